"""Triton Python model: weighted mean of several classifiers' softmax probabilities.

The one copy of this combine step: ``python -m training.publish --fuse`` copies this file into
``<fused>_combine/1/model.py``. Inputs ``logits_0 .. logits_{n-1}`` (same class order), output
``probabilities``; the weights come from the config parameter ``weights`` (comma-separated, default equal).
Self-contained (Triton loads it on its own); ``tests/training/test_training_contract.py`` checks that its
softmax agrees with training's (``training.report.metrics.softmax``).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        given = config.get("parameters", {}).get("weights", {}).get("string_value", "")
        weights = [float(w) for w in given.split(",")] if given else [1.0] * len(self.inputs)
        if len(weights) != len(self.inputs):
            raise pb_utils.TritonModelException(f"{len(weights)} weights for {len(self.inputs)} inputs")
        self.weights = np.asarray(weights, dtype=np.float32) / float(sum(weights))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            fused = sum(
                weight * softmax(pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.float32))
                for weight, name in zip(self.weights, self.inputs, strict=True))
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("probabilities", np.asarray(fused, dtype=np.float32))]))
        return responses
