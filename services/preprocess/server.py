"""Wire the preprocess servicer into a grpc.aio server with health, reflection and metrics."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
from prometheus_client import start_http_server
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.errors import ErrorInterceptor, ShopvisionError, transport_limit
from services.common.grpc_server import (
    add_health_and_reflection,
    balanced_server_options,
    create_server,
    serve_until_signalled,
    set_serving,
)
from services.common.tracing import setup_tracing
from services.preprocess import metrics
from services.preprocess.config import PreprocessConfig
from services.preprocess.servicer import PreprocessServicer

LOG = logging.getLogger(__name__)
SERVICE_NAME = preprocess_pb2.DESCRIPTOR.services_by_name["Preprocessor"].full_name
# Clients reconnect (and resolve the Service name again) this often; calls on an aged connection get the grace.
MAX_CONNECTION_AGE_S = 30.0
MAX_CONNECTION_AGE_GRACE_S = 30.0


def observe(method: str, code: grpc.StatusCode, error: ShopvisionError | None, seconds: float) -> None:
    metrics.REQUESTS.labels(code.name).inc()
    metrics.REQUEST_SECONDS.observe(seconds)
    if error is not None and code == grpc.StatusCode.INVALID_ARGUMENT:
        metrics.REJECTED.labels(error.reason).inc()


async def serve(config: PreprocessConfig) -> None:
    setup_tracing("preprocess")  # before any server or channel exists: the instrumentation wraps their factories
    cv2.setNumThreads(1)  # parallelism comes from the worker pool, one image per thread
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="decode")
    request_limit = config.max_image_bytes + 64 * 1024  # the image plus the other request fields
    server = create_server([ErrorInterceptor(observe, max_request_bytes=request_limit)],
                           max_message_bytes=transport_limit(request_limit),
                           extra_options=balanced_server_options(MAX_CONNECTION_AGE_S, MAX_CONNECTION_AGE_GRACE_S))
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(
        PreprocessServicer(executor, config.max_image_bytes, config.max_image_pixels), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    server.add_insecure_port(config.address)
    if config.metrics_port:
        host = config.address.rpartition(":")[0].strip("[]") or "127.0.0.1"
        start_http_server(config.metrics_port, addr=host)
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)
    LOG.info("preprocess serving on %s (metrics :%d/metrics, %d workers)",
             config.address, config.metrics_port, config.workers)
    try:
        await serve_until_signalled(server, config.grace_s,
                                    on_stop=lambda: set_serving(health, [SERVICE_NAME], False))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
