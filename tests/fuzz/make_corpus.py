"""Write the corpus of malformed (and a few valid) images that CI replays through the preprocess service.

    python -m tests.fuzz.make_corpus [--output tests/fuzz/corpus]

Deterministic: the same bytes on every run. Each file name starts with the outcome the service must
give: ``ok-`` (a 224x224 input), ``bad-`` (``INVALID_ARGUMENT``) or ``any-`` (either; what a decoder
makes of flipped bits inside compressed data is its own business, as long as it neither crashes nor hangs).
"""
from __future__ import annotations

import argparse
import random
import struct
from pathlib import Path

from tests.fuzz.seeds import flat_png, png_chunk, seeds
from tests.images import png_bomb

HERE = Path(__file__).resolve().parent


def _flip(data: bytes, rng: random.Random, count: int, start: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        pos = rng.randrange(start, len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _png_with_ihdr(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def _jpeg_sof(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _webp_vp8x(width: int, height: int, flags: int) -> bytes:
    payload = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _bmp(width: int, height: int, bits: int = 24, compression: int = 0, pixels: bytes = b"") -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def corpus() -> dict[str, bytes]:
    """file name -> bytes."""
    s = seeds()
    rng = random.Random(8)
    png, jpeg, webp, bmp = s["png"], s["jpeg"], s["webp_lossy"], s["bmp"]
    # The first bytes of a PNG after its IHDR chunk are read as the next chunk's length: the PNG
    # signature there claims a 2.3 GB chunk, which OpenCV allocated before it looked (found by fuzzing).
    chunk_length_bomb = png[:33] + png
    files = {
        "ok-jpeg.jpg": jpeg,
        "ok-jpeg-progressive.jpg": s["jpeg_progressive"],
        "ok-png.png": png,
        "ok-png-gray.png": s["png_gray"],
        "ok-png-rgba.png": s["png_rgba"],
        "ok-png-16bit.png": s["png_16bit"],
        "ok-webp-lossy.webp": webp,
        "ok-webp-lossless.webp": s["webp_lossless"],
        "ok-bmp.bmp": bmp,
        "ok-bmp-gray.bmp": s["bmp_gray"],
        "ok-png-1x1.png": flat_png(1, 1),
        "ok-png-aspect-20-to-1.png": flat_png(400, 20),
        "bad-empty.bin": b"",
        "bad-one-byte.bin": b"\xff",
        "bad-text.txt": b"definitely not an image\n" * 8,
        "bad-zip.zip": b"PK\x03\x04" + bytes(60),
        "bad-pdf.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(40),
        "bad-gif.gif": s["gif"],
        "bad-gif-animated.gif": s["gif_animated"],
        "bad-tiff.tif": s["tiff"],
        "bad-heic.heic": b"\x00\x00\x00\x18ftypheic" + bytes(40),
        "bad-png-bomb-50000x50000.png": png_bomb(),
        "bad-png-chunk-length-bomb.png": chunk_length_bomb,
        "bad-png-truncated.png": png[: len(png) // 2],
        "bad-png-no-ihdr.png": png[:8] + png[33:],
        "bad-png-zero-width.png": _png_with_ihdr(0, 12),
        "bad-png-aspect-1x40000.png": flat_png(1, 40_000),
        "bad-png-header-only.png": _png_with_ihdr(16, 12),
        "bad-jpeg-truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad-jpeg-only-soi.jpg": b"\xff\xd8\xff",
        "bad-jpeg-scan-before-frame.jpg": b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\xff\xd9",
        "bad-jpeg-65500x65500.jpg": _jpeg_sof(65_500, 65_500),
        "bad-jpeg-zero-height.jpg": _jpeg_sof(16, 0),
        "bad-jpeg-frame-without-data.jpg": _jpeg_sof(16, 12),
        "bad-webp-animated.webp": _webp_vp8x(16, 12, flags=0x02),
        "bad-webp-16384x16384.webp": _webp_vp8x(16_384, 16_384, flags=0),
        "bad-webp-riff-only.webp": webp[:16],
        "bad-webp-vp8l-signature.webp": b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00\x00" + bytes(13),
        "bad-bmp-100000x100000.bmp": _bmp(100_000, 100_000),
        "bad-bmp-unknown-compression.bmp": _bmp(16, 12, compression=7, pixels=bytes(16 * 12 * 3)),
        "bad-bmp-header-only.bmp": bmp[:54],
        "any-png-flipped-data.png": _flip(png, rng, 3, start=41),
        "any-jpeg-flipped-data.jpg": _flip(jpeg, rng, 3, start=len(jpeg) // 2),
        "any-webp-flipped-data.webp": _flip(webp, rng, 3, start=40),
        "any-bmp-flipped-pixels.bmp": _flip(bmp, rng, 8, start=54),
        "any-jpeg-progressive-flipped.jpg": _flip(s["jpeg_progressive"], rng, 4, start=len(jpeg) // 2),
    }
    return files


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the malformed-image corpus replayed in CI.")
    parser.add_argument("--output", type=Path, default=HERE / "corpus", help="directory (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    for old in args.output.iterdir():
        if old.name.startswith(("ok-", "bad-", "any-")):
            old.unlink()
    for name, data in corpus().items():
        (args.output / name).write_bytes(data)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
