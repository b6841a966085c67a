"""The threshold rule of ``training.calibrate`` and its drift reference, on hand-made answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.common import model_params
from services.gateway.drift import score_bin
from training.calibrate import (
    NEVER_CONFIDENT,
    calibration_parameters,
    choose_thresholds,
    class_threshold,
    reference_distribution,
    rule_text,
)


def test_threshold_is_the_lowest_score_that_keeps_the_target_precision() -> None:
    # Ranked by score: 19 right answers, then a wrong one at 0.60, then right ones, then two wrong at the bottom.
    scores = np.array([0.99 - 0.01 * i for i in range(19)] + [0.60, 0.59, 0.58, 0.30, 0.20])
    correct = np.array([True] * 19 + [False, True, True, False, False])
    row = class_threshold(scores, correct, 0.95)
    # At 0.58: 21 right of 22 = 0.9545 >= 0.95; at 0.30: 21 of 23 = 0.913. The dip at 0.60 (19 of 20 = 0.95)
    # does not stop the rule: a lower threshold with the target precision wins.
    assert row["threshold"] == pytest.approx(0.58)
    assert row["confident"] == 22 and row["answers"] == 24
    assert row["precision"] == pytest.approx(21 / 22)
    assert row["coverage"] == pytest.approx(22 / 24)
    confident = scores >= row["threshold"]
    assert correct[confident].mean() >= 0.95


def test_a_class_that_never_reaches_the_target_is_never_confident() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([False, True, True, True])  # its best precision is 3/4 (at 0.6)
    row = class_threshold(scores, correct, 0.95)
    assert row["threshold"] == NEVER_CONFIDENT > 1.0
    assert row["confident"] == 0 and row["coverage"] == 0.0 and row["precision"] is None
    assert row["best_precision"] == pytest.approx(0.75)
    empty = class_threshold(np.array([]), np.array([], dtype=bool), 0.95)
    assert empty["threshold"] == NEVER_CONFIDENT and empty["answers"] == 0


def test_tied_scores_are_all_in_or_all_out() -> None:
    # 10 right answers at 0.9, then 3 tied at 0.5 of which one is wrong (12 of 13 = 0.923 < 0.95 with the tie,
    # 11 of 12 would pass if the tie could be split).
    scores = np.array([0.9] * 10 + [0.5, 0.5, 0.5])
    correct = np.array([True] * 10 + [True, False, True])
    row = class_threshold(scores, correct, 0.95)
    assert row["threshold"] == pytest.approx(0.9) and row["confident"] == 10
    # Whatever order the tie was given in.
    reordered = class_threshold(scores, np.array([True] * 10 + [False, True, True]), 0.95)
    assert reordered["threshold"] == row["threshold"] and reordered["confident"] == 10
    # A tie with only right answers is taken whole.
    whole = class_threshold(np.array([0.7, 0.7, 0.7]), np.array([True, True, True]), 0.95)
    assert whole["threshold"] == pytest.approx(0.7) and whole["confident"] == 3 and whole["coverage"] == 1.0


def test_choose_thresholds_per_answered_class_and_overall() -> None:
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    labels = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3))
    logits[np.arange(3000), labels] += rng.uniform(0, 4, 3000)  # informative but noisy
    logits[labels == 2, 1] += 3.0  # class c is often answered b: b's precision suffers
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    chosen = choose_thresholds(probabilities.astype(np.float32), labels, classes, 0.95)
    predicted = probabilities.argmax(axis=1)
    top1 = probabilities.astype(np.float32)[np.arange(3000), predicted]
    for class_id, row in enumerate(chosen["per_class"]):
        mine = predicted == class_id
        sure = mine & (top1 >= chosen["thresholds"][class_id])
        assert row["answers"] == mine.sum() and row["confident"] == sure.sum()
        if row["precision"] is not None:
            assert (labels[sure] == class_id).mean() >= 0.95
    confident = top1 >= np.asarray(chosen["thresholds"])[predicted]
    assert chosen["overall"]["confident"] == confident.sum()
    assert chosen["overall"]["precision"] == pytest.approx((predicted == labels)[confident].mean())
    assert chosen["overall"]["precision"] >= 0.95 > chosen["overall"]["top1"]


def test_reference_bins_agree_with_the_gateway_binning() -> None:
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4) * 0.3, size=500).astype(np.float32)
    probabilities[0] = [1.0, 0.0, 0.0, 0.0]  # a score of exactly 1 falls into the last (closed) bin
    probabilities[1] = [0.5, 0.5, 0.0, 0.0]  # an edge: [0.5, 0.55)
    reference = reference_distribution(probabilities, "test")
    edges = np.asarray(reference["score_edges"])
    assert len(edges) == 21 and edges[0] == 0.0 and edges[-1] == 1.0
    top1 = probabilities.max(axis=1)
    counts = np.bincount([score_bin(float(s), edges) for s in top1], minlength=20)
    assert np.allclose(np.asarray(reference["score_share"]), counts / 500, atol=1e-6)
    assert sum(reference["class_share"]) == pytest.approx(1.0, abs=1e-5)
    assert reference["count"] == 500 and reference["split"] == "test"


def test_calibration_parameters_are_the_contract_names_with_json_values() -> None:
    calibration = {"thresholds": [0.5, NEVER_CONFIDENT], "rule": rule_text(0.95),
                   "reference": {"class_share": [0.5, 0.5], "score_edges": [0.0, 0.5, 1.0],
                                 "score_share": [0.1, 0.9], "count": 10, "split": "validation \"x\""}}
    params = calibration_parameters(calibration)
    assert set(params) == {model_params.THRESHOLDS, model_params.THRESHOLD_RULE, model_params.REFERENCE}
    assert json.loads(params[model_params.THRESHOLDS]) == [0.5, 2.0]
    assert json.loads(params[model_params.REFERENCE]) == calibration["reference"]
    assert params[model_params.THRESHOLD_RULE].startswith("precision>=0.95 on the validation split")
