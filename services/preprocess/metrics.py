"""Prometheus metrics of the preprocess service (one place for every name)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(2 ** p) for p in range(10, 26, 2))  # 1 KiB .. 32 MiB

REQUESTS = Counter("shopvision_preprocess_requests_total", "Preprocess calls by gRPC status code", ["code"])
REQUEST_SECONDS = Histogram("shopvision_preprocess_request_duration_seconds",
                            "Whole Preprocess call, server side", buckets=LATENCY_BUCKETS)
DECODE_SECONDS = Histogram("shopvision_preprocess_decode_duration_seconds", "Image decode time by format",
                           ["format"], buckets=LATENCY_BUCKETS)
TRANSFORM_SECONDS = Histogram("shopvision_preprocess_transform_duration_seconds",
                              "Resize/crop/colour time after decode", buckets=LATENCY_BUCKETS)
IMAGE_BYTES = Histogram("shopvision_preprocess_image_bytes", "Size of received encoded images",
                        buckets=BYTES_BUCKETS)
REJECTED = Counter("shopvision_preprocess_rejected_total", "Images refused, by reason", ["reason"])
IN_FLIGHT = Gauge("shopvision_preprocess_in_flight_requests", "Preprocess calls being served")

# The label values the code produces, initialised at import so that every series a dashboard plots exists at 0
# from the start: a panel reads 0, not "No data", until the first error.
CODES = ("OK", "INVALID_ARGUMENT")
# Every ``InvalidInput`` reason of the preprocess code (formats.py, imaging.py, servicer.py, common/spec.py, the
# request size limit of common/errors.py); tests/unit/test_metrics_labels.py keeps the list complete.
REJECT_REASONS = ("empty", "not_an_image", "unsupported_format", "corrupt", "truncated", "too_many_pixels",
                  "bad_aspect_ratio", "decode_failed", "bad_spec", "too_large")

for _code in CODES:
    REQUESTS.labels(_code)
for _reason in REJECT_REASONS:
    REJECTED.labels(_reason)
