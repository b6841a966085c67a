"""The Python-decode design: a private repository whose JPEG ensemble answers with the stack's own top-1."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from bench.harness.stack import private_stack
from bench.targets import TritonJpegTarget
from bench.triton_decode.repository import DECODER, build, jpeg_ensemble_name
from devstack.stack import REPO_ROOT, Stack
from tests.conftest import photo_bytes


def test_the_private_repository_links_the_served_models_and_adds_the_decoder(tmp_path: Path):
    dest = build(dest=tmp_path / "repo", instances=1)
    served = sorted(p.name for p in (REPO_ROOT / "model_repository").iterdir() if (p / "config.pbtxt").exists())
    assert sorted(p.name for p in dest.iterdir()) == sorted([*served, DECODER, jpeg_ensemble_name()])
    assert all((dest / name).is_symlink() for name in served)
    decoder = (dest / DECODER / "config.pbtxt").read_text()
    assert 'key: "preprocess.resize_shorter" value: { string_value: "256" }' in decoder
    assert "dims: [ 224, 224, 3 ]" in decoder and "count: 1 kind: KIND_CPU" in decoder
    ensemble = (dest / jpeg_ensemble_name() / "config.pbtxt").read_text()
    assert 'model_name: "efficientnet_lite0_imagenet_onnx"\n      model_version: 1' in ensemble
    assert "shopvision.public" not in ensemble  # the gateway must never list it
    build(dest=dest, instances=1)  # rebuilding over an earlier build leaves model_repository/ alone
    assert (REPO_ROOT / "model_repository" / "efficientnet_lite0_imagenet" / "config.pbtxt").exists()


@pytest.fixture(scope="module")
def decode_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = Path(tmp_path_factory.mktemp("decode"))
    with private_stack(root / "logs", model_repository=build(dest=root / "repo")) as stack:
        yield stack


@pytest.mark.stack
def test_the_jpeg_ensemble_agrees_with_the_stack_on_a_sample_photo(decode_stack: Stack):
    jpeg = photo_bytes("coffee.png")

    async def top1() -> tuple[int, str]:
        target = TritonJpegTarget(decode_stack.triton_grpc_address, jpeg_ensemble_name(), [jpeg])
        try:
            return await target.top1()
        finally:
            await target.close()

    class_id, label = asyncio.run(top1())
    with grpc.insecure_channel(decode_stack.gateway_address) as channel:
        ours = recognition_pb2_grpc.ProductRecognitionStub(channel).Classify(
            recognition_pb2.ClassifyRequest(image=jpeg, top_k=1), timeout=60)
    assert (class_id, label) == (ours.predictions[0].class_id, ours.predictions[0].label) == (967, "espresso")


@pytest.mark.stack
def test_the_jpeg_ensemble_refuses_bytes_that_are_not_an_image(decode_stack: Stack):
    async def bad() -> None:
        target = TritonJpegTarget(decode_stack.triton_grpc_address, jpeg_ensemble_name(), [b"not an image"])
        try:
            await target(0, 30.0)
        finally:
            await target.close()

    with pytest.raises(Exception, match="(?i)image|format|decode"):
        asyncio.run(bad())
