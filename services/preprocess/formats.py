"""Identify an uploaded image from its first bytes and read its size from the header alone.

Nothing here decodes pixels, so a decompression bomb (a tiny file whose header
claims billions of pixels) is refused before any memory is spent on it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from services.common.errors import InvalidInput

ACCEPTED = ("jpeg", "png", "webp", "bmp")
ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP"


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def sniff_format(data: bytes) -> str:
    """Container format from magic bytes: one of ACCEPTED, or a name of a format we refuse, or ''."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "heif/avif"
    return ""


def read_header(data: bytes) -> ImageHeader:
    """Format and pixel size of ``data``; raises :class:`InvalidInput` with a reason the caller can act on."""
    if not data:
        raise InvalidInput("image is empty: send the bytes of a JPEG, PNG, WebP or BMP file", reason="empty")
    fmt = sniff_format(data)
    if fmt not in ACCEPTED:
        if fmt:
            raise InvalidInput(f"unsupported image format {fmt.upper()}; accepted formats: {ACCEPTED_TEXT}",
                               reason="unsupported_format")
        raise InvalidInput(f"image bytes are not a recognised image file; accepted formats: {ACCEPTED_TEXT}",
                           reason="not_an_image")
    try:
        width, height = _SIZE_READERS[fmt](data)
    except (struct.error, IndexError, ValueError):
        raise InvalidInput(f"{fmt.upper()} header is truncated or corrupt", reason="corrupt") from None
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{fmt.upper()} header gives an empty size {width}x{height}", reason="corrupt")
    return ImageHeader(fmt, width, height)


def check_complete(header: ImageHeader, data: bytes) -> None:
    """Refuse files cut short in transit: decoders would otherwise fill the missing rows with grey."""
    if header.format == "jpeg" and b"\xff\xd9" not in data[-1024:].rstrip(b"\x00\r\n "):
        raise InvalidInput("JPEG is truncated: the end-of-image marker is missing", reason="truncated")
    if header.format == "png":
        _check_png_chunks(data)


def _check_png_chunks(data: bytes) -> None:
    """Every chunk must fit inside the file, up to IEND. OpenCV's PNG reader allocates a chunk's declared
    length before reading it: without this walk a 700-byte file claiming a 2 GB chunk costs over 1 GB."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if length > len(data) - pos - 12:
            raise InvalidInput(f"PNG is truncated or corrupt: a chunk claims {length:,} bytes, "
                               f"{len(data) - pos - 12:,} remain", reason="truncated")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos += 12 + length
    raise InvalidInput("PNG is truncated: the IEND chunk is missing", reason="truncated")


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk the marker segments until a start-of-frame (SOF0..SOF15 except DHT/JPG/DAC).
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("bad marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            raise ValueError("bad segment length")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            raise ValueError("no frame header")
        pos += 2 + length
    raise ValueError("no frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 signature")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        flags = data[20]
        if flags & 0x02:
            raise InvalidInput(f"animated WebP is not supported; send a single still image ({ACCEPTED_TEXT})",
                               reason="unsupported_format")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise ValueError("unknown WebP chunk")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)


_SIZE_READERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size, "bmp": _bmp_size}
