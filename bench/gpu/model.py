"""Triton Python-backend model: EfficientNet-Lite0 in torch on the GPU (``make``-free GPU benchmark).

Laid into a model repository by ``bench/gpu_bench.sh``. Input ``image`` UINT8 [224, 224, 3],
output ``probabilities`` FP32 [1000]; every request of a dynamic batch runs in one forward
pass. Config parameter ``precision`` is ``fp32`` or ``fp16``. The bundle directory (weights,
model code) comes from the environment variable ``SHOPVISION_GPU_BUNDLE``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        bundle = Path(os.environ["SHOPVISION_GPU_BUNDLE"])
        sys.path.insert(0, str(bundle / "py"))
        from lite0 import build

        device_id = int(args.get("model_instance_device_id", "0") or 0)
        self.device = f"cuda:{device_id}" if args.get("model_instance_kind") == "GPU" else "cuda:0"
        self.half = params.get("precision", "fp32") == "fp16"
        torch.backends.cudnn.benchmark = True
        self.model = build(bundle / "lite0_fp16.pt", self.device, self.half)

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        with torch.inference_mode():
            logits = self.model(batch.to(self.device, non_blocking=True))
            probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        responses, start = [], 0
        for size in sizes:
            out = np.ascontiguousarray(probabilities[start:start + size], dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probabilities", out)]))
            start += size
        return responses
