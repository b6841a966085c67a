"""Pure parts of the feedback path: label checks, the export's de-duplication and hold-out, retrain's arguments."""
from __future__ import annotations

import argparse
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.errors import InvalidInput
from services.gateway.feedback import FeedbackItem, FeedbackRow, FeedbackService, check_label
from training import feedback, retrain, train
from training.data.datasets import FASHION_LABELS
from training.report.model_card import _feedback_lines


def digest(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def test_label_must_be_one_of_the_models_labels() -> None:
    assert check_label("  Trouser ", FASHION_LABELS, "fashion_cnn") == "Trouser"
    for wrong in ("trouser", "Hat", ""):
        with pytest.raises(InvalidInput) as refused:
            check_label(wrong, FASHION_LABELS, "fashion_cnn")
        assert refused.value.reason == "unknown_label"
        assert all(label in refused.value.message for label in FASHION_LABELS)
    with pytest.raises(InvalidInput, match="publishes no labels"):
        check_label("x", [], "embedder")


def test_optional_ids_are_bounded_and_printable() -> None:
    item = FeedbackItem(model="m", label="Bag", image=b"x")
    assert FeedbackService.validate(item, FASHION_LABELS).label == "Bag"
    for field, value in (("request_id", "r" * 257), ("product_id", "sku\n1")):
        with pytest.raises(InvalidInput):
            FeedbackService.validate(FeedbackItem(model="m", label="Bag", image=b"x", **{field: value}), FASHION_LABELS)


def test_export_keeps_each_photo_once_with_its_latest_label() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    rows = [FeedbackRow("a", "Bag", digest(1), start), FeedbackRow("b", "Coat", digest(2), start + timedelta(1)),
            FeedbackRow("c", "Dress", digest(1), start + timedelta(2)),
            FeedbackRow("d", "Coat", digest(2), start + timedelta(3))]
    entries, conflicts = feedback.plan(rows, 0.0)
    assert [(e.sha256, e.label) for e in entries] == [(digest(1), "Dress"), (digest(2), "Coat")]
    assert conflicts == 1 and not any(e.held_out for e in entries)


def test_holdout_is_a_stable_share_chosen_by_hash() -> None:
    digests = [digest(n) for n in range(10_000)]
    held = [feedback.held_out(d, 0.2) for d in digests]
    assert 0.18 < sum(held) / len(held) < 0.22
    assert held == [feedback.held_out(d, 0.2) for d in digests]
    assert all(feedback.held_out(d, 0.3) for d, h in zip(digests, held, strict=True) if h)  # a larger share grows


def test_since_takes_iso_times_and_dates_as_utc() -> None:
    assert feedback.iso_time("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    assert feedback.iso_time("2026-12-01T08:00:00+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(argparse.ArgumentTypeError):
        feedback.iso_time("yesterday")


def test_retrain_publishes_a_canary_only() -> None:
    parser = retrain.get_args_parser()
    for refused in ("0", "100", "150"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "fashion_cnn", "--canary", refused])
    assert parser.parse_args(["--model", "fashion_cnn"]).canary == 10.0


def test_retrain_trains_the_served_arch_on_base_plus_feedback(tmp_path: Path) -> None:
    args = retrain.get_args_parser().parse_args(["--model", "fashion_cnn", "--smoke", "--epochs", "2"])
    served = {"meta": {"arch": "seed_cnn", "data": "fashion-mnist"}}
    argv = retrain.train_argv(args, served, tmp_path / "manifest.csv", tmp_path / "run")
    parsed = train.get_args_parser().parse_args(argv)
    manifest = str(tmp_path / "manifest.csv")
    assert (parsed.arch, parsed.data, parsed.extra_data) == ("seed_cnn", "fashion-mnist", manifest)
    assert (parsed.epochs, parsed.limit_train, parsed.batch_size) == (2, 300, 32)
    assert parsed.recipe == Path("model_repository/fashion_cnn/config.pbtxt")
    with pytest.raises(SystemExit, match="no training settings"):
        retrain.train_argv(args, {"meta": {"arch": "imported"}}, tmp_path / "m.csv", tmp_path / "run")


def test_model_card_shows_the_feedback_held_out() -> None:
    holdout = {"count": 2, "top1": 0.5, "top5": 1.0, "source": "holdout.csv", "macro_precision": 0.5,
               "macro_recall": 0.5, "macro_f1": 0.5,
               "per_class": [{"class": "Bag", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}]}
    lines = "\n".join(_feedback_lines({"data": "fashion-mnist", "extra_data": "manifest.csv"}, holdout))
    assert "manifest.csv" in lines and "top-1 50.00 %" in lines and "| Bag |" in lines
    assert "No feedback was held out" in "\n".join(_feedback_lines({}, {"count": 0, "source": "holdout.csv"}))
    assert _feedback_lines({}, None) == []
