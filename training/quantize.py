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
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from training import inference
from training.datasets import (
    FASHION_MNIST,
    SPLIT_DEFAULTS,
    load_dataset,
    run_split_of,
    source_labels,
    stratified_subset,
)
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


def is_depthwise(node: onnx.NodeProto) -> bool:
    """A grouped (depthwise) convolution: ONNX Runtime computes it channel by channel, not as one GEMM."""
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def collect_activations(int8_path: Path, images: np.ndarray, work_dir: Path) -> dict[str, list[np.ndarray]]:
    """Every tensor of a QDQ model on ``images`` (flattened per batch), with ONNX Runtime's QDQ debugger."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    augmented = work_dir / "model.int8.debug.onnx"
    debug.modify_model_output_intermediate_tensors(str(int8_path), str(augmented))
    try:
        return debug.collect_activations(str(augmented), ImageReader(images))
    finally:
        augmented.unlink(missing_ok=True)


def activation_sqnr(activations: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of every quantized activation of a QDQ model: the tensor before its
    QuantizeLinear (clipped to the representable range) against the same tensor after its DequantizeLinear.
    Low values mark activations whose range is wide for their typical size (outliers)."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    sqnr = {}
    for name, pair in debug.create_activation_matching(activations).items():
        if not pair.get("pre_qdq") or not pair.get("post_qdq"):
            continue
        pre, post = np.concatenate([a.ravel() for a in pair["pre_qdq"]]), np.concatenate(
            [a.ravel() for a in pair["post_qdq"]])
        # Rounding noise only: where the quantizer folded a ReLU into the zero point, the clipped part is intended.
        sqnr[name] = debug.compute_signal_to_quantization_noice_ratio(np.clip(pre, post.min(), post.max()), post)
    return sqnr


def pair_saturation(int8_path: Path, pre: onnx.ModelProto, activations: dict[str, list[np.ndarray]],
                    max_elements: int = 1 << 22) -> dict[str, float]:
    """For every weight that ONNX Runtime multiplies as a GEMM (1×1 convolutions, Gemm, MatMul): the fraction of
    VPMADDUBSW pair sums (uint8 activation codes × int8 weight codes, adjacent input channels added in pairs) that
    would leave int16 if the weight were quantized to 8 bits, over the activations seen (float weight name ->
    fraction). A weight whose pairs never saturate can keep 8 bits on a CPU without VNNI."""
    model = onnx.load(str(int8_path))
    quantized = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {i.name: numpy_helper.to_array(i) for i in pre.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
              for v in [*pre.graph.value_info, *pre.graph.input, *pre.graph.output]}
    pre_nodes = {n.name: n for n in pre.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    result = {}
    for node in model.graph.node:
        original = pre_nodes.get(node.name)
        if node.op_type not in ("Conv", "Gemm", "MatMul") or original is None or original.input[1] not in weights:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in activations or q.input[0] not in shapes:
            continue
        attrs = {a.name: a for a in node.attribute}
        weight = weights[original.input[1]]
        if node.op_type == "Conv":
            if weight.shape[2:] != (1, 1) or is_depthwise(node):
                continue  # k×k and depthwise convolutions are not one plain GEMM over channels
            matrix = weight.reshape(weight.shape[0], -1)
        else:
            transposed = node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i == 1
            matrix = weight if transposed else weight.T
        x = np.concatenate([a.reshape(-1, *shapes[q.input[0]]) for a in activations[q.input[0]]])
        x = np.moveaxis(x, 1, -1) if node.op_type == "Conv" else x
        codes = np.clip(np.round(x.reshape(-1, matrix.shape[1]) / float(quantized[q.input[1]]))
                        + int(quantized[q.input[2]]), 0, 255).astype(np.int32)
        scale = np.abs(matrix).max(axis=1, keepdims=True) / 127
        w8 = np.round(matrix / np.where(scale > 0, scale, 1)).astype(np.int32)
        pairs = matrix.shape[1] // 2
        even, odd = w8[:, 0:2 * pairs:2].T, w8[:, 1:2 * pairs:2].T  # (pairs, out)
        rows = max(1, max_elements // max(1, pairs * w8.shape[0]))
        saturated = 0
        for first in range(0, len(codes), rows):
            a = codes[first:first + rows]
            sums = a[:, 0:2 * pairs:2, None] * even[None] + a[:, 1:2 * pairs:2, None] * odd[None]
            saturated += int(np.count_nonzero((sums > 32767) | (sums < -32768)))
        result[original.input[1]] = saturated / max(1, len(codes) * pairs * w8.shape[0])
    return result


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """Weight initializers of the grouped (depthwise) convolutions of ``model``."""
    initializers = {i.name for i in model.graph.initializer}
    return [n.input[1] for n in model.graph.node if is_depthwise(n) and n.input[1] in initializers]


def float_nodes(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """Names of the nodes of ``model`` to exclude from quantization so that ``tensors`` stay float: their
    readers, or for a tensor nobody reads (a graph output) its producer."""
    nodes = model.graph.node
    names = set()
    for tensor in tensors:
        readers = [n.name for n in nodes if tensor in n.input]
        names.update(readers or [n.name for n in nodes if tensor in n.output])
    return [n.name for n in nodes if n.name in names]


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
    # Calibrate on the run's own training split, never on its validation images (training.train's defaults for a
    # run that recorded no arguments).
    train_idx, _ = run_split_of(labels, {**SPLIT_DEFAULTS, **run.get("args", {})})
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

    pre = onnx.load(str(pre_path))
    depthwise = depthwise_weights(pre) if reduce_range and args.depthwise_8bit else []
    if depthwise:
        LOG.info("depthwise weights: 8-bit (%d convolutions)", len(depthwise))

    def quantize(eight_bit: list[str], exclude: list[str]) -> None:
        quantize_static(str(pre_path), str(int8_path), ImageReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=not args.per_tensor, reduce_range=reduce_range,
                        weight_type=QuantType.QInt8 if args.weight_type == "int8" else QuantType.QUInt8,
                        activation_type=QuantType.QUInt8 if args.activation_type == "uint8" else QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=exclude,
                        extra_options={"TensorQuantOverrides": {w: [{"axis": 0, "reduce_range": False}]
                                                                for w in eight_bit}},
                        op_types_to_quantize=[t for t in args.op_types.split(",") if t] or None)

    quantize(depthwise, [])
    activations = collect_activations(int8_path, calibration[:64], args.run_dir)
    sqnr = activation_sqnr(activations)
    saturation = pair_saturation(int8_path, pre, activations) if reduce_range else {}
    del activations
    safe = [w for w, fraction in saturation.items() if fraction <= args.saturation_tolerance]
    if safe:
        LOG.info("8-bit weights for %d of %d GEMM operators: at most a fraction %g of their VPMADDUBSW pair sums "
                 "leaves int16 on the calibration images", len(safe), len(saturation), args.saturation_tolerance)
    noisiest = sorted(sqnr, key=sqnr.__getitem__)
    worst = noisiest[:args.exclude_worst]
    excluded = float_nodes(pre, worst) if worst else []
    if excluded:
        LOG.info("keeping %d operators in float, for %s", len(excluded),
                 ", ".join(f"{t} ({sqnr[t]:.1f} dB)" for t in worst))
    if safe or excluded:
        quantize(depthwise + safe, excluded)
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
        "depthwise_8bit_weights": len(depthwise), "safe_8bit_weights": len(safe),
        "saturation_tolerance": args.saturation_tolerance,
        "saturated_pair_fraction": {w: float(f"{f:.3g}") for w, f in saturation.items()},
        "activation_type": args.activation_type, "cpu_vnni": vnni,
        "op_types": args.op_types,
        "excluded_nodes": excluded,
        "worst_activations_sqnr_db": {t: round(sqnr[t], 2) for t in noisiest[:10]},
        "threads": args.threads, "img_s": timing,
        "speedup": {k: v["int8"] / v["fp32"] for k, v in timing.items()},
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
        "quantize_s": round(quantize_s, 1),
    }
    result["markdown"] = [
        f"INT8 static quantization (ONNX Runtime QDQ of {args.op_types or 'all supported ops'}, "
        f"per-channel={result['per_channel']}, {result['weight_bits']}-bit {args.weight_type} weights"
        f"{f' ({len(depthwise) + len(safe)} 8-bit: depthwise and saturation-free)' if depthwise or safe else ''}, "
        f"{args.activation_type} activations, CPU {'with' if result['cpu_vnni'] else 'without'} VNNI, "
        f"{args.calibration_method} calibration on {len(calibration)} training images, quant_pre_process first"
        f"{f', {len(excluded)} operators kept in float' if excluded else ''}), "
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
