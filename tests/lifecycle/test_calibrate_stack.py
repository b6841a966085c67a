"""End to end on a private stack: calibrate ``fashion_cnn`` in a copy of the model repository, serve that copy, and
measure ``Prediction.confident`` through the real Classify path with ``training.evaluate --published``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from training import calibrate, evaluate

pytestmark = pytest.mark.stack
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_calibrated_thresholds_reach_classify_and_its_confident_answers_hold_the_precision(tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    calibration = calibrate.calibrate_model(repository, "fashion_cnn")
    assert calibrate.write_config_parameters(repository, "fashion_cnn", calibration)
    stack = Stack(ports=Ports.free(), model_repository=repository, log_dir=tmp_path / "logs",
                  postgres_dir=tmp_path / "postgres")
    stack.start()
    try:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            listed = recognition_pb2_grpc.ProductRecognitionStub(channel).ListModels(
                recognition_pb2.ListModelsRequest(), timeout=30)
        info = next(m for m in listed.models if m.name == "fashion_cnn")
        assert list(info.thresholds) == pytest.approx(calibration["thresholds"])
        assert info.threshold_rule == calibration["rule"]

        folder = repository / "fashion_cnn" / "1"
        argv = ["--published", str(folder), "--gateway", stack.gateway_address, "--limit-test", "2000",
                "--catalog-count", "200"]
        evaluate.main(evaluate.get_args_parser().parse_args(argv))
    finally:
        stack.stop()
    measured = json.loads((folder / "classify_eval.json").read_text())["confident_eval"]
    test = measured["test"]["overall"]
    # Chosen for 0.95 on validation; on 2 000 test images the confident answers keep about that precision,
    # above the model's plain top-1, and most answers are confident.
    validation = calibration["overall"]
    assert test["precision"] > measured["test"]["overall"]["top1"] + 0.03
    assert test["precision"] == pytest.approx(validation["precision"], abs=0.02)
    assert test["coverage"] == pytest.approx(validation["coverage"], abs=0.05)
    assert measured["model_versions"] == ["1"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "test via Classify: precision among confident" in card
