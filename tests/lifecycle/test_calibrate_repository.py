"""``training.calibrate`` on a copy of the real model repository: real ONNX models, the real Fashion-MNIST validation
split, configs Triton's parser reads back. The repository itself is never written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.common import model_params
from training import calibrate
from training.data.datasets import fashion_mnist_raw, run_split
from training.report import confidence
from training.repository.recipe import read_config

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = REPO_ROOT / "model_repository"
MODELS = ("fashion_cnn", "fashion_cnn_onnx", "fashion_effnet", "fashion_effnet_onnx", "fashion_fused",
          "fashion_fused_combine", "postprocess_softmax", "efficientnet_lite0_imagenet")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """The Fashion models and the ImageNet ensemble (its 18 MB ONNX file is not needed: it is skipped first)."""
    copy = tmp_path / "model_repository"
    for name in MODELS:
        shutil.copytree(REPOSITORY / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    return copy


def parameters(path: Path) -> dict[str, str]:
    return {key: value.string_value for key, value in read_config(path).parameters.items()}


def test_full_validation_split_of_fashion_cnn_matches_its_training_run(repository: Path) -> None:
    calibration = calibrate.calibrate_model(repository, "fashion_cnn")
    run = json.loads((repository / "fashion_cnn" / "1" / "run.json").read_text())
    # The same 6 000 images training validated on, scored the same way: the run's validation top-1 comes back.
    assert calibration["count"] == run["val_images"] == 6000
    assert calibration["overall"]["top1"] == pytest.approx(run["val_top1"], abs=1 / 6000)
    labels = fashion_mnist_raw("train")[1]
    _, val_idx = run_split(labels, 0.1, 0, 0, 0)
    assert np.bincount(labels[val_idx]).tolist() == [row["support"] for row in calibration["per_class"]]
    assert calibration["overall"]["precision"] >= calibrate.TARGET_PRECISION
    assert json.loads((repository / "fashion_cnn" / "1" / "calibration.json").read_text()) == calibration


def test_thresholds_give_the_target_precision_on_the_images_they_were_chosen_on(repository: Path) -> None:
    calibration = calibrate.calibrate_model(repository, "fashion_effnet", limit=300)
    assert calibration["version"] == 4 and calibration["count"] == 300 and calibration["limit"] == 300
    assert calibration["classes"] == list(calibrate.model_labels(repository, "fashion_effnet"))
    assert calibration["members"] == [{"classifier": "fashion_effnet_onnx", "version": 4, "weight": 1.0}]
    reference = calibration["reference"]
    assert set(reference) == {"class_share", "score_edges", "score_share", "count", "split"}
    assert len(reference["score_edges"]) == 21 and len(reference["score_share"]) == 20
    assert len(reference["class_share"]) == 10 and sum(reference["score_share"]) == pytest.approx(1, abs=1e-4)
    assert "validation split of fashion-mnist" in reference["split"] and "300 of 6000" in reference["split"]

    # Score the same images again, independently of the calibration's bookkeeping.
    source, split_args = "fashion-mnist", {"val_fraction": "0.1", "seed": "0", "limit_train": "0", "limit_val": "0"}
    spec = calibrate.version_spec(repository, "fashion_effnet", 4)
    images, labels, _ = calibrate.validation_images(source, split_args, spec, tuple(calibration["classes"]), 300)
    members = calibrate.resolve_members(repository, "fashion_effnet", 4)
    probabilities = calibrate.member_probabilities(repository, members, images)
    predicted = probabilities.argmax(axis=1)
    top1 = probabilities[np.arange(len(labels)), predicted]
    for class_id, row in enumerate(calibration["per_class"]):
        confident = (predicted == class_id) & (top1 >= calibration["thresholds"][class_id])
        assert confident.sum() == row["confident"], row["class"]
        if row["confident"]:
            assert (labels[confident] == class_id).mean() >= calibrate.TARGET_PRECISION, row["class"]
            assert (labels[confident] == class_id).mean() == pytest.approx(row["precision"])
        else:
            assert calibration["thresholds"][class_id] == calibrate.NEVER_CONFIDENT


def test_fused_model_is_computed_from_its_members_and_combine_weights(repository: Path) -> None:
    fused = calibrate.calibrate_model(repository, "fashion_fused", limit=200)
    weights = [float(w) for w in parameters(repository / "fashion_fused_combine" / "config.pbtxt")["weights"]
               .split(",")]
    assert [m["classifier"] for m in fused["members"]] == ["fashion_effnet_onnx", "fashion_cnn_onnx"]
    assert [m["weight"] for m in fused["members"]] == pytest.approx([w / sum(weights) for w in weights])
    effnet = calibrate.calibrate_model(repository, "fashion_effnet", limit=200)
    cnn = calibrate.calibrate_model(repository, "fashion_cnn", limit=200)
    # The fusion lands between (or above) its members on the same 200 images.
    assert fused["overall"]["top1"] >= min(effnet["overall"]["top1"], cnn["overall"]["top1"])
    assert "weighted mean" in fused["computed"]


def test_cli_all_writes_calibration_config_and_card_and_skips_imagenet(repository: Path) -> None:
    configs = {m: (repository / m / "config.pbtxt").read_text() for m in ("fashion_cnn", "fashion_effnet",
                                                                          "fashion_fused")}
    card_before = (repository / "fashion_effnet" / "4" / "MODEL_CARD.md").read_text()
    command = [sys.executable, "-m", "training.calibrate", "--repository", str(repository), "--all", "--limit", "100"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped efficientnet_lite0_imagenet" in result.stderr
    assert not (repository / "efficientnet_lite0_imagenet" / "1" / "calibration.json").exists()
    for model, version in (("fashion_cnn", "1"), ("fashion_effnet", "4"), ("fashion_fused", "4")):
        calibration = json.loads((repository / model / version / "calibration.json").read_text())
        found = parameters(repository / model / "config.pbtxt")
        for key, value in calibrate.calibration_parameters(calibration).items():
            assert found[key] == value, (model, key)
        assert json.loads(found[model_params.THRESHOLDS]) == calibration["thresholds"]
        text = (repository / model / "config.pbtxt").read_text()
        keys = tuple(f'key: "{key}"' for key in calibrate.calibration_parameters(calibration))

        def other_lines(config: str, keys: tuple[str, ...] = keys) -> list[str]:
            return [line for line in config.splitlines() if not any(key in line for key in keys)]
        # Every other line untouched (the served configs may carry the parameters already), each parameter once.
        assert other_lines(text) == other_lines(configs[model])
        assert len(text.splitlines()) == len(other_lines(configs[model])) + 3
    card = (repository / "fashion_effnet" / "4" / "MODEL_CARD.md").read_text()
    before_section = card_before.split(f"## {confidence.TITLE}")[0]
    assert card.split(f"## {confidence.TITLE}")[0] == before_section and card.count(f"## {confidence.TITLE}") == 1
    assert "| Trouser |" in card.split(f"## {confidence.TITLE}")[1]

    # Again: the same files, no second section, no second parameter lines.
    cnn_config = (repository / "fashion_cnn" / "config.pbtxt").read_text()
    result = subprocess.run([*command, "--no-config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (repository / "fashion_effnet" / "4" / "MODEL_CARD.md").read_text() == card
    assert (repository / "fashion_cnn" / "config.pbtxt").read_text() == cnn_config


def test_cli_help_states_the_defaults() -> None:
    text = subprocess.run([sys.executable, "-m", "training.calibrate", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True, timeout=120).stdout
    for default in ("(default: 0.95)", "(default: 0)", "(default: 1)", "--all", "precision"):
        assert default in text
