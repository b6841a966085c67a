"""The request data of the benchmarks: real sample photos as JPEGs of several sizes, their model tensors,
and serialised ``ClassifyRequest`` messages.

Every system in ``make bench`` sees the same pictures: the services get the JPEG bytes, the
ONNX Runtime ceiling and Triton-direct runs get the uint8 tensors the preprocess service makes
of those same bytes (same recipe, read from the model's ``config.pbtxt``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from devstack.stack import REPO_ROOT, sample_photo
from services.common.spec import Spec
from services.preprocess.imaging import preprocess
from training.repository.layout import IMAGENET_ENSEMBLE

# CC0 / public-domain photos shipped in scikit-image and scikit-learn.
PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg")
# (width, height): VGA, ~1 MP, ~3 MP and a 12 MP phone photo (4:3).
SIZES = ((640, 480), (1152, 864), (2048, 1536), (4032, 3024))
ENSEMBLE = IMAGENET_ENSEMBLE
CALL = "shopvision.v1.ProductRecognition.Classify"
BATCH_CALL = "shopvision.v1.ProductRecognition.ClassifyBatch"


@dataclass(frozen=True)
class ImageSet:
    width: int
    height: int
    jpegs: tuple[bytes, ...]

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def mean_bytes(self) -> float:
        return sum(len(j) for j in self.jpegs) / len(self.jpegs)


def photo_path(name: str) -> Path:
    path = sample_photo(name)
    if not path.exists():
        import sklearn

        path = Path(sklearn.__file__).parent / "datasets" / "images" / name
    return path


def _crop_to_aspect(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        new_w = int(round(h * target))
        left = (w - new_w) // 2
        return image[:, left:left + new_w]
    new_h = int(round(w / target))
    top = (h - new_h) // 2
    return image[top:top + new_h]


def synthesize(width: int, height: int, photos: tuple[str, ...] = PHOTOS, quality: int = 90,
               grain: float = 2.0, seed: int = 0) -> ImageSet:
    """Each photo centre-cropped to the aspect ratio, resized to ``width`` x ``height``, JPEG-encoded.

    A little Gaussian grain keeps upscaled photos from compressing unrealistically well
    (a real 12 MP phone JPEG is a few MB; a smooth upscale would be a fraction of that).
    """
    rng = np.random.default_rng(seed)
    jpegs = []
    for name in photos:
        image = cv2.imread(str(photo_path(name)), cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError(f"cannot read sample photo {name}")
        cropped = _crop_to_aspect(image, width, height)
        interpolation = cv2.INTER_AREA if cropped.shape[1] > width else cv2.INTER_CUBIC
        resized = cv2.resize(cropped, (width, height), interpolation=interpolation)
        if grain > 0:
            # Uniform integer noise in [-a, a] has a standard deviation of about a / sqrt(3).
            amplitude = max(1, int(round(grain * 3 ** 0.5)))
            noise = rng.integers(-amplitude, amplitude + 1, resized.shape, dtype=np.int16)
            resized = np.clip(resized.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"cannot encode {name} at {width}x{height}")
        jpegs.append(encoded.tobytes())
    return ImageSet(width, height, tuple(jpegs))


def model_spec(repository: Path = REPO_ROOT / "model_repository", model: str = ENSEMBLE) -> Spec:
    """The preprocessing recipe from the model's ``config.pbtxt`` (``preprocess.*`` parameters, input dims)."""
    text = (repository / model / "config.pbtxt").read_text()
    params = dict(re.findall(r'key:\s*"(preprocess\.[a-z_]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text))
    dims = re.search(r'name:\s*"image"[^}]*dims:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]', text)
    if dims is None:
        raise ValueError(f"{model}/config.pbtxt has no image input with three dims")
    height, width, channels = (int(d) for d in dims.groups())
    return Spec(height=height, width=width, channels=channels, crop=params.get("preprocess.crop", "center"),
                resize_shorter=int(params.get("preprocess.resize_shorter", "0") or 0),
                background=params.get("preprocess.background", "keep")).validate()


def tensors(images: ImageSet, spec: Spec) -> list[np.ndarray]:
    """The uint8 (H, W, C) model inputs the preprocess service makes of ``images``."""
    return [preprocess(jpeg, spec, max_pixels=100_000_000).pixels for jpeg in images.jpegs]


def jpeg_of(photo: Path, quality: int = 90) -> bytes:
    """The image file ``photo`` re-encoded as a JPEG, the way a shop's upload usually arrives."""
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"cannot read {photo}")
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cannot encode {photo} as JPEG")
    return encoded.tobytes()


def jpeg_photo(name: str = "coffee.png", quality: int = 90) -> bytes:
    """A sample photo as a JPEG (what shop clients send; cheaper for the load generator than PNG)."""
    return jpeg_of(sample_photo(name), quality)


def classify_payloads_from_bytes(images: Iterable[bytes], top_k: int = 5, model: str = "") -> list[bytes]:
    """Serialised ``ClassifyRequest`` messages, one per encoded image."""
    from shopvision.v1 import recognition_pb2

    return [recognition_pb2.ClassifyRequest(image=image, top_k=top_k, model=model).SerializeToString()
            for image in images]


def classify_batch_payloads_from_bytes(images: Sequence[bytes], items: int, top_k: int = 5) -> list[bytes]:
    """Serialised ``ClassifyBatchRequest`` messages of ``items`` images each, one per starting image (rotating)."""
    from shopvision.v1 import recognition_pb2

    return [recognition_pb2.ClassifyBatchRequest(requests=[
        recognition_pb2.ClassifyRequest(image=images[(start + i) % len(images)], top_k=top_k) for i in range(items)
    ]).SerializeToString() for start in range(len(images))]


def classify_payloads(images: Sequence[Path], top_k: int = 5, model: str = "") -> list[bytes]:
    return classify_payloads_from_bytes((path.read_bytes() for path in images), top_k, model)
