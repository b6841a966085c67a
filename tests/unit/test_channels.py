"""The options of the gateway's upstream channels (services/gateway/channels.py) and the targets they accept."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devstack.stack import free_port
from services.common.grpc_server import balanced_server_options
from services.gateway.channels import RENEW_EVERY_S, channel_options
from services.gateway.config import GatewayConfig
from services.gateway.triton import CHANNEL_ARGS


def numbers(options: list[tuple[str, str | int]]) -> dict[str, int]:
    return {name: number for name, number in options if isinstance(number, int)}


def test_calls_are_balanced_round_robin() -> None:
    options = dict(channel_options(max_send_bytes=1234))
    config = json.loads(str(options["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # pick_first (gRPC's default) would pin the gateway to one replica; nothing may ask for it.
    assert "grpc.lb_policy_name" not in options or options["grpc.lb_policy_name"] == "round_robin"


def test_message_limits_are_the_callers() -> None:
    options = dict(channel_options(max_send_bytes=1234, max_receive_bytes=5678))
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.max_receive_message_length"] == 5678
    triton = dict(CHANNEL_ARGS)
    assert triton["grpc.max_send_message_length"] == triton["grpc.max_receive_message_length"] == 64 * 1024 * 1024


def test_keepalive_fits_what_the_preprocess_server_permits() -> None:
    client = numbers(channel_options(max_send_bytes=1024))
    server = dict(balanced_server_options(max_connection_age_s=30, grace_s=30))
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    # A client pinging more often than the server allows gets GOAWAY "too_many_pings" and drops its connection.
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0  # preprocess permits it: keep probing an idle connection
    # Triton's default flags do not: a third ping on an idle connection got GOAWAY "too_many_pings".
    assert 0 < numbers(CHANNEL_ARGS)["grpc.http2.max_pings_without_data"] <= 2


def test_re_resolution_is_not_throttled_past_a_renewal() -> None:
    options = numbers(channel_options(max_send_bytes=1024))
    # gRPC's default spaces resolutions 30 s apart, which would outlast several renewals.
    assert options["grpc.dns_min_time_between_resolutions_ms"] <= RENEW_EVERY_S * 1000
    assert options["grpc.max_reconnect_backoff_ms"] <= 1000


@pytest.fixture(scope="module")
def health_port() -> Iterator[int]:
    """A real gRPC health server on a free loopback port, in a thread of its own."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.mark.parametrize("target", [
    "127.0.0.1:{port}",  # the form of the defaults (GATEWAY_PREPROCESS_ADDRESS, GATEWAY_TRITON_ADDRESS)
    "localhost:{port}",  # a name, as ``preprocess:50052``
    "dns:///localhost:{port}",  # as deploy/k8s's dns:///preprocess.shopvision.svc.cluster.local:50052
    "ipv4:127.0.0.1:{port}",
    "ipv4:127.0.0.1:{port},127.0.0.1:{dead}",  # one address refusing connections: calls go to the other
])
def test_every_target_syntax_reaches_the_server(target: str, health_port: int) -> None:
    async def check() -> int:
        address = target.format(port=health_port, dead=free_port())
        async with grpc.aio.insecure_channel(address, options=channel_options(max_send_bytes=1024)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            replies = [await stub.Check(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(4)]
        return min(reply.status for reply in replies)

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING


def test_defaults_are_host_port_targets() -> None:
    defaults = GatewayConfig.from_env({})
    for address in (defaults.preprocess_address, defaults.triton_address):
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and port.isdigit(), address
