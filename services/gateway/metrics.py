"""Prometheus metrics of the gateway (one place for every name)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(2 ** p) for p in range(10, 26, 2))  # 1 KiB .. 32 MiB

REQUESTS = Counter("shopvision_gateway_requests_total", "Calls by method and gRPC status code", ["method", "code"])
REQUEST_SECONDS = Histogram("shopvision_gateway_request_duration_seconds", "Whole call, server side",
                            ["method"], buckets=LATENCY_BUCKETS)
HOP_SECONDS = Histogram("shopvision_gateway_hop_duration_seconds", "Time spent in each downstream hop",
                        ["hop"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("shopvision_gateway_in_flight_requests", "Images being classified now")
REQUEST_BYTES = Histogram("shopvision_gateway_image_bytes", "Size of received encoded images",
                          buckets=BYTES_BUCKETS)
REJECTED = Counter("shopvision_gateway_rejected_total", "Requests refused as invalid, by reason", ["reason"])
UPSTREAM_ERRORS = Counter("shopvision_gateway_upstream_errors_total", "Failed calls to a downstream service",
                          ["upstream", "code"])
SHED = Counter("shopvision_gateway_shed_total", "Requests refused with RESOURCE_EXHAUSTED because the gateway was full")
UPSTREAM_UP = Gauge("shopvision_gateway_upstream_up", "1 when the downstream service answers its health check",
                    ["upstream"])
# Reliability and security (services/gateway/retry.py, the one retry engine; services/gateway/security.py).
RETRIES = Counter("shopvision_gateway_retries_total",
                  "Retry decisions for idempotent downstream calls: retried, or why not (budget, window, attempts)",
                  ["upstream", "outcome"])
RATE_LIMITED = Counter("shopvision_gateway_rate_limited_total",
                       "Requests refused with RESOURCE_EXHAUSTED because their caller was over its rate limit")
AUTH_FAILURES = Counter("shopvision_gateway_auth_failures_total",
                        "Requests refused with UNAUTHENTICATED (missing or unknown bearer token)")

# The label values the code produces, initialised at import so that every series a dashboard plots exists at 0
# from the start: a panel reads 0, not "No data", until the first error.
# services/gateway/retry.py: the outcomes of one retry decision (preprocess has an attempt limit, Triton has none).
RETRY_OUTCOMES = ("retried", "budget_exhausted", "window_elapsed", "attempts_exhausted")
RETRY_OUTCOMES_BY_UPSTREAM = {"preprocess": RETRY_OUTCOMES, "triton": RETRY_OUTCOMES[:3]}
# The codes an upstream failure is counted under: preprocess_client.py, triton.py (``_to_error``: another code
# Triton sends appears when it first happens), catalog/store.py (``database_errors``).
UPSTREAM_ERROR_CODES = {"preprocess": ("UNAVAILABLE", "DEADLINE_EXCEEDED"),
                        "triton": ("UNAVAILABLE", "DEADLINE_EXCEEDED"),
                        "postgres": ("UNAVAILABLE",)}

for _upstream, _outcomes in RETRY_OUTCOMES_BY_UPSTREAM.items():
    for _outcome in _outcomes:
        RETRIES.labels(_upstream, _outcome)
for _upstream, _codes in UPSTREAM_ERROR_CODES.items():
    for _code in _codes:
        UPSTREAM_ERRORS.labels(_upstream, _code)
