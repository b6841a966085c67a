"""On a fresh stack, before any error, the error and retry counters that dashboards plot already exist at 0.

A real Prometheus scraping a fresh stack found no ``shopvision_gateway_upstream_errors_total`` and no
``shopvision_gateway_retries_total``: a counter child that was never incremented is not exposed, so its panel
read "No data" instead of 0. The metrics modules now create every series the code can count at start-up; this
scrapes a private, fresh stack, then makes real errors and checks that they land on those same series (no new
label values appear, so the initialised ones are the ones the code counts).
"""
from __future__ import annotations

import signal

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from tests.metrics_util import scrape, value

pytestmark = pytest.mark.stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# The series the dashboards plot (tools/dashboards.py), with the label values the code produces.
GATEWAY_SERIES = [
    *[("shopvision_gateway_upstream_errors_total", {"upstream": upstream, "code": code})
      for upstream, code in [("preprocess", "UNAVAILABLE"), ("preprocess", "DEADLINE_EXCEEDED"),
                             ("triton", "UNAVAILABLE"), ("triton", "DEADLINE_EXCEEDED"), ("postgres", "UNAVAILABLE")]],
    *[("shopvision_gateway_retries_total", {"upstream": "preprocess", "outcome": outcome})
      for outcome in ("retried", "budget_exhausted", "window_elapsed", "attempts_exhausted")],
    *[("shopvision_gateway_retries_total", {"upstream": "triton", "outcome": outcome})
      for outcome in ("retried", "budget_exhausted", "window_elapsed")],
]
PREPROCESS_SERIES = [
    ("shopvision_preprocess_requests_total", {"code": "INVALID_ARGUMENT"}),  # code="OK": health checks count
    *[("shopvision_preprocess_rejected_total", {"reason": reason})
      for reason in ("empty", "not_an_image", "unsupported_format", "corrupt", "truncated", "too_many_pixels",
                     "bad_aspect_ratio", "decode_failed", "bad_spec", "too_large")],
]


def label_sets(samples: Samples, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {labels for sample, labels in samples if sample == name}


def assert_at_zero(samples: Samples, series: list[tuple[str, dict[str, str]]]) -> None:
    for name, labels in series:
        key = (name, tuple(sorted(labels.items())))
        assert key in samples, f"{name}{labels} is not exposed"
        assert samples[key] == 0.0, f"{name}{labels} = {samples[key]} on a fresh stack"


def test_error_and_retry_counters_exist_at_zero_then_count_real_errors(make_stack) -> None:
    stack = make_stack()
    gateway, preprocess = scrape(stack.ports.gateway_metrics), scrape(stack.ports.preprocess_metrics)
    assert_at_zero(gateway, GATEWAY_SERIES)
    assert_at_zero(preprocess, PREPROCESS_SERIES)

    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(recognition_pb2.ClassifyRequest(image=b"not a photo, just text"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        counted = scrape(stack.ports.preprocess_metrics)
        assert value(counted, "shopvision_preprocess_rejected_total", reason="not_an_image") == 1
        assert value(counted, "shopvision_preprocess_requests_total", code="INVALID_ARGUMENT") == 1
        for name in ("shopvision_preprocess_rejected_total", "shopvision_preprocess_requests_total"):
            assert label_sets(counted, name) == label_sets(preprocess, name), name
        stack.stop_service("preprocess", signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as down:
            stub.Classify(recognition_pb2.ClassifyRequest(image=b"\x89PNG\r\n\x1a\n"), timeout=30)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE

    after = scrape(stack.ports.gateway_metrics)
    # The errors were counted on the series that were there from the start, under no new label values.
    assert value(after, "shopvision_gateway_upstream_errors_total", upstream="preprocess", code="UNAVAILABLE") == 1
    assert value(after, "shopvision_gateway_retries_total", upstream="preprocess", outcome="retried") >= 1
    assert sum(value(after, "shopvision_gateway_retries_total", upstream="preprocess", outcome=outcome)
               for outcome in ("budget_exhausted", "window_elapsed", "attempts_exhausted")) == 1
    for name in ("shopvision_gateway_upstream_errors_total", "shopvision_gateway_retries_total"):
        assert label_sets(after, name) == label_sets(gateway, name), name
