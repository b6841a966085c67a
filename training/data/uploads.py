"""Images as a client uploads them, through the preprocess service's own code."""
from __future__ import annotations

import cv2
import numpy as np

from services.common.spec import Spec
from services.preprocess.imaging import preprocess
from training.data.datasets import MAX_PIXELS


def encode_png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def preprocess_all(photos: list[bytes], spec: Spec) -> np.ndarray:
    """Each photo through the preprocess service's own code, as an upload would go."""
    return np.stack([preprocess(data, spec, MAX_PIXELS).pixels for data in photos])
