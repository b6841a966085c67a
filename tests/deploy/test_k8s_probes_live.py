"""The gRPC health entries the Kubernetes probes ask for, on a real gateway process.

A gateway whose upstreams are down must be unready ("" NOT_SERVING) yet alive ("liveness" SERVING):
otherwise the kubelet would restart every gateway during a Triton outage. On SIGTERM it must finish
within its drain time, which terminationGracePeriodSeconds covers (test_k8s_policy.py).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_manifests import container, find, render

from devstack.stack import Ports, Stack
from services.common.grpc_server import LIVENESS_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 2.0


def status(stub: health_pb2_grpc.HealthStub, service: str) -> int | None:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
    except grpc.RpcError:
        return None


def test_gateway_without_upstreams_is_alive_but_not_ready(tmp_path: Path) -> None:
    probes = container(find(render("cpu"), "Deployment", "gateway"))
    assert probes["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert "service" not in probes["readinessProbe"]["grpc"]
    # Preprocess and Triton ports are free ports nobody listens on.
    stack = Stack(ports=Ports.free(), log_dir=tmp_path, extra_env={"GATEWAY_GRACE_SECONDS": str(GRACE_S),
                                                                   "GATEWAY_METRICS_PORT": "0"})
    try:
        process = stack.start_service("gateway")
        with grpc.insecure_channel(stack.gateway_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while status(stub, LIVENESS_SERVICE) != SERVING:
                assert process.poll() is None, (tmp_path / "gateway.log").read_text()
                assert time.monotonic() < deadline, "gateway never answered its liveness health entry"
                time.sleep(0.2)
            time.sleep(1.5)  # a few health-tracker rounds against the missing upstreams
            assert status(stub, "") == NOT_SERVING
            assert status(stub, LIVENESS_SERVICE) == SERVING
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=GRACE_S + 10)
        assert time.monotonic() - started <= GRACE_S + 3
        assert process.returncode == 0, (tmp_path / "gateway.log").read_text()
    finally:
        stack.stop()
