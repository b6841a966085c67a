"""Classify end to end over real gRPC: gateway → preprocess → real Triton ensemble."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Stack, free_port
from services.common.spec import Spec
from services.preprocess.imaging import preprocess
from tests.conftest import photo_bytes
from tests.images import animated_gif, encode, gradient, png_bomb
from tests.metrics_util import scrape, value

CUP_CLASSES = {"espresso", "cup", "coffee mug", "tea cup", "eggnog"}


def top_labels(reply: recognition_pb2.ClassifyResponse) -> list[str]:
    return [p.label for p in reply.predictions]


def test_coffee_photo_is_a_cup(gateway) -> None:
    reply = gateway.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")), timeout=30)
    assert len(reply.predictions) == 5  # the default top_k
    assert CUP_CLASSES & set(top_labels(reply)), top_labels(reply)
    assert reply.model == "efficientnet_lite0_imagenet"
    assert reply.model_version == "1"
    scores = [p.score for p in reply.predictions]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert (reply.image_width, reply.image_height) == (600, 400)


def test_cat_photo_is_a_cat(gateway) -> None:
    request = recognition_pb2.ClassifyRequest(image=photo_bytes("chelsea.png"), top_k=5)
    reply = gateway.Classify(request, timeout=30)
    labels = top_labels(reply)
    cats = ("Egyptian Mau", "tabby cat", "tiger cat")
    assert any("cat" in label.lower() or label in cats for label in labels), labels


def test_top_k_is_the_head_of_the_full_distribution(gateway) -> None:
    """top_k=3 of a JPEG photo: the three most likely classes, best first, each once, the same as the head of
    top_k=1 and of the whole 1 000-class distribution (which sums to 1), with the model's labels."""
    image = photo_bytes("china.jpg")

    def predictions(top_k: int) -> list[recognition_pb2.Prediction]:
        reply = gateway.Classify(recognition_pb2.ClassifyRequest(image=image, top_k=top_k), timeout=30)
        return list(reply.predictions)

    top3, top1, full = predictions(3), predictions(1), predictions(1000)
    assert (len(top3), len(top1), len(full)) == (3, 1, 1000)
    assert sorted(p.class_id for p in full) == list(range(1000))  # every class exactly once
    assert sum(p.score for p in full) == pytest.approx(1.0, abs=1e-3)
    for predictions_of in (top3, full):
        scores = [p.score for p in predictions_of]
        assert scores == sorted(scores, reverse=True), scores[:10]
    assert len({p.class_id for p in top3}) == 3
    assert [p.class_id for p in top3] == [p.class_id for p in full[:3]]
    assert [p.score for p in top3] == pytest.approx([p.score for p in full[:3]], abs=1e-6)
    assert top3[2].score >= full[3].score  # nothing left out scores higher
    assert (top1[0].class_id, top1[0].label) == (top3[0].class_id, top3[0].label)
    assert top1[0].score == pytest.approx(top3[0].score, abs=1e-6)
    labels = {m.name: list(m.labels) for m in gateway.ListModels(recognition_pb2.ListModelsRequest(),
                                                                 timeout=30).models}["efficientnet_lite0_imagenet"]
    assert [p.label for p in top3] == [labels[p.class_id] for p in top3]


def test_request_id_is_echoed(gateway) -> None:
    reply, call = gateway.Classify.with_call(
        recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")),
        metadata=[("x-request-id", "test-req-42")], timeout=30)
    assert reply.request_id == "test-req-42"
    assert ("x-request-id", "test-req-42") in tuple(call.initial_metadata())


def test_serving_path_matches_in_process_onnx_runtime(gateway) -> None:
    """The model's answer must not depend on the serving path."""
    data = photo_bytes("coffee.png")
    reply = gateway.Classify(recognition_pb2.ClassifyRequest(image=data, top_k=5), timeout=30)
    pixels = preprocess(data, Spec(224, 224, 3, "center", 256, "keep"), max_pixels=10**8).pixels
    session = ort.InferenceSession(str(REPO_ROOT / "model_repository/efficientnet_lite0_imagenet_onnx/1/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": pixels[None]})
    probabilities = np.exp(logits[0] - logits[0].max())
    probabilities /= probabilities.sum()
    expected = np.argsort(-probabilities)[:5]
    assert [p.class_id for p in reply.predictions][0] == expected[0]
    for prediction in reply.predictions:
        assert abs(prediction.score - probabilities[prediction.class_id]) < 1e-3


def test_classify_batch_mixes_results_and_errors(gateway) -> None:
    reply = gateway.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(requests=[
        recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")),
        recognition_pb2.ClassifyRequest(image=b"not an image"),
    ]), timeout=30)
    assert reply.items[0].WhichOneof("result") == "response"
    assert CUP_CLASSES & set(top_labels(reply.items[0].response))
    assert reply.items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a recognised image" in reply.items[1].error.message


def test_classify_batch_goes_upstream_in_chunks_with_the_answers_of_single_calls(gateway, stack) -> None:
    """Eight photos (two top_k values), then a bad one, then one for another model, on a gateway that sends chunks of
    GATEWAY_BATCH_CHUNK_IMAGES = 8 (the default): the eight go as one PreprocessBatch call and one Triton request of
    batch 8, the bad one as a second PreprocessBatch call that no inference follows, and each answer equals the
    one Classify gives that photo."""
    names = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg",
             "coffee.png", "chelsea.png")
    good = [recognition_pb2.ClassifyRequest(image=photo_bytes(name), top_k=1 + 4 * (i % 2))
            for i, name in enumerate(names)]
    requests = [*good, recognition_pb2.ClassifyRequest(image=b"not an image"),
                recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png"), model="fashion_cnn")]
    ensemble = {"model": "efficientnet_lite0_imagenet", "version": "1"}
    ports = (stack.ports.triton_metrics, stack.ports.preprocess_metrics, stack.ports.gateway_metrics)
    before = [scrape(port) for port in ports]
    reply = gateway.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(requests=requests), timeout=60)
    after = [scrape(port) for port in ports]

    def delta(service: int, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)
    assert delta(0, "nv_inference_request_success", **ensemble) == 1
    assert delta(0, "nv_inference_count", **ensemble) == 8
    # The gateway timed one preprocess hop per chunk (two of the default model's, fashion_cnn's) and one Triton hop
    # per chunk with an image left to classify, not one per image; every image reached the preprocess service,
    # which refused the bad one.
    assert delta(2, "shopvision_gateway_hop_duration_seconds_count", hop="preprocess") == 3
    assert delta(2, "shopvision_gateway_hop_duration_seconds_count", hop="triton") == 2
    assert delta(1, "shopvision_preprocess_image_bytes_count") == 10
    assert delta(1, "shopvision_preprocess_rejected_total", reason="not_an_image") == 1

    kinds = [item.WhichOneof("result") for item in reply.items]
    assert kinds == ["response"] * 8 + ["error", "response"]
    assert reply.items[8].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.items[9].response.model == "fashion_cnn"
    answered = [item.response for item in reply.items[:8]]
    for request, batched in zip(good, answered, strict=True):
        single = gateway.Classify(request, timeout=30)
        assert len(batched.predictions) == request.top_k
        assert [p.label for p in batched.predictions] == [p.label for p in single.predictions]
        assert np.allclose([p.score for p in batched.predictions], [p.score for p in single.predictions], atol=1e-5)
        assert (batched.image_width, batched.image_height) == (single.image_width, single.image_height)
    assert len({r.request_id for r in answered}) == len(answered)


def test_list_models(gateway) -> None:
    reply = gateway.ListModels(recognition_pb2.ListModelsRequest(), timeout=30)
    models = {m.name: m for m in reply.models}
    assert reply.default_model == "efficientnet_lite0_imagenet"
    model = models["efficientnet_lite0_imagenet"]
    assert list(model.versions) == ["1"]
    assert len(model.labels) == 1000 and model.labels[967] == "espresso"
    assert (model.input_height, model.input_width, model.input_channels) == (224, 224, 3)
    assert model.is_default
    assert "postprocess_softmax" not in models  # internal steps are not public


def test_health_is_serving(stack) -> None:
    for address, service in ((stack.gateway_address, "shopvision.v1.ProductRecognition"),
                             (stack.preprocess_address, "shopvision.v1.Preprocessor")):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD_INPUTS = [
    pytest.param(dict(image=b""), "empty", "empty", id="empty"),
    pytest.param(dict(image=b"%PDF-1.4 definitely not a photo"), "not_an_image", "accepted formats", id="not-an-image"),
    pytest.param(dict(image=encode(gradient(), ".jpg")[:3000]), "truncated", "truncated", id="truncated-jpeg"),
    pytest.param(dict(image=png_bomb(50_000, 50_000)), "too_many_pixels", "50000x50000", id="png-bomb"),
    pytest.param(dict(image=animated_gif()), "unsupported_format", "GIF; accepted formats: JPEG, PNG, WebP, BMP",
                 id="animated-gif"),
    pytest.param(dict(image=encode(gradient(), ".png"), top_k=1001), "bad_top_k", "1000 classes", id="top-k"),
    pytest.param(dict(image=encode(gradient(), ".png"), model="no_such_model"), "unknown_model",
                 "unknown model 'no_such_model'", id="unknown-model"),
]


@pytest.mark.parametrize("fields,reason,words", BAD_INPUTS)
def test_bad_input_gets_invalid_argument_and_is_counted(gateway, stack, fields, reason, words) -> None:
    before = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_rejected_total", reason=reason)
    with pytest.raises(grpc.RpcError) as info:
        gateway.Classify(recognition_pb2.ClassifyRequest(**fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    after = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_rejected_total", reason=reason)
    assert after == before + 1
    # ... and the service keeps serving.
    reply = gateway.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")), timeout=30)
    assert reply.predictions


def test_oversized_image_is_refused_and_counted(gateway, stack) -> None:
    before = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_rejected_total", reason="too_large")
    big = encode(gradient(), ".png") + b"\x00" * (21 * 1024 * 1024)  # over the 20 MiB default
    with pytest.raises(grpc.RpcError) as info:
        gateway.Classify(recognition_pb2.ClassifyRequest(image=big), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limited to" in info.value.details()
    after = value(scrape(stack.ports.gateway_metrics), "shopvision_gateway_rejected_total", reason="too_large")
    assert after == before + 1


# -- deadlines: a gateway in front of a preprocess stand-in that never answers in time ---------------------------
WIRE_ROUNDING_S = 0.05
GATEWAY_DEADLINE_S = 4.0  # the gateway's GATEWAY_DEFAULT_TIMEOUT_SECONDS, for callers that send no deadline
CALLER_DEADLINE_S = 2.0  # shorter than the gateway's own, so a gateway that ignored it would be seen


@dataclasses.dataclass
class SlowUpstream:
    """A private gateway on the session stack's Triton whose preprocess is tests/integration/slow_preprocess.py."""

    gateway: Stack
    record: Path

    def calls(self, request_id: str) -> list[dict]:
        """What the stand-in saw of the calls made for ``request_id`` (the deadline each arrived with)."""
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [call for call in map(json.loads, lines) if call["request_id"] == request_id]


@pytest.fixture(scope="module")
def slow_upstream(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowUpstream]:
    root = tmp_path_factory.mktemp("slow-upstream")
    ports = dataclasses.replace(stack.ports, gateway=free_port(), gateway_metrics=free_port(),
                                preprocess=free_port())
    gateway = Stack(ports=ports, log_dir=root, extra_env={"GATEWAY_DEFAULT_TIMEOUT_SECONDS": str(GATEWAY_DEADLINE_S)})
    record = root / "calls.jsonl"
    with open(root / "slow_preprocess.log", "ab") as log:
        stand_in = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.slow_preprocess", "--address", gateway.preprocess_address,
             "--record", str(record)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30.0
        while not Stack.grpc_serving(gateway.preprocess_address):
            assert stand_in.poll() is None, f"the stand-in exited: {(root / 'slow_preprocess.log').read_text()}"
            assert time.monotonic() < deadline, "the slow preprocess stand-in is not serving after 30 s"
            time.sleep(0.1)
        gateway.start_service("gateway")
        gateway.wait_ready(60.0, names=("gateway",))  # SERVING needs the stand-in's health and Triton's model
        yield SlowUpstream(gateway, record)
    finally:
        gateway.stop()
        stand_in.terminate()
        stand_in.wait(20)


@pytest.mark.slow  # a private gateway, and 6 s spent waiting out deadlines on purpose
def test_gateway_enforces_its_deadline_on_a_slow_upstream_and_counts_it(slow_upstream: SlowUpstream) -> None:
    """A caller without a deadline gets DEADLINE_EXCEEDED from the gateway itself after its default deadline:
    the gateway's own message and reason, passed on to preprocess, and counted in the gateway's metrics."""
    metrics_port = slow_upstream.gateway.ports.gateway_metrics
    before = scrape(metrics_port)
    with grpc.insecure_channel(slow_upstream.gateway.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        started = time.monotonic()
        call = stub.Classify.future(recognition_pb2.ClassifyRequest(image=photo_bytes("chelsea.png")),
                                    metadata=[("x-request-id", "deadline-from-gateway")])  # no client deadline
        try:
            error = call.exception(timeout=GATEWAY_DEADLINE_S + 15.0)
        except grpc.FutureTimeoutError:
            call.cancel()
            pytest.fail(f"no answer {GATEWAY_DEADLINE_S + 15.0:.0f} s after the gateway's deadline: not enforced")
        elapsed = time.monotonic() - started
    assert error is not None, "a preprocess stand-in that never answers gave a reply"
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (error.code(), error.details())
    assert "deadline exceeded while waiting for the preprocess service" in (error.details() or "")
    assert dict(error.trailing_metadata() or ()).get("x-error-reason") == "deadline"
    assert GATEWAY_DEADLINE_S - 0.5 <= elapsed < GATEWAY_DEADLINE_S + 3.0, elapsed
    (upstream_call,) = slow_upstream.calls("deadline-from-gateway")
    assert upstream_call["time_remaining_s"] is not None, "the gateway called preprocess without a deadline"
    # gRPC sends a timeout rounded up to its wire units (seen: 4.0088 s for 4 s): allow that rounding, no more.
    assert 0.0 < upstream_call["time_remaining_s"] <= GATEWAY_DEADLINE_S + WIRE_ROUNDING_S, upstream_call
    after = scrape(metrics_port)
    for name, labels in (("shopvision_gateway_requests_total", {"method": "Classify", "code": "DEADLINE_EXCEEDED"}),
                         ("shopvision_gateway_upstream_errors_total",
                          {"upstream": "preprocess", "code": "DEADLINE_EXCEEDED"})):
        assert value(after, name, **labels) == value(before, name, **labels) + 1, (name, labels)


@pytest.mark.slow  # a private gateway, and 6 s spent waiting out deadlines on purpose
def test_caller_deadline_is_propagated_to_the_slow_upstream(slow_upstream: SlowUpstream) -> None:
    """The caller's deadline, not the gateway's own, bounds the call and travels on to the preprocess hop."""
    with grpc.insecure_channel(slow_upstream.gateway.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("chelsea.png")),
                          metadata=[("x-request-id", "deadline-from-caller")], timeout=CALLER_DEADLINE_S)
        elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < CALLER_DEADLINE_S + 1.0
    (call,) = slow_upstream.calls("deadline-from-caller")
    assert call["time_remaining_s"] is not None, "the gateway called preprocess without a deadline"
    assert 0.0 < call["time_remaining_s"] <= CALLER_DEADLINE_S + WIRE_ROUNDING_S, call


def test_dynamic_batching_under_concurrent_load(gateway, stack) -> None:
    """Triton must execute fewer batches than requests: nv_inference_exec_count < nv_inference_count."""
    model = {"model": "efficientnet_lite0_imagenet_onnx", "version": "1"}
    before = scrape(stack.ports.triton_metrics)
    image = photo_bytes("coffee.png")
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(
            lambda _: gateway.Classify(recognition_pb2.ClassifyRequest(image=image), timeout=60), range(64)))
    assert all(r.predictions[0].label == replies[0].predictions[0].label for r in replies)
    after = scrape(stack.ports.triton_metrics)
    inferences = value(after, "nv_inference_count", **model) - value(before, "nv_inference_count", **model)
    executions = value(after, "nv_inference_exec_count", **model) - value(before, "nv_inference_exec_count", **model)
    assert inferences >= 64
    assert executions < inferences, (executions, inferences)
