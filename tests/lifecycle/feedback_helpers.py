"""Shared by the feedback tests: Fashion-MNIST photos as uploads, SubmitFeedback calls, reads of the database."""
from __future__ import annotations

from datetime import datetime

import cv2
import grpc
import numpy as np
import psycopg
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from training.data.datasets import FASHION_LABELS, fashion_mnist_raw, stratified_subset


def fashion_photos(count: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``count`` Fashion-MNIST test items spread over the classes, as PNG uploads with their true labels."""
    raw, labels = fashion_mnist_raw("test")
    picked = stratified_subset(labels, count, seed)
    photos = []
    for i in picked:
        ok, png = cv2.imencode(".png", raw[i])
        assert ok
        photos.append((png.tobytes(), FASHION_LABELS[int(labels[i])]))
    return photos


def noisy(photo: bytes, seed: int) -> bytes:
    """Another photo of the same item: the same pixels with a little seeded noise (new bytes, new hash)."""
    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_GRAYSCALE)
    noise = np.random.default_rng(seed).integers(-3, 4, image.shape)
    ok, png = cv2.imencode(".png", np.clip(image + noise, 0, 255).astype(np.uint8))
    assert ok
    return png.tobytes()


def submit(stub: recognition_pb2_grpc.ProductRecognitionStub, image: bytes, label: str, model: str,
           metadata: tuple[tuple[str, str], ...] = (), **fields: str) -> recognition_pb2.SubmitFeedbackResponse:
    return stub.SubmitFeedback(recognition_pb2.SubmitFeedbackRequest(image=image, label=label, model=model, **fields),
                               metadata=metadata, timeout=30)


def refusal(stub: recognition_pb2_grpc.ProductRecognitionStub, image: bytes, label: str,
            model: str) -> grpc.RpcError:
    try:
        submit(stub, image, label, model)
    except grpc.RpcError as error:
        return error
    raise AssertionError("SubmitFeedback accepted what it should refuse")


def reason_of(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("x-error-reason", "")


def feedback_count(url: str, model: str | None = None) -> int:
    """Feedback rows committed (read on a new connection), of one model or all."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM feedback WHERE %(m)s::text IS NULL OR model = %(m)s",
                           {"m": model}).fetchone()
    assert row is not None
    return int(row[0])


def image_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM images").fetchone()
    assert row is not None
    return int(row[0])


def database_now(url: str) -> datetime:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]
