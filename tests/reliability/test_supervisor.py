"""``make run`` heals: a crashed service is restarted with backoff and logged (devstack/supervisor.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Ports, Stack
from devstack.supervisor import Backoff, Supervisor
from tests.conftest import photo_bytes
from tests.reliability.processes import wait_for


@dataclass
class FakeProcess:
    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeStack:
    def __init__(self) -> None:
        self.processes = {"preprocess": FakeProcess(100)}
        self.started: list[str] = []

    def start_service(self, name: str) -> FakeProcess:
        self.started.append(name)
        self.processes[name] = FakeProcess(100 + len(self.started))
        return self.processes[name]


def test_restarts_back_off_and_reset_after_a_stable_run() -> None:
    now = [0.0]
    stack = FakeStack()
    supervisor = Supervisor(stack, names=["preprocess"], backoff=Backoff(initial_s=1, max_s=4, reset_after_s=60),
                            clock=lambda: now[0])
    delays = []
    for _ in range(4):  # crashes right after each start: 1, 2, 4, 4 s
        stack.processes["preprocess"].returncode = 1
        supervisor.poll()
        crashed_at, starts = now[0], len(stack.started)
        while len(stack.started) == starts:
            now[0] += 0.25
            supervisor.poll()
        delays.append(now[0] - crashed_at)
    assert delays == [1.0, 2.0, 4.0, 4.0]
    now[0] += 120  # a long healthy run resets the backoff
    stack.processes["preprocess"].returncode = -9
    supervisor.poll()
    now[0] += 1.0
    supervisor.poll()
    assert len(stack.started) == 5 and supervisor.restarts["preprocess"] == 5


def children(pid: int) -> dict[str, int]:
    """Service name -> pid of the direct children of ``pid`` (from /proc)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for name in ("triton", "preprocess", "gateway"):
                if f"services.{name}" in cmdline or (name == "triton" and "tritonserver" in cmdline):
                    found[name] = int(child)
    return found


def test_make_run_restarts_crashed_services(tmp_path: Path) -> None:
    ports = Ports.free()
    flags = [f"--{name.replace('_', '-')}-port={port}" for name, port in vars(ports).items()]
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        stack = subprocess.Popen([sys.executable, "-m", "devstack.stack", "--no-smoke", "--restart-backoff=0.5",
                                  f"--log-dir={tmp_path}", *flags], cwd=REPO_ROOT, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    probe = Stack(ports=ports)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    try:
        wait_for(lambda: "serving; press Ctrl-C" in log.read_text(), 180, "make run up")
        first = children(stack.pid)
        assert set(first) == {"triton", "preprocess", "gateway"}, first
        for pid in first.values():
            os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: set(children(stack.pid)) == set(first)
                 and not set(children(stack.pid).values()) & set(first.values()), 30, "all three restarted")
        wait_for(lambda: probe.gateway_ready(), 120, "gateway SERVING after the restarts")
        with grpc.insecure_channel(probe.gateway_address) as channel:
            reply = recognition_pb2_grpc.ProductRecognitionStub(channel).Classify(
                recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")), timeout=30)
        assert reply.predictions[0].label == "espresso"
        text = log.read_text()
        for name in first:
            assert f"{name} (pid {first[name]}) exited with code -9" in text, text[-3000:]
            assert f"restarted {name}" in text
    finally:
        last = children(stack.pid) if stack.poll() is None else {}
        os.kill(stack.pid, signal.SIGTERM)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            stack.kill()
    assert stack.returncode == 0
    time.sleep(0.5)
    for pid in last.values():  # Ctrl-C / SIGTERM stops the restarted services too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
