"""Canary and shadow rollouts on the real stack: Triton from the wheel, preprocess, two gateways, real gRPC.

A private model repository (a copy of fashion_cnn, its classifier and the softmax, plus a slow pass-through
step for a slow shadow) in tmp; a candidate is the same fashion_cnn ONNX published again as the next version
with ``python -m training.publish --canary|--shadow``, then moved with ``python -m training.rollout``. Both
versions have the same weights, so they agree on every image: what tells them apart is the version reported.
"""
from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Ports, Stack
from services.common import model_params
from tests.images import encode, gradient
from tests.metrics_util import scrape, value
from tests.search.gateways import PrivateGateway
from training import publish
from training import rollout as rollout_cli
from training.repository import layout

pytestmark = pytest.mark.stack

MODEL = "fashion_cnn"
CANDIDATE = model_params.candidate_name(MODEL)
CLASSIFIER = layout.classifier_name(MODEL)
SOURCE = REPO_ROOT / "model_repository"
SLOW_STEP = "slow_logits"
SLOW_CONFIG = """# Test-only: passes logits through after a sleep (a slow candidate for the shadow test).
name: "slow_logits"
backend: "python"
max_batch_size: 64
input [
  { name: "logits_in" data_type: TYPE_FP32 dims: [ -1 ] }
]
output [
  { name: "logits_out" data_type: TYPE_FP32 dims: [ -1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "delay_seconds" value: { string_value: "0.3" } }
"""


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollout") / "model_repository"
    for name in (MODEL, CLASSIFIER, layout.SOFTMAX):
        shutil.copytree(SOURCE / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / SLOW_STEP / "1").mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("slow_logits_model.py"), root / SLOW_STEP / "1" / "model.py")
    (root / SLOW_STEP / "config.pbtxt").write_text(SLOW_CONFIG)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run directory holding the published fashion_cnn version 1 (its ONNX, run.json, model card)."""
    run = tmp_path_factory.mktemp("fashion_cnn_run")
    for item in (SOURCE / MODEL / "1").iterdir():
        shutil.copy(item, run / item.name)
    shutil.copy(SOURCE / CLASSIFIER / "1" / "model.onnx", run / "model.onnx")
    return run


@pytest.fixture(scope="module")
def rollout_stack(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("rollout-stack")
    stack = Stack(ports=Ports.free(), model_repository=repository, log_dir=root / "logs",
                  postgres_dir=root / "postgres",
                  extra_env={"GATEWAY_DEFAULT_MODEL": MODEL, "GATEWAY_SHADOW_MAX_IN_FLIGHT": "2"})
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def second_gateway(rollout_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateGateway]:
    gateway = PrivateGateway.on(rollout_stack, tmp_path_factory.mktemp("gateway-b"), GATEWAY_DEFAULT_MODEL=MODEL)
    gateway.start()
    yield gateway
    gateway.stack.stop()


@pytest.fixture(scope="module")
def stub_a(rollout_stack: Stack) -> Iterator[recognition_pb2_grpc.ProductRecognitionStub]:
    with grpc.insecure_channel(rollout_stack.gateway_address) as channel:
        yield recognition_pb2_grpc.ProductRecognitionStub(channel)


@pytest.fixture(scope="module")
def stub_b(second_gateway: PrivateGateway) -> Iterator[recognition_pb2_grpc.ProductRecognitionStub]:
    with grpc.insecure_channel(second_gateway.address) as channel:
        yield recognition_pb2_grpc.ProductRecognitionStub(channel)


# -- helpers ---------------------------------------------------------------------------------------------------------
def images() -> list[bytes]:
    base = gradient(56, 56)
    return [encode(base, ".png"), encode(base[::-1].copy(), ".png"), encode(255 - base, ".png"),
            encode(base[:, ::-1].copy(), ".png")]


IMAGES = images()


def classify(stub: recognition_pb2_grpc.ProductRecognitionStub, caller: str,
             image: bytes = IMAGES[0]) -> recognition_pb2.ClassifyResponse:
    return stub.Classify(recognition_pb2.ClassifyRequest(image=image, model=MODEL, top_k=3),
                         metadata=(("x-caller-id", caller),), timeout=30)


def model_info(stub: recognition_pb2_grpc.ProductRecognitionStub) -> recognition_pb2.ModelInfo:
    reply = stub.ListModels(recognition_pb2.ListModelsRequest(), timeout=10)
    return next(m for m in reply.models if m.name == MODEL)


def wait_for(stub: recognition_pb2_grpc.ProductRecognitionStub, candidate_version: str, mode: str = "",
             percent: float = 0.0, timeout_s: float = 20.0) -> recognition_pb2.ModelInfo:
    """Until the gateway's ListModels shows this rollout (candidate_version '' = none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = model_info(stub)
        if (info.candidate_version, info.rollout_mode) == (candidate_version, mode) and \
                abs(info.canary_percent - percent) < 1e-6:
            return info
        assert time.monotonic() < deadline, f"gateway shows {info}, not candidate {candidate_version} {mode}"
        time.sleep(0.2)


def publish_candidate(repository: Path, run_dir: Path, stack: Stack, *flags: str) -> int:
    args = publish.get_args_parser().parse_args([
        "--repository", str(repository), "--triton", stack.triton_grpc_address, "--run-dir", str(run_dir),
        "--model", MODEL, "--description", "fashion_cnn republished as a candidate", *flags])
    return publish.main(args)


def run_rollout(repository: Path, stack: Stack, command: str, *flags: str) -> None:
    args = rollout_cli.get_args_parser().parse_args([
        command, "--model", MODEL, "--repository", str(repository), "--triton", stack.triton_grpc_address,
        *flags])
    assert rollout_cli.main(args) == 0


def end_any_rollout(repository: Path, stack: Stack) -> None:
    if (repository / CANDIDATE).exists():
        run_rollout(repository, stack, "rollback")


def served(stub: recognition_pb2_grpc.ProductRecognitionStub) -> str:
    return model_info(stub).versions[-1]


class Load:
    """Background callers classifying in a loop on one gateway; every failure is recorded."""

    def __init__(self, address: str, callers: list[str], threads: int = 2) -> None:
        self._address = address
        self._callers = callers
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        self.versions: list[str] = []
        self.failures: list[str] = []

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _loop(self, index: int) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            n = index
            while not self._stop.is_set():
                caller = self._callers[n % len(self._callers)]
                n += len(self._threads)
                try:
                    self.versions.append(classify(stub, caller, IMAGES[n % len(IMAGES)]).model_version)
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")


def p50_of_calls(stub: recognition_pb2_grpc.ProductRecognitionStub, count: int) -> tuple[float, set[str]]:
    seconds, versions = [], set()
    for i in range(count):
        start = time.perf_counter()
        versions.add(classify(stub, f"latency-{i}", IMAGES[i % len(IMAGES)]).model_version)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), versions


# -- tests -----------------------------------------------------------------------------------------------------------
def test_canary_splits_callers_stickily_and_alike_on_every_gateway(
        repository: Path, run_dir: Path, rollout_stack: Stack, second_gateway: PrivateGateway,
        stub_a: recognition_pb2_grpc.ProductRecognitionStub, stub_b: recognition_pb2_grpc.ProductRecognitionStub,
        capsys: pytest.CaptureFixture[str]) -> None:
    end_any_rollout(repository, rollout_stack)
    serving = served(stub_a)
    version = publish_candidate(repository, run_dir, rollout_stack, "--canary", "20")
    assert (repository / CANDIDATE / str(version)).is_dir() and (repository / CLASSIFIER / str(version)).is_dir()
    for stub in (stub_a, stub_b):
        info = wait_for(stub, str(version), "canary", 20.0)
        assert info.versions[-1] == serving

    callers = [f"shopper-{i}" for i in range(200)]
    first: dict[str, str] = {}
    for caller in callers:
        reply = classify(stub_a, caller)
        assert reply.model == MODEL
        assert all(p.confident == (p.score >= 0.5) for p in reply.predictions)  # uncalibrated: the default
        first[caller] = reply.model_version
    assert set(first.values()) == {serving, str(version)}
    share = sum(v == str(version) for v in first.values()) / len(callers)
    assert 0.13 <= share <= 0.27, f"the canary answered {share:.0%} of callers, not 20 ± 7 %"
    for caller in callers[:50]:  # sticky: the same version on every call, whatever the image
        for image in IMAGES[1:3]:
            assert classify(stub_a, caller, image).model_version == first[caller], caller
    disagreements = [c for c in callers if classify(stub_b, c).model_version != first[c]]
    assert not disagreements, f"the two gateways split {len(disagreements)} callers differently"
    canary_caller = next(c for c in callers if first[c] == str(version))
    serving_caller = next(c for c in callers if first[c] == serving)
    for caller in (canary_caller, serving_caller):  # a batch is one caller: every item on its version
        batch = stub_b.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(requests=[
            recognition_pb2.ClassifyRequest(image=image, model=MODEL) for image in IMAGES]),
            metadata=(("x-caller-id", caller),), timeout=30)
        assert [item.response.model_version for item in batch.items] == [first[caller]] * len(IMAGES)

    time.sleep(0.5)  # the comparison copies of the canary's answers finish
    samples = scrape(rollout_stack.ports.gateway_metrics)
    assert value(samples, "shopvision_gateway_rollout_requests_total", model=MODEL, version=str(version),
                 role="canary") >= sum(v == str(version) for v in first.values())
    assert value(samples, "shopvision_gateway_shadow_agreement_total", model=MODEL, agree="true") > 0
    assert value(samples, "shopvision_gateway_shadow_agreement_total", model=MODEL, agree="false") == 0

    urls = [f"http://127.0.0.1:{port}/metrics"
            for port in (rollout_stack.ports.gateway_metrics, second_gateway.stack.ports.gateway_metrics)]
    flags = [flag for url in urls for flag in ("--metrics", url)]
    capsys.readouterr()
    run_rollout(repository, rollout_stack, "status", *flags)
    text = capsys.readouterr().out
    assert f"candidate version {version}" in text and "canary answering 20 % of callers" in text
    assert f"serving version {serving}" in text
    run_rollout(repository, rollout_stack, "status", "--json", *flags)
    report = json.loads(capsys.readouterr().out)
    rows = {(row["version"], row["role"]): row for row in report["versions"]}
    assert rows[(serving, "serving")]["requests"] > 0 and rows[(str(version), "canary")]["requests"] > 0
    assert rows[(str(version), "canary")]["p50_ms"] is not None and rows[(str(version), "canary")]["errors"] == 0
    assert report["gateways"] == 2 and report["agreement"]["compared"] > 0

    run_rollout(repository, rollout_stack, "set", "--canary", "100")
    wait_for(stub_a, str(version), "canary", 100.0)
    assert {classify(stub_a, c).model_version for c in callers[:20]} == {str(version)}
    end_any_rollout(repository, rollout_stack)


@pytest.mark.slow
def test_promote_under_load_fails_no_call(
        repository: Path, run_dir: Path, rollout_stack: Stack, second_gateway: PrivateGateway,
        stub_a: recognition_pb2_grpc.ProductRecognitionStub, stub_b: recognition_pb2_grpc.ProductRecognitionStub
) -> None:
    end_any_rollout(repository, rollout_stack)
    version = publish_candidate(repository, run_dir, rollout_stack, "--canary", "50")
    for stub in (stub_a, stub_b):
        wait_for(stub, str(version), "canary", 50.0)
    callers = [f"promote-{i}" for i in range(20)]
    with Load(rollout_stack.gateway_address, callers) as load_a, Load(second_gateway.address, callers) as load_b:
        time.sleep(1.0)
        run_rollout(repository, rollout_stack, "promote")
        for stub in (stub_a, stub_b):
            wait_for(stub, "")
        time.sleep(1.0)
    assert not load_a.failures and not load_b.failures, (load_a.failures + load_b.failures)[:5]
    assert len(load_a.versions) > 20 and len(load_b.versions) > 20
    assert load_a.versions[-1] == str(version) and load_b.versions[-1] == str(version)
    for stub in (stub_a, stub_b):
        assert model_info(stub).versions == [str(version)]
        assert {classify(stub, c).model_version for c in callers} == {str(version)}
    assert not (repository / CANDIDATE).exists() and (repository / MODEL / str(version) / "spec.json").exists()
    config = (repository / MODEL / "config.pbtxt").read_text()
    assert layout.step_members(config)[0] == (CLASSIFIER, version)
    assert layout.parameter_of(config, model_params.PUBLIC) == "true" and layout.rollout_of(config) is None


@pytest.mark.slow
def test_rollback_under_load_fails_no_call(
        repository: Path, run_dir: Path, rollout_stack: Stack,
        stub_a: recognition_pb2_grpc.ProductRecognitionStub) -> None:
    end_any_rollout(repository, rollout_stack)
    serving = served(stub_a)
    version = publish_candidate(repository, run_dir, rollout_stack, "--canary", "50")
    wait_for(stub_a, str(version), "canary", 50.0)
    callers = [f"rollback-{i}" for i in range(20)]
    with Load(rollout_stack.gateway_address, callers, threads=3) as load:
        time.sleep(1.0)
        run_rollout(repository, rollout_stack, "rollback")
        wait_for(stub_a, "")
        time.sleep(1.0)
    assert not load.failures, load.failures[:5]
    assert str(version) in load.versions and load.versions[-1] == serving
    assert model_info(stub_a).versions == [serving]
    assert {classify(stub_a, c).model_version for c in callers} == {serving}
    assert not (repository / CANDIDATE).exists()
    assert not (repository / CLASSIFIER / str(version)).exists(), "the rejected classifier version stayed"


def make_slow(candidate_text: str) -> str:
    """The candidate with the slow pass-through step between its classifier and the softmax."""
    text = candidate_text.replace('output_map { key: "logits" value: "logits" }',
                                  'output_map { key: "logits" value: "raw_logits" }', 1)
    softmax_step = f'    {{\n      model_name: "{layout.SOFTMAX}"'
    slow_step = (f'    {{\n      model_name: "{SLOW_STEP}"\n      model_version: 1\n'
                 '      input_map { key: "logits_in" value: "raw_logits" }\n'
                 '      output_map { key: "logits_out" value: "logits" }\n    },\n')
    assert softmax_step in text
    return layout.pinned(text.replace(softmax_step, slow_step + softmax_step, 1), {})


@pytest.mark.slow
def test_a_slow_shadow_never_answers_nor_slows_the_serving_version(
        repository: Path, run_dir: Path, rollout_stack: Stack,
        stub_a: recognition_pb2_grpc.ProductRecognitionStub) -> None:
    end_any_rollout(repository, rollout_stack)
    serving = served(stub_a)
    p50_of_calls(stub_a, 10)  # warm up
    baseline, _ = p50_of_calls(stub_a, 40)

    version = publish_candidate(repository, run_dir, rollout_stack, "--shadow")
    config = repository / CANDIDATE / "config.pbtxt"
    layout.write_atomic(config, make_slow(config.read_text()))
    publish.load(rollout_stack.triton_grpc_address, [(CANDIDATE, version)], 60)
    wait_for(stub_a, str(version), "shadow")
    before = scrape(rollout_stack.ports.gateway_metrics)

    with_shadow, versions = p50_of_calls(stub_a, 40)
    assert versions == {serving}, "a shadow answered"
    assert with_shadow <= max(1.5 * baseline, baseline + 0.015), \
        f"p50 went from {baseline * 1e3:.1f} ms to {with_shadow * 1e3:.1f} ms with a slow shadow"
    with Load(rollout_stack.gateway_address, [f"overload-{i}" for i in range(8)], threads=4) as load:
        time.sleep(2.0)
    assert not load.failures and set(load.versions) == {serving}
    time.sleep(1.5)  # the shadow calls in flight finish
    after = scrape(rollout_stack.ports.gateway_metrics)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("shopvision_gateway_shadow_agreement_total", model=MODEL, agree="true") > 0
    assert delta("shopvision_gateway_shadow_agreement_total", model=MODEL, agree="false") == 0
    assert delta("shopvision_gateway_shadow_dropped_total", model=MODEL) > 0
    assert delta("shopvision_gateway_rollout_requests_total", model=MODEL, version=str(version), role="shadow") > 0
    assert delta("shopvision_gateway_rollout_requests_total", model=MODEL, version=str(version), role="canary") == 0
    shadow_p50 = _p50(after, str(version), "shadow")
    assert shadow_p50 is not None and shadow_p50 >= 0.25, "the shadow was not the slow candidate"
    end_any_rollout(repository, rollout_stack)
    wait_for(stub_a, "")


def _p50(samples: dict, version: str, role: str) -> float | None:
    buckets = sorted((float(dict(labels)["le"]), count) for (name, labels), count in samples.items()
                     if name == "shopvision_gateway_rollout_request_duration_seconds_bucket"
                     and dict(labels).get("model") == MODEL and dict(labels).get("version") == version
                     and dict(labels).get("role") == role)
    return rollout_cli.histogram_quantile(0.5, buckets)



@pytest.mark.slow
def test_the_split_survives_triton_and_gateway_restarts(
        repository: Path, run_dir: Path, rollout_stack: Stack, second_gateway: PrivateGateway,
        stub_a: recognition_pb2_grpc.ProductRecognitionStub, stub_b: recognition_pb2_grpc.ProductRecognitionStub
) -> None:
    """The candidate lives in the model repository: a restarted Triton loads it again (--load-model=*), a
    restarted gateway reads it again, and callers keep their versions."""
    end_any_rollout(repository, rollout_stack)
    version = publish_candidate(repository, run_dir, rollout_stack, "--canary", "30")
    wait_for(stub_a, str(version), "canary", 30.0)
    callers = [f"restart-{i}" for i in range(40)]
    before = {c: classify(stub_a, c).model_version for c in callers}
    assert str(version) in before.values()

    rollout_stack.stop_service("triton")
    rollout_stack.start_service("triton")
    rollout_stack.wait_ready(120, names=("triton",))
    second_gateway.stop()
    second_gateway.start()
    for stub in (stub_a, stub_b):
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_for(stub, str(version), "canary", 30.0, timeout_s=2)
                break
            except (AssertionError, grpc.RpcError, StopIteration):
                assert time.monotonic() < deadline, "the rollout did not come back after the restarts"
                time.sleep(0.5)
    for stub in (stub_a, stub_b):
        assert {c: classify(stub, c).model_version for c in callers} == before
    end_any_rollout(repository, rollout_stack)
