"""INT8 post-training static quantization with ONNX Runtime, measured against FP32 in one run.

    python -m training.quantize --run-dir runs/fashion_effnet

``quant_pre_process`` first (shape inference + graph optimisation; without it a
per-channel QDQ model can run slower than FP32), then ``quantize_static`` in
QDQ format with per-channel INT8 weights, calibrated on training images that
went through the model's recipe. On x86 CPUs without VNNI, ONNX Runtime
computes uint8×int8 products with VPMADDUBSW, whose 16-bit sums saturate:
there the weights are quantized to 7 bits (``--reduce-range auto``), which
cut EfficientNet-Lite0's INT8 loss from 3.9 to 1.2-1.5 pt on this machine
(uint8 weights, which do not saturate, lost 0.4 pt but ran 5× slower). Accuracy on the test set and CPU throughput
of both models are measured side by side (alternating rounds on the same
thread count). Writes ``model.int8.onnx`` and ``quantization.json`` into the
run directory; ``training.evaluate --model-file model.int8.onnx`` gives the
INT8 model's full report.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from training import inference
from training.datasets import FASHION_MNIST, load_dataset, source_labels, stratified_split, stratified_subset
from training.evaluate import load_run
from training.metrics import top_k_accuracy
from training.onnx_export import INPUT_NAME
from training.recipe import spec_from_dict

LOG = logging.getLogger("quantize")


class ImageReader(CalibrationDataReader):
    """Feeds uint8 (N, H, W, C) calibration images in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (u8×s8 dot products without 16-bit intermediate saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="output directory of training.train")
    parser.add_argument("--calibration-count", type=int, default=512,
                        help="training images used for calibration (default: %(default)s)")
    parser.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                        help="(default: %(default)s)")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default: per channel)")
    parser.add_argument("--weight-type", choices=["int8", "uint8"], default="int8",
                        help="int8 weights (U8S8) or uint8 (U8U8: slower, but x86 CPUs without VNNI compute U8S8 "
                             "with VPMADDUBSW, which can saturate) (default: %(default)s)")
    parser.add_argument("--activation-type", choices=["uint8", "int8"], default="uint8",
                        help="activation type (default: %(default)s)")
    parser.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                        help="7-bit weights, the cure for VPMADDUBSW saturation on x86 CPUs without VNNI; auto = on "
                             "where this CPU lacks VNNI (measured here: -3.9 pt 8-bit vs -1.2 pt 7-bit on "
                             "EfficientNet-Lite0) (default: %(default)s)")
    parser.add_argument("--op-types", default="",
                        help="operator types to quantize; empty = every type ONNX Runtime can (default: %(default)s)")
    parser.add_argument("--limit-test", type=int, default=0,
                        help="test images to score; 0 = all (default: %(default)s)")
    parser.add_argument("--test-data", default="", help="test set for folder / CSV runs (default: Fashion-MNIST's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads for the timing (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes to time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per timing round (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> dict:
    run = load_run(args.run_dir)
    meta = run["meta"]
    spec = spec_from_dict(meta["spec"])
    classes = tuple(meta["classes"])
    fp32_path = args.run_dir / "model.onnx"
    pre_path = args.run_dir / "model.pre.onnx"
    int8_path = args.run_dir / "model.int8.onnx"

    source = meta.get("data", FASHION_MNIST)
    labels, _ = source_labels(source, "train", classes)
    train_idx, _ = stratified_split(labels, 0.1, 0)
    pick = train_idx[stratified_subset(labels[train_idx], args.calibration_count, 1)]
    calibration = load_dataset(source, spec, split="train", classes=classes, indices=pick).images

    vnni = cpu_has_vnni()
    reduce_range = args.reduce_range == "on" or (args.reduce_range == "auto" and not vnni)
    LOG.info("weights: %s-bit%s", 7 if reduce_range else 8,
             "" if args.reduce_range != "auto" else f" (auto: this CPU {'has' if vnni else 'lacks'} VNNI)")
    start = time.perf_counter()
    quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=False)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.calibration_method]
    quantize_static(str(pre_path), str(int8_path), ImageReader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=not args.per_tensor, reduce_range=reduce_range,
                    weight_type=QuantType.QInt8 if args.weight_type == "int8" else QuantType.QUInt8,
                    activation_type=QuantType.QUInt8 if args.activation_type == "uint8" else QuantType.QInt8,
                    calibrate_method=method,
                    op_types_to_quantize=[t for t in args.op_types.split(",") if t] or None)
    quantize_s = time.perf_counter() - start
    LOG.info("quantized %s -> %s in %.1f s", fp32_path, int8_path, quantize_s)

    test_source = args.test_data or source
    test_labels, _ = source_labels(test_source, "test", classes)
    test = load_dataset(test_source, spec, split="test", classes=classes,
                        indices=stratified_subset(test_labels, args.limit_test, 0))
    sessions = {"fp32": inference.session(fp32_path, args.threads), "int8": inference.session(int8_path, args.threads)}
    accuracy = {name: top_k_accuracy(inference.logits(sess, test.images), test.labels, 1)
                for name, sess in sessions.items()}
    timing = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        timing[f"batch_{batch_size}"] = inference.interleaved_throughput(sessions, test.images, batch_size,
                                                                          args.rounds, args.seconds)
    result = {
        "fp32_top1": accuracy["fp32"], "int8_top1": accuracy["int8"],
        "top1_change_pt": 100 * (accuracy["int8"] - accuracy["fp32"]),
        "test_images": len(test), "calibration_images": len(calibration),
        "calibration_method": args.calibration_method, "per_channel": not args.per_tensor,
        "weight_bits": 7 if reduce_range else 8, "weight_type": args.weight_type,
        "activation_type": args.activation_type, "cpu_vnni": vnni,
        "op_types": args.op_types,
        "threads": args.threads, "img_s": timing,
        "speedup": {k: v["int8"] / v["fp32"] for k, v in timing.items()},
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
        "quantize_s": round(quantize_s, 1),
    }
    result["markdown"] = [
        f"INT8 static quantization (ONNX Runtime QDQ of {args.op_types or 'all supported ops'}, "
        f"per-channel={result['per_channel']}, {result['weight_bits']}-bit {args.weight_type} weights, "
        f"{args.activation_type} activations, CPU {'with' if result['cpu_vnni'] else 'without'} VNNI, "
        f"{args.calibration_method} calibration on {len(calibration)} training images, quant_pre_process first), "
        f"measured side by side with FP32 on {len(test)} test images, {args.threads} thread(s):", "",
        "| | FP32 | INT8 | change |", "| --- | ---: | ---: | ---: |",
        f"| top-1 | {100 * accuracy['fp32']:.2f} % | {100 * accuracy['int8']:.2f} % | "
        f"{result['top1_change_pt']:+.2f} pt |",
        *(f"| {k.replace('_', ' ')} img/s | {v['fp32']:.0f} | {v['int8']:.0f} | ×{v['int8'] / v['fp32']:.2f} |"
          for k, v in timing.items()),
        f"| file size | {result['size_bytes']['fp32'] / 1e6:.2f} MB | {result['size_bytes']['int8'] / 1e6:.2f} MB | |",
    ]
    (args.run_dir / "quantization.json").write_text(json.dumps(result, indent=2))
    LOG.info("top-1 fp32 %.2f%% int8 %.2f%%; speed-up %s", 100 * accuracy["fp32"], 100 * accuracy["int8"],
             {k: round(v, 2) for k, v in result["speedup"].items()})
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
