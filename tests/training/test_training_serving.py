"""The fashion model through the real stack: the committed model answers Fashion-MNIST images and
catalog-style photos; publishing a new version under concurrent load fails no request; a fused model
serves the weighted mean of its members' probabilities."""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from training import publish
from training.data.catalog import render
from training.data.datasets import FASHION_LABELS, fashion_mnist_raw, stratified_subset
from training.evaluate import classify_all

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = REPO_ROOT / "model_repository"
MODEL = "fashion_cnn"
SERVED = "fashion_effnet"  # the fine-tuned EfficientNet-Lite0 (docs/MODELS.md)


def _png(item: np.ndarray) -> bytes:
    return cv2.imencode(".png", item)[1].tobytes()


def _accuracy(stub: recognition_pb2_grpc.ProductRecognitionStub, photos: list[bytes], labels: np.ndarray,
              model: str) -> float:
    correct = 0
    for photo, label in zip(photos, labels, strict=True):
        reply = stub.Classify(recognition_pb2.ClassifyRequest(image=photo, model=model, top_k=1), timeout=30)
        correct += reply.predictions[0].class_id == label
    return correct / len(labels)


@pytest.mark.parametrize(("model", "test_floor", "catalog_floor"), [
    ("fashion_cnn", 0.88, 0.80), ("fashion_effnet", 0.92, 0.88), ("fashion_fused", 0.92, 0.88)])
def test_committed_fashion_model_answers_test_images_and_catalog_photos(
        gateway: recognition_pb2_grpc.ProductRecognitionStub, model: str, test_floor: float,
        catalog_floor: float) -> None:
    items, labels = fashion_mnist_raw("test")
    pick = stratified_subset(labels, 300, seed=1)
    test_top1 = _accuracy(gateway, [_png(items[i]) for i in pick], labels[pick], model)
    pick = stratified_subset(labels, 150, seed=2)
    photos = [render(items[i], seed=int(i)).data for i in pick]
    catalog_top1 = _accuracy(gateway, photos, labels[pick], model)
    print(f"{model}: {test_top1:.3f} on 300 test images, {catalog_top1:.3f} on 150 catalog photos")
    assert test_top1 >= test_floor and catalog_top1 >= catalog_floor, (test_top1, catalog_top1)
    listed = {m.name: m for m in gateway.ListModels(recognition_pb2.ListModelsRequest(), timeout=10).models}
    assert list(listed[model].labels) == list(FASHION_LABELS)
    assert (listed[model].input_height, listed[model].input_width, listed[model].input_channels) == (28, 28, 1)


@pytest.mark.slow
def test_fine_tuned_model_through_classify_on_all_test_images_and_catalog_photos(stack: Stack) -> None:
    """The fine-tuned EfficientNet-Lite0 through the real Classify path: all 10 000 Fashion-MNIST test images (sent
    as PNG uploads) and 1 000 catalog-style photos (colour JPEGs of any size, light background, off-centre).

    Measured on fashion_effnet v4: 95.12 % and 93.70 % (2 000 photos); v3 94.99 % and 94.15 %, v2 94.67 % and
    93.55 %. The floors are the issue's bar for the served model, 95.0 % / 90 %: v3 and every earlier version would
    fail the first (docs/MODELS.md).

    Why a margin of 12 test images is enough: the figure is a deterministic function of the committed file and the
    library versions, which requirements.txt pins (numpy, opencv-python-headless, onnxruntime). What varies from run
    to run is only how dynamic batching groups the requests; measured: Classify (``classify_eval.json``, batches of
    any size) and in-process ONNX Runtime (``eval.json``, batch 256) both count 9 512 correct images, and in-process
    at batch 1, 7 and 256 (2026-12-01, this machine) not one of the 10 000 predictions changes: the measured
    variation is 0 images, so 12 is a margin, not a coin toss. Slow (11 000 Classify calls): ``-m 'not slow'``
    leaves it out of a quick run; ``make test`` runs it."""
    items, labels = fashion_mnist_raw("test")
    scores = classify_all(stack.gateway_address, SERVED, [_png(x) for x in items], len(FASHION_LABELS), 8)
    test_correct = int(np.sum(scores.argmax(1) == labels))
    pick = stratified_subset(labels, 1000, seed=3)
    photos = [render(items[i], seed=int(i)).data for i in pick]
    scores = classify_all(stack.gateway_address, SERVED, photos, len(FASHION_LABELS), 8)
    catalog_correct = int(np.sum(scores.argmax(1) == labels[pick]))
    print(f"{SERVED} through Classify: test {test_correct} / 10 000, catalog-style {catalog_correct} / 1 000")
    assert test_correct >= 9500, f"{test_correct} of 10 000 test images right, the bar is 9 500 (95.0 %)"
    assert catalog_correct >= 900, f"{catalog_correct} of 1 000 catalog photos right, the bar is 900 (90 %)"


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack over a copy of the fashion model's part of the repository (the committed one is not touched)."""
    base = tmp_path_factory.mktemp("publish")
    repository = base / "model_repository"
    for name in ("postprocess_softmax", MODEL, f"{MODEL}_onnx"):
        shutil.copytree(REPOSITORY / name, repository / name, ignore=shutil.ignore_patterns("__pycache__"))
    stack = Stack(ports=Ports.free(), model_repository=repository, log_dir=base / "logs",
                  extra_env={"GATEWAY_DEFAULT_MODEL": MODEL})
    stack.start()
    yield stack
    stack.stop()


def _committed_run(tmp_path: Path) -> Path:
    """A training.train-style run directory rebuilt from the committed version 1."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("run.json", "eval.json", "MODEL_CARD.md"):
        shutil.copy(REPOSITORY / MODEL / "1" / name, run_dir / name)
    shutil.copy(REPOSITORY / f"{MODEL}_onnx" / "1" / "model.onnx", run_dir / "model.onnx")
    return run_dir


def test_publish_swaps_the_version_under_load_without_a_failed_request(private_stack: Stack, tmp_path: Path) -> None:
    items, _ = fashion_mnist_raw("test")
    photos = [_png(items[i]) for i in range(32)]
    seen: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with grpc.insecure_channel(private_stack.gateway_address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            i = offset
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = stub.Classify(recognition_pb2.ClassifyRequest(image=photos[i % 32], model=MODEL),
                                          timeout=30)
                    seen.append((sent, reply.model_version))
                except grpc.RpcError as error:
                    errors.append(f"{error.code()}: {error.details()}")
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        version = publish.main(publish.get_args_parser().parse_args(
            ["--repository", str(private_stack.model_repository), "--run-dir", str(_committed_run(tmp_path)),
             "--model", MODEL, "--triton", private_stack.triton_grpc_address]))
        published_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert version == 2
    assert not errors, errors[:5]
    before = {v for t, v in seen if t < published_at - 5}
    after = {v for t, v in seen if t > published_at + 0.5}
    assert "1" in {v for _, v in seen} and after == {"2"}, (before, after)
    assert len(seen) > 50
    version_dir = private_stack.model_repository / MODEL / "2"
    assert (version_dir / "MODEL_CARD.md").exists() and (version_dir / "spec.json").exists()
    assert (private_stack.model_repository / f"{MODEL}_onnx" / "2" / "model.onnx").exists()


def test_fused_model_serves_the_weighted_mean_of_its_members(private_stack: Stack,
                                                             smoke_runs: dict[str, Path]) -> None:
    repository = str(private_stack.model_repository)
    publish.main(publish.get_args_parser().parse_args(
        ["--repository", repository, "--run-dir", str(smoke_runs["effnet"]), "--model", "fashion_smoke",
         "--triton", private_stack.triton_grpc_address]))
    publish.main(publish.get_args_parser().parse_args(
        ["--repository", repository, "--fuse", "fashion_fused", "--members", f"{MODEL},fashion_smoke",
         "--weights", "0.7,0.3", "--triton", private_stack.triton_grpc_address]))
    items, _ = fashion_mnist_raw("test")
    with grpc.insecure_channel(private_stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

        def probabilities(model: str, photo: bytes) -> np.ndarray:
            reply = stub.Classify(recognition_pb2.ClassifyRequest(image=photo, model=model, top_k=10), timeout=30)
            assert reply.model == model
            scores = np.zeros(10)
            for p in reply.predictions:
                scores[p.class_id] = p.score
            return scores

        for i in range(3):
            photo = _png(items[i])
            expected = 0.7 * probabilities(MODEL, photo) + 0.3 * probabilities("fashion_smoke", photo)
            np.testing.assert_allclose(probabilities("fashion_fused", photo), expected, atol=1e-5)
