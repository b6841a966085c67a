"""The "Confidence thresholds" section of the model card, and ``training.evaluate --published`` measuring
``Prediction.confident`` through Classify.

The Classify side is a real gRPC server in this process that answers like the gateway would for a calibrated
model: the preprocess service's code with the model's recipe, the real ``fashion_cnn`` ONNX file, and
``confident`` = score >= its class's threshold from ``calibration.json``.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from services.preprocess.imaging import preprocess
from training import calibrate, evaluate
from training.onnx import inference
from training.report import confidence, model_card
from training.report.metrics import softmax

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A copy of fashion_cnn v1 (and what calibrating it needs), calibrated on 300 validation images."""
    copy = tmp_path / "model_repository"
    for name in ("fashion_cnn", "fashion_cnn_onnx"):
        shutil.copytree(REPOSITORY / name, copy / name, ignore=shutil.ignore_patterns("*.png"))
    calibrate.calibrate_model(copy, "fashion_cnn", limit=300)
    return copy / "fashion_cnn" / "1"


class CalibratedClassifier(recognition_pb2_grpc.ProductRecognitionServicer):
    def __init__(self, repository: Path) -> None:
        self.spec = calibrate.version_spec(repository, "fashion_cnn", 1)
        self.labels = calibrate.model_labels(repository, "fashion_cnn")
        self.thresholds = json.loads((repository / "fashion_cnn" / "1" / "calibration.json").read_text())["thresholds"]
        self.session = inference.session(repository / "fashion_cnn_onnx" / "1" / "model.onnx")

    def Classify(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802 (the gRPC method name)
        pixels = preprocess(request.image, self.spec, 64 * 1024 * 1024).pixels
        scores = softmax(inference.logits(self.session, pixels[None]))[0]
        ranked = np.argsort(-scores)[:request.top_k or 5]
        return recognition_pb2.ClassifyResponse(model=request.model, model_version="1", predictions=[
            recognition_pb2.Prediction(label=self.labels[i], score=float(scores[i]), class_id=int(i),
                                       confident=bool(scores[i] >= self.thresholds[i])) for i in ranked])


@pytest.fixture
def gateway(published: Path) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    recognition_pb2_grpc.add_ProductRecognitionServicer_to_server(
        CalibratedClassifier(published.parent.parent), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_published_version_measured_through_classify(published: Path, gateway: str) -> None:
    card_before = (published / "MODEL_CARD.md").read_text()
    eval_before = (published / "eval.json").read_bytes()
    argv = ["--published", str(published), "--gateway", gateway, "--limit-test", "300", "--catalog-count", "60",
            "--concurrency", "4"]
    report = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    written = json.loads((published / "classify_eval.json").read_text())
    assert written["test"]["count"] == 300 and written["catalog"]["count"] == 60
    measured = written["confident_eval"]
    assert measured["model_versions"] == ["1"] and gateway in measured["via"]
    assert report["confident_eval"] == measured
    test = measured["test"]
    assert sum(row["answers"] for row in test["per_class"]) == test["overall"]["answers"] == 300
    assert sum(row["confident"] for row in test["per_class"]) == test["overall"]["confident"]
    # The thresholds were chosen for 0.95 on validation; on 300 test images the confident answers are about as right.
    assert test["overall"]["precision"] > max(0.9, test["overall"]["top1"])
    assert 0.5 < test["overall"]["coverage"] < 1.0
    # The in-process evaluation and the hand-written card stay; only the confidence section is new.
    assert (published / "eval.json").read_bytes() == eval_before
    card = (published / "MODEL_CARD.md").read_text()
    # Everything before the confidence section is as it was (the served cards may carry that section already).
    assert card.split(f"## {confidence.TITLE}")[0] == card_before.split(f"## {confidence.TITLE}")[0]
    section = card.split(f"## {confidence.TITLE}")[1]
    assert "test via Classify: precision among confident" in section
    assert f"{100 * test['overall']['coverage']:.2f} % of 300 answers confident" in section


def test_section_is_replaced_in_place_and_rendered_in_new_cards(published: Path) -> None:
    calibration = json.loads((published / "calibration.json").read_text())
    lines = confidence.section(calibration, None)
    assert lines[0] == f"## {confidence.TITLE}"
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 2 + 10 + 1  # header, alignment, classes, all
    never = [row for row in calibration["per_class"] if row["precision"] is None]
    assert sum("never (best precision" in line for line in table) == len(never)

    card = "# Model card\n\nintro\n\n## Confidence thresholds\n\nold text\n\n## INT8\n\nkept\n"
    updated = confidence.update_section(card, confidence.TITLE, lines)
    assert "old text" not in updated and updated.count("## Confidence thresholds") == 1
    assert updated.startswith("# Model card\n\nintro\n\n## Confidence thresholds\n")
    assert updated.endswith("\n## INT8\n\nkept\n")
    assert confidence.update_section(updated, confidence.TITLE, lines) == updated

    run = json.loads((published / "run.json").read_text())
    report = json.loads((published / "eval.json").read_text())
    rendered = model_card.render(run, report, {confidence.CALIBRATION: calibration})
    assert rendered.count(f"## {confidence.TITLE}") == 1 and "```json" not in rendered.split(confidence.TITLE)[1]


def test_record_confident_counts_per_answered_class() -> None:
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], dtype=np.float32)
    answers = evaluate.Answers(scores, np.array([True, False, True, True]), ["3"])
    report: dict = {"via": "Classify via test"}
    evaluate.record_confident(report, "test", answers, np.array([0, 1, 1, 0]), ("a", "b"))
    measured = report["confident_eval"]
    assert measured["model_versions"] == ["3"]
    a, b = measured["test"]["per_class"]
    assert (a["answers"], a["confident"], a["precision"], a["coverage"]) == (2, 1, 1.0, 0.5)
    assert (b["answers"], b["confident"], b["precision"], b["coverage"]) == (2, 2, 0.5, 1.0)
    overall = measured["test"]["overall"]
    assert (overall["confident"], overall["precision"], overall["coverage"]) == (3, pytest.approx(2 / 3), 0.75)
    with pytest.raises(SystemExit, match="--gateway"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--published", "model_repository/fashion_cnn/1"]))
