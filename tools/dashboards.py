"""Grafana dashboards for shopvision, as code: ``python -m tools.dashboards`` writes the JSON files.

    python -m tools.dashboards [--out-dir deploy/k8s/components/monitoring/dashboards] [--check]

Plain Python, no dashboard library: each dashboard is a list of rows of panels, and every panel is a
title, a unit and its PromQL queries. The committed JSON must equal this script's output
(``--check``, and ``tests/observability/test_dashboards.py``); edit this file, then run ``make dashboards``.

Every dashboard imports cleanly into any Grafana (9.x onwards): a ``${datasource}`` variable (no
hard-coded data source uid), a ``namespace`` variable (the ``namespace`` label that the
prometheus-operator monitors and ``devstack/prometheus_local.py`` put on every target) and, where models
matter, a multi-value ``model`` variable. Scrape jobs are named ``gateway``, ``preprocess`` and ``triton``.

Panels whose description starts with :data:`GPU_ONLY` query only Triton's GPU metrics, which a
CPU-only Triton does not export; the live-Prometheus test skips their data check, and says so. Panels whose
description starts with :data:`ROLLOUT_ONLY` query only :data:`ROLLOUT_ONLY_METRICS`, which have data only
while a candidate runs as canary or shadow.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "deploy" / "k8s" / "components" / "monitoring" / "dashboards"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11.x; older Grafana migrates down-level panels itself
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GPU_ONLY = "GPU only:"
ROLLOUT_ONLY = "During a rollout only:"
# The gateway's comparisons of a candidate's answers with the serving version's (services/gateway/metrics.py):
# no data unless a candidate runs as canary or shadow.
ROLLOUT_ONLY_METRICS = ("shopvision_gateway_shadow_agreement_total", "shopvision_gateway_shadow_dropped_total")
# Triton's per-GPU metrics (docs: user-guide/metrics.md, "GPU Metrics"); absent without a GPU.
TRITON_GPU_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
                      "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption")

NS = 'namespace="$namespace"'
RATE = "[$__rate_interval]"
# gRPC methods that are the API: health checks and the per-item counts of ClassifyBatch are not calls.
API = f'{NS}, method!~"Check|ClassifyBatchItem"'
# Status codes that spend the error budget: the service failed, not the caller.
SERVER_ERRORS = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|DATA_LOSS|UNIMPLEMENTED"
MODEL = f'{NS}, model=~"$model"'
# The model lifecycle, as the gateway counts it: per public model, its versions and their rollout role.
BY_ROLE = "model, version, role"
ROLE_LEGEND = "{{model}} v{{version}} {{role}}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    stacked: bool = False
    decimals: int | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    with_model: bool = False
    tags: tuple[str, ...] = field(default=("shopvision",))


def panel(title: str, *queries: tuple[str, str] | str, **options: Any) -> Panel:
    parsed = tuple(Query(*q) if isinstance(q, tuple) else Query(q) for q in queries)
    return Panel(title, parsed, **options)


def quantiles(metric: str, selector: str, by: str = "", label: str = "") -> tuple[tuple[str, str], ...]:
    """p50/p95/p99 of a histogram, optionally per label ``by``."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else (f" {label}" if label else "")
    return tuple(
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}{RATE})))", f"p{p}{suffix}")
        for q, p in ((0.5, 50), (0.95, 95), (0.99, 99)))


def share(part: str, whole: str) -> str:
    """``part / whole``, 0 (not "no data") where ``whole`` has series and ``part`` none; same grouping on both."""
    return f"({part} or {whole} * 0) / {whole}"


def error_ratio(codes: str) -> str:
    """Share of API calls that ended with one of ``codes``; 0 (not "no data") when none did."""
    total = f"sum(rate(shopvision_gateway_requests_total{{{API}}}{RATE}))"
    matching = f'sum(rate(shopvision_gateway_requests_total{{{API}, code=~"{codes}"}}{RATE}))'
    return share(matching, total)


def rate_by(by: str, metric: str, selector: str = MODEL) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}{RATE}))"


def share_of_label(label: str, by: str, metric: str, top: int | None = None) -> str:
    """Each ``label`` value's share of ``metric`` within its ``by`` group; the ``top`` largest per group."""
    expr = f"{rate_by(f'{by}, {label}', metric)} / ignoring ({label}) group_left {rate_by(by, metric)}"
    return f"topk by ({by}) ({top}, {expr})" if top else expr


def quantiles_by(metric: str, by: str, legend: str, levels: tuple[float, ...]) -> tuple[tuple[str, str], ...]:
    """Quantiles of a histogram per ``by`` (several labels), with ``legend`` after each quantile's name."""
    return tuple((f"histogram_quantile({q}, {rate_by(f'{by}, le', metric + '_bucket')})", f"p{round(q * 100)} {legend}")
                 for q in levels)


def per_request(metric_us: str, by: str = "model") -> str:
    """Triton's cumulative microsecond counters divided by successful requests: seconds per request."""
    return (f"sum by ({by}) (rate({metric_us}{{{MODEL}}}{RATE})) / 1e6"
            f" / sum by ({by}) (rate(nv_inference_request_success{{{MODEL}}}{RATE}))")


# -- the dashboards ----------------------------------------------------------------------------------------------
OVERVIEW = Dashboard(
    uid="shopvision-overview",
    title="shopvision / Service overview",
    description="The public gRPC API: traffic, errors, latency per hop, saturation.",
    rows=(
        Row("Golden signals", (
            panel("Requests / s", f"sum(rate(shopvision_gateway_requests_total{{{API}}}{RATE}))",
                  unit="reqps", kind="stat", width=6, height=5),
            panel("Server error ratio", error_ratio(SERVER_ERRORS), unit="percentunit", kind="stat", width=6,
                  height=5, decimals=2,
                  description="Calls that failed because of the service (not the caller); the SLO counts these."),
            panel("Classify p99", f"histogram_quantile(0.99, sum by (le) (rate("
                  f'shopvision_gateway_request_duration_seconds_bucket{{{NS}, method="Classify"}}{RATE})))',
                  unit="s", kind="stat", width=6, height=5),
            panel("In flight", f"sum(shopvision_gateway_in_flight_requests{{{NS}}})", unit="short", kind="stat",
                  width=6, height=5, description="Images being classified now, all gateway replicas."),
        )),
        Row("Traffic and errors", (
            panel("Requests by method", (f"sum by (method) (rate(shopvision_gateway_requests_total{{{API}}}{RATE}))",
                                         "{{method}}"), unit="reqps"),
            panel("Responses by status code",
                  (f"sum by (code) (rate(shopvision_gateway_requests_total{{{API}}}{RATE}))", "{{code}}"),
                  unit="reqps", stacked=True),
            panel("Error ratio", (error_ratio(SERVER_ERRORS), "server errors (SLO)"),
                  (error_ratio("INVALID_ARGUMENT"), "rejected inputs"), unit="percentunit",
                  description="Server errors spend the error budget; rejected inputs are the callers' mistakes."),
            panel("Rejected inputs by reason",
                  (f"sum by (reason) (rate(shopvision_gateway_rejected_total{{{NS}}}{RATE}))", "{{reason}}"),
                  unit="reqps", stacked=True, description="INVALID_ARGUMENT answers, by the x-error-reason sent back."),
        )),
        Row("Latency", (
            panel("Classify latency (server side)",
                  *quantiles("shopvision_gateway_request_duration_seconds", f'{NS}, method="Classify"'), unit="s"),
            panel("Latency per hop", *quantiles("shopvision_gateway_hop_duration_seconds", NS, by="hop"), unit="s",
                  description="Time the gateway waits on each downstream service per image."),
        )),
        Row("Saturation and dependencies", (
            panel("In-flight requests",
                  (f"sum by (instance) (shopvision_gateway_in_flight_requests{{{NS}}})", "gateway {{instance}}"),
                  (f"sum by (instance) (shopvision_preprocess_in_flight_requests{{{NS}}})", "preprocess {{instance}}"),
                  unit="short", width=8),
            panel("Shed load", (f"sum(rate(shopvision_gateway_shed_total{{{NS}}}{RATE}))", "refused (full)"),
                  unit="reqps", width=8,
                  description="Calls refused at once with RESOURCE_EXHAUSTED: GATEWAY_MAX_IN_FLIGHT was reached."),
            panel("Upstream errors",
                  (f"sum by (upstream, code) (rate(shopvision_gateway_upstream_errors_total{{{NS}}}{RATE}))",
                   "{{upstream}} {{code}}"), unit="reqps", width=8),
            panel("Upstreams ready (gateway's view)",
                  (f"min by (upstream) (shopvision_gateway_upstream_up{{{NS}}})", "{{upstream}}"), unit="bool",
                  width=8, description="1 when every gateway replica sees the service ready on its health check."),
            panel("Scrape targets up", (f'sum by (job) (up{{{NS}, job=~"gateway|preprocess|triton"}})', "{{job}}"),
                  unit="short", width=8),
            panel("Image size", *quantiles("shopvision_gateway_image_bytes", NS), unit="bytes", width=8),
        )),
        Row("Retries and refused callers", (
            panel("Downstream retries by outcome",
                  (f"sum by (upstream, outcome) (rate(shopvision_gateway_retries_total{{{NS}}}{RATE}))",
                   "{{upstream}} {{outcome}}"), unit="reqps",
                  description="retried, or why a failed idempotent call was not retried (budget, window, attempts)."),
            panel("Refused callers",
                  (f"sum(rate(shopvision_gateway_rate_limited_total{{{NS}}}{RATE}))", "over rate limit"),
                  (f"sum(rate(shopvision_gateway_auth_failures_total{{{NS}}}{RATE}))", "unauthenticated"),
                  unit="reqps", stacked=True),
        )),
    ),
)

# Rollouts (serving, canary, shadow), drift from the validation reference, and feedback, as the gateway sees
# them; the alerts on them are in deploy/k8s/components/monitoring/rules/lifecycle.rules.yml. `model` here is
# the public model (a Triton ensemble, so the Triton dashboard's model variable lists it).
LIFECYCLE = Row("Model lifecycle", (
    panel("Requests by version and role",
          (rate_by(BY_ROLE, "shopvision_gateway_rollout_requests_total"), ROLE_LEGEND), unit="reqps", width=8,
          description="Calls each version answers: serving, canary (answers a share of the callers) or shadow "
                      "(gets a copy of serving's calls; its answer is compared, never returned)."),
    panel("Error ratio by version and role",
          (share(rate_by(BY_ROLE, "shopvision_gateway_rollout_errors_total"),
                 rate_by(BY_ROLE, "shopvision_gateway_rollout_requests_total")), ROLE_LEGEND),
          unit="percentunit", width=8, decimals=2,
          description="A failed canary call falls back to the serving version. ShopvisionCandidateWorse: a canary "
                      "or shadow 2 points above serving for 10 minutes, at 1 call/s or more."),
    panel("p99 inference time by version and role",
          (f"histogram_quantile(0.99, "
           f"{rate_by(f'{BY_ROLE}, le', 'shopvision_gateway_rollout_request_duration_seconds_bucket')})",
           ROLE_LEGEND), unit="s", width=8,
          description="Triton's part of each call. ShopvisionCandidateWorse: a canary or shadow above 1.5 x "
                      "serving's p99 (and 25 ms more) for 10 minutes."),
    panel("Candidate agreement with serving",
          (share(rate_by("model", "shopvision_gateway_shadow_agreement_total", f'{MODEL}, agree="true"'),
                 rate_by("model", "shopvision_gateway_shadow_agreement_total")), "{{model}}"),
          unit="percentunit", width=8, decimals=1,
          description=f"{ROLLOUT_ONLY} share of the compared calls (shadow copies, canary answers) on which the "
                      "candidate's top-1 label is serving's. ShopvisionCandidateDisagreement: below 50 % for "
                      "15 minutes."),
    panel("Comparisons dropped", (rate_by("model", "shopvision_gateway_shadow_dropped_total"), "{{model}}"),
          unit="reqps", width=8,
          description=f"{ROLLOUT_ONLY} comparison calls not made because GATEWAY_SHADOW_MAX_IN_FLIGHT were in "
                      "flight: the agreement leaves them out."),
    panel("Feedback", (rate_by("model, outcome", "shopvision_gateway_feedback_total"), "{{model}} {{outcome}}"),
          unit="reqps", width=8, stacked=True,
          description="SubmitFeedback calls committed: stored, or a duplicate of feedback already stored."),
    panel("Drift (PSI against the validation reference)",
          (f"max by (model, version, signal) (shopvision_gateway_drift_psi{{{MODEL}}})",
           "{{model}} v{{version}} {{signal}}"), unit="short", decimals=2,
          description="Population stability index of the last window of predictions (class shares, top-1 score) "
                      "against the version's validation split: under 0.1 no change, 0.1 to 0.25 moderate, above "
                      "0.25 significant (ShopvisionModelDrift after 15 minutes). Highest replica."),
    panel("Drift window samples",
          (f"min by (model, version) (shopvision_gateway_drift_window_samples{{{MODEL}}})", "{{model}} v{{version}}"),
          unit="short",
          description="Predictions in the smallest replica's window. Under 500, a window's PSI is mostly noise "
                      "and does not alert."),
    panel("Top-1 score",
          *quantiles_by("shopvision_gateway_top1_score", "model, version", "{{model}} v{{version}}", (0.1, 0.5)),
          unit="percentunit", width=8,
          description="Score of the answer given, low tail and median: falling scores are the first sign of "
                      "inputs unlike the training data."),
    panel("Predicted labels (top 5 per version)",
          (share_of_label("label", "model, version", "shopvision_gateway_predictions_total", top=5),
           "{{model}} v{{version}} {{label}}"), unit="percentunit", width=8,
          description="Share of the answers each top-1 label takes; the class PSI compares all of them with "
                      "the validation split."),
    panel("Input brightness",
          (share_of_label("bucket", "model", "shopvision_gateway_input_brightness_total"), "{{model}} {{bucket}}"),
          unit="percentunit", width=8, stacked=True, description="Share of the images in each brightness bucket."),
    panel("Input size", *quantiles_by("shopvision_gateway_input_megapixels", "model", "{{model}}", (0.5, 0.95)),
          unit="short", decimals=1, description="Megapixels of the decoded images."),
    panel("Input aspect ratio",
          *quantiles_by("shopvision_gateway_input_aspect_ratio", "model", "{{model}}", (0.05, 0.5, 0.95)),
          unit="short", decimals=2, description="Width / height of the decoded images."),
))

TRITON = Dashboard(
    uid="shopvision-triton",
    title="shopvision / Triton models",
    description="Triton Inference Server per model and version: rate, dynamic batching, queue vs compute, failures; "
                "the model lifecycle (rollouts, drift, feedback) as the gateway sees it.",
    with_model=True,
    rows=(
        Row("Throughput", (
            panel("Inferences / s by model and version",
                  (f"sum by (model, version) (rate(nv_inference_count{{{MODEL}}}{RATE}))", "{{model}} v{{version}}"),
                  unit="short"),
            panel("Successful requests / s",
                  (f"sum by (model, version) (rate(nv_inference_request_success{{{MODEL}}}{RATE}))",
                   "{{model}} v{{version}}"), unit="reqps"),
            panel("Average batch size",
                  (f"sum by (model, version) (rate(nv_inference_count{{{MODEL}}}{RATE}))"
                   f" / sum by (model, version) (rate(nv_inference_exec_count{{{MODEL}}}{RATE}))",
                   "{{model}} v{{version}}"), unit="short", decimals=1,
                  description="Inferences per model execution (nv_inference_count / nv_inference_exec_count): "
                              "how well dynamic batching groups requests."),
            panel("Pending requests", (f"sum by (model) (nv_inference_pending_request_count{{{MODEL}}})", "{{model}}"),
                  unit="short", description="Requests queued in Triton, not yet executing."),
        )),
        Row("Time per request", (
            panel("Queue vs compute time",
                  (per_request("nv_inference_queue_duration_us"), "{{model}} queue"),
                  (per_request("nv_inference_compute_infer_duration_us"), "{{model}} compute"), unit="s",
                  description="Average per successful request over the interval. Queue time growing while "
                              "compute stays flat means Triton needs more instances."),
            panel("Compute breakdown",
                  (per_request("nv_inference_compute_input_duration_us"), "{{model}} input"),
                  (per_request("nv_inference_compute_infer_duration_us"), "{{model}} infer"),
                  (per_request("nv_inference_compute_output_duration_us"), "{{model}} output"), unit="s"),
            panel("Request time inside Triton", (per_request("nv_inference_request_duration_us"), "{{model}}"),
                  unit="s", width=24),
        )),
        Row("Failures", (
            panel("Failed requests by reason",
                  (f"sum by (model, reason) (rate(nv_inference_request_failure{{{MODEL}}}{RATE}))",
                   "{{model}} {{reason}}"), unit="reqps", stacked=True),
            panel("Failure ratio",
                  (f"sum by (model) (rate(nv_inference_request_failure{{{MODEL}}}{RATE})) / (sum by (model) "
                   f"(rate(nv_inference_request_failure{{{MODEL}}}{RATE})) + sum by (model) "
                   f"(rate(nv_inference_request_success{{{MODEL}}}{RATE})))", "{{model}}"), unit="percentunit"),
        )),
        LIFECYCLE,
    ),
)

PREPROCESS = Dashboard(
    uid="shopvision-preprocess",
    title="shopvision / Preprocess",
    description="Image decode and transform: time by format, rejected images by reason.",
    rows=(
        Row("Decode", (
            panel("Decode time by format", *quantiles("shopvision_preprocess_decode_duration_seconds", NS, by="format"),
                  unit="s"),
            panel("Decoded images / s by format",
                  (f"sum by (format) (rate(shopvision_preprocess_decode_duration_seconds_count{{{NS}}}{RATE}))",
                   "{{format}}"), unit="reqps", stacked=True),
            panel("Transform time (resize, crop, colour)",
                  *quantiles("shopvision_preprocess_transform_duration_seconds", NS), unit="s"),
            panel("Image size", *quantiles("shopvision_preprocess_image_bytes", NS), unit="bytes"),
        )),
        Row("Requests and rejects", (
            panel("Requests by status code",
                  (f"sum by (code) (rate(shopvision_preprocess_requests_total{{{NS}}}{RATE}))", "{{code}}"),
                  unit="reqps", stacked=True, width=8),
            panel("Rejected images by reason",
                  (f"sum by (reason) (rate(shopvision_preprocess_rejected_total{{{NS}}}{RATE}))", "{{reason}}"),
                  unit="reqps", stacked=True, width=8,
                  description="Images refused before or during decode (not an image, truncated, bombs, ...)."),
            panel("Request latency (server side)",
                  *quantiles("shopvision_preprocess_request_duration_seconds", NS), unit="s", width=8),
        )),
    ),
)

CAPACITY = Dashboard(
    uid="shopvision-capacity",
    title="shopvision / Capacity",
    description="CPU, memory and GPU of every shopvision process.",
    rows=(
        Row("CPU and memory", (
            panel("CPU used by service",
                  (f'sum by (job) (rate(process_cpu_seconds_total{{{NS}, job=~"gateway|preprocess"}}{RATE}))',
                   "{{job}}"), unit="short", description="CPU cores busy, all replicas of each Python service."),
            panel("Resident memory by service",
                  (f'sum by (job) (process_resident_memory_bytes{{{NS}, job=~"gateway|preprocess"}})', "{{job}}"),
                  unit="bytes"),
            panel("Triton host CPU utilisation", (f"avg by (instance) (nv_cpu_utilization{{{NS}}})", "{{instance}}"),
                  unit="percentunit", description="Whole-node CPU as Triton reports it (nv_cpu_utilization)."),
            panel("Triton host memory",
                  (f"sum by (instance) (nv_cpu_memory_used_bytes{{{NS}}})", "used {{instance}}"),
                  (f"sum by (instance) (nv_cpu_memory_total_bytes{{{NS}}})", "total {{instance}}"), unit="bytes"),
            panel("Open file descriptors",
                  (f'max by (job) (process_open_fds{{{NS}, job=~"gateway|preprocess"}}'
                   f' / process_max_fds{{{NS}, job=~"gateway|preprocess"}})', "{{job}}"), unit="percentunit"),
            panel("Images per CPU-second",
                  (f'sum(rate(shopvision_gateway_requests_total{{{NS}, method="Classify", code="OK"}}{RATE}))'
                   f' / sum(rate(process_cpu_seconds_total{{{NS}, job=~"gateway|preprocess"}}{RATE}))',
                   "images / CPU-s"),
                  unit="short", decimals=1,
                  description="Classified images per second of gateway+preprocess CPU (Triton's own CPU excluded)."),
        )),
        Row("GPU", (
            panel("GPU utilisation", (f"avg by (gpu_uuid) (nv_gpu_utilization{{{NS}}})", "{{gpu_uuid}}"),
                  unit="percentunit", width=8, description=f"{GPU_ONLY} empty on CPU-only nodes."),
            panel("GPU memory used",
                  (f"sum by (gpu_uuid) (nv_gpu_memory_used_bytes{{{NS}}}) / sum by (gpu_uuid) "
                   f"(nv_gpu_memory_total_bytes{{{NS}}})", "{{gpu_uuid}}"),
                  unit="percentunit", width=8, description=f"{GPU_ONLY} empty on CPU-only nodes."),
            panel("GPU power", (f"sum by (gpu_uuid) (nv_gpu_power_usage{{{NS}}})", "{{gpu_uuid}} used"),
                  (f"sum by (gpu_uuid) (nv_gpu_power_limit{{{NS}}})", "{{gpu_uuid}} limit"),
                  unit="watt", width=8, description=f"{GPU_ONLY} empty on CPU-only nodes."),
        )),
    ),
)

DASHBOARDS = {"overview.json": OVERVIEW, "triton-models.json": TRITON, "preprocess.json": PREPROCESS,
              "capacity.json": CAPACITY}


# -- rendering to Grafana's JSON model ---------------------------------------------------------------------------
def variables(with_model: bool) -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, query: str, multi: bool) -> dict[str, Any]:
        variable: dict[str, Any] = {
            "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "refresh": 2, "sort": 1, "hide": 0, "regex": "", "current": {}, "options": [],
            "multi": multi, "includeAll": multi,
        }
        return variable

    listed = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        query_variable("namespace", "Namespace", 'label_values(up{job="gateway"}, namespace)', multi=False),
    ]
    if with_model:
        listed.append(query_variable("model", "Model", f"label_values(nv_inference_count{{{NS}}}, model)",
                                     multi=True))
    return listed


def render_panel(item: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": item.unit}
    if item.decimals is not None:
        defaults["decimals"] = item.decimals
    if item.kind == "timeseries":
        defaults["custom"] = {"fillOpacity": 10 if item.stacked else 0, "showPoints": "never",
                              "stacking": {"mode": "normal" if item.stacked else "none"}}
        options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return {
        "id": panel_id,
        "type": item.kind,
        "title": item.title,
        "description": item.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": item.height, "w": item.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": q.expr,
                     "legendFormat": q.legend or "__auto", "range": True}
                    for i, q in enumerate(item.queries)],
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y, x, row_height = next_id + 1, y + 1, 0, 0
        for item in row.panels:
            if x + item.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(render_panel(item, next_id, x, y))
            next_id, x, row_height = next_id + 1, x + item.width, max(row_height, item.height)
        y += row_height
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "links": [{"type": "dashboards", "tags": ["shopvision"], "asDropdown": True, "title": "shopvision",
                   "includeVars": True, "keepTime": True}],
        "templating": {"list": variables(dashboard.with_model)},
        "panels": panels,
    }


def to_json(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the shopvision Grafana dashboards (JSON) from code.")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where to write them (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file in --out-dir differs from the generated JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    stale = []
    for name, dashboard in DASHBOARDS.items():
        path = args.out_dir / name
        text = to_json(dashboard)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("out of date (run `make dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
