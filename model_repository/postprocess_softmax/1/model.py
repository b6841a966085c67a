"""Numerically stable softmax over the last axis, one response per request."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32)
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("probabilities", probabilities.astype(np.float32))]))
        return responses
