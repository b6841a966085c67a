"""Decode and transform against simple references."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.common.spec import Spec
from services.preprocess.imaging import preprocess
from tests.images import encode, gradient, png_bomb

CENTER = Spec(height=224, width=224, channels=3, crop="center", resize_shorter=256)


def reference_center_crop(rgb: np.ndarray, shorter: int, size: int) -> np.ndarray:
    """Straightforward resize-shorter-side + centre crop, written independently of the service."""
    h, w = rgb.shape[:2]
    if h < w:
        new_h, new_w = shorter, int(round(w * shorter / h))
    else:
        new_w, new_h = shorter, int(round(h * shorter / w))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def test_center_crop_matches_reference_on_lossless_png() -> None:
    rgb = gradient(640, 480)
    result = preprocess(encode(rgb, ".png"), CENTER, max_pixels=10**8)
    assert result.pixels.shape == (224, 224, 3)
    assert result.pixels.dtype == np.uint8
    np.testing.assert_array_equal(result.pixels, reference_center_crop(rgb, 256, 224))


def test_channel_order_is_rgb() -> None:
    red = np.zeros((300, 300, 3), np.uint8)
    red[..., 0] = 255
    pixels = preprocess(encode(red, ".png"), CENTER, max_pixels=10**8).pixels
    assert pixels[..., 0].min() == 255 and pixels[..., 1:].max() == 0


def test_large_jpeg_reduced_decode_stays_close_to_reference() -> None:
    rgb = cv2.resize(gradient(640, 480), (4032, 3024), interpolation=cv2.INTER_LINEAR)
    data = encode(rgb, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    result = preprocess(data, CENTER, max_pixels=10**8)
    reference = reference_center_crop(rgb, 256, 224)
    assert (result.header.width, result.header.height) == (4032, 3024)
    assert np.abs(result.pixels.astype(int) - reference.astype(int)).mean() < 3.0


def test_transparent_png_is_composited_on_white() -> None:
    rgba = np.zeros((100, 100, 4), np.uint8)  # fully transparent
    ok, buf = cv2.imencode(".png", rgba)
    pixels = preprocess(buf.tobytes(), CENTER, max_pixels=10**8).pixels
    assert pixels.min() == 255


def test_object_crop_makes_light_background_dark_and_centres_the_product() -> None:
    canvas = np.full((600, 800, 3), 245, np.uint8)
    canvas[100:250, 500:650] = (40, 60, 200)  # an off-centre product on a light background
    spec = Spec(height=28, width=28, channels=1, crop="object", background="dark")
    pixels = preprocess(encode(canvas, ".png"), spec, max_pixels=10**8).pixels
    assert pixels.shape == (28, 28, 1)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 0  # background is black
    assert pixels[14, 14, 0] > 100  # the product fills the centre, light on dark


def test_decompression_bomb_refused_before_decoding() -> None:
    with pytest.raises(InvalidInput) as info:
        preprocess(png_bomb(), CENTER, max_pixels=50_000_000)
    assert info.value.reason == "too_many_pixels"
    assert "50000x50000" in info.value.message


def test_bad_spec_is_refused() -> None:
    with pytest.raises(InvalidInput, match="crop"):
        preprocess(encode(gradient(), ".png"), Spec(height=10, width=10, crop="diagonal"), max_pixels=10**8)
