"""Extra service processes beside a running stack, and a small load driver that records what each call got."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Stack, free_port

REQUEST_ID_KEY = "x-request-id"


@dataclass
class Service:
    proc: subprocess.Popen
    address: str
    metrics_port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:.0f} s")
        time.sleep(0.1)


def start_gateway(stack: Stack, log: Path, **env: str) -> Service:
    """A gateway process on its own ports in front of ``stack``'s preprocess and Triton; returns once SERVING."""
    port, metrics_port = free_port(), free_port()
    environment = {**stack.env(), "GATEWAY_ADDRESS": f"127.0.0.1:{port}", "GATEWAY_METRICS_PORT": str(metrics_port),
                   "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.2", **env}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=REPO_ROOT, env=environment,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(proc, f"127.0.0.1:{port}", metrics_port, log)
    try:
        wait_for(lambda: proc.poll() is not None or '"health: SERVING"' in service.log_text(), 60, "gateway SERVING")
        assert proc.poll() is None, f"gateway exited with {proc.returncode}:\n{service.log_text()[-2000:]}"
    except BaseException:
        service.stop(signal.SIGKILL)
        raise
    return service


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode
    accepted: bool  # the gateway started handling the call: it sent its x-request-id response header
    details: str


@dataclass
class Load:
    """``workers`` threads each classifying ``image`` in a loop until :meth:`stop`; every call is recorded.

    A call refused with ``UNAVAILABLE`` that the gateway never accepted is retried by the client
    after a short pause (as a real client with a retry policy would do).
    """

    address: str
    image: bytes
    workers: int = 3
    timeout_s: float = 15.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            request = recognition_pb2.ClassifyRequest(image=self.image, top_k=1)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    _, call = stub.Classify.with_call(request, timeout=self.timeout_s)
                    code, headers, details = grpc.StatusCode.OK, call.initial_metadata(), ""
                except grpc.RpcError as error:
                    code, headers, details = error.code(), error.initial_metadata(), error.details() or ""
                accepted = any(key == REQUEST_ID_KEY for key, _ in headers or ())
                self.outcomes.append(Outcome(started, time.monotonic(), code, accepted, details))
                if code != grpc.StatusCode.OK:
                    time.sleep(0.05)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def wait_for_calls(self, count: int, timeout_s: float = 60.0) -> None:
        start = len(self.outcomes)
        wait_for(lambda: len(self.outcomes) >= start + count, timeout_s, f"{count} more calls")
