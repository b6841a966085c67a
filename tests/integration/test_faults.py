"""Triton down, recovery without a gateway restart, and load shedding — on a private stack."""
from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from tests.conftest import photo_bytes
from tests.metrics_util import scrape, value


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(ports=Ports.free(), log_dir=Path(tmp_path_factory.mktemp("faults")),
                  extra_env={"GATEWAY_MAX_IN_FLIGHT": "2", "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.2"})
    stack.start()
    yield stack
    stack.stop()


def classify(stack: Stack, timeout: float = 30.0, image: bytes | None = None) -> recognition_pb2.ClassifyResponse:
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        return stub.Classify(recognition_pb2.ClassifyRequest(image=image or photo_bytes("coffee.png")),
                             timeout=timeout)


def gateway_health(stack: Stack) -> int:
    with grpc.insecure_channel(stack.gateway_address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_overload_is_shed_with_resource_exhausted(private_stack: Stack) -> None:
    image = photo_bytes("chelsea.png")
    shed_before = value(scrape(private_stack.ports.gateway_metrics), "shopvision_gateway_shed_total")

    def call(_: int) -> grpc.StatusCode:
        try:
            classify(private_stack, image=image)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(call, range(24)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
    assert codes.count(grpc.StatusCode.OK) > 0
    shed_after = value(scrape(private_stack.ports.gateway_metrics), "shopvision_gateway_shed_total")
    assert shed_after - shed_before == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_triton_down_gives_unavailable_then_recovers_without_gateway_restart(private_stack: Stack) -> None:
    assert classify(private_stack).predictions
    gateway_pid = private_stack.processes["gateway"].pid
    private_stack.stop_service("triton", signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        classify(private_stack, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Triton" in info.value.details()
    assert time.monotonic() - started < 5.0  # fails fast, does not hang until the deadline
    wait_for(lambda: gateway_health(private_stack) == health_pb2.HealthCheckResponse.NOT_SERVING)

    private_stack.start_service("triton")
    wait_for(private_stack.triton_ready, timeout_s=120)
    wait_for(lambda: gateway_health(private_stack) == health_pb2.HealthCheckResponse.SERVING)
    assert classify(private_stack).predictions[0].label == "espresso"
    assert private_stack.processes["gateway"].pid == gateway_pid


def test_preprocess_down_gives_unavailable_then_recovers(private_stack: Stack) -> None:
    private_stack.stop_service("preprocess", signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as info:
        classify(private_stack, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "preprocess" in info.value.details()
    wait_for(lambda: gateway_health(private_stack) == health_pb2.HealthCheckResponse.NOT_SERVING)
    private_stack.start_service("preprocess")
    wait_for(lambda: gateway_health(private_stack) == health_pb2.HealthCheckResponse.SERVING)
    assert classify(private_stack).predictions
