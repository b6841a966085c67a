"""gRPC server wiring shared by the services: health, reflection, message-size limits, graceful stop."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

LOG = logging.getLogger(__name__)


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def balanced_server_options(max_connection_age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """Options of a server that clients balance over (round robin over a headless Service's addresses)."""
    return [
        # Each connection is closed (GOAWAY, in-flight calls get ``grace_s``) after about ``max_connection_age_s``:
        # a client reconnects and resolves the name again, so even one that does not renew its channel (the
        # gateway does, services/gateway/channels.py) reaches replicas added since. New calls move to the new
        # connection without failing.
        ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        # The gateway pings every 10 s, also between calls, to notice a replica that vanished; gRPC's default
        # policy (one ping per 5 minutes without calls) would answer with GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ]


def create_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    max_message_bytes: int,
    extra_options: Sequence[tuple[str, int]] = (),
) -> grpc.aio.Server:
    options = message_size_options(max_message_bytes) + [("grpc.so_reuseport", 0), *extra_options]
    return grpc.aio.server(interceptors=list(interceptors), options=options)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register ``grpc.health.v1`` (starting NOT_SERVING) and server reflection for ``service_names``."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    return health_servicer


# Health entry that stays SERVING while the process runs: the Kubernetes liveness probe asks for it, so a
# missing upstream (which turns "" NOT_SERVING) makes a pod unready but never gets it restarted.
LIVENESS_SERVICE = "liveness"


async def set_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health_servicer.set(name, status)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)


async def serve_until_signalled(server: grpc.aio.Server, grace_s: float, on_stop=None) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting and give in-flight calls ``grace_s`` to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    LOG.info("stopping: draining in-flight calls for up to %.1f s", grace_s)
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_s)
    LOG.info("stopped")
