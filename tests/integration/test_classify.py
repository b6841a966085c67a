"""Classify end to end over real gRPC: gateway → preprocess → real Triton ensemble."""
from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import recognition_pb2

from devstack.stack import REPO_ROOT
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


def test_jpeg_photo_and_top_k(gateway) -> None:
    reply = gateway.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("china.jpg"), top_k=3), timeout=30)
    assert len(reply.predictions) == 3


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


def test_short_deadline_gets_deadline_exceeded(gateway) -> None:
    with pytest.raises(grpc.RpcError) as info:
        gateway.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("chelsea.png")), timeout=0.002)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


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
