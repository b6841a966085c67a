"""Feedback behind SubmitFeedback: a caller's photo with its correct label, stored to retrain the model.

The one place where the platform keeps a caller's photo: the caller sends it for that purpose. The servicer
checks the upload like Classify does (size, model, decodable by the preprocess service) before anything here
runs; :class:`FeedbackService` checks the label against the model's labels and commits the row before the call
is answered. :class:`FeedbackStore` holds every feedback query, on the catalog's connection pool (the same
database, GATEWAY_CATALOG_DATABASE_URL); ``python -m training.feedback`` reads through it too.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import InvalidInput
from services.gateway import metrics
from services.gateway.catalog.store import CatalogStore, database_errors, keep_image, sha256

LOG = logging.getLogger(__name__)

MAX_ID_CHARS = 256
IMAGE_CHUNK = 100


@dataclass(frozen=True)
class FeedbackItem:
    """One correction: ``model`` is the resolved public model name, ``label`` one of its labels."""

    model: str
    label: str
    image: bytes
    request_id: str = ""
    product_id: str = ""
    caller: str = ""


@dataclass(frozen=True)
class Stored:
    feedback_id: str
    duplicate: bool


@dataclass(frozen=True)
class FeedbackRow:
    """A stored feedback without its photo (read the photos with :meth:`FeedbackStore.images`)."""

    feedback_id: str
    label: str
    image_sha256: bytes
    created_at: datetime


def check_label(label: str, labels: Sequence[str], model: str) -> str:
    """``label`` if it is one of ``labels`` (exact match, surrounding blanks ignored), else INVALID_ARGUMENT
    listing them."""
    label = label.strip()
    if not labels:
        raise InvalidInput(f"model {model} publishes no labels: feedback needs a classifier with labels.txt",
                           reason="unknown_label")
    if label not in labels:
        shown = f"{label[:80]!r}" if label else "an empty label"
        raise InvalidInput(f"{shown} is not a label of model {model}; its labels are: {', '.join(labels)}",
                           reason="unknown_label")
    return label


def check_optional_id(value: str, field: str) -> str:
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidInput(f"{field} must be at most {MAX_ID_CHARS} printable characters", reason=f"bad_{field}")
    return value


class FeedbackStore:
    """Every feedback query, on the catalog store's pool (its migrations create the ``feedback`` table)."""

    def __init__(self, catalog: CatalogStore) -> None:
        self._catalog = catalog

    async def insert(self, item: FeedbackItem) -> Stored:
        """Store the photo (once per content) and the feedback (once per model, photo and label), committed
        before this returns."""
        digest = sha256(item.image)
        async with database_errors("storing feedback"), self._catalog.connection() as conn, conn.transaction():
            await keep_image(conn, digest, item.image)
            cursor = await conn.execute(
                "INSERT INTO feedback (model, label, image_sha256, image_bytes, request_id, product_id, caller)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT ON CONSTRAINT feedback_once DO NOTHING"
                " RETURNING feedback_id",
                (item.model, item.label, digest, len(item.image), item.request_id, item.product_id, item.caller))
            row = await cursor.fetchone()
            if row is not None:
                return Stored(str(row[0]), duplicate=False)
            cursor = await conn.execute(
                "SELECT feedback_id FROM feedback WHERE model = %s AND image_sha256 = %s AND label = %s",
                (item.model, digest, item.label))
            existing = await cursor.fetchone()
        assert existing is not None  # the conflicting row exists: feedback rows are never deleted by the gateway
        return Stored(str(existing[0]), duplicate=True)

    async def rows(self, model: str, since: datetime | None = None) -> list[FeedbackRow]:
        """``model``'s feedback created at or after ``since`` (all when None), oldest first."""
        async with database_errors("reading feedback"), self._catalog.connection() as conn:
            cursor = await conn.execute(
                "SELECT feedback_id, label, image_sha256, created_at FROM feedback"
                " WHERE model = %(model)s AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
                " ORDER BY created_at, feedback_id", {"model": model, "since": since})
            return [FeedbackRow(str(fid), label, bytes(digest), created) for fid, label, digest, created
                    in await cursor.fetchall()]

    async def images(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """The photos of ``digests`` (sha256 -> bytes), read :data:`IMAGE_CHUNK` at a time."""
        found: dict[bytes, bytes] = {}
        async with database_errors("reading feedback photos"), self._catalog.connection() as conn:
            for start in range(0, len(digests), IMAGE_CHUNK):
                cursor = await conn.execute("SELECT sha256, image FROM images WHERE sha256 = ANY(%s)",
                                            (list(digests[start:start + IMAGE_CHUNK]),))
                found.update((bytes(digest), bytes(image)) for digest, image in await cursor.fetchall())
        return found

    async def counts(self, since: datetime | None = None) -> list[tuple[str, str, int]]:
        """(model, label, feedback count) of every model and label, optionally from ``since``."""
        async with database_errors("counting feedback"), self._catalog.connection() as conn:
            cursor = await conn.execute(
                "SELECT model, label, count(*) FROM feedback"
                " WHERE %(since)s::timestamptz IS NULL OR created_at >= %(since)s"
                " GROUP BY model, label ORDER BY model, label", {"since": since})
            return [(model, label, int(count)) for model, label, count in await cursor.fetchall()]


class FeedbackService:
    """Check and store one feedback; the servicer has already checked the upload and that the photo decodes."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    @staticmethod
    def validate(item: FeedbackItem, labels: Sequence[str]) -> FeedbackItem:
        """``item`` with its label and ids checked (INVALID_ARGUMENT otherwise): cheap, so the servicer calls it
        before it has the photo decoded."""
        return FeedbackItem(model=item.model, label=check_label(item.label, labels, item.model), image=item.image,
                            request_id=check_optional_id(item.request_id, "request_id"),
                            product_id=check_optional_id(item.product_id, "product_id"), caller=item.caller)

    async def submit(self, item: FeedbackItem, labels: Sequence[str]) -> Stored:
        """Store ``item`` (validated again: nothing unchecked reaches the database); committed on return."""
        item = self.validate(item, labels)
        stored = await self.store.insert(item)
        metrics.FEEDBACK.labels(item.model, "duplicate" if stored.duplicate else "stored").inc()
        LOG.info("feedback %s", "already stored" if stored.duplicate else "stored", extra={"fields": {
            "feedback_id": stored.feedback_id, "model": item.model, "label": item.label,
            "bytes": len(item.image), "corrects": item.request_id, "product_id": item.product_id}})
        return stored
