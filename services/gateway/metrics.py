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

# Feedback (services/gateway/feedback.py): SubmitFeedback calls that were committed, new or already stored.
# ``model`` is a served model's name (bounded by the model repository), ``outcome`` one of FEEDBACK_OUTCOMES.
FEEDBACK = Counter("shopvision_gateway_feedback_total", "Feedback committed by SubmitFeedback, by model and outcome",
                   ["model", "outcome"])
FEEDBACK_OUTCOMES = ("stored", "duplicate")

# Rollouts (services/gateway/routing.py): role is "serving" (the public version answered), "canary" (the
# candidate answered) or "shadow" (a copy the candidate got; nobody saw its answer). The comparison calls of a
# canary's answers (copies to the serving version) count only in the agreement and dropped counters.
ROLLOUT_REQUESTS = Counter("shopvision_gateway_rollout_requests_total",
                           "Inferences by model, answering version and rollout role", ["model", "version", "role"])
ROLLOUT_ERRORS = Counter("shopvision_gateway_rollout_errors_total",
                         "Failed inferences by model, version and rollout role (a failed canary falls back to "
                         "the serving version)", ["model", "version", "role"])
ROLLOUT_SECONDS = Histogram("shopvision_gateway_rollout_request_duration_seconds",
                            "Triton inference time by model, version and rollout role",
                            ["model", "version", "role"], buckets=LATENCY_BUCKETS)
SHADOW_AGREEMENT = Counter("shopvision_gateway_shadow_agreement_total",
                           "Comparisons of the candidate's and the serving version's top-1 label on the same "
                           "image (shadow copies and canary answers)", ["model", "agree"])
SHADOW_DROPPED = Counter("shopvision_gateway_shadow_dropped_total",
                         "Comparison calls not made because GATEWAY_SHADOW_MAX_IN_FLIGHT were in flight", ["model"])

# Drift (services/gateway/drift.py): what each served version answers and what it is sent, with no image kept. The
# drift figure is the population stability index of the last window of answers against the version's reference
# (its validation split, ``shopvision.reference``); signal "class" (top-1 label shares) or "score" (top-1 scores).
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
MEGAPIXEL_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
ASPECT_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 0.99, 1.01, 1.11, 1.33, 2.0, 4.0)
BRIGHTNESS_BUCKETS = tuple(f"{low}-{low + 31}" for low in range(0, 256, 32))  # mean of the model input, 0..255
DRIFT_SIGNALS = ("class", "score")
PREDICTIONS = Counter("shopvision_gateway_predictions_total",
                      "Top-1 answers by model, version and label (models with at most 100 classes)",
                      ["model", "version", "label"])
TOP1_SCORE = Histogram("shopvision_gateway_top1_score", "Top-1 score of each answer", ["model", "version"],
                       buckets=SCORE_BUCKETS)
INPUT_MEGAPIXELS = Histogram("shopvision_gateway_input_megapixels", "Decoded size of each classified image",
                             ["model"], buckets=MEGAPIXEL_BUCKETS)
INPUT_ASPECT_RATIO = Histogram("shopvision_gateway_input_aspect_ratio",
                               "Width / height of each classified image as decoded", ["model"],
                               buckets=ASPECT_RATIO_BUCKETS)
INPUT_BRIGHTNESS = Counter("shopvision_gateway_input_brightness_total",
                           "Classified images by the mean of the model's input pixels (8 buckets of 32 levels)",
                           ["model", "bucket"])
DRIFT_PSI = Gauge("shopvision_gateway_drift_psi",
                  "Population stability index of the last window of answers against the version's validation "
                  "reference, by signal (class: top-1 label shares; score: top-1 score histogram)",
                  ["model", "version", "signal"])
DRIFT_WINDOW = Gauge("shopvision_gateway_drift_window_samples", "Answers in the drift window of a model version",
                     ["model", "version"])

# Every reason a refusal (INVALID_ARGUMENT) is counted under: the gateway's own ``InvalidInput`` reasons
# (services/gateway, services/common/errors.py and spec.py), the preprocess service's, which the gateway passes on
# (preprocess_client.py), and "image" when the preprocess service sent none. tests/unit/test_gateway_rejected.py
# keeps the list complete.
GATEWAY_REJECT_REASONS = ("empty", "too_large", "unknown_model", "bad_top_k", "batch_too_large", "bad_spec",
                          "bad_catalog", "catalog_model", "bad_product_id", "bad_metadata", "duplicate_in_batch",
                          "bad_k", "bad_page_size", "bad_page_token", "bad_attributes", "bad_filter",
                          "unknown_label")
PREPROCESS_REJECT_REASONS = ("not_an_image", "unsupported_format", "corrupt", "truncated", "too_many_pixels",
                             "bad_aspect_ratio", "decode_failed", "image")
REJECT_REASONS = (*GATEWAY_REJECT_REASONS, *PREPROCESS_REJECT_REASONS)
for _reason in REJECT_REASONS:
    REJECTED.labels(_reason)
