"""What ``make bench`` puts load on besides the gateway: Triton directly, and the naive peer process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_aio

from devstack.stack import REPO_ROOT, Stack, free_port

CHANNEL_ARGS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024)]


class TritonTarget:
    """Preprocessed uint8 tensors straight to a Triton model over gRPC, top-k through the classification
    extension, exactly as the gateway asks for them (one shared channel)."""

    def __init__(self, address: str, model: str, images: Sequence[np.ndarray], top_k: int = 5,
                 input_name: str = "image", output_name: str = "probabilities") -> None:
        self.address, self.model = address, model
        self._client = triton_aio.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        self._inputs = []
        for image in images:
            infer_input = triton_aio.InferInput(input_name, [1, *image.shape], "UINT8")
            infer_input.set_data_from_numpy(image[None])
            self._inputs.append([infer_input])
        self._outputs = [triton_aio.InferRequestedOutput(output_name, class_count=top_k)]

    async def __call__(self, index: int, timeout_s: float) -> object:
        return await self._client.infer(self.model, self._inputs[index % len(self._inputs)], outputs=self._outputs,
                                        client_timeout=timeout_s)

    async def close(self) -> None:
        await self._client.close()


class NaivePeer:
    """``python -m bench.naive_server`` as a child process on a free loopback port."""

    def __init__(self, workers: int = 4, intra_op_threads: int = 2, log_path: Path | None = None) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.workers, self.intra_op_threads, self.log_path = workers, intra_op_threads, log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> NaivePeer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.naive_server", "--address", self.address, "--workers", str(self.workers),
             "--intra-op-threads", str(self.intra_op_threads)],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not Stack.grpc_serving(self.address):
            if self.process.poll() is not None:
                raise RuntimeError(f"naive peer exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"naive peer not serving on {self.address} after {timeout_s:.0f} s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> NaivePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
