"""Triton Python model: numerically stable softmax over a classifier's logits, one response per request.

Shared by every classification ensemble (its last step). Triton loads a Python model file on its own, with only
its own folder and the backend's ``triton_python_backend_utils`` to import from (from object storage each model
is fetched into a directory of its own), so it cannot import training's softmax
(``training.report.metrics.softmax``, in the training image only) nor the fused combine step's
(``fashion_fused_combine/1/model.py``, which ``training.publish --fuse`` copies alone into every fused model).
This file keeps the one served copy for single models; ``tests/training/test_training_contract.py`` runs
``execute`` and checks it against training's softmax, large logits included.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (the max is subtracted before ``exp``)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("probabilities", softmax(logits).astype(np.float32))]))
        return responses
