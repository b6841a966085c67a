"""Triton Python model for the rollout tests: passes logits through after sleeping ``delay_seconds`` per batch.

Put between a classifier and the softmax in a candidate ensemble, it makes a candidate that agrees with the
serving version but is slow (tests/lifecycle/test_rollout_stack.py copies this file into a model repository).
"""
import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.delay_s = float(config.get("parameters", {}).get("delay_seconds", {}).get("string_value", "0.3"))

    def execute(self, requests: list) -> list:
        time.sleep(self.delay_s)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("logits_out", pb_utils.get_input_tensor_by_name(request, "logits_in").as_numpy())])
            for request in requests]
