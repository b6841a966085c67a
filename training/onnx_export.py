"""Export an image classifier to ONNX in the layout the serving path expects.

The exported graph takes ``image``: uint8, NHWC, shape (N, H, W, C), and does
the cast, normalisation and NCHW transpose itself, so only raw pixels travel on
the wire. It returns ``logits`` (N, classes) and ``embedding`` (N, features),
the pooled features before the classifier head (for similar-product search).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

LOG = logging.getLogger("onnx_export")

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")


class UInt8NHWCWrapper(nn.Module):
    """Wraps ``features`` + ``head`` so that the graph starts from uint8 NHWC pixels.

    ``(x - mean) / std`` maps float pixels in [0, 255] to the network's input range;
    EfficientNet-Lite uses ``(x - 127) / 128``. Optionally the graph also resizes
    the image (bilinear) to ``net_size`` and repeats a grayscale channel to
    ``net_channels``, so a small grayscale input can feed an ImageNet backbone
    while only the small image travels on the wire. ``stretch_contrast`` scales
    each image so its brightest pixel is 255 (a product's contrast against its
    background then no longer depends on its colour or the photo's exposure).
    ``flip_tta`` (inference only) averages the pooled features of the image and
    its mirror image: test-time augmentation inside the graph, at twice the
    backbone's cost; logits and embedding are then those of the pair.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        head: nn.Module,
        mean: float = 127.0,
        std: float = 128.0,
        in_channels: int = 3,
        net_size: int | None = None,
        net_channels: int | None = None,
        stretch_contrast: bool = False,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.mean = mean
        self.std = std
        self.in_channels = in_channels
        self.net_size = net_size
        self.net_channels = net_channels
        self.stretch_contrast = stretch_contrast
        self.flip_tta = flip_tta

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float()
        if self.stretch_contrast:
            x = x * (255.0 / x.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1.0))
        if self.net_size is not None and tuple(x.shape[2:]) != (self.net_size, self.net_size):
            x = nn.functional.interpolate(x, size=(self.net_size, self.net_size), mode="bilinear",
                                          align_corners=False)
        x = (x - self.mean) / self.std
        if self.net_channels is not None and self.net_channels != self.in_channels:
            x = x.expand(-1, self.net_channels, -1, -1)
        embedding = self.features(x)
        if self.flip_tta and not self.training:
            # The head is linear (dropout is off in eval), so the head of the mean is the mean of the logits.
            embedding = (embedding + self.features(x.flip(3))) / 2
        logits = self.head(embedding)
        return logits, embedding


def export(
    model: nn.Module,
    path: Path,
    height: int,
    width: int,
    channels: int,
    opset: int = 17,
) -> float:
    """Export ``model`` (a :class:`UInt8NHWCWrapper`) to ``path`` with a dynamic batch axis and check it:
    ``onnx.checker`` and parity with PyTorch. Returns the largest ONNX Runtime vs PyTorch difference."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    sample = torch.randint(0, 256, (2, height, width, channels), dtype=torch.uint8)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (sample,),
        str(tmp),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
        opset_version=opset,
        dynamo=False,
    )
    onnx_model = onnx.load(str(tmp))
    onnx.checker.check_model(onnx_model)
    tmp.replace(path)
    max_diff = check_parity(model, path, height, width, channels)
    LOG.info("exported %s (ONNX Runtime vs PyTorch max |diff| %.2e)", path, max_diff)
    return max_diff


def check_parity(model: nn.Module, path: Path, height: int, width: int, channels: int, batch: int = 3) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime logits on random pixels."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(batch, height, width, channels), dtype=np.uint8)
    with torch.no_grad():
        expected_logits, expected_embedding = model(torch.from_numpy(pixels))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels})
    diff = max(
        float(np.abs(logits - expected_logits.numpy()).max()),
        float(np.abs(embedding - expected_embedding.numpy()).max()),
    )
    if diff > 1e-3:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.2e} (> 1e-3)")
    return diff


def store_weights_as_float16(source: Path, target: Path, min_elements: int = 1024) -> Path:
    """Write ``source`` with its large float32 weights stored as float16 and cast back to float32 in the graph.

    The file halves in size; ONNX Runtime folds the casts when it loads the model, so it computes in float32 on
    weights rounded to float16 (relative error <= 2^-11). The accuracy of the stored file is measured like any
    other model file (``training.evaluate --model-file``).
    """
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != TensorProto.FLOAT or int(np.prod(initializer.dims)) < min_elements:
            continue
        weights = numpy_helper.to_array(initializer)
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(weights.astype(np.float16), f"{name}__float16"))
        casts.append(helper.make_node("Cast", [f"{name}__float16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__to_float32"))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    LOG.info("%s: %d weights stored as float16, %.1f -> %.1f MB", target, len(casts), source.stat().st_size / 1e6,
             target.stat().st_size / 1e6)
    return target


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__ + """
Re-export a trained run as a new run directory, e.g. with test-time flip averaging in the graph:

    python -m training.onnx_export --run-dir runs/fashion/effnet --flip-tta --output-run-dir runs/fashion/effnet_flip

The new directory gets ``model.onnx``, the source's ``run.json`` (with an
``export`` entry saying how it was derived) and its curves, so
``training.evaluate``, ``training.quantize`` and ``training.publish`` treat it
like any trained run.
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="output directory of training.train")
    parser.add_argument("--output-run-dir", type=Path, required=True, help="run directory to write")
    parser.add_argument("--flip-tta", action="store_true",
                        help="average the features of the image and its mirror image inside the graph")
    parser.add_argument("--opset", type=int, default=17, help="(default: %(default)s)")
    parser.add_argument("--float16-weights", action="store_true",
                        help="also write model.fp16w.onnx: float32 compute on weights stored as float16 (half size)")
    return parser


def main(args: argparse.Namespace) -> dict:
    import json
    import shlex
    import shutil
    import sys

    from training.models import load_checkpoint
    from training.recipe import spec_from_dict

    model, checkpoint = load_checkpoint(args.run_dir / "checkpoint.pth")
    model.flip_tta = args.flip_tta
    spec = spec_from_dict(checkpoint["meta"]["spec"])
    out: Path = args.output_run_dir
    out.mkdir(parents=True, exist_ok=True)
    max_diff = export(model, out / "model.onnx", spec.height, spec.width, spec.channels, args.opset)
    run = json.loads((args.run_dir / "run.json").read_text())
    run["export"] = {"from_run": str(args.run_dir), "flip_tta": args.flip_tta,
                     "command": "python -m training.onnx_export " + shlex.join(sys.argv[1:]),
                     "onnx_parity_max_abs_diff": max_diff}
    run["meta"]["macs"] *= 2 if args.flip_tta else 1  # the backbone runs twice
    (out / "run.json").write_text(json.dumps(run, indent=2))
    if (args.run_dir / "curves.png").exists():
        shutil.copyfile(args.run_dir / "curves.png", out / "curves.png")
    if args.float16_weights:
        store_weights_as_float16(out / "model.onnx", out / "model.fp16w.onnx")
    LOG.info("wrote %s: %s", out, run["export"])
    return run["export"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
