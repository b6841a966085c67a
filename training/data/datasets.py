"""Training data: Fashion-MNIST (Debian ``dataset-fashion-mnist``), an image folder or a CSV manifest.

Every source ends up as uint8 arrays of shape (N, H, W, C) holding exactly what
the model receives in production: each image goes through the serving path's
own preprocessing (``services.preprocess.imaging``) with the model's recipe
(:class:`Spec`, read from ``config.pbtxt``). Images are kept in memory.
"""
from __future__ import annotations

import csv
import gzip
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from services.common.spec import Spec
from services.preprocess.imaging import preprocess, transform

LOG = logging.getLogger(__name__)

# Where Debian's dataset-fashion-mnist puts the files; FASHION_MNIST_DIR overrides it (a machine without the package).
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST = "fashion-mnist"
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_PIXELS = 64 * 1024 * 1024
# training.train's split arguments by default: one place, for its CLI and for reading a run that recorded none.
SPLIT_DEFAULTS = {"val_fraction": 0.1, "seed": 0, "limit_train": 0, "limit_val": 0}


@dataclass(frozen=True)
class Dataset:
    """Model-ready images (N, H, W, C) uint8, integer labels (N,) and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.classes)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} bytes of data for shape {shape}")
    return array.reshape(shape)


def fashion_mnist_raw(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST: (N, 28, 28) uint8 images (white on black) and (N,) labels."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} is missing: apt-get install dataset-fashion-mnist (make deps)")
    images = read_idx(images_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def apply_recipe(images: np.ndarray, spec: Spec) -> np.ndarray:
    """Run decoded images (N, H, W) gray or (N, H, W, 3) RGB through the serving transform."""
    out = np.empty((len(images), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, image in enumerate(images):
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
        out[i] = transform(rgb, spec)
    return out


def image_folder_items(root: Path) -> tuple[list[tuple[Path, str]], tuple[str, ...]]:
    """(path, class name) for every image under ``root/<class>/``; classes sorted by name."""
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    items = [(path, name) for name in classes for path in sorted((root / name).rglob("*"))
             if path.suffix.lower() in IMAGE_SUFFIXES]
    return items, classes


def manifest_items(path: Path, allow_empty: bool = False) -> tuple[list[tuple[Path, str]], tuple[str, ...]]:
    """(path, label) rows of a CSV manifest ``path,label`` (header optional; paths relative to the CSV). One that
    lists no image is an error unless ``allow_empty`` (an export of feedback may hold nothing out)."""
    items: list[tuple[Path, str]] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: row {row!r} is not path,label")
            file, label = row[0].strip(), row[1].strip()
            if not items and (file, label) == ("path", "label"):
                continue
            file_path = Path(file)
            items.append((file_path if file_path.is_absolute() else path.parent / file_path, label))
    if not items and not allow_empty:
        raise ValueError(f"{path} lists no images")
    return items, tuple(sorted({label for _, label in items}))


def load_files(items: list[tuple[Path, str]], classes: tuple[str, ...], spec: Spec) -> Dataset:
    """Decode and transform each file exactly as the preprocess service does for an upload."""
    index = {name: i for i, name in enumerate(classes)}
    images = np.empty((len(items), spec.height, spec.width, spec.channels), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (path, label) in enumerate(items):
        if label not in index:
            raise ValueError(f"{path}: label {label!r} is not one of {classes}")
        images[i] = preprocess(path.read_bytes(), spec, MAX_PIXELS).pixels
        labels[i] = index[label]
    return Dataset(images, labels, classes)


def _items(source: str) -> tuple[list[tuple[Path, str]], tuple[str, ...]]:
    path = Path(source)
    if path.is_dir():
        return image_folder_items(path)
    if path.suffix.lower() == ".csv" and path.exists():
        return manifest_items(path)
    raise FileNotFoundError(f"data source {source!r} is neither {FASHION_MNIST!r}, a folder nor a CSV file")


def source_labels(source: str, split: str = "train",
                  classes: tuple[str, ...] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels and class names of a source without decoding any image (to split and subset cheaply)."""
    if source == FASHION_MNIST:
        return read_idx(FASHION_MNIST_DIR / f"{'t10k' if split == 'test' else 'train'}-labels-idx1-ubyte.gz"
                        ).astype(np.int64), FASHION_LABELS
    items, found = _items(source)
    classes = classes or found
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in items} - set(index))
    if unknown:
        raise ValueError(f"{source}: labels {unknown} are not among {classes}")
    return np.array([index[label] for _, label in items], dtype=np.int64), classes


def load_dataset(source: str, spec: Spec, split: str = "train", classes: tuple[str, ...] | None = None,
                 indices: np.ndarray | None = None) -> Dataset:
    """``fashion-mnist`` (``split`` picks train or test), an image folder, or a ``.csv`` manifest.

    ``classes`` fixes the label order (a test folder must use the training classes); ``indices``
    (into :func:`source_labels`) loads only those items, in that order.
    """
    if source == FASHION_MNIST:
        raw, labels = fashion_mnist_raw(split)
        if indices is not None:
            raw, labels = raw[indices], labels[indices]
        return Dataset(apply_recipe(raw, spec), labels, FASHION_LABELS)
    items, found = _items(source)
    if indices is not None:
        items = [items[i] for i in indices]
    dataset = load_files(items, classes or found, spec)
    LOG.info("loaded %d images in %d classes from %s", len(dataset), len(dataset.classes), source)
    return dataset


def load_extra(source: str, spec: Spec, classes: tuple[str, ...]) -> Dataset:
    """Extra training images (a folder or a CSV manifest, e.g. exported feedback) with their labels mapped onto
    the base data's ``classes``; ``ValueError`` naming every label the base data does not have. An empty
    manifest gives an empty dataset."""
    path = Path(source)
    items, found = manifest_items(path, allow_empty=True) if path.suffix.lower() == ".csv" else _items(source)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{source}: labels {unknown} are not classes of the base data ({', '.join(classes)})")
    return load_files(items, classes, spec)


def concatenate(first: Dataset, second: Dataset, repeat: int = 1) -> Dataset:
    """``first`` followed by ``repeat`` copies of ``second`` (same classes)."""
    if first.classes != second.classes:
        raise ValueError(f"datasets of different classes: {first.classes} vs {second.classes}")
    return Dataset(np.concatenate([first.images, *[second.images] * repeat]),
                   np.concatenate([first.labels, *[second.labels] * repeat]), first.classes)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each class's share; returns sorted (train, validation) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * val_fraction)) if val_fraction > 0 else 0
        if val_fraction > 0 and len(members) > 1:
            count = min(max(count, 1), len(members) - 1)
        val.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def run_split(labels: np.ndarray, val_fraction: float, seed: int, limit_train: int = 0,
              limit_val: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (train, validation) indices ``training.train`` uses: :func:`stratified_split`, then optionally a
    class-balanced subset of each (``limit_*`` images; 0 = all). One definition, so a later step (e.g. fusion
    weights chosen on validation) rebuilds exactly the split a run was validated on."""
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if limit_train:
        train_idx = train_idx[stratified_subset(labels[train_idx], limit_train, seed)]
    if limit_val:
        val_idx = val_idx[stratified_subset(labels[val_idx], limit_val, seed)]
    return train_idx, val_idx


def run_split_of(labels: np.ndarray, args: Mapping[str, str | float]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`run_split` with the split arguments a run recorded (the ``args`` of its ``run.json`` or checkpoint,
    stored as strings), so every later step rebuilds the split from one reading of them."""
    return run_split(labels, float(args["val_fraction"]), int(args["seed"]), int(args["limit_train"]),
                     int(args["limit_val"]))


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` seeded indices spread evenly over the classes (for smoke runs and calibration)."""
    if count <= 0 or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked: list[int] = []
    round_ = 0
    while len(picked) < count:
        for members in per_class:
            if round_ < len(members) and len(picked) < count:
                picked.append(int(members[round_]))
        round_ += 1
    return np.sort(np.array(picked, dtype=np.int64))
