"""Header sniffing: formats, sizes, and refusals that happen before any decoding."""
from __future__ import annotations

import grpc
import pytest

from services.common.errors import InvalidInput
from services.preprocess.formats import check_complete, read_header
from tests.images import animated_gif, encode, gradient, png_bomb


@pytest.mark.parametrize("ext,fmt", [(".jpg", "jpeg"), (".png", "png"), (".webp", "webp"), (".bmp", "bmp")])
def test_accepted_formats_report_their_real_size(ext: str, fmt: str) -> None:
    data = encode(gradient(321, 123), ext)
    header = read_header(data)
    assert (header.format, header.width, header.height) == (fmt, 321, 123)


def test_lossless_webp_size() -> None:
    data = encode(gradient(77, 55), ".webp", [1 << 6, 101])  # IMWRITE_WEBP_QUALITY > 100 = lossless (VP8L)
    assert data[12:16] == b"VP8L"
    header = read_header(data)
    assert (header.width, header.height) == (77, 55)


def test_png_bomb_is_read_from_header_only() -> None:
    header = read_header(png_bomb(50_000, 50_000))
    assert (header.format, header.width, header.height) == ("png", 50_000, 50_000)


@pytest.mark.parametrize("data,reason,words", [
    (b"", "empty", "empty"),
    (b"hello, this is text", "not_an_image", "accepted formats: JPEG, PNG, WebP, BMP"),
    (animated_gif(), "unsupported_format", "GIF"),
    (b"II*\x00" + b"\x00" * 64, "unsupported_format", "TIFF"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 4, "corrupt", "PNG header"),
])
def test_refusals_say_what_is_wrong(data: bytes, reason: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        read_header(data)
    assert info.value.reason == reason
    assert words in info.value.message
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_truncated_jpeg_is_detected() -> None:
    data = encode(gradient(), ".jpg")
    check_complete(read_header(data), data)  # the whole file passes
    cut = data[: len(data) // 2]
    with pytest.raises(InvalidInput) as info:
        check_complete(read_header(cut), cut)
    assert info.value.reason == "truncated"


def test_truncated_png_is_detected() -> None:
    data = encode(gradient(), ".png")
    cut = data[:-20]
    with pytest.raises(InvalidInput, match="truncated"):
        check_complete(read_header(cut), cut)
