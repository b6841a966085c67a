"""Pure parts of the rollout: the caller split, config parsing, pinned config writers and edits, the routing
decisions against a fake Triton, and the status arithmetic of training.rollout."""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from services.common import model_params
from services.common.spec import Spec
from services.gateway import metrics
from services.gateway.config import GatewayConfig, RolloutConfig
from services.gateway.rollout import Calibration, Candidate, bucket_of, calibration_of, candidate_of_config
from services.gateway.routing import Router
from services.gateway.triton import Classification, Model, ModelGone, embedding_source_of
from tests.metrics_util import value
from training import rollout as rollout_cli
from training.repository import layout
from training.repository.recipe import read_config

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
SPEC = Spec(28, 28, 1, "object", 0, "dark")


# -- the split -------------------------------------------------------------------------------------------------------
def test_canary_share_of_200_callers_is_near_the_percent_and_stable() -> None:
    callers = [f"caller-{i}" for i in range(200)]
    chosen = [c for c in callers if bucket_of("fashion_cnn", c) < 20.0]
    assert 0.13 * 200 <= len(chosen) <= 0.27 * 200, len(chosen)
    assert chosen == [c for c in callers if bucket_of("fashion_cnn", c) < 20.0]  # the same every time
    # A property of the hash, not of this process: every replica and every restart computes the same.
    assert bucket_of("fashion_cnn", "caller-0") == pytest.approx(
        int.from_bytes(__import__("hashlib").sha256(b"fashion_cnn\x00caller-0").digest()[:8], "big")
        % 10_000 / 100)


def test_split_is_monotonic_in_the_percent_and_differs_between_models() -> None:
    callers = [uuid.UUID(int=i).hex for i in range(500)]
    at_10 = {c for c in callers if bucket_of("m", c) < 10}
    at_50 = {c for c in callers if bucket_of("m", c) < 50}
    assert at_10 <= at_50  # raising the share keeps the canary's callers on it
    assert {c for c in callers if bucket_of("other", c) < 50} != at_50
    assert all(0.0 <= bucket_of("m", c) < 100.0 for c in callers)


def test_a_shadow_answers_nobody_and_a_full_canary_everybody() -> None:
    shadow = Candidate("m", "m__candidate", "2", "shadow", 100.0, SPEC)
    full = Candidate("m", "m__candidate", "2", "canary", 100.0, SPEC)
    none = Candidate("m", "m__candidate", "2", "canary", 0.0, SPEC)
    assert not any(shadow.answers(str(i)) for i in range(100))
    assert all(full.answers(str(i)) for i in range(100))
    assert not any(none.answers(str(i)) for i in range(100))


# -- parsing what Triton returns -----------------------------------------------------------------------------------
def _params(**values: str) -> dict[str, str]:
    return dict(values)


def test_candidate_parameters_are_parsed_and_bad_ones_ignored() -> None:
    params = {model_params.CANDIDATE_OF: "m", model_params.ROLLOUT_MODE: "canary",
              model_params.CANARY_PERCENT: "12.5", model_params.MEMBERS: "m_onnx:3,postprocess_softmax:1",
              model_params.THRESHOLDS: "[0.5, 0.9]", model_params.THRESHOLD_RULE: "precision>=0.95",
              model_params.REFERENCE: '{"count": 3}'}
    candidate = candidate_of_config("m__candidate", params, ["3"], SPEC, 2)
    assert candidate is not None
    assert (candidate.model, candidate.version, candidate.mode, candidate.percent) == ("m", "3", "canary", 12.5)
    assert candidate.calibration == Calibration((0.5, 0.9), "precision>=0.95", '{"count": 3}')
    assert candidate.members == "m_onnx:3,postprocess_softmax:1"
    assert candidate_of_config("x", {**params, model_params.CANARY_PERCENT: "120"}, ["3"], SPEC, 2) is None
    assert candidate_of_config("x", {**params, model_params.ROLLOUT_MODE: "blue-green"}, ["3"], SPEC, 2) is None
    assert candidate_of_config("x", {model_params.PUBLIC: "true"}, ["3"], SPEC, 2) is None


def test_thresholds_parse_or_fall_back_to_the_default() -> None:
    good = calibration_of("m", {model_params.THRESHOLDS: "[0.2, 0.8, 0.5]"}, 3)
    assert good.thresholds == (0.2, 0.8, 0.5)
    assert good.confident(0.8, 1, 0.5) and not good.confident(0.79, 1, 0.5) and good.confident(0.2, 0, 0.9)
    for bad in ("[0.2, 0.8]", "not json", '{"a": 1}', '["x", 1, 2]'):
        assert calibration_of("m", {model_params.THRESHOLDS: bad}, 3).thresholds == ()
    plain = Calibration()
    assert plain.confident(0.5, 0, 0.5) and not plain.confident(0.49, 0, 0.5)


def test_embedding_source_carries_the_pinned_step_version() -> None:
    config = {"ensemble_scheduling": {"step": [
        {"model_name": "m_onnx", "model_version": "3", "input_map": {"image": "image"},
         "output_map": {"logits": "logits", "embedding": "embedding"}}]}}
    source = embedding_source_of(config)
    assert source is not None and source.version == "3" and source.model == "m_onnx"
    config["ensemble_scheduling"]["step"][0]["model_version"] = "-1"
    source = embedding_source_of(config)
    assert source is not None and source.version == ""


def test_gateway_rollout_settings_and_the_refresh_period() -> None:
    config = GatewayConfig.from_env({})
    assert config.model_refresh_s <= 1.0  # a split change reaches every replica within ~2 s
    assert config.rollout.confidence_threshold == 0.5 and config.rollout.shadow_max_in_flight == 4
    custom = RolloutConfig.from_env({"GATEWAY_CONFIDENCE_THRESHOLD": "0.7", "GATEWAY_SHADOW_MAX_IN_FLIGHT": "0"})
    assert (custom.confidence_threshold, custom.shadow_max_in_flight) == (0.7, 0)


# -- pinned configs --------------------------------------------------------------------------------------------------
def _steps(text: str) -> list[tuple[str, int]]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return [(step.model_name, step.model_version) for step in config.ensemble_scheduling.step]


def test_writers_pin_every_step_and_list_the_members() -> None:
    written = {
        "ensemble": layout.ensemble_config("m", SPEC, 10, 64, "d", classifier_version=3),
        "ensemble default": layout.ensemble_config("m", SPEC, 10, 64, "d"),
        "candidate": layout.ensemble_config("m", SPEC, 10, 64, "d", classifier_version=4,
                                            rollout=layout.Rollout("m", "canary", 20)),
        "fused": layout.fused_config("f", ["a", "b"], SPEC, 10, 64, "d", member_versions=[4, 1]),
        "fused default": layout.fused_config("f", ["a", "b"], SPEC, 10, 64, "d"),
    }
    for what, text in written.items():
        steps = _steps(text)
        assert steps and all(version >= 1 for _, version in steps), f"{what} has an unpinned step: {steps}"
        assert "model_version: -1" not in text, what
        members = layout.parameter_of(text, model_params.MEMBERS)
        assert members == ",".join(f"{n}:{v}" for n, v in steps), what
    assert _steps(written["ensemble"]) == [("m_onnx", 3), ("postprocess_softmax", 1)]
    assert _steps(written["fused"]) == [("a_onnx", 4), ("b_onnx", 1), ("f_combine", 1)]
    candidate = read_config_text(written["candidate"])
    assert candidate.name == "m__candidate"
    assert model_params.PUBLIC not in candidate.parameters
    assert candidate.parameters[model_params.CANDIDATE_OF].string_value == "m"
    assert candidate.parameters[model_params.CANARY_PERCENT].string_value == "20"
    with pytest.raises(ValueError):
        layout.ensemble_config("m", SPEC, 10, 64, "d", classifier_version=-1)


def read_config_text(text: str):  # type: ignore[no-untyped-def]
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_committed_public_ensembles_are_pinned_to_existing_versions() -> None:
    public = [p for p in sorted(REPOSITORY.glob("*/config.pbtxt"))
              if model_params.PUBLIC in read_config(p).parameters]
    assert {p.parent.name for p in public} >= {"fashion_cnn", "fashion_effnet", "fashion_fused",
                                               "efficientnet_lite0_imagenet"}
    for path in public:
        config = read_config(path)
        steps = [(s.model_name, s.model_version) for s in config.ensemble_scheduling.step]
        assert all(version >= 1 for _, version in steps), f"{path}: {steps}"
        assert config.parameters[model_params.MEMBERS].string_value == layout.members_value(steps), path
        for name, version in steps:
            folder = REPOSITORY / name / str(version)
            # The ImageNet classifier's ONNX file is made by `make models`; its version folder must be that one.
            assert folder.is_dir() or name == "efficientnet_lite0_imagenet_onnx", f"{path}: {folder} is missing"


def test_candidate_and_public_edits_round_trip_and_keep_other_parameters() -> None:
    public = layout.ensemble_config("m", SPEC, 10, 64, "d", classifier_version=3)
    public = layout.with_parameter(public, model_params.THRESHOLDS, "[0.5, 0.5]")
    candidate = layout.pinned(layout.as_candidate(public, "m", layout.Rollout("m", "shadow")), {"m_onnx": 4})
    assert layout.rollout_of(candidate) == layout.Rollout("m", "shadow", 0.0)
    assert layout.step_members(candidate) == [("m_onnx", 4), ("postprocess_softmax", 1)]
    assert layout.parameter_of(candidate, model_params.THRESHOLDS) == "[0.5, 0.5]"
    promoted = layout.as_public(candidate, "m")
    assert read_config_text(promoted).name == "m"
    assert layout.rollout_of(promoted) is None and layout.parameter_of(promoted, model_params.PUBLIC) == "true"
    assert layout.parameter_of(promoted, model_params.MEMBERS) == "m_onnx:4,postprocess_softmax:1"
    assert layout.as_public(layout.as_candidate(public, "m", layout.Rollout("m")), "m") == public
    reference = json.dumps({"class_share": [0.5, 0.5], "split": "val"})
    with_json = layout.with_parameter(public, model_params.REFERENCE, reference)
    assert json.loads(read_config_text(with_json).parameters[model_params.REFERENCE].string_value) == \
        json.loads(reference)
    assert layout.parameter_of(with_json, model_params.REFERENCE) == reference


# -- routing against a fake Triton -------------------------------------------------------------------------------
class FakeTriton:
    """Answers like TritonBackend: the serving model and the candidate give fixed top-1 classes."""

    def __init__(self, candidate_top: int = 1, candidate_gone: bool = False, candidate_delay_s: float = 0.0):
        self.candidate_top = candidate_top
        self.candidate_gone = candidate_gone
        self.candidate_delay_s = candidate_delay_s
        self.refreshes = 0
        self.calls: list[str] = []

    def _serving(self, model: Model) -> Classification:
        self.calls.append(model.name)
        return Classification([0.9], [1], ["b"], "1")

    async def _once(self, name: str) -> Classification:
        self.calls.append(name)
        if name.endswith(model_params.CANDIDATE_SUFFIX):
            await asyncio.sleep(self.candidate_delay_s)
            if self.candidate_gone:
                raise ModelGone(f"{name} is gone", reason="model_gone")
            return Classification([0.8], [self.candidate_top], ["x"], "2")
        return Classification([0.9], [1], ["b"], "1")

    async def classify_many(self, model: Model, pixels: np.ndarray, top_k: int, timeout_s: float,
                            request_id: str) -> list[Classification]:
        return [self._serving(model) for _ in pixels]

    async def classify_once_many(self, name: str, pixels: np.ndarray, top_k: int, timeout_s: float,
                                 request_id: str) -> list[Classification]:
        return [await self._once(name) for _ in pixels]

    async def refresh(self) -> dict:
        self.refreshes += 1
        return {}


def _model(name: str, mode: str, percent: float) -> Model:
    model = Model(name, ["1"], SPEC, 10, calibration=Calibration(tuple([0.95] * 10)))
    model.candidate = Candidate(name, model_params.candidate_name(name), "2", mode, percent, SPEC,
                                calibration=Calibration(tuple([0.1] * 10)))
    return model


def _router(triton: FakeTriton, limit: int = 4) -> Router:
    return Router(triton, RolloutConfig(0.5, limit, 1.0))  # type: ignore[arg-type]


def _scrape() -> dict:
    from prometheus_client import REGISTRY, generate_latest

    from tests.metrics_util import parse

    return parse(generate_latest(REGISTRY).decode())


def test_canary_answers_its_callers_and_falls_back_when_gone() -> None:
    model = _model("unit_canary", "canary", 50.0)
    pixels = np.zeros((28, 28, 1), np.uint8)
    callers = [f"c{i}" for i in range(40)]

    async def run(triton: FakeTriton) -> list[str]:
        router = _router(triton)
        roles = []
        for caller in callers:
            answer = await router.classify(router.route(model, caller), pixels, 1, 1e12, "r")
            roles.append(answer.role)
            assert answer.result.model_version == ("2" if answer.role == "canary" else "1")
            assert answer.calibration == (model.candidate.calibration if answer.role == "canary"  # type: ignore
                                          else model.calibration)
        await asyncio.sleep(0.05)
        await router.close()
        return roles

    triton = FakeTriton(candidate_top=1)
    roles = asyncio.run(run(triton))
    expected = ["canary" if bucket_of("unit_canary", c) < 50 else "serving" for c in callers]
    assert roles == expected and "canary" in roles and "serving" in roles
    samples = _scrape()
    assert value(samples, "shopvision_gateway_rollout_requests_total", model="unit_canary", version="2",
                 role="canary") == roles.count("canary")
    assert value(samples, "shopvision_gateway_shadow_agreement_total", model="unit_canary",
                 agree="true") == roles.count("canary")

    gone = FakeTriton(candidate_gone=True)
    roles = asyncio.run(run(gone))
    assert roles == ["serving"] * len(callers)
    assert gone.refreshes >= 1


def test_shadow_never_answers_and_drops_copies_past_the_limit() -> None:
    model = _model("unit_shadow", "shadow", 0.0)
    pixels = np.zeros((28, 28, 1), np.uint8)

    async def run() -> list[str]:
        triton = FakeTriton(candidate_top=3, candidate_delay_s=0.2)
        router = _router(triton, limit=2)
        roles = [(await router.classify(router.route(model, f"c{i}"), pixels, 1, 1e12, "r")).role
                 for i in range(10)]
        await asyncio.sleep(0.4)
        await router.close()
        return roles

    before = _scrape()
    assert asyncio.run(run()) == ["serving"] * 10
    after = _scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("shopvision_gateway_shadow_dropped_total", model="unit_shadow") == 8
    assert delta("shopvision_gateway_shadow_agreement_total", model="unit_shadow", agree="false") == 2
    assert delta("shopvision_gateway_rollout_requests_total", model="unit_shadow", version="2", role="shadow") == 2
    assert delta("shopvision_gateway_rollout_requests_total", model="unit_shadow", version="1", role="serving") == 10
    assert metrics.SHADOW_DROPPED is not None


# -- training.rollout status arithmetic ------------------------------------------------------------------------------
def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 0.0), (0.1, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert rollout_cli.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert rollout_cli.histogram_quantile(0.25, buckets) == pytest.approx(0.055)
    assert rollout_cli.histogram_quantile(0.99, buckets) == pytest.approx(0.982)
    assert rollout_cli.histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_status_sums_over_replicas() -> None:
    one = """# TYPE shopvision_gateway_rollout_requests_total counter
shopvision_gateway_rollout_requests_total{model="m",version="1",role="serving"} 80.0
shopvision_gateway_rollout_requests_total{model="m",version="2",role="canary"} 20.0
shopvision_gateway_rollout_requests_total{model="other",version="1",role="serving"} 5.0
# TYPE shopvision_gateway_rollout_errors_total counter
shopvision_gateway_rollout_errors_total{model="m",version="2",role="canary"} 1.0
# TYPE shopvision_gateway_rollout_request_duration_seconds histogram
shopvision_gateway_rollout_request_duration_seconds_bucket{model="m",version="2",role="canary",le="0.01"} 10.0
shopvision_gateway_rollout_request_duration_seconds_bucket{model="m",version="2",role="canary",le="+Inf"} 20.0
shopvision_gateway_rollout_request_duration_seconds_count{model="m",version="2",role="canary"} 20.0
shopvision_gateway_rollout_request_duration_seconds_sum{model="m",version="2",role="canary"} 0.3
# TYPE shopvision_gateway_shadow_agreement_total counter
shopvision_gateway_shadow_agreement_total{model="m",agree="true"} 18.0
shopvision_gateway_shadow_agreement_total{model="m",agree="false"} 2.0
# TYPE shopvision_gateway_shadow_dropped_total counter
shopvision_gateway_shadow_dropped_total{model="m"} 3.0
"""
    observed = rollout_cli.observe("m", [one, one])
    assert observed.series[("1", "serving")].requests == 160
    assert observed.series[("2", "canary")].requests == 40 and observed.series[("2", "canary")].errors == 2
    assert observed.series[("2", "canary")].quantile(0.5) == pytest.approx(0.01)
    assert (observed.agree, observed.disagree, observed.dropped) == (36, 4, 6)


# -- caller identity -------------------------------------------------------------------------------------------------
def test_caller_is_the_token_identity_else_the_caller_id_header() -> None:
    """Through a real grpc.aio server: the bearer token's caller wins over x-caller-id (a caller cannot pick
    its canary by sending another id); without tokens the header is the caller, and no header gives a new id
    per call."""
    import grpc

    from services.gateway.security import CallerInterceptor, Token, TokenSet
    from services.gateway.servicer import caller_of

    secret = "s" * 24

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return caller_of(context).encode()

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Caller": grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=lambda b: b, response_serializer=lambda b: b)})

    async def callers(tokens: TokenSet | None, metadata: list[tuple[tuple[str, str], ...]]) -> list[str]:
        interceptors = [CallerInterceptor(tokens, None)] if tokens is not None else []
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Echo/Caller", request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
                return [(await call(b"", metadata=m, timeout=5)).decode() for m in metadata]
        finally:
            await server.stop(None)

    auth = ("authorization", f"Bearer {secret}")
    with_tokens = asyncio.run(callers(TokenSet([Token.of("alice", secret)]),
                                      [(auth, ("x-caller-id", "bob")), (auth,)]))
    assert with_tokens == ["token:alice", "token:alice"]
    plain = asyncio.run(callers(None, [(("x-caller-id", "bob"),), (), ()]))
    assert plain[0] == "bob" and plain[1] != plain[2] and len(plain[1]) == 32
