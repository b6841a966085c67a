"""``make run`` heals: a crashed service is restarted with backoff and logged (devstack/supervisor.py), at any
moment: during start-up, during the launcher's smoke check, and once serving."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.postgres import LocalPostgres
from devstack.stack import REPO_ROOT, SERVICES, Ports, Stack
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
    def __init__(self, failing_starts: int = 0) -> None:
        self.processes = {"preprocess": FakeProcess(100)}
        self.started: list[str] = []
        self.failing_starts = failing_starts

    def start_service(self, name: str) -> FakeProcess:
        if self.failing_starts:
            self.failing_starts -= 1
            raise OSError("data directory not reachable")
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


def test_a_failed_restart_is_retried_with_backoff() -> None:
    now = [0.0]
    stack = FakeStack(failing_starts=2)
    supervisor = Supervisor(stack, names=["preprocess"], backoff=Backoff(initial_s=1, max_s=30, reset_after_s=60),
                            clock=lambda: now[0])
    stack.processes["preprocess"].returncode = 1
    for _ in range(40):  # 10 s in 0.25 s steps; a start that raises must not end supervision
        supervisor.poll()
        if stack.started:
            break
        now[0] += 0.25
    assert stack.started == ["preprocess"] and supervisor.restarts["preprocess"] == 1
    assert now[0] == 1.0 + 2.0 + 4.0  # crash, then two failed starts: 1, 2 and 4 s apart


def test_a_process_started_by_the_stack_itself_is_timed_from_then(caplog: pytest.LogCaptureFixture) -> None:
    """make run starts services after the supervisor: their uptime counts from when it first sees them."""
    now = [0.0]
    stack = FakeStack()
    del stack.processes["preprocess"]
    supervisor = Supervisor(stack, names=["preprocess"], backoff=Backoff(initial_s=1, max_s=30, reset_after_s=60),
                            clock=lambda: now[0])
    supervisor.poll()  # not started yet: nothing to do
    now[0] = 100.0
    stack.processes["preprocess"] = FakeProcess(7)
    supervisor.poll()
    now[0] = 101.5
    stack.processes["preprocess"].returncode = -9
    with caplog.at_level(logging.ERROR, logger="supervisor"):
        supervisor.poll()
    assert "preprocess (pid 7) exited with code -9 after 1.5 s; restarting in 1.0 s" in caplog.text


def children(pid: int) -> dict[str, int]:
    """Service name -> pid of the direct children of ``pid`` (from /proc)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except FileNotFoundError:  # exited between the two reads
                continue
            for name in SERVICES:
                if (f"services.{name}" in cmdline or (name == "triton" and "tritonserver" in cmdline)
                        or (name == "postgres" and "pginstall/bin/postgres " in cmdline)):
                    found[name] = int(child)
    return found


@contextmanager
def make_run(tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, Ports, Path]]:
    """``python -m devstack.stack`` as ``make run`` starts it, on free ports with its logs and data in tmp_path.

    On exit: SIGTERM (as Ctrl-C), and every service it had running must be gone afterwards.
    """
    ports = Ports.free()
    flags = [f"--{name.replace('_', '-')}-port={port}" for name, port in vars(ports).items()]
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "devstack.stack", "--restart-backoff=0.5",
                                     f"--log-dir={tmp_path}", f"--postgres-dir={tmp_path / 'postgres'}", *extra,
                                     *flags], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    last: dict[str, int] = {}
    try:
        yield launcher, ports, log
    finally:
        last = children(launcher.pid) if launcher.poll() is None else {}
        os.kill(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            for pid in last.values():
                os.killpg(pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, log.read_text()[-3000:]
    time.sleep(0.5)
    for pid in last.values():  # Ctrl-C / SIGTERM stops the restarted services too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def classify_label(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = recognition_pb2_grpc.ProductRecognitionStub(channel).Classify(
            recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")), timeout=30)
    return reply.predictions[0].label


@pytest.mark.slow  # `make run` end to end, three services killed and restarted (~25 s)
def test_make_run_restarts_crashed_services(tmp_path: Path) -> None:
    with make_run(tmp_path, "--no-smoke") as (launcher, ports, log):
        probe = Stack(ports=ports)
        wait_for(lambda: "serving; press Ctrl-C" in log.read_text(), 180, "make run up")
        with psycopg.connect(probe.postgres_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
            conn.execute("INSERT INTO kept VALUES (1), (2), (3)")
        first = children(launcher.pid)
        assert set(first) == set(SERVICES), first
        for pid in first.values():
            os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: set(children(launcher.pid)) == set(first)
                 and not set(children(launcher.pid).values()) & set(first.values()), 30, "all four restarted")
        wait_for(lambda: probe.gateway_ready(), 120, "gateway SERVING after the restarts")
        assert classify_label(probe.gateway_address) == "espresso"
        wait_for(LocalPostgres(tmp_path / "postgres", ports.postgres).ready, 30, "PostgreSQL up after its restart")
        with psycopg.connect(probe.postgres_url) as conn:  # committed before the SIGKILL: crash recovery kept it
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (3,)
        text = log.read_text()
        for name in first:
            assert f"{name} (pid {first[name]}) exited with code -9" in text, text[-3000:]
            assert f"restarted {name}" in text
        assert launcher.poll() is None


@pytest.mark.slow  # `make run` end to end with crashes during start-up (~25 s)
def test_make_run_survives_crashes_during_start_up_and_its_smoke_check(tmp_path: Path) -> None:
    """PostgreSQL killed as soon as it is started, Triton as soon as the gateway reports SERVING (so while
    the launcher runs its smoke check): the launcher restarts both, its smoke check succeeds, it serves."""
    with make_run(tmp_path) as (launcher, ports, log):
        probe = Stack(ports=ports)
        wait_for(lambda: "postgres" in children(launcher.pid), 60, "PostgreSQL started")
        postgres = children(launcher.pid)["postgres"]
        os.killpg(postgres, signal.SIGKILL)
        wait_for(lambda: probe.gateway_ready() or launcher.poll() is not None, 240, "gateway SERVING")
        triton = children(launcher.pid).get("triton")
        assert triton is not None, log.read_text()[-3000:]
        os.killpg(triton, signal.SIGKILL)
        wait_for(lambda: "smoke check: coffee.png -> espresso" in log.read_text() or launcher.poll() is not None,
                 240, "the smoke check succeeding after Triton's restart")
        assert launcher.poll() is None, log.read_text()[-3000:]
        now = children(launcher.pid)
        assert now["triton"] != triton and now["postgres"] != postgres, now
        text = log.read_text()
        assert f"triton (pid {triton}) exited with code -9" in text and "restarted triton" in text, text[-3000:]
        assert f"postgres (pid {postgres}) exited with code -9" in text and "restarted postgres" in text
        assert "smoke check failed" not in text
        wait_for(lambda: probe.gateway_ready(), 120, "gateway SERVING")
        assert classify_label(probe.gateway_address) == "espresso"
        assert launcher.poll() is None
