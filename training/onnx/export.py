"""Export an image classifier to ONNX in the layout the serving path expects.

The exported graph takes ``image``: uint8, NHWC, shape (N, H, W, C), and does
the cast, normalisation and NCHW transpose itself, so only raw pixels travel on
the wire. It returns ``logits`` (N, classes) and ``embedding`` (N, features),
the pooled features before the classifier head (for similar-product search).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

LOG = logging.getLogger("onnx_export")

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")


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
