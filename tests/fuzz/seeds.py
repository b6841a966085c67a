"""Small valid images in every format the service sniffs: the seeds that fuzzing mutates."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from tests.images import animated_gif


def _encode(image_bgr: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image_bgr, params or [])
    assert ok, ext
    return buf.tobytes()


def still_gif() -> bytes:
    """A one-frame 2x2 GIF (OpenCV cannot write GIFs)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 2, 2, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 2, 2, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def flat_png(width: int, height: int, channels: int = 3) -> bytes:
    """A valid PNG of one colour, of any size: a few hundred bytes even for millions of pixels."""
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    row = b"\x00" + b"\x80" * (width * channels)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def seeds() -> dict[str, bytes]:
    """name -> bytes of a small valid file (16x12 noise, so every decoder path has real data)."""
    rng = np.random.default_rng(8)
    color = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    gray = color[:, :, 0]
    rgba = np.dstack([color, rng.integers(0, 256, (12, 16), dtype=np.uint8)])
    return {
        "jpeg": _encode(color, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
        "jpeg_progressive": _encode(color, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "png": _encode(color, ".png"),
        "png_gray": _encode(gray, ".png"),
        "png_rgba": _encode(rgba, ".png"),
        "png_16bit": _encode(color.astype(np.uint16) * 257, ".png"),
        "webp_lossy": _encode(color, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "webp_lossless": _encode(color, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "bmp": _encode(color, ".bmp"),
        "bmp_gray": _encode(gray, ".bmp"),
        "tiff": _encode(color, ".tiff"),
        "gif": still_gif(),
        "gif_animated": animated_gif(),
    }
