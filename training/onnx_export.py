"""Re-export a trained run to ONNX as a new run directory (library: :mod:`training.onnx.export`).

    python -m training.onnx_export --run-dir runs/fashion/effnet --flip-tta --output-run-dir runs/fashion/effnet_flip
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

from training.nets.models import load_checkpoint
from training.onnx import export as onnx_export
from training.onnx.export import export, store_weights_as_float16
from training.repository.recipe import spec_from_dict

LOG = logging.getLogger("onnx_export")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(onnx_export.__doc__ or "") + """
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
