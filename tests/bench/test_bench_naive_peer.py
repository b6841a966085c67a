"""The naive peer serves the same proto and model: same top-1 as the stack for a sample photo."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from bench.harness.data import model_spec
from bench.targets import NaivePeer
from tests.conftest import photo_bytes


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[recognition_pb2_grpc.ProductRecognitionStub]:
    log = Path(tmp_path_factory.mktemp("naive")) / "naive.log"
    with NaivePeer(workers=2, log_path=log) as peer, grpc.insecure_channel(peer.address) as channel:
        yield recognition_pb2_grpc.ProductRecognitionStub(channel)


@pytest.mark.stack
def test_naive_peer_agrees_with_the_stack_on_a_sample_photo(naive, gateway):
    request = recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png"), top_k=3)
    theirs, ours = naive.Classify(request, timeout=60), gateway.Classify(request, timeout=60)
    assert theirs.predictions[0].label == ours.predictions[0].label == "espresso"
    assert theirs.predictions[0].class_id == ours.predictions[0].class_id
    assert theirs.predictions[0].score == pytest.approx(ours.predictions[0].score, abs=0.05)
    assert (theirs.image_width, theirs.image_height) == (ours.image_width, ours.image_height)


def test_naive_peer_refuses_bytes_that_are_not_an_image(naive):
    with pytest.raises(grpc.RpcError) as caught:
        naive.Classify(recognition_pb2.ClassifyRequest(image=b"not an image"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.stack
def test_benchmark_recipe_is_the_one_the_gateway_serves(gateway):
    spec = model_spec()
    listed = gateway.ListModels(recognition_pb2.ListModelsRequest(), timeout=30)
    model = next(m for m in listed.models if m.name == listed.default_model)
    assert (spec.height, spec.width, spec.channels) == (model.input_height, model.input_width, model.input_channels)
