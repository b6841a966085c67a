"""The one check of an uploaded photo's size that every RPC taking an image makes before any work."""
from __future__ import annotations

from services.common.errors import InvalidInput
from services.gateway import metrics


def check_upload(image: bytes, max_bytes: int) -> None:
    """Count the upload's size and refuse an empty or oversized one (``INVALID_ARGUMENT``)."""
    size = len(image)
    metrics.REQUEST_BYTES.observe(size)
    if size == 0:
        raise InvalidInput("image is empty: send the bytes of a JPEG, PNG, WebP or BMP file", reason="empty")
    if size > max_bytes:
        raise InvalidInput(f"image is {size:,} bytes; the limit is {max_bytes:,}", reason="too_large")
