"""What ``make bench`` puts load on besides the gateway: Triton directly (tensors, or JPEG bytes into the
Python-decode ensemble), the naive peer process and the Ray Serve peer."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio

from bench.peers import install
from devstack.stack import REPO_ROOT, Stack, free_port
from services.common.spec import Spec

LOG = logging.getLogger("bench.targets")

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


class TritonJpegTarget:
    """JPEG bytes as a one-element ``BYTES`` tensor to a Triton ensemble that decodes them itself (the
    Python-decode design), top-k through the classification extension like :class:`TritonTarget`."""

    def __init__(self, address: str, model: str, jpegs: Sequence[bytes], top_k: int = 5,
                 input_name: str = "jpeg", output_name: str = "probabilities") -> None:
        self.address, self.model = address, model
        self._client = triton_aio.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        self._inputs = []
        for jpeg in jpegs:
            infer_input = triton_aio.InferInput(input_name, [1, 1], "BYTES")
            infer_input.set_data_from_numpy(np.array([[jpeg]], dtype=np.object_))
            self._inputs.append([infer_input])
        self._outputs = [triton_aio.InferRequestedOutput(output_name, class_count=top_k)]

    async def __call__(self, index: int, timeout_s: float) -> object:
        return await self._client.infer(self.model, self._inputs[index % len(self._inputs)], outputs=self._outputs,
                                        client_timeout=timeout_s)

    async def top1(self, index: int = 0) -> tuple[int, str]:
        """(class id, label) of the best class for JPEG ``index``."""
        reply: Any = await self(index, 60.0)
        entry = reply.as_numpy(self._outputs[0].name())[0][0].decode()  # "score:class_id:label"
        _, class_id, label = entry.split(":", 2)
        return int(class_id), label

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


def session_members(session_id: int) -> list[int]:
    """Live processes of the session ``session_id`` (field 6 of /proc/PID/stat)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class RayServePeer:
    """``python -m bench.peers.ray_serve`` from its own environment (made first when missing), on free ports.

    Ray starts a dozen processes (GCS, raylet, agents, the Serve controller, proxy and replicas); some put
    themselves in their own process group, and two agents outlive ``ray.shutdown()``. All stay in the
    launcher's session, so :meth:`stop` signals the peer, then every remaining member of that session by
    pid, and removes Ray's session directory.
    """

    def __init__(self, spec: Spec, replicas: int = 1, intra_op_threads: int = 2, max_batch_size: int = 8,
                 batch_wait_ms: float = 5.0, num_cpus: int | None = None, log_path: Path | None = None,
                 env: install.PeerEnv = install.RAY) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.spec, self.replicas, self.intra_op_threads = spec, replicas, intra_op_threads
        self.max_batch_size, self.batch_wait_ms = max_batch_size, batch_wait_ms
        self.num_cpus = num_cpus or os.cpu_count() or 2
        self.log_path, self.env = log_path, env
        # Short, under /tmp: Ray's Unix socket paths must stay under 108 bytes.
        self.temp_dir = Path(f"/tmp/ray-sv-{os.getpid()}-{self.address.rpartition(':')[2]}")
        self.process: subprocess.Popen | None = None

    @property
    def config(self) -> dict[str, object]:
        return {"replicas": self.replicas, "intra_op_threads": self.intra_op_threads,
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms,
                "num_cpus": self.num_cpus, "ray_version": self.ray_version()}

    def ray_version(self) -> str:
        pinned = [line for line in self.env.requirements.read_text().splitlines() if line.startswith("ray")]
        return pinned[0].partition("==")[2] if pinned else "?"

    def start(self, timeout_s: float = 240.0) -> RayServePeer:
        python = install.ensure(self.env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")]))
        env.pop("VIRTUAL_ENV", None)
        LOG.info("starting the Ray Serve peer on %s (%d replica(s), %d intra-op threads, batch <= %d, "
                 "%d CPUs; log %s) ...", self.address, self.replicas, self.intra_op_threads, self.max_batch_size,
                 self.num_cpus, self.log_path)
        self.process = subprocess.Popen(
            [str(python), "-m", "bench.peers.ray_serve", "--grpc-port", self.address.rpartition(":")[2],
             "--http-port", str(free_port()), "--spec", json.dumps(asdict(self.spec)),
             "--replicas", str(self.replicas), "--intra-op-threads", str(self.intra_op_threads),
             "--max-batch-size", str(self.max_batch_size), "--batch-wait-ms", str(self.batch_wait_ms),
             "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.temp_dir)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"Ray Serve peer exited with code {self.process.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Ray Serve peer not answering on {self.address} after {timeout_s:.0f} s")
            time.sleep(1.0)
        LOG.info("Ray Serve peer is ready")
        return self

    def answers(self) -> bool:
        """Whether the ingress answers a Classify of a sample photo (Ray's proxy has no gRPC health service)."""
        from bench.harness.data import classify_payloads_from_bytes, jpeg_photo

        payload = classify_payloads_from_bytes([jpeg_photo()], top_k=1)[0]

        async def call() -> bool:
            async with grpc.aio.insecure_channel(self.address) as channel:
                method = channel.unary_unary("/shopvision.v1.ProductRecognition/Classify")
                try:
                    await method(payload, timeout=5)
                except grpc.aio.AioRpcError:
                    return False
            return True

        return asyncio.run(call())

    def stop(self) -> None:
        if self.process is None:
            return
        session = self.process.pid
        if self.process.poll() is None:
            os.kill(session, signal.SIGTERM)  # the peer shuts Serve and Ray down itself
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            members = session_members(session)
            for pid in members:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while members and time.monotonic() < deadline:
                time.sleep(0.2)
                members = session_members(session)
            if not members:
                break
        if self.process.poll() is None:
            self.process.wait()
        left = session_members(session)
        if left:
            LOG.warning("Ray Serve peer: processes %s of session %d did not exit", left, session)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayServePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
