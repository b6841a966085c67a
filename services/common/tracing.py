"""OpenTelemetry tracing, off unless an OTLP endpoint is configured.

One environment variable turns it on: the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Then :func:`setup_tracing` installs a tracer provider that
batches spans to that endpoint over OTLP/gRPC, the W3C ``traceparent`` propagator, and the
opentelemetry-python-contrib ``grpc.aio`` server and client instrumentation, so every hop
(gateway → preprocess, gateway → Triton) gets one span and carries the trace to the next service.
The other ``OTEL_*`` variables (``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, …) are
read by the SDK itself.

Triton exports OTLP over HTTP only; :func:`otlp_http_traces_url` gives the launcher its URL.

When tracing is off nothing from OpenTelemetry is imported and :func:`set_span_attributes` is one
``None`` check.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

GRPC_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
HTTP_ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT_HTTP"
OTLP_HTTP_PORT = 4318  # the standard OTLP/HTTP port, beside OTLP/gRPC's 4317 on every collector

# Set once by setup_tracing: returns the span of the call being served (None while tracing is off).
_current_span: Callable[[], Any] | None = None


def grpc_endpoint(env: Mapping[str, str] | None = None) -> str:
    """The OTLP/gRPC endpoint the Python services export to; empty when tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return next((env[name].strip() for name in GRPC_ENDPOINT_VARIABLES if env.get(name, "").strip()), "")


def otlp_http_traces_url(env: Mapping[str, str] | None = None) -> str:
    """Where Triton posts its spans (OTLP/HTTP); empty when tracing is off.

    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT_HTTP`` as given, otherwise the gRPC endpoint's host on port 4318,
    path ``/v1/traces`` (how an OpenTelemetry Collector listens by default).
    """
    env = os.environ if env is None else env
    endpoint = grpc_endpoint(env)
    if not endpoint:
        return ""
    explicit = env.get(HTTP_ENDPOINT_VARIABLE, "").strip()
    if explicit:
        return explicit
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if parts.scheme == "https" else "http"
    return f"{scheme}://{host}:{OTLP_HTTP_PORT}/v1/traces"


def _inside_a_trace(_details: Any) -> bool:
    """Client calls are traced only on behalf of a traced request: the background polls (readiness every
    second, model refreshes) would otherwise start a trace of their own each time."""
    return _current_span is not None and _current_span().get_span_context().is_valid


def setup_tracing(service_name: str) -> bool:
    """Install tracing for this process when an OTLP endpoint is configured; return whether it is on.

    Call once at start-up, before any gRPC server or channel is created (the instrumentation wraps
    ``grpc.aio.server`` and ``grpc.aio.insecure_channel``/``secure_channel``).
    ``service_name`` is the ``service.name`` resource attribute unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` names one.
    """
    global _current_span
    endpoint = grpc_endpoint()
    if not endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer, filters
    from opentelemetry.propagate import set_global_textmap
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_EXPORTER_OTLP_*
    trace.set_tracer_provider(provider)
    _current_span = trace.get_current_span
    if "OTEL_PROPAGATORS" not in os.environ:
        set_global_textmap(TraceContextTextMapPropagator())  # W3C traceparent: what Triton reads
    # Health probes and reflection are not requests worth a trace.
    not_plumbing = filters.negate(filters.any_of(filters.health_check(),
                                                 filters.service_prefix("grpc.reflection")))
    GrpcAioInstrumentorServer(filter_=not_plumbing).instrument(tracer_provider=provider)
    GrpcAioInstrumentorClient(filter_=filters.all_of(not_plumbing, _inside_a_trace)).instrument(
        tracer_provider=provider)
    LOG.info("tracing on: OTLP/gRPC to %s", endpoint,
             extra={"fields": {"service_name": resource.attributes.get(SERVICE_NAME)}})
    return True


def set_span_attributes(attributes: Mapping[str, str | int | float | bool]) -> None:
    """Add ``attributes`` to the span of the call being served (nothing while tracing is off)."""
    if _current_span is not None:
        _current_span().set_attributes(attributes)
