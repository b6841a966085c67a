"""Builders for good and bad image bytes used across the tests."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def encode(image_rgb: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params or [])
    assert ok, ext
    return buf.tobytes()


def gradient(width: int = 320, height: int = 240) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    r = np.tile(x, (height, 1))
    g = np.tile(y[:, None], (1, width))
    b = 255 - r
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # One compressed row of zeros is enough to look plausible; a decoder would try to allocate it all.
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def animated_gif() -> bytes:
    """A two-frame animated GIF (built by hand; OpenCV cannot write GIFs)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 2, 2, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 2, 2, 0)
             + b"\x02\x02\x44\x01\x00")
    return header + loop + frame + frame + b"\x3b"
