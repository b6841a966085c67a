"""Training from a team's own catalog: an image folder (one sub-folder per class) or a CSV manifest of
colour photos of any size, through the same preprocessing recipe as serving."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from services.common.spec import Spec
from training import evaluate
from training.data.datasets import load_dataset, source_labels
from training.repository.layout import ensemble_config
from training.repository.recipe import read_spec

SHAPES = ("circle", "square", "triangle")


def _photo(shape: str, rng: np.random.Generator) -> np.ndarray:
    """A coloured shape on a light background, random size and position (BGR for OpenCV)."""
    height, width = (int(v) for v in rng.integers(120, 420, size=2))
    image = np.full((height, width, 3), rng.integers(225, 256, size=3), dtype=np.uint8)
    size = int(rng.integers(30, min(height, width) // 2))
    cx, cy = int(rng.integers(size, width - size)), int(rng.integers(size, height - size))
    colour = tuple(int(c) for c in rng.integers(0, 160, size=3))
    if shape == "circle":
        cv2.circle(image, (cx, cy), size, colour, -1)
    elif shape == "square":
        cv2.rectangle(image, (cx - size, cy - size), (cx + size, cy + size), colour, -1)
    else:
        points = np.array([[cx, cy - size], [cx - size, cy + size], [cx + size, cy + size]], dtype=np.int32)
        cv2.fillPoly(image, [points], colour)
    return image


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of 3 × 10 photos (JPEG, PNG, WebP) and a CSV manifest listing the same files."""
    root = tmp_path_factory.mktemp("catalog")
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for shape in SHAPES:
        (root / "images" / shape).mkdir(parents=True)
        for i in range(10):
            suffix = (".jpg", ".png", ".webp")[i % 3]
            path = root / "images" / shape / f"{i}{suffix}"
            cv2.imwrite(str(path), _photo(shape, rng))
            rows.append(f"images/{shape}/{i}{suffix},{shape}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "images", root / "manifest.csv"


def test_folder_and_manifest_load_the_same_preprocessed_images(catalog: tuple[Path, Path],
                                                              fashion_config: Path) -> None:
    folder, manifest = catalog
    spec = read_spec(fashion_config)
    from_folder = load_dataset(str(folder), spec)
    from_manifest = load_dataset(str(manifest), spec)
    assert from_folder.classes == from_manifest.classes == SHAPES
    assert from_folder.images.shape == (30, 28, 28, 1)
    order = np.lexsort((np.arange(30), from_manifest.labels))
    np.testing.assert_array_equal(from_folder.labels, from_manifest.labels[order])
    np.testing.assert_array_equal(from_folder.images, from_manifest.images[order])
    # The object recipe turns a dark shape on a light background into a bright shape on black.
    centre, corner = from_folder.images[:, 12:16, 12:16].mean(), from_folder.images[:, :2, :2].mean()
    assert centre > 60 > corner
    labels, classes = source_labels(str(manifest))
    assert classes == SHAPES and np.bincount(labels).tolist() == [10, 10, 10]


def test_train_and_evaluate_from_a_folder_with_a_colour_recipe(tmp_path: Path, catalog: tuple[Path, Path],
                                                               train_run) -> None:
    folder, manifest = catalog
    recipe = tmp_path / "shapes" / "config.pbtxt"
    recipe.parent.mkdir()
    recipe.write_text(ensemble_config("shapes", Spec(32, 32, 3, "center", 36, "keep"), 3, 64, "test"))
    run = train_run(tmp_path / "run", "--data", str(folder), "--recipe", str(recipe), "--val-fraction", "0.2",
                    "--limit-train", "0", "--limit-val", "0", "--epochs", "2", "--batch-size", "8")
    assert run["meta"]["classes"] == list(SHAPES) and run["meta"]["spec"]["channels"] == 3
    assert (run["train_images"], run["val_images"]) == (24, 6)
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [32, 32, 3]
    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--run-dir", str(tmp_path / "run"), "--test-data", str(manifest), "--no-benchmark"]))
    assert report["test"]["count"] == 30 and "catalog" not in report
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["classes"] == list(SHAPES)
