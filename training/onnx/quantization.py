"""INT8 building blocks on ONNX graphs: calibration reader, VNNI detection, QDQ activation noise (SQNR), VPMADDUBSW
pair saturation of GEMM weights, and the node lists ``quantize_static`` takes (used by :mod:`training.quantize`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from training.onnx.export import INPUT_NAME


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
