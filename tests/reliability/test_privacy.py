"""Image bytes are never logged and never written to disk.

A photo made unique to this run (random noise over a real photo, so no other test or engineer can
produce its bytes) is classified, preprocessed and refused in several ways; then every service log,
and every file written meanwhile under the repository and the temp directory, is searched for any
fragment of it — raw, base64, hex, Python-escaped or protobuf-text-escaped — and of its pixels.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import text_encoding
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Stack
from services.common.spec import Spec
from services.preprocess.imaging import preprocess
from tests.conftest import photo_bytes
from tests.images import encode

SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules"}


def unique_photo() -> bytes:
    import cv2

    photo = cv2.imdecode(np.frombuffer(photo_bytes("chelsea.png"), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    noise = np.random.default_rng(int.from_bytes(os.urandom(8), "little")).integers(-12, 13, photo.shape)
    return encode(np.clip(photo + noise, 0, 255).astype(np.uint8), ".png")


def fragments(data: bytes) -> tuple[list[bytes], list[str]]:
    """Byte and text fragments of ``data`` in the encodings a careless log line would use."""
    windows = [data[pos:pos + 12] for pos in (len(data) // 4, len(data) // 2, 3 * len(data) // 4)]
    encoded = base64.b64encode(data).decode()
    texts = [encoded[pos:pos + 20] for pos in (len(encoded) // 4, len(encoded) // 2, 3 * len(encoded) // 4)]
    texts += [base64.b64encode(w).decode()[:12] for w in windows]
    texts += [w.hex() for w in windows]
    texts += [repr(w)[2:-1] for w in windows if len(repr(w)) > 20]
    texts += [text_encoding.CEscape(w, as_utf8=False) for w in windows]
    texts += [json.dumps(t)[1:-1] for t in texts if json.dumps(t)[1:-1] != t]  # as they appear in JSON logs
    return windows, texts


def echoes(message: str, data: bytes) -> bool:
    """Whether an error message carries a fragment of ``data`` in any of the encodings :func:`fragments` makes."""
    _, texts = fragments(data)
    return any(t in message for t in texts)


def leaks(path: Path, windows: list[bytes], texts: list[str]) -> list[str]:
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    return [f"{path}: raw bytes" for w in windows if w in data] + [f"{path}: {t!r}" for t in texts if t in text]


def recently_written(roots: list[Path], since: float) -> list[Path]:
    found = []
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
            for name in files:
                path = Path(directory) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if stat.st_mtime >= since and stat.st_size < 64 * 1024 * 1024 and path.is_file():
                    found.append(path)
    return found


def test_image_bytes_are_never_logged_nor_written(stack: Stack) -> None:
    since = time.time() - 1
    image = unique_photo()
    pixels = preprocess(image, Spec(height=224, width=224, channels=3, crop="center", resize_shorter=256),
                        max_pixels=50_000_000).pixels.tobytes()
    with grpc.insecure_channel(stack.gateway_address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        gateway = recognition_pb2_grpc.ProductRecognitionStub(ch)
        assert gateway.Classify(recognition_pb2.ClassifyRequest(image=image, top_k=3), timeout=30).predictions
        batch = gateway.ClassifyBatch(recognition_pb2.ClassifyBatchRequest(requests=[
            recognition_pb2.ClassifyRequest(image=image),
            recognition_pb2.ClassifyRequest(image=image[: len(image) // 2]),  # truncated: an error path
            recognition_pb2.ClassifyRequest(image=b"GIF89a" + image[6:]),  # unsupported format
        ]), timeout=30)
        assert [item.WhichOneof("result") for item in batch.items] == ["response", "error", "error"]
        for item, sent in zip(batch.items[1:], (image[: len(image) // 2], b"GIF89a" + image[6:]), strict=True):
            assert item.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], item.error
            assert not echoes(item.error.message, sent), "a batch item's error message echoes the image"
        broken_uploads = {"truncated": image[: len(image) // 2], "no IHDR": b"\x89PNG\r\n\x1a\n" + image[100:],
                          "no signature": image[100:]}
        for name, broken in broken_uploads.items():
            # Each must be refused: an accepted broken upload would leave its error path untested here.
            with pytest.raises(grpc.RpcError) as refused:
                gateway.Classify(recognition_pb2.ClassifyRequest(image=broken), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, refused.value.code())
            assert not echoes(refused.value.details() or "", broken), f"{name}: the error message echoes the image"
    with grpc.insecure_channel(stack.preprocess_address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        preprocess_pb2_grpc.PreprocessorStub(ch).Preprocess(preprocess_pb2.PreprocessRequest(
            image=image, spec=preprocess_pb2.ImageSpec(height=224, width=224, channels=3)), timeout=30)
    time.sleep(0.5)  # let the services flush their log lines

    logs = sorted(stack.log_dir.glob("*.log")) if stack.log_dir else []
    assert {p.stem for p in logs} >= {"gateway", "preprocess", "triton"}
    assert '"classified"' in (stack.log_dir / "gateway.log").read_text()  # the logs we search are the live ones
    image_windows, image_texts = fragments(image)
    pixel_windows, pixel_texts = fragments(pixels)
    windows, texts = image_windows + pixel_windows, image_texts + pixel_texts
    found = [leak for path in logs for leak in leaks(path, windows, texts)]
    assert not found, found

    written = recently_written([REPO_ROOT, Path(tempfile.gettempdir())], since)
    found = [leak for path in written if path.suffix != ".log" for leak in leaks(path, image_windows, image_texts)]
    assert not found, found
