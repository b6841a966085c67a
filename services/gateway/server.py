"""Wire the gateway: servicer, error interceptor, health (tracking Triton and preprocess), reflection, metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health
from prometheus_client import start_http_server
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from services.common.errors import ErrorInterceptor, ShopvisionError, transport_limit
from services.common.grpc_server import add_health_and_reflection, create_server, serve_until_signalled, set_serving
from services.common.tracing import setup_tracing
from services.gateway import metrics
from services.gateway.catalog.filters import AttributeLimits
from services.gateway.catalog.service import CatalogService, CatalogSettings, Embedder
from services.gateway.catalog.store import CatalogStore, StoreSettings
from services.gateway.concurrency import AdmissionGate
from services.gateway.config import GatewayConfig
from services.gateway.feedback import FeedbackService, FeedbackStore
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.retry import Retrier, RetryBudget, RetryPolicy
from services.gateway.routing import Router
from services.gateway.security import CallerInterceptor, RateLimiter, TokenSet, server_credentials
from services.gateway.servicer import ProductRecognitionServicer
from services.gateway.triton import InferRetryPolicy, TritonBackend

LOG = logging.getLogger(__name__)
SERVICE_NAME = recognition_pb2.DESCRIPTOR.services_by_name["ProductRecognition"].full_name


def observe(method: str, code: grpc.StatusCode, error: ShopvisionError | None, seconds: float) -> None:
    metrics.REQUESTS.labels(method, code.name).inc()
    metrics.REQUEST_SECONDS.labels(method).observe(seconds)
    if error is not None and code == grpc.StatusCode.INVALID_ARGUMENT:
        metrics.REJECTED.labels(error.reason).inc()


class HealthTracker:
    """SERVING only while Triton is ready with the default model and the preprocess service is SERVING."""

    def __init__(self, config: GatewayConfig, health_servicer: health.HealthServicer,
                 preprocess: PreprocessClient, triton: TritonBackend) -> None:
        self._config = config
        self._health = health_servicer
        self._preprocess = preprocess
        self._triton = triton
        self.serving: bool | None = None
        self.stopping = False

    async def check_once(self) -> bool:
        preprocess_up, triton_up = await asyncio.gather(self._preprocess.ready(), self._triton.ready())
        metrics.UPSTREAM_UP.labels("preprocess").set(preprocess_up)
        metrics.UPSTREAM_UP.labels("triton").set(triton_up)
        if triton_up:
            try:
                await self._triton.refresh_if_older(self._config.model_refresh_s if self.serving else 0.0)
            except ShopvisionError as error:
                LOG.warning("model refresh failed: %s", error.message)
                triton_up = False
        model_ready = self._config.default_model in self._triton.models
        serving = preprocess_up and triton_up and model_ready and not self.stopping
        if serving != self.serving:
            LOG.log(logging.INFO if serving else logging.WARNING, "health: %s", "SERVING" if serving else "NOT_SERVING",
                    extra={"fields": {"preprocess": preprocess_up, "triton": triton_up,
                                      "default_model_ready": model_ready}})
            await set_serving(self._health, [SERVICE_NAME], serving)
            self.serving = serving
        return serving

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                LOG.exception("health check failed")
            await asyncio.sleep(self._config.health_interval_s)

    async def stop(self) -> None:
        self.stopping = True
        await set_serving(self._health, [SERVICE_NAME], False)


def preprocess_retrier(config: GatewayConfig) -> Retrier:
    retry = config.retry
    policy = RetryPolicy(max_attempts=retry.max_attempts, initial_backoff_s=retry.initial_backoff_s,
                         window_s=retry.window_s)
    return Retrier("preprocess", policy, RetryBudget(retry.budget_ratio, retry.budget_min_per_s))


def triton_retry_policy(config: GatewayConfig) -> InferRetryPolicy:
    return InferRetryPolicy(drain_window_s=config.retry.triton_drain_window_s, connect_window_s=config.retry.window_s,
                            initial_backoff_s=config.retry.initial_backoff_s)


def catalog_service(config: GatewayConfig, preprocess: PreprocessClient,
                    triton: TritonBackend) -> CatalogService | None:
    """The shared catalog in PostgreSQL, or None when GATEWAY_CATALOG_DATABASE_URL is empty."""
    search = config.search
    if not search.enabled:
        LOG.warning("GATEWAY_CATALOG_DATABASE_URL is empty: the catalog RPCs answer UNAVAILABLE")
        return None
    store = CatalogStore(search.database_url, StoreSettings(
        hnsw_m=search.hnsw_m, hnsw_ef_construction=search.hnsw_ef_construction, ef_search=search.ef_search,
        max_scan_tuples=search.max_scan_tuples, statement_timeout_ms=search.statement_timeout_ms,
        pool_max=search.pool_size))
    limits = AttributeLimits(max_keys=search.max_attribute_keys, max_values=search.max_attribute_values,
                             max_chars=search.max_attribute_chars)
    settings = CatalogSettings(default_model=search.model or config.default_model, max_k=search.max_k,
                               duplicate_threshold=search.duplicate_threshold, limits=limits,
                               max_image_bytes=config.max_image_bytes)
    return CatalogService(store, Embedder(preprocess, triton), settings)


def caller_interceptor(config: GatewayConfig) -> CallerInterceptor | None:
    """Token authentication and per-caller rate limits, when either is configured."""
    tokens = TokenSet.from_config(config.security)
    limiter = (RateLimiter(config.security.rate_limit_per_s, config.security.burst)
               if config.security.rate_limit_per_s > 0 else None)
    return CallerInterceptor(tokens, limiter) if tokens is not None or limiter is not None else None


async def serve(config: GatewayConfig) -> None:
    setup_tracing("gateway")  # before any server or channel exists: the instrumentation wraps their factories
    preprocess = PreprocessClient(config.preprocess_address, max_message_bytes=config.max_image_bytes + 64 * 1024,
                                  retrier=preprocess_retrier(config))
    triton = TritonBackend(config.triton_address, triton_retry_policy(config),
                           RetryBudget(config.retry.budget_ratio, config.retry.budget_min_per_s))
    search = catalog_service(config, preprocess, triton)
    if search is not None:
        await search.store.open()
    # Feedback lives in the catalog's database, on its pool; without a catalog, SubmitFeedback answers UNAVAILABLE.
    feedback = FeedbackService(FeedbackStore(search.store)) if search is not None else None
    request_limit = config.max_image_bytes + 64 * 1024  # the image plus the other request fields
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(observe, max_request_bytes=request_limit)]
    caller_control = caller_interceptor(config)
    if caller_control is not None:
        interceptors.append(caller_control)  # inside the ErrorInterceptor: its refusals are mapped and counted
    server = create_server(interceptors, max_message_bytes=transport_limit(request_limit))
    router = Router(triton, config.rollout)  # canary / shadow rollouts read from Triton (routing.py)
    recognition_pb2_grpc.add_ProductRecognitionServicer_to_server(
        ProductRecognitionServicer(config, preprocess, triton, AdmissionGate(config.max_in_flight), search,
                                   router=router, feedback=feedback), server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    await set_serving(health_servicer, [SERVICE_NAME], False)
    credentials = server_credentials(config.security)
    if credentials is None:
        server.add_insecure_port(config.address)
    else:
        server.add_secure_port(config.address, credentials)
    if config.metrics_port:
        host = config.address.rpartition(":")[0].strip("[]") or "127.0.0.1"
        start_http_server(config.metrics_port, addr=host)
    tracker = HealthTracker(config, health_servicer, preprocess, triton)
    await server.start()
    LOG.info("gateway serving on %s (preprocess %s, Triton %s, metrics :%d/metrics)",
             config.address, config.preprocess_address, config.triton_address, config.metrics_port,
             extra={"fields": {"tls": "mutual" if config.security.tls_client_ca else
                               "on" if credentials is not None else "off",
                               "token_auth": caller_control is not None and caller_control.authenticates,
                               "rate_limit_per_s": config.security.rate_limit_per_s}})
    health_task = asyncio.create_task(tracker.run())
    try:
        await serve_until_signalled(server, config.grace_s, on_stop=tracker.stop)
    finally:
        health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health_task
        if search is not None:
            await search.close()
        await router.close()
        await preprocess.close()
        await triton.close()
