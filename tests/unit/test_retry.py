"""The one retry engine (services/gateway/retry.py) as Triton inference uses it (services/gateway/triton.py).

The errors are real ``InferenceServerException`` objects: tritonclient's aio client raises them from real gRPC
calls to an in-process server that speaks Triton's inference protocol and answers with the status and message a
Triton gives while it swaps a model version or drains, or to a port where nothing listens.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from prometheus_client import REGISTRY, generate_latest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from devstack.stack import free_port
from services.common.errors import DeadlineExceeded, Unavailable
from services.gateway import metrics
from services.gateway.retry import RetryBudget
from services.gateway.triton import InferRetryPolicy, TritonBackend, is_disconnected, is_draining, is_retryable
from tests.metrics_util import parse, value

# What Triton 2.51 answers while a version is unloaded or the server drains (status, message).
DRAINING = [
    (grpc.StatusCode.UNAVAILABLE, "'fashion_effnet' version 3 is not at ready state"),
    (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'fashion_effnet' has no available versions"),
    (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'fashion_effnet' is not found"),
    (grpc.StatusCode.UNAVAILABLE, "Server is stopping"),
    (grpc.StatusCode.UNAVAILABLE, "Triton has stopped accepting new inference requests"),
]
NOT_RETRIED = [
    (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'image' for model 'fashion_effnet'"),
    (grpc.StatusCode.INTERNAL, "onnx runtime error 6: Non-zero status code returned while running Conv node"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "request exceeds the queue size"),
]


class ScriptedTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer answers the scripted errors in turn, then succeeds (or sleeps ``delay_s`` first)."""

    def __init__(self, errors: list[tuple[grpc.StatusCode, str]], repeat_last: bool = False,
                 delay_s: float = 0.0) -> None:
        self.errors = list(errors)
        self.repeat_last = repeat_last
        self.delay_s = delay_s
        self.calls = 0

    async def ModelInfer(self, request: service_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.errors:
            code, message = self.errors[0] if self.repeat_last and len(self.errors) == 1 else self.errors.pop(0)
            await context.abort(code, message)
        return service_pb2.ModelInferResponse(model_name=request.model_name, model_version="7", id=request.id)


async def raised_by(address: str, timeout_s: float = 5.0) -> InferenceServerException:
    """The exception tritonclient raises for one inference at ``address``."""
    client = triton_aio.InferenceServerClient(address)
    try:
        pixels = triton_aio.InferInput("image", [1, 2, 2, 3], "UINT8")
        pixels.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.uint8))
        with pytest.raises(InferenceServerException) as info:
            await client.infer("fashion_effnet", [pixels], client_timeout=timeout_s)
        return info.value
    finally:
        await client.close()


async def infer(backend: TritonBackend, timeout_s: float) -> triton_aio.InferResult:
    pixels = triton_aio.InferInput("image", [1, 2, 2, 3], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.uint8))
    return await backend._infer_with_retries(
        lambda remaining: backend._client.infer("fashion_effnet", [pixels], client_timeout=remaining),
        timeout_s, "inferring fashion_effnet")


class Servers:
    def __init__(self) -> None:
        self.running: list[grpc.aio.Server] = []

    async def start(self, servicer: ScriptedTriton) -> str:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.running.append(server)
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        for server in self.running:
            await server.stop(0)


def run(test: Callable[[Servers], Awaitable[None]]) -> None:
    async def main() -> None:
        servers = Servers()
        try:
            await test(servers)
        finally:
            await servers.stop()

    asyncio.run(main())


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """This process's metrics, as a scrape of the gateway would read them."""
    return parse(generate_latest(REGISTRY).decode())


def retries(outcome: str) -> float:
    return value(samples(), "shopvision_gateway_retries_total", upstream="triton", outcome=outcome)


@pytest.mark.parametrize(("code", "message"), DRAINING)
def test_what_a_draining_triton_answers_is_draining(code: grpc.StatusCode, message: str) -> None:
    async def check(servers: Servers) -> None:
        error = await raised_by(await servers.start(ScriptedTriton([(code, message)])))
        assert error.message() == message and error.status() == str(code)
        assert is_draining(error) and not is_disconnected(error) and is_retryable(error)
        policy = InferRetryPolicy(drain_window_s=8.0, connect_window_s=3.0)
        assert policy.window_of(error) == 8.0

    run(check)


def test_an_unreachable_triton_is_disconnected() -> None:
    async def check(_: Servers) -> None:
        error = await raised_by(f"127.0.0.1:{free_port()}")
        assert error.status() == str(grpc.StatusCode.UNAVAILABLE)
        assert is_disconnected(error) and not is_draining(error) and is_retryable(error)
        assert InferRetryPolicy(drain_window_s=8.0, connect_window_s=3.0).window_of(error) == 3.0

    run(check)


@pytest.mark.parametrize(("code", "message"), NOT_RETRIED)
def test_other_triton_errors_are_not_retried(code: grpc.StatusCode, message: str) -> None:
    async def check(servers: Servers) -> None:
        error = await raised_by(await servers.start(ScriptedTriton([(code, message)])))
        assert not is_draining(error) and not is_disconnected(error) and not is_retryable(error)

    run(check)


def test_a_frozen_triton_times_out_and_is_not_retried() -> None:
    async def check(servers: Servers) -> None:
        frozen = ScriptedTriton([], delay_s=5.0)
        error = await raised_by(await servers.start(frozen), timeout_s=0.2)
        assert error.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert not is_retryable(error)
        backend = TritonBackend(await servers.start(ScriptedTriton([], delay_s=5.0)), renew_every_s=0)
        with pytest.raises(DeadlineExceeded):
            await infer(backend, timeout_s=0.3)
        await backend.close()

    run(check)


def test_inference_is_sent_again_while_triton_drains_and_succeeds() -> None:
    async def check(servers: Servers) -> None:
        triton = ScriptedTriton(DRAINING[:3])
        backend = TritonBackend(await servers.start(triton), InferRetryPolicy(initial_backoff_s=0.01),
                                RetryBudget(ratio=1.0, min_per_s=100.0), renew_every_s=0)
        before = retries("retried")
        result = await infer(backend, timeout_s=5.0)
        assert result.get_response().model_version == "7"
        assert triton.calls == 4 and retries("retried") - before == 3
        await backend.close()

    run(check)


def test_retries_stop_at_the_drain_window() -> None:
    async def check(servers: Servers) -> None:
        triton = ScriptedTriton([DRAINING[3]], repeat_last=True)
        backend = TritonBackend(await servers.start(triton), InferRetryPolicy(
            drain_window_s=0.5, connect_window_s=0.05, initial_backoff_s=0.02, max_backoff_s=0.05),
            RetryBudget(ratio=1.0, min_per_s=1000.0), renew_every_s=0)
        before = retries("window_elapsed")
        started = time.monotonic()
        with pytest.raises(Unavailable, match="Server is stopping"):
            await infer(backend, timeout_s=10.0)
        elapsed = time.monotonic() - started
        # Retried for the drain window (not the much shorter connect window), not until the 10 s deadline.
        assert 0.4 < elapsed < 2.0 and triton.calls > 3
        assert retries("window_elapsed") - before == 1
        await backend.close()

    run(check)


def test_retries_never_go_past_the_deadline() -> None:
    async def check(servers: Servers) -> None:
        triton = ScriptedTriton([DRAINING[0]], repeat_last=True)
        backend = TritonBackend(await servers.start(triton), InferRetryPolicy(
            drain_window_s=30.0, initial_backoff_s=0.02, max_backoff_s=0.05),
            RetryBudget(ratio=1.0, min_per_s=1000.0), renew_every_s=0)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await infer(backend, timeout_s=0.4)
        assert time.monotonic() - started < 0.6
        await backend.close()

    run(check)


def test_an_unreachable_triton_is_retried_for_the_connect_window_only() -> None:
    async def check(_: Servers) -> None:
        backend = TritonBackend(f"127.0.0.1:{free_port()}", InferRetryPolicy(
            drain_window_s=30.0, connect_window_s=0.3, initial_backoff_s=0.02, max_backoff_s=0.05),
            RetryBudget(ratio=1.0, min_per_s=1000.0), renew_every_s=0)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await infer(backend, timeout_s=10.0)
        assert time.monotonic() - started < 2.0
        await backend.close()

    run(check)


def test_an_empty_budget_sends_nothing_again() -> None:
    async def check(servers: Servers) -> None:
        triton = ScriptedTriton([DRAINING[0]], repeat_last=True)
        backend = TritonBackend(await servers.start(triton), InferRetryPolicy(initial_backoff_s=0.01),
                                RetryBudget(ratio=0.0, min_per_s=0.0), renew_every_s=0)
        before = retries("budget_exhausted")
        with pytest.raises(Unavailable):
            await infer(backend, timeout_s=5.0)
        assert triton.calls == 1 and retries("budget_exhausted") - before == 1
        await backend.close()

    run(check)


def test_every_outcome_the_engine_counts_is_initialised() -> None:
    """The series a dashboard plots exist at 0 before the first retry (services/gateway/metrics.py)."""
    exposed = samples()
    for upstream, outcomes in metrics.RETRY_OUTCOMES_BY_UPSTREAM.items():
        for outcome in outcomes:
            key = ("shopvision_gateway_retries_total", tuple(sorted({"upstream": upstream,
                                                                      "outcome": outcome}.items())))
            assert key in exposed, key
    assert set(metrics.RETRY_OUTCOMES_BY_UPSTREAM["triton"]) == set(InferRetryPolicy().retrier(
        RetryBudget(1, 1)).policy.outcomes())
