"""Every dashboard query and every recording rule has data in a real Prometheus scraping the real stack.

A real Prometheus (Debian ``prometheus``) is started on a free loopback port with a scrape config
pointing at the session stack's gateway, preprocess and Triton metrics ports, plus a second gateway
whose preprocess address answers nothing (a replica cut off from its upstream: real UNAVAILABLE errors
and upstream failures, without breaking the shared stack). After a burst of real ``Classify`` traffic
(good photos at concurrency 16 so Triton batches, empty bytes, bytes that are no image, an unknown
model), each PromQL expression is evaluated through ``/api/v1/query`` and must return series with a
finite value, and each of its selectors must match series on its own, so a misspelt metric name
fails even when it hides behind ``or``.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.prometheus_local import RULES_FILES, LocalPrometheus, prometheus_binary, scrape_targets
from devstack.stack import REPO_ROOT, Stack, free_port
from tests.conftest import photo_bytes
from tests.observability.promql import (
    load_dashboards,
    panel_queries,
    problems,
    rule_groups,
    rules_file_names,
    selectors,
    substitute,
    variable_values,
)
from tools.dashboards import ROLLOUT_ONLY_METRICS, TRITON_GPU_METRICS
from training.data.datasets import fashion_mnist_raw
from training.data.uploads import encode_png

pytestmark = pytest.mark.stack
RATE_WINDOW = "5m"  # longer than this module's Prometheus has existed: every rate() sees the whole burst
NAMESPACE = "local"
DASHBOARDS = load_dashboards()
QUERIES = [q for name, board in sorted(DASHBOARDS.items()) for q in panel_queries(name, board)]
FIRST_ROUND_SERIES = (
    'shopvision_gateway_upstream_errors_total{upstream="preprocess"}',
    'shopvision_gateway_rejected_total{reason="unknown_model"}',
    'shopvision_preprocess_rejected_total{reason="not_an_image"}',
    'shopvision_gateway_requests_total{method="ClassifyBatch"}',
    'shopvision_gateway_requests_total{method="ListModels"}',
)
PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg")
# A calibrated model (a drift reference, per-label counts): the drift figure needs this many answers in its window
# (services/gateway/drift.py DriftMonitor's min_samples), given in the first round.
CALIBRATED_MODEL = "fashion_effnet"
DRIFT_MIN_SAMPLES = 200


def rollout_only(expr: str) -> bool:
    """Series that exist only while a canary or shadow runs (tests/lifecycle/test_rollout_stack.py has them)."""
    # The metrics themselves and what rules record from them (namespace_model:shopvision_gateway_shadow_agreement:...).
    names = [name.removesuffix("_total") for name in ROLLOUT_ONLY_METRICS]
    return any(name in expr for name in names) or bool(re.search(r'role\s*=~?\s*"[^"]*(canary|shadow)', expr))


@dataclass
class BrokenGateway:
    address: str
    metrics_port: int


@pytest.fixture(scope="module")
def broken_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokenGateway]:
    """A second gateway, with the real Triton but a preprocess address where nothing listens."""
    gateway = BrokenGateway(f"127.0.0.1:{free_port()}", free_port())
    env = stack.env() | {"GATEWAY_ADDRESS": gateway.address, "GATEWAY_METRICS_PORT": str(gateway.metrics_port),
                         "GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{free_port()}"}
    log = open(tmp_path_factory.mktemp("broken-gateway") / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(gateway.address) as channel:
            while True:
                assert proc.poll() is None, f"gateway exited with {proc.returncode}"
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "second gateway did not start"
                    time.sleep(0.25)
        yield gateway
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def classify_expecting(stub, code: grpc.StatusCode, **fields) -> None:
    try:
        stub.Classify(recognition_pb2.ClassifyRequest(**fields), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == code, f"{fields.keys()}: {error.code()} {error.details()}"
    else:
        assert code == grpc.StatusCode.OK, f"{list(fields)} succeeded; expected {code.name}"


def drive_traffic(stack: Stack, broken: BrokenGateway, burst: int, calibrated: int) -> None:
    """Real calls: good photos (PNG and JPEG) at concurrency 16, ``calibrated`` Fashion-MNIST test images to the
    calibrated model (drift, per-label counts), one feedback, bad inputs, a batch, calls that fail upstream."""
    photos = [photo_bytes(name) for name in PHOTOS]
    raw, labels = fashion_mnist_raw("test")
    items = [encode_png(raw[i]) for i in range(calibrated)]
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: classify_expecting(stub, grpc.StatusCode.OK, image=photos[i % len(photos)]),
                          range(burst)))
            list(pool.map(lambda item: classify_expecting(stub, grpc.StatusCode.OK, image=item,
                                                          model=CALIBRATED_MODEL), items))
        names = stub.ListModels(recognition_pb2.ListModelsRequest(), timeout=10)
        model_labels = next(m.labels for m in names.models if m.name == CALIBRATED_MODEL)
        stub.SubmitFeedback(recognition_pb2.SubmitFeedbackRequest(
            image=encode_png(raw[burst + calibrated]), model=CALIBRATED_MODEL,
            label=model_labels[int(labels[burst + calibrated])]), timeout=30)
        classify_expecting(stub, grpc.StatusCode.INVALID_ARGUMENT, image=b"")
        classify_expecting(stub, grpc.StatusCode.INVALID_ARGUMENT, image=b"this is a shopping list, not a photo")
        classify_expecting(stub, grpc.StatusCode.INVALID_ARGUMENT, image=photos[0], model="no_such_model")
        stub.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(
            requests=[recognition_pb2.ClassifyRequest(image=p) for p in photos[:3]]), timeout=30)
        stub.ListModels(recognition_pb2.ListModelsRequest(), timeout=10)
    with grpc.insecure_channel(broken.address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        for _ in range(2):
            classify_expecting(stub, grpc.StatusCode.UNAVAILABLE, image=photos[0])


def wait_for(what: str, check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(stack: Stack, broken_gateway: BrokenGateway, tmp_path_factory) -> Iterator[LocalPrometheus]:
    try:
        prometheus_binary()
    except RuntimeError as error:
        pytest.fail(str(error))
    targets = scrape_targets(stack.ports.gateway_metrics, stack.ports.preprocess_metrics, stack.ports.triton_metrics)
    targets["gateway"].append(f"127.0.0.1:{broken_gateway.metrics_port}")
    prom = LocalPrometheus(targets, port=free_port(), namespace=NAMESPACE, interval_s=1.0,
                           log_path=tmp_path_factory.mktemp("prometheus") / "prometheus.log")
    prom.start()
    try:
        # Discovery hands targets to the scrapers after ~5 s; wait until each one has been scraped.
        wait_for("all 4 targets scraped", lambda: len(prom.query("up == 1")) == 4)
        # A counter's first sample holds its first increments, which rate() cannot see: the first round
        # creates every series (reasons, codes, methods), the second one moves them all.
        drive_traffic(stack, broken_gateway, burst=len(PHOTOS), calibrated=DRIFT_MIN_SAMPLES + 10)
        wait_for("the first round to be scraped", lambda: all(prom.query(s) for s in FIRST_ROUND_SERIES))
        drive_traffic(stack, broken_gateway, burst=48, calibrated=24)
        # The last calls must be scraped and the rules evaluated on them (1 s intervals).
        wait_for("the error ratio rule to see the UNAVAILABLE calls", lambda: any(
            float(s["value"][1]) > 0 for s in prom.query("namespace:shopvision_gateway_errors:ratio_rate5m")))
        time.sleep(2)
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def variables(prometheus: LocalPrometheus) -> dict[str, dict[str, str]]:
    """Per dashboard, the value Grafana would give each variable (evaluated through Prometheus)."""
    return {name: variable_values(prometheus, board, RATE_WINDOW) for name, board in DASHBOARDS.items()}


def gpu_metrics_exported(prom: LocalPrometheus) -> bool:
    return bool(prom.query(f'count({{__name__=~"{"|".join(TRITON_GPU_METRICS)}"}})'))


def test_every_target_is_up(prometheus: LocalPrometheus) -> None:
    health = prometheus.scrapes_healthy()
    assert len(health) == 4 and set(health.values()) == {"up"}, health


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_variables_have_values(variables: dict[str, dict[str, str]], name: str) -> None:
    values = variables[name]
    assert values["namespace"] == NAMESPACE
    if "model" in values:
        assert "efficientnet_lite0_imagenet" in values["model"]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.name)
def test_every_panel_query_has_data(prometheus: LocalPrometheus, variables, query) -> None:
    expr = substitute(query.expr, variables[query.dashboard])
    if query.gpu_only and not gpu_metrics_exported(prometheus):
        prometheus.query(expr)  # still a valid query: a syntax error would raise here
        pytest.skip("GPU only (marked in the panel description): Triton on this machine exports no nv_gpu_* "
                    "metrics, so this panel stays empty; its names are checked against Triton's GPU metric list")
    if rollout_only(query.expr):
        prometheus.query(expr)
        pytest.skip("rollout only (marked in the panel description): no canary or shadow runs on the session stack; "
                    "tests/lifecycle/test_rollout_stack.py exports these series during one")
    assert problems(prometheus, expr) == [], expr


def test_every_recording_rule_has_data(prometheus: LocalPrometheus) -> None:
    records, alerts = set(), set()
    for path in RULES_FILES:
        file_records, file_alerts = rules_file_names(path)
        records, alerts = records | file_records, alerts | file_alerts
    loaded = [rule for group in rule_groups(prometheus) for rule in group["rules"]]
    assert {r["name"] for r in loaded if r["type"] == "recording"} == records
    assert {r["name"] for r in loaded if r["type"] == "alerting"} == alerts
    failures = {}
    for rule in loaded:
        if rule["health"] != "ok":
            failures[rule["name"]] = f"health {rule['health']}: {rule.get('lastError')}"
        elif rule["type"] == "recording" and not rollout_only(rule["query"]):
            recorded = prometheus.query(rule["name"])
            found = problems(prometheus, rule["query"])
            if not any(math.isfinite(float(s["value"][1])) for s in recorded):
                found.insert(0, f"recorded series: {recorded or 'none'}")
            if found:
                failures[rule["name"]] = found
    assert failures == {}


def test_alert_rules_read_series_that_exist(prometheus: LocalPrometheus) -> None:
    """Alerts need not fire, but every series they read must exist (recorded or scraped)."""
    missing = {}
    for group in rule_groups(prometheus):
        for rule in group["rules"]:
            if rule["type"] == "alerting" and not rollout_only(rule["query"]):
                empty = [s for s in selectors(rule["query"]) if not prometheus.query(s)]
                if empty:
                    missing[rule["name"]] = empty
    assert missing == {}


def test_a_misspelt_metric_fails_the_check(prometheus: LocalPrometheus, variables) -> None:
    query = next(q for q in QUERIES if q.dashboard == "overview.json" and q.panel == "Server error ratio")
    expr = substitute(query.expr, variables["overview.json"])
    assert problems(prometheus, expr) == []
    # Misspelt everywhere: the panel has no series at all.
    everywhere = expr.replace("shopvision_gateway_requests_total", "shopvision_gateway_request_total")
    assert "no series" in problems(prometheus, everywhere)
    # Misspelt only in the errors half, which `or ... * 0` would otherwise paper over with zeros.
    once = expr.replace("shopvision_gateway_requests_total", "shopvision_gateway_request_total", 1)
    assert prometheus.query(once), "the whole expression still answers"
    assert any("shopvision_gateway_request_total" in p for p in problems(prometheus, once))
    assert "query failed" in problems(prometheus, expr.replace("sum(", "sum((", 1))[0]


def test_traffic_shows_up_with_the_right_labels(prometheus: LocalPrometheus) -> None:
    """What was sent in the second round is seen moving (rate > 0), under the labels the panels group by."""
    def moving(metric: str, label: str) -> set[str]:
        expr = f"sum by ({label}) (rate({metric}[{RATE_WINDOW}])) > 0"
        return {s["metric"].get(label, "") for s in prometheus.query(expr)}

    assert {"empty", "not_an_image", "unknown_model"} <= moving("shopvision_gateway_rejected_total", "reason")
    assert "not_an_image" in moving("shopvision_preprocess_rejected_total", "reason")
    assert "preprocess" in moving('shopvision_gateway_upstream_errors_total{code="UNAVAILABLE"}', "upstream")
    assert {"png", "jpeg"} <= moving("shopvision_preprocess_decode_duration_seconds_count", "format")
    assert {"Classify", "ClassifyBatch", "ListModels"} <= moving(
        "shopvision_gateway_request_duration_seconds_count", "method")
    assert moving("shopvision_gateway_hop_duration_seconds_count", "hop") == {"preprocess", "triton"}
    assert {s["metric"]["upstream"] for s in prometheus.query(
        "min by (upstream) (shopvision_gateway_upstream_up) == 0")} == {"preprocess"}


def test_triton_batched_the_concurrent_calls(prometheus: LocalPrometheus) -> None:
    batch = prometheus.query(
        'namespace_model:nv_inference_batch_size:mean_rate5m{model="efficientnet_lite0_imagenet_onnx"}')
    assert batch and float(batch[0]["value"][1]) > 1.0, batch


def test_broken_gateway_is_reported_unavailable(prometheus: LocalPrometheus, broken_gateway) -> None:
    by_instance = {s["metric"]["instance"]: float(s["value"][1]) for s in prometheus.query(
        'sum by (instance) (shopvision_gateway_requests_total{code="UNAVAILABLE", method="Classify"})')}
    assert by_instance.get(f"127.0.0.1:{broken_gateway.metrics_port}", 0) == 4, by_instance
