"""Faults on a private stack under load: frozen Triton, graceful SIGTERM, rolling restarts, the retry budget.

"Accepted" (here and in docs/RELIABILITY.md): the gateway started handling the call — the caller
received the gateway's ``x-request-id`` response header — and did not shed it with
``RESOURCE_EXHAUSTED``. A call refused before that (``UNAVAILABLE`` while no gateway listens or
while one is draining) did no work and may be retried by the client; an accepted call must succeed.
The load clients here shed nothing (fewer callers than GATEWAY_MAX_IN_FLIGHT).
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from tests.conftest import photo_bytes
from tests.images import encode, gradient
from tests.metrics_util import scrape, value
from tests.reliability.processes import Load, Outcome, wait_for

OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
RACE_S = 0.05  # a call sent this close before a signal may still be on its way to the server
GRACE_S = 5.0
DEFAULT_TIMEOUT_S = 2.0
RETRY_WINDOW_S = 6.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(ports=Ports.free(), log_dir=Path(tmp_path_factory.mktemp("shutdown")), extra_env={
        "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.2", "GATEWAY_DEFAULT_TIMEOUT_SECONDS": str(DEFAULT_TIMEOUT_S),
        "GATEWAY_GRACE_SECONDS": str(GRACE_S), "PREPROCESS_GRACE_SECONDS": str(GRACE_S),
        "PREPROCESS_WORKERS": "2", "GATEWAY_RETRY_WINDOW_SECONDS": str(RETRY_WINDOW_S),
        "GATEWAY_RETRY_BUDGET_MIN_PER_SECOND": "1"})
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def slow_image() -> bytes:
    """A 2000x2000 PNG: ~0.2 s to decode, so preprocess calls are reliably in flight when a signal lands."""
    noise = np.random.default_rng(7).integers(-3, 4, (2000, 2000, 3))
    return encode(np.clip(gradient(2000, 2000) + noise, 0, 255).astype(np.uint8), ".png")


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


class HealthWatch:
    """Streams ``Health.Watch`` of ``address`` in a thread; stops reading once it saw NOT_SERVING after SERVING."""

    def __init__(self, address: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # Bounded but generous: under a full test run on 2 cores the first status can take over 10 s.
        wait_for(lambda: SERVING in self.statuses, 30, "health SERVING on the watch stream")

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(reply.status)
                if reply.status == NOT_SERVING:
                    self._call.cancel()  # an open stream would hold the server for its whole grace period
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)
        self._channel.close()


def preprocess_loop(address: str, image: bytes, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Direct Preprocess calls (no gateway, no retries), recorded like :class:`Load` does."""
    request = preprocess_pb2.PreprocessRequest(image=image, spec=preprocess_pb2.ImageSpec(
        height=224, width=224, channels=3, crop="center", resize_shorter=256, background="keep"))
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = preprocess_pb2_grpc.PreprocessorStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.Preprocess(request, timeout=15)
                code, details = OK, ""
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            outcomes.append(Outcome(started, time.monotonic(), code, True, details))
            if code != OK:
                time.sleep(0.05)


def terminate(stack: Stack, name: str) -> tuple[float, float]:
    """SIGTERM ``name``; return (when the signal was sent, seconds until the process exited)."""
    proc = stack.processes[name]
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(GRACE_S + 10)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode} after SIGTERM"
    return sent, time.monotonic() - sent


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.code.name}{'' if o.accepted else ' (not accepted)'}"
        counts[key] = counts.get(key, 0) + 1
    return str(counts)


def test_frozen_triton_calls_end_at_their_deadline_without_retries(private_stack: Stack) -> None:
    image = photo_bytes("coffee.png")
    with grpc.insecure_channel(private_stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        assert stub.Classify(recognition_pb2.ClassifyRequest(image=image), timeout=30).predictions
        before = scrape(private_stack.ports.gateway_metrics)
        triton = private_stack.processes["triton"]
        os.killpg(triton.pid, signal.SIGSTOP)  # the server and its backend stubs
        try:
            request = recognition_pb2.ClassifyRequest(image=image)
            started = time.monotonic()
            # Three calls bring no deadline (the gateway's default applies; the client would wait forever),
            # three bring a shorter one of their own.
            open_ended = [stub.Classify.future(request) for _ in range(3)]
            bounded = [stub.Classify.future(request, timeout=1.0) for _ in range(3)]
            for future, budget in [(f, DEFAULT_TIMEOUT_S) for f in open_ended] + [(f, 1.0) for f in bounded]:
                try:
                    error = future.exception(timeout=max(0.0, started + budget + 1.0 - time.monotonic()))
                except grpc.FutureTimeoutError:
                    future.cancel()
                    raise AssertionError(f"a call with a {budget} s deadline hung past it") from None
                assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            # Nothing is left running in the gateway once the deadlines have passed.
            wait_for(lambda: value(scrape(private_stack.ports.gateway_metrics),
                                   "shopvision_gateway_in_flight_requests") == 0, 3, "no call in flight")
            wait_for(lambda: health_of(private_stack.gateway_address) == NOT_SERVING, 10, "gateway NOT_SERVING")
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        wait_for(lambda: health_of(private_stack.gateway_address) == SERVING, 30, "gateway SERVING again")
        reply = stub.Classify(recognition_pb2.ClassifyRequest(image=image), timeout=30)
        assert reply.predictions[0].label == "espresso"
    after = scrape(private_stack.ports.gateway_metrics)
    # One Triton attempt per call: inference is never retried on DEADLINE_EXCEEDED, so a frozen Triton
    # sees no extra load.
    failed = value(after, "shopvision_gateway_upstream_errors_total", upstream="triton", code="DEADLINE_EXCEEDED") \
        - value(before, "shopvision_gateway_upstream_errors_total", upstream="triton", code="DEADLINE_EXCEEDED")
    assert failed <= 6
    for upstream in ("preprocess", "triton"):
        assert value(after, "shopvision_gateway_retries_total", upstream=upstream, outcome="retried") == value(
            before, "shopvision_gateway_retries_total", upstream=upstream, outcome="retried")


def test_preprocess_sigterm_drains_and_restart_loses_no_accepted_request(private_stack: Stack,
                                                                         slow_image: bytes) -> None:
    retried_before = value(scrape(private_stack.ports.gateway_metrics), "shopvision_gateway_retries_total",
                           upstream="preprocess", outcome="retried")
    direct: list[Outcome] = []
    stop = threading.Event()
    callers = [threading.Thread(target=preprocess_loop, args=(private_stack.preprocess_address, slow_image, stop,
                                                               direct), daemon=True) for _ in range(3)]
    watch = HealthWatch(private_stack.preprocess_address)
    try:
        with Load(private_stack.gateway_address, photo_bytes("chelsea.png"), workers=3) as load:
            for caller in callers:
                caller.start()
            load.wait_for_calls(6)
            wait_for(lambda: len(direct) >= 2, 30, "direct preprocess calls")
            sent, exit_s = terminate(private_stack, "preprocess")
            private_stack.start_service("preprocess")
            wait_for(lambda: health_of(private_stack.preprocess_address) == SERVING, 30, "new preprocess SERVING")
            restarted = time.monotonic()
            load.wait_for_calls(6)
            stop.set()
            for caller in callers:
                caller.join(20)
    finally:
        stop.set()
        watch.close()

    assert exit_s < GRACE_S + 1.0
    assert watch.statuses[-1] == NOT_SERVING, watch.statuses  # announced before the server stopped
    # A call sent in the last 50 ms before the signal may not have reached the server yet: like a later
    # one it is refused before any handler sees it (UNAVAILABLE, or rarely CANCELLED in the instant the
    # server stops accepting).
    racing = [o for o in direct if sent - RACE_S <= o.started <= sent]
    # Calls in flight when the signal arrived were finished, not cut off.
    in_flight = [o for o in direct if o.started < sent - RACE_S and o.ended > sent]
    assert in_flight and all(o.code == OK for o in in_flight), summary(in_flight)
    assert {o.code for o in racing} <= {OK, UNAVAILABLE, grpc.StatusCode.CANCELLED}, summary(racing)
    # Calls that came later were refused without being processed, or served by the new process.
    assert {o.code for o in direct if o not in racing} <= {OK, UNAVAILABLE}, summary(direct)
    # Through the gateway nothing was lost: retries waited for the new process.
    assert all(o.code == OK for o in load.outcomes), summary(load.outcomes)
    assert any(o.started > restarted for o in load.outcomes)
    retried = value(scrape(private_stack.ports.gateway_metrics), "shopvision_gateway_retries_total",
                    upstream="preprocess", outcome="retried") - retried_before
    assert retried >= 1


def test_gateway_sigterm_drains_and_rolling_restart_loses_no_accepted_request(private_stack: Stack) -> None:
    watch = HealthWatch(private_stack.gateway_address)
    try:
        with Load(private_stack.gateway_address, photo_bytes("astronaut.png"), workers=4) as load:
            load.wait_for_calls(8)
            sent, exit_s = terminate(private_stack, "gateway")
            private_stack.start_service("gateway")
            wait_for(lambda: health_of(private_stack.gateway_address) == SERVING, 30, "new gateway SERVING")
            restarted = time.monotonic()
            load.wait_for_calls(8)
    finally:
        watch.close()

    assert exit_s < GRACE_S + 1.0
    assert watch.statuses[-1] == NOT_SERVING, watch.statuses
    outcomes = load.outcomes
    in_flight = [o for o in outcomes if o.started < sent < o.ended and o.accepted]
    assert in_flight and all(o.code == OK for o in in_flight), summary(in_flight)
    lost = [o for o in outcomes if o.accepted and o.code != OK]
    assert not lost, summary(outcomes)
    # Refused before any handler saw them: UNAVAILABLE (nobody listening, or GOAWAY), or rarely CANCELLED
    # (a stream that reached the server in the instant it stopped). No work was done; the client retries.
    refused = [o for o in outcomes if not o.accepted]
    assert all(o.code in (UNAVAILABLE, grpc.StatusCode.CANCELLED) for o in refused), summary(outcomes)
    assert any(o.started > restarted and o.code == OK for o in outcomes)


def test_retry_budget_bounds_retries_while_preprocess_is_down(private_stack: Stack) -> None:
    metrics_port = private_stack.ports.gateway_metrics
    before = scrape(metrics_port)
    private_stack.stop_service("preprocess", signal.SIGKILL)
    calls = 24
    image = photo_bytes("coffee.png")

    def call(_: int) -> grpc.StatusCode:
        with grpc.insecure_channel(private_stack.gateway_address) as channel:
            try:
                recognition_pb2_grpc.ProductRecognitionStub(channel).Classify(
                    recognition_pb2.ClassifyRequest(image=image), timeout=30)
                return OK
            except grpc.RpcError as error:
                return error.code()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        codes = list(pool.map(call, range(calls)))
    elapsed = time.monotonic() - started
    after = scrape(metrics_port)

    def delta(outcome: str) -> float:
        return value(after, "shopvision_gateway_retries_total", upstream="preprocess", outcome=outcome) - value(
            before, "shopvision_gateway_retries_total", upstream="preprocess", outcome=outcome)

    assert codes == [UNAVAILABLE] * calls, codes
    assert elapsed < RETRY_WINDOW_S + 3  # the retry window, not the 30 s deadline, bounds the wait
    # Retries stay within the budget: 0.2 per call plus 1 per second, plus at most 10 saved up before.
    assert 1 <= delta("retried") <= 0.2 * calls + 1 * elapsed + 10
    assert delta("budget_exhausted") >= 1
    private_stack.start_service("preprocess")
    wait_for(lambda: health_of(private_stack.gateway_address) == SERVING, 30, "gateway SERVING again")
