"""SubmitFeedback on the real stack: what it stores (committed, read back on a new connection), what it refuses
(and then stores nothing), and that no other RPC stores a caller's photo."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import psycopg
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Stack
from tests.lifecycle.feedback_helpers import (
    fashion_photos,
    feedback_count,
    image_count,
    noisy,
    reason_of,
    refusal,
    submit,
)
from tests.metrics_util import scrape, value
from tests.search.gateways import PrivateGateway
from training.data.datasets import FASHION_LABELS

pytestmark = pytest.mark.stack
MODEL = "fashion_cnn"


def stored_row(url: str, feedback_id: str) -> dict:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(
            "SELECT f.model, f.label, f.request_id, f.product_id, f.caller, f.image_bytes, i.image"
            "  FROM feedback f JOIN images i ON i.sha256 = f.image_sha256 WHERE f.feedback_id = %s", (feedback_id,))
        columns = [c.name for c in cursor.description or ()]
        row = cursor.fetchone()
    assert row is not None, f"feedback {feedback_id} is not in the database"
    return dict(zip(columns, row, strict=True))


def test_feedback_is_committed_and_kept_once_per_label(stack: Stack,
                                                       gateway: recognition_pb2_grpc.ProductRecognitionStub) -> None:
    photo, label = fashion_photos(10, seed=11)[3]
    photo = noisy(photo, 1)  # bytes no other test sends
    other_label = next(name for name in FASHION_LABELS if name != label)
    before = scrape(stack.ports.gateway_metrics)

    first = submit(gateway, photo, f" {label} ", MODEL, metadata=(("x-caller-id", "merchandiser-7"),),
                   request_id="req-123", product_id="sku-42")
    assert first.feedback_id and not first.duplicate
    row = stored_row(stack.postgres_url, first.feedback_id)
    assert row == {"model": MODEL, "label": label, "request_id": "req-123", "product_id": "sku-42",
                   "caller": "merchandiser-7", "image_bytes": len(photo), "image": photo}

    again = submit(gateway, photo, label, MODEL)
    assert again.duplicate and again.feedback_id == first.feedback_id
    relabelled = submit(gateway, photo, other_label, MODEL)  # a different opinion on the same photo is kept too
    assert not relabelled.duplicate and relabelled.feedback_id != first.feedback_id
    with psycopg.connect(stack.postgres_url) as conn:
        rows = conn.execute("SELECT label FROM feedback WHERE image_sha256 = %s ORDER BY created_at",
                            (hashlib.sha256(photo).digest(),)).fetchall()
    assert [r[0] for r in rows] == [label, other_label]

    after = scrape(stack.ports.gateway_metrics)
    for outcome, expected in (("stored", 2), ("duplicate", 1)):
        counted = (value(after, "shopvision_gateway_feedback_total", model=MODEL, outcome=outcome)
                   - value(before, "shopvision_gateway_feedback_total", model=MODEL, outcome=outcome))
        assert counted == expected, outcome

    # An empty model is the default model, stored under its name.
    models = gateway.ListModels(recognition_pb2.ListModelsRequest(), timeout=10)
    default = next(m for m in models.models if m.name == models.default_model)
    resolved = submit(gateway, noisy(photo, 3), default.labels[0], "")
    assert stored_row(stack.postgres_url, resolved.feedback_id)["model"] == models.default_model


def test_a_label_the_model_lacks_is_refused_with_the_labels(stack: Stack,
                                                            gateway: recognition_pb2_grpc.ProductRecognitionStub
                                                            ) -> None:
    photo, _ = fashion_photos(10, seed=12)[0]
    count = feedback_count(stack.postgres_url)
    for label in ("Hat", "", "trouser"):  # unknown, empty, wrong case
        error = refusal(gateway, photo, label, MODEL)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert reason_of(error) == "unknown_label"
        assert all(name in (error.details() or "") for name in FASHION_LABELS), error.details()
    error = refusal(gateway, photo, "Trouser", "no_such_model")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(error) == "unknown_model"
    assert feedback_count(stack.postgres_url) == count


def test_bad_photos_are_refused_and_nothing_is_stored(stack: Stack,
                                                      gateway: recognition_pb2_grpc.ProductRecognitionStub) -> None:
    photo, label = fashion_photos(10, seed=13)[0]
    feedback_before, images_before = feedback_count(stack.postgres_url), image_count(stack.postgres_url)
    bad = {"empty": b"", "not an image": b"just some text, not a photo", "truncated": photo[: len(photo) // 2],
           "unsupported format": b"GIF89a" + photo[6:], "oversize": b"\x89PNG\r\n\x1a\n" + b"\0" * (20 * 1024 * 1024)}
    for name, image in bad.items():
        error = refusal(gateway, image, label, MODEL)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
    assert feedback_count(stack.postgres_url) == feedback_before
    assert image_count(stack.postgres_url) == images_before


def test_classify_stores_no_photo(stack: Stack, gateway: recognition_pb2_grpc.ProductRecognitionStub) -> None:
    photos = [noisy(photo, 2) for photo, _ in fashion_photos(10, seed=14)[:3]]
    feedback_before, images_before = feedback_count(stack.postgres_url), image_count(stack.postgres_url)
    for photo in photos:
        assert gateway.Classify(recognition_pb2.ClassifyRequest(image=photo, model=MODEL), timeout=30).predictions
    batch = gateway.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(requests=[
        recognition_pb2.ClassifyRequest(image=photo, model=MODEL) for photo in photos]), timeout=30)
    assert all(item.WhichOneof("result") == "response" for item in batch.items)
    assert feedback_count(stack.postgres_url) == feedback_before
    assert image_count(stack.postgres_url) == images_before
    with psycopg.connect(stack.postgres_url) as conn:
        digests = [hashlib.sha256(photo).digest() for photo in photos]
        kept = conn.execute("SELECT count(*) FROM images WHERE sha256 = ANY(%s)", (digests,)).fetchone()
    assert kept == (0,)


def test_without_a_catalog_database_feedback_is_unavailable(stack: Stack, tmp_path: Path) -> None:
    private = PrivateGateway.on(stack, tmp_path / "gateway", GATEWAY_CATALOG_DATABASE_URL="").start()
    try:
        with grpc.insecure_channel(private.address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            photo, label = fashion_photos(10, seed=15)[0]
            error = refusal(stub, photo, label, MODEL)
    finally:
        private.stop()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "GATEWAY_CATALOG_DATABASE_URL" in (error.details() or "")
    assert reason_of(error) == "feedback_disabled"


def test_the_authenticated_caller_is_kept_with_the_feedback(stack: Stack, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("shop-east feedback-test-token-0123456789\n")
    private = PrivateGateway.on(stack, tmp_path / "gateway", GATEWAY_AUTH_TOKENS_FILE=str(tokens)).start()
    try:
        with grpc.insecure_channel(private.address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            photo, label = fashion_photos(10, seed=16)[0]
            stored = submit(stub, noisy(photo, 4), label, MODEL, metadata=(
                ("authorization", "Bearer feedback-test-token-0123456789"), ("x-caller-id", "claims-to-be-west")))
    finally:
        private.stop()
    assert stored_row(stack.postgres_url, stored.feedback_id)["caller"] == "token:shop-east"
