"""INT8 post-training static quantization with ONNX Runtime, measured against FP32 in one run.

    python -m training.quantize --run-dir runs/fashion_effnet

``quant_pre_process`` first (shape inference + graph optimisation; without it a
per-channel QDQ model can run slower than FP32), then ``quantize_static`` in
QDQ format with per-channel INT8 weights, calibrated on training images that
went through the model's recipe. On x86 CPUs without VNNI, ONNX Runtime
computes uint8×int8 products with VPMADDUBSW, whose 16-bit pair sums saturate:
there (``--reduce-range auto``) weights get 7 bits, except where saturation
cannot happen: depthwise convolutions (computed without VPMADDUBSW) and GEMM
operators whose 8-bit pair sums never left int16 on the calibration images
(checked in numpy from the calibrated activation codes). On EfficientNet-Lite0
(this machine, full test set): 8-bit everywhere -3.36 pt, 7-bit everywhere
-1.33 pt, this allocation -1.05 pt; uint8 weights (no saturation) lost 0.4 pt
but ran 5× slower. ``quantization.json`` also lists each activation's
quantization SQNR (``--exclude-worst N`` keeps the noisiest in float). Accuracy on the test set and CPU throughput
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from training.data.datasets import (
    FASHION_MNIST,
    SPLIT_DEFAULTS,
    load_dataset,
    run_split_of,
    source_labels,
    stratified_subset,
)
from training.onnx import inference
from training.onnx.quantization import (
    ImageReader,
    activation_sqnr,
    collect_activations,
    cpu_has_vnni,
    depthwise_weights,
    float_nodes,
    pair_saturation,
)
from training.report.metrics import top_k_accuracy
from training.report.runs import load_run
from training.repository.recipe import spec_from_dict

LOG = logging.getLogger("quantize")


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
    parser.add_argument("--depthwise-8bit", action=argparse.BooleanOptionalAction, default=True,
                        help="keep depthwise conv weights 8-bit when the range is reduced: ONNX Runtime computes "
                             "depthwise convs without VPMADDUBSW, so they cannot saturate (measured on "
                             "EfficientNet-Lite0, 2 000 test images: -1.50 pt all 7-bit, -1.15 pt with 8-bit "
                             "depthwise) (default: %(default)s)")
    parser.add_argument("--saturation-tolerance", type=float, default=0.0,
                        help="with reduced range, give 8-bit weights to the GEMM operators (1x1 convs, Gemm) whose "
                             "8-bit VPMADDUBSW pair sums leave int16 for at most this fraction of pairs on the "
                             "calibration images; negative = none (default: %(default)s)")
    parser.add_argument("--op-types", default="",
                        help="operator types to quantize; empty = every type ONNX Runtime can (default: %(default)s)")
    parser.add_argument("--exclude-worst", type=int, default=0,
                        help="keep in float the operators that read the N activations with the worst quantization "
                             "noise (lowest SQNR, measured on calibration images); 0 = quantize all "
                             "(default: %(default)s)")
    parser.add_argument("--limit-test", type=int, default=0,
                        help="test images to score; 0 = all (default: %(default)s)")
    parser.add_argument("--test-data", default="", help="test set for folder / CSV runs (default: Fashion-MNIST's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads for the timing (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes to time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per timing round (default: %(default)s)")
    return parser


@dataclass
class Allocation:
    """Which weights keep 8 bits and which operators stay float, with the measurements that decided it."""

    reduce_range: bool
    depthwise: list[str] = field(default_factory=list)
    safe: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    saturation: dict[str, float] = field(default_factory=dict)
    sqnr: dict[str, float] = field(default_factory=dict)

    @property
    def noisiest(self) -> list[str]:
        return sorted(self.sqnr, key=self.sqnr.__getitem__)


def calibration_images(run: dict, args: argparse.Namespace) -> np.ndarray:
    """Training images of the run's own training split, never its validation images (training.train's split
    defaults for a run that recorded no arguments), through the model's recipe."""
    meta = run["meta"]
    classes = tuple(meta["classes"])
    source = meta.get("data", FASHION_MNIST)
    labels, _ = source_labels(source, "train", classes)
    train_idx, _ = run_split_of(labels, {**SPLIT_DEFAULTS, **run.get("args", {})})
    pick = train_idx[stratified_subset(labels[train_idx], args.calibration_count, 1)]
    return load_dataset(source, spec_from_dict(meta["spec"]), split="train", classes=classes, indices=pick).images


def use_reduced_range(args: argparse.Namespace, vnni: bool) -> bool:
    reduce_range: bool = args.reduce_range == "on" or (args.reduce_range == "auto" and not vnni)
    LOG.info("weights: %s-bit%s", 7 if reduce_range else 8,
             "" if args.reduce_range != "auto" else f" (auto: this CPU {'has' if vnni else 'lacks'} VNNI)")
    return reduce_range


def quantize_once(args: argparse.Namespace, pre_path: Path, int8_path: Path, calibration: np.ndarray,
                  reduce_range: bool, eight_bit: list[str], exclude: list[str]) -> None:
    """One ``quantize_static`` call: QDQ, ``eight_bit`` weights exempt from the reduced range, ``exclude`` float."""
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.calibration_method]
    quantize_static(str(pre_path), str(int8_path), ImageReader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=not args.per_tensor, reduce_range=reduce_range,
                    weight_type=QuantType.QInt8 if args.weight_type == "int8" else QuantType.QUInt8,
                    activation_type=QuantType.QUInt8 if args.activation_type == "uint8" else QuantType.QInt8,
                    calibrate_method=method, nodes_to_exclude=exclude,
                    extra_options={"TensorQuantOverrides": {w: [{"axis": 0, "reduce_range": False}]
                                                            for w in eight_bit}},
                    op_types_to_quantize=[t for t in args.op_types.split(",") if t] or None)


def quantize_model(args: argparse.Namespace, pre_path: Path, int8_path: Path, calibration: np.ndarray,
                   reduce_range: bool) -> Allocation:
    """Quantize once, measure the result (activation SQNR, pair saturation) and quantize again where that
    measurement frees weights to 8 bits or keeps noisy operators in float."""
    pre = onnx.load(str(pre_path))
    plan = Allocation(reduce_range, depthwise=depthwise_weights(pre) if reduce_range and args.depthwise_8bit else [])
    if plan.depthwise:
        LOG.info("depthwise weights: 8-bit (%d convolutions)", len(plan.depthwise))
    quantize_once(args, pre_path, int8_path, calibration, reduce_range, plan.depthwise, [])
    activations = collect_activations(int8_path, calibration[:64], args.run_dir)
    plan.sqnr = activation_sqnr(activations)
    plan.saturation = pair_saturation(int8_path, pre, activations) if reduce_range else {}
    del activations
    plan.safe = [w for w, fraction in plan.saturation.items() if fraction <= args.saturation_tolerance]
    if plan.safe:
        LOG.info("8-bit weights for %d of %d GEMM operators: at most a fraction %g of their VPMADDUBSW pair sums "
                 "leaves int16 on the calibration images", len(plan.safe), len(plan.saturation),
                 args.saturation_tolerance)
    worst = plan.noisiest[:args.exclude_worst]
    plan.excluded = float_nodes(pre, worst) if worst else []
    if plan.excluded:
        LOG.info("keeping %d operators in float, for %s", len(plan.excluded),
                 ", ".join(f"{t} ({plan.sqnr[t]:.1f} dB)" for t in worst))
    if plan.safe or plan.excluded:
        quantize_once(args, pre_path, int8_path, calibration, reduce_range, plan.depthwise + plan.safe, plan.excluded)
    return plan


def measure_side_by_side(args: argparse.Namespace, run: dict, models: dict[str, Path]
                         ) -> tuple[dict[str, float], dict[str, dict[str, float]], int]:
    """Top-1 on the test set and images/s (alternating rounds) of each model: (accuracy, timing, test images)."""
    meta = run["meta"]
    classes = tuple(meta["classes"])
    test_source = args.test_data or meta.get("data", FASHION_MNIST)
    test_labels, _ = source_labels(test_source, "test", classes)
    test = load_dataset(test_source, spec_from_dict(meta["spec"]), split="test", classes=classes,
                        indices=stratified_subset(test_labels, args.limit_test, 0))
    sessions = {name: inference.session(path, args.threads) for name, path in models.items()}
    accuracy = {name: top_k_accuracy(inference.logits(sess, test.images), test.labels, 1)
                for name, sess in sessions.items()}
    timing = {f"batch_{batch_size}": inference.interleaved_throughput(sessions, test.images, batch_size,
                                                                       args.rounds, args.seconds)
              for batch_size in (int(b) for b in args.batch_sizes.split(","))}
    return accuracy, timing, len(test)


def quantization_markdown(args: argparse.Namespace, result: dict, plan: Allocation) -> list[str]:
    eight_bit = len(plan.depthwise) + len(plan.safe)
    timing = result["img_s"]
    return [
        f"INT8 static quantization (ONNX Runtime QDQ of {args.op_types or 'all supported ops'}, "
        f"per-channel={result['per_channel']}, {result['weight_bits']}-bit {args.weight_type} weights"
        f"{f' ({eight_bit} 8-bit: depthwise and saturation-free)' if eight_bit else ''}, "
        f"{args.activation_type} activations, CPU {'with' if result['cpu_vnni'] else 'without'} VNNI, "
        f"{args.calibration_method} calibration on {result['calibration_images']} training images, "
        f"quant_pre_process first"
        f"{f', {len(plan.excluded)} operators kept in float' if plan.excluded else ''}), "
        f"measured side by side with FP32 on {result['test_images']} test images, {args.threads} thread(s):", "",
        "| | FP32 | INT8 | change |", "| --- | ---: | ---: | ---: |",
        f"| top-1 | {100 * result['fp32_top1']:.2f} % | {100 * result['int8_top1']:.2f} % | "
        f"{result['top1_change_pt']:+.2f} pt |",
        *(f"| {k.replace('_', ' ')} img/s | {v['fp32']:.0f} | {v['int8']:.0f} | ×{v['int8'] / v['fp32']:.2f} |"
          for k, v in timing.items()),
        f"| file size | {result['size_bytes']['fp32'] / 1e6:.2f} MB | {result['size_bytes']['int8'] / 1e6:.2f} MB | |",
    ]


def main(args: argparse.Namespace) -> dict:
    run = load_run(args.run_dir)
    fp32_path = args.run_dir / "model.onnx"
    pre_path = args.run_dir / "model.pre.onnx"
    int8_path = args.run_dir / "model.int8.onnx"
    calibration = calibration_images(run, args)
    vnni = cpu_has_vnni()
    reduce_range = use_reduced_range(args, vnni)

    start = time.perf_counter()
    quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=False)
    plan = quantize_model(args, pre_path, int8_path, calibration, reduce_range)
    quantize_s = time.perf_counter() - start
    LOG.info("quantized %s -> %s in %.1f s", fp32_path, int8_path, quantize_s)

    accuracy, timing, test_images = measure_side_by_side(args, run, {"fp32": fp32_path, "int8": int8_path})
    result = {
        "fp32_top1": accuracy["fp32"], "int8_top1": accuracy["int8"],
        "top1_change_pt": 100 * (accuracy["int8"] - accuracy["fp32"]),
        "test_images": test_images, "calibration_images": len(calibration),
        "calibration_method": args.calibration_method, "per_channel": not args.per_tensor,
        "weight_bits": 7 if reduce_range else 8, "weight_type": args.weight_type,
        "depthwise_8bit_weights": len(plan.depthwise), "safe_8bit_weights": len(plan.safe),
        "saturation_tolerance": args.saturation_tolerance,
        "saturated_pair_fraction": {w: float(f"{f:.3g}") for w, f in plan.saturation.items()},
        "activation_type": args.activation_type, "cpu_vnni": vnni,
        "op_types": args.op_types,
        "excluded_nodes": plan.excluded,
        "worst_activations_sqnr_db": {t: round(plan.sqnr[t], 2) for t in plan.noisiest[:10]},
        "threads": args.threads, "img_s": timing,
        "speedup": {k: v["int8"] / v["fp32"] for k, v in timing.items()},
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
        "quantize_s": round(quantize_s, 1),
    }
    result["markdown"] = quantization_markdown(args, result, plan)
    (args.run_dir / "quantization.json").write_text(json.dumps(result, indent=2))
    LOG.info("top-1 fp32 %.2f%% int8 %.2f%%; speed-up %s", 100 * accuracy["fp32"], 100 * accuracy["int8"],
             {k: round(v, 2) for k, v in result["speedup"].items()})
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
