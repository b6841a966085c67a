"""Render Fashion-MNIST items as catalog-style product photos (the evaluation set for real uploads).

Real uploads are colour JPEGs of any size with the product on a white or light
background, not centred and sometimes small. Each rendering, seeded per item:

* a canvas of 320..1280 px per side, light background (each channel 225..255)
  with a gentle gradient and sensor noise;
* the item scaled so its longer side is 15..70 % of the canvas's shorter side,
  placed at a random offset;
* the item's intensity used as the opacity of a random product colour (dark,
  saturated or mid-grey), so shape and texture survive but the object is
  dark-on-light and tinted, the opposite of the training data;
* saved as JPEG at quality 40, 60, 80 or 95.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

JPEG_QUALITIES = (40, 60, 80, 95)


@dataclass(frozen=True)
class Rendering:
    data: bytes
    width: int
    height: int
    object_fraction: float
    quality: int


def _product_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour visibly darker than the background (luminance at most ~170)."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] <= 170:
            return colour


def render(item: np.ndarray, seed: int) -> Rendering:
    """``item``: a (28, 28) uint8 Fashion-MNIST image (white on black). Returns JPEG bytes."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(320, 1281, size=2))
    background = rng.uniform(225, 255, size=3).astype(np.float32)
    ramp = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None] * np.float32(rng.uniform(0, 8))
    row = np.clip(background[None, None, :] + ramp, 0, 255)
    base = np.ascontiguousarray(np.broadcast_to(row.astype(np.uint8), (height, width, 3)))
    # Sensor noise from one small tile (drawing it per pixel would dominate the cost), saturating uint8 ops.
    tile = rng.normal(0, 2.0, size=(64, 64, 3))
    reps = (height // 64 + 1, width // 64 + 1, 1)
    brighter = np.tile(np.round(np.clip(tile, 0, None)).astype(np.uint8), reps)[:height, :width]
    darker = np.tile(np.round(np.clip(-tile, 0, None)).astype(np.uint8), reps)[:height, :width]
    canvas_u8: np.ndarray = cv2.subtract(cv2.add(base, np.ascontiguousarray(brighter)),
                                         np.ascontiguousarray(darker))

    fraction = float(rng.uniform(0.15, 0.7))
    side = max(8, int(round(fraction * min(width, height))))
    alpha = cv2.resize(item, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    alpha = np.clip(alpha / 255.0, 0.0, 1.0)[:, :, None]
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    colour = _product_colour(rng).astype(np.float32)
    region = canvas_u8[top:top + side, left:left + side].astype(np.float32)
    canvas_u8[top:top + side, left:left + side] = np.clip(region * (1 - alpha) + colour * alpha, 0, 255)

    quality = int(rng.choice(JPEG_QUALITIES))
    bgr = cv2.cvtColor(canvas_u8, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return Rendering(encoded.tobytes(), width, height, fraction, quality)


def render_set(items: np.ndarray, seed: int = 0) -> list[Rendering]:
    """One rendering per item; item ``i`` always gets the same photo for the same ``seed``."""
    return [render(item, seed * 1_000_003 + i) for i, item in enumerate(items)]
