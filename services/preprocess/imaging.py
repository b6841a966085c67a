"""Decode an uploaded image and turn it into a model's uint8 input (pure functions, no gRPC).

The recipe (:class:`Spec`) belongs to the model version: it comes from the
``preprocess.*`` parameters of the model's ``config.pbtxt``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

from services.common.errors import InvalidInput
from services.common.spec import Spec
from services.preprocess.formats import ImageHeader, check_complete, read_header

MAX_ASPECT_RATIO = 20
# The object crop is padded to a square before it is resized down; larger crops are shrunk first.
MAX_SQUARE_SIDE = 2048


@dataclass(frozen=True)
class Result:
    pixels: np.ndarray  # uint8, (height, width, channels)
    header: ImageHeader
    decode_s: float
    transform_s: float


def preprocess(data: bytes, spec: Spec, max_pixels: int) -> Result:
    """Validate, decode and transform ``data`` according to ``spec``."""
    spec.validate()
    header = read_header(data)
    if header.width * header.height > max_pixels:
        raise InvalidInput(
            f"image is {header.width}x{header.height} = {header.width * header.height:,} pixels; "
            f"the limit is {max_pixels:,}", reason="too_many_pixels")
    _check_aspect_ratio(header.width, header.height)
    check_complete(header, data)
    start = time.perf_counter()
    image = decode(data, header, needed=_needed_shorter_side(spec))
    _check_aspect_ratio(image.shape[1], image.shape[0])  # in case the decoder disagrees with the header
    decoded = time.perf_counter()
    pixels = transform(image, spec)
    return Result(pixels, header, decoded - start, time.perf_counter() - decoded)


def _check_aspect_ratio(width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Resizing the shorter side of a 1x40000 strip to 256 px would need a 256x10M intermediate image.
        raise InvalidInput(f"image is {width}x{height}; the aspect ratio is limited to {MAX_ASPECT_RATIO}:1",
                           reason="bad_aspect_ratio")


def _needed_shorter_side(spec: Spec) -> int:
    if spec.crop == "center":
        return max(spec.resize_shorter, spec.height, spec.width)
    # "object" crops a part of the frame: keep enough resolution for a small product.
    return 4 * max(spec.height, spec.width)


def decode(data: bytes, header: ImageHeader, needed: int) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3). Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that
    still leaves at least ``needed`` pixels on the shorter side (libjpeg's DCT scaling, much cheaper)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if header.format == "jpeg":
        flag = cv2.IMREAD_COLOR
        shorter = min(header.width, header.height)
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if shorter // factor >= needed:
                flag = reduced
                break
        image = cv2.imdecode(buffer, flag)
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise InvalidInput(f"{header.format.upper()} data could not be decoded (corrupt or truncated)",
                           reason="decode_failed")
    return _to_rgb8(image)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = ((image - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        # Product photos with a transparent background: composite onto white, as a shop page shows them.
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def transform(image: np.ndarray, spec: Spec) -> np.ndarray:
    """RGB uint8 → the model's (height, width, channels) uint8 input."""
    if spec.crop == "object":
        out = _object_crop(image, spec)
    elif spec.crop == "stretch":
        out = _resize(_color(image, spec.channels), spec.width, spec.height)
    else:
        out = _center_crop(_color(image, spec.channels), spec)
    if spec.background == "dark" and spec.crop != "object":
        out = _make_background_dark(out)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out)


def _color(image: np.ndarray, channels: int) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if channels == 1 else image


def _center_crop(image: np.ndarray, spec: Spec) -> np.ndarray:
    h, w = image.shape[:2]
    shorter = spec.resize_shorter or max(spec.height, spec.width)
    scale = shorter / min(h, w)
    new_w, new_h = max(spec.width, round(w * scale)), max(spec.height, round(h * scale))
    resized = _resize(image, new_w, new_h)
    top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
    return resized[top:top + spec.height, left:left + spec.width]


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _make_background_dark(image: np.ndarray) -> np.ndarray:
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return 255 - image if np.median(_border(gray)) > 127 else image


def _object_crop(image: np.ndarray, spec: Spec) -> np.ndarray:
    """Catalog photo → Fashion-MNIST-like input: the product, light on black, centred in a square.

    The background level is the median of the frame's border; pixels that differ
    from it by more than a threshold are the product. Its bounding box is cropped,
    padded to a square with a margin and resized to the model's size.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if spec.channels == 1 else None
    work = gray if gray is not None else image
    luminance = gray if gray is not None else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    background = float(np.median(_border(luminance)))
    distance = np.abs(luminance.astype(np.int16) - int(round(background))).astype(np.uint8)
    mask = distance > 24
    if spec.background == "dark":
        if background > 127:
            work = 255 - work
        # Subtract what is left of the background so it becomes black, as in the training data.
        floor = 255 - background if background > 127 else background
        work = np.clip(work.astype(np.int16) - int(round(floor)), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    if len(xs) >= 16:
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        work = work[top:bottom, left:right]
    h, w = work.shape[:2]
    if max(h, w) > MAX_SQUARE_SIDE:  # bound the padded square (an elongated 50 Mpx image: billions of pixels)
        factor = MAX_SQUARE_SIDE / max(h, w)
        work = _resize(work, max(1, round(w * factor)), max(1, round(h * factor)))
        h, w = work.shape[:2]
    side = int(max(h, w) * 1.08) + 1
    fill = 0 if spec.background == "dark" else int(round(background))
    pad_top, pad_left = (side - h) // 2, (side - w) // 2
    square = cv2.copyMakeBorder(work, pad_top, side - h - pad_top, pad_left, side - w - pad_left,
                                cv2.BORDER_CONSTANT, value=(fill, fill, fill))
    return _resize(square, spec.width, spec.height)
