"""A Python-based Triton backend named ``onnxruntime``.

The ``tritonserver`` binary in the ``nvidia-pytriton`` wheel ships only the
Python backend. Placed at ``<backend-dir>/onnxruntime/model.py``, this file lets
a model whose ``config.pbtxt`` says ``backend: "onnxruntime"`` load with the
``onnxruntime`` pip package, so the very same model repository runs unchanged
on the NGC Triton container's native ONNX Runtime backend in Kubernetes.

It honours the native backend's ``parameters`` keys ``intra_op_thread_count``
and ``inter_op_thread_count``, reads ``default_model_filename`` (default
``model.onnx``) and runs all requests of a dynamic batch in one session call.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _int_parameter(config: dict, key: str, default: int) -> int:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return int(value) if value else default


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _int_parameter(self.config, "intra_op_thread_count", 0)
        options.inter_op_num_threads = _int_parameter(self.config, "inter_op_thread_count", 0)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX Runtime threads would otherwise spin, stealing CPU from the other model instances and
        # from the preprocess service on small machines (measured in docs/BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        missing = (set(self.input_names) - session_inputs) | (set(self.output_names) - session_outputs)
        if missing:
            raise pb_utils.TritonModelException(
                f"{path}: tensors {sorted(missing)} named in config.pbtxt are not in the ONNX graph "
                f"(graph inputs {sorted(session_inputs)}, outputs {sorted(session_outputs)})"
            )

    def execute(self, requests: list) -> list:
        # Concatenate every request of the dynamic batch along axis 0, run once, split back.
        arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(arrays[self.input_names[0]][-1].shape[0])
        feed = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in arrays.items()}
        outputs = self.session.run(self.output_names, feed)
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
