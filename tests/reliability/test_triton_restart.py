"""A rolling restart of Triton under load loses zero accepted calls.

The replacement Triton starts on the same HTTP and gRPC ports (``TRITON_REUSE_PORTS``) and serves
before the old one gets SIGTERM. While the old one drains it refuses new work ("Request for unknown
model", "Server is stopping"); the gateway sends such inferences again (they are pure functions of
their inputs) until the connection moves to the new Triton, within its drain window and retry budget.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from devstack.stack import REPO_ROOT, Ports, Stack, free_port
from tests.conftest import photo_bytes
from tests.metrics_util import scrape, value
from tests.reliability.processes import Load, wait_for


def metrics_answer(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def reusable_stack(tmp_path: Path):
    stack = Stack(ports=Ports.free(), log_dir=tmp_path / "logs", extra_env={"TRITON_REUSE_PORTS": "true"})
    stack.start()
    yield stack
    stack.stop()


@pytest.mark.slow  # two Tritons restarted in turn under load (~45 s with start and stop)
def test_rolling_triton_restart_under_load_loses_no_accepted_call(reusable_stack: Stack, tmp_path: Path) -> None:
    stack = reusable_stack
    env = stack.env()
    env["TRITON_METRICS_PORT"] = str(free_port())  # metrics has no port sharing; give the new one its own
    log = open(tmp_path / "triton-replacement.log", "ab")
    retried_before = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_retries_total",
                           upstream="triton", outcome="retried")
    with Load(stack.gateway_address, photo_bytes("coffee.png"), workers=3, timeout_s=20.0) as load:
        time.sleep(1.5)
        replacement = subprocess.Popen([sys.executable, "-m", "services.triton"], cwd=REPO_ROOT, env=env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: metrics_answer(int(env["TRITON_METRICS_PORT"])), 120, "replacement Triton up")
            wait_for(lambda: b"Started GRPCInferenceService" in (tmp_path / "triton-replacement.log").read_bytes(),
                     60, "replacement Triton serving gRPC")
            old = stack.processes["triton"]
            os.killpg(old.pid, signal.SIGTERM)
            old.wait(60)
            time.sleep(2.0)
        except BaseException:
            os.killpg(replacement.pid, signal.SIGKILL)
            raise
    stack.processes["triton"] = replacement  # the stack's teardown stops the replacement
    log.close()
    accepted = [o for o in load.outcomes if o.accepted]
    failed = [o for o in accepted if o.code != grpc.StatusCode.OK]
    assert len(accepted) > 30, len(accepted)
    assert not failed, [(o.code, o.details) for o in failed[:5]]
    # The restart was bridged by resending inferences, not by luck of timing.
    retried = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_retries_total",
                    upstream="triton", outcome="retried") - retried_before
    assert retried >= 1
