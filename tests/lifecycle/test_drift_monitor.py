"""``services.gateway.drift``: the PSI, and the metrics :class:`DriftMonitor` exports, read from prometheus_client's
registry. Each test uses its own model name, so the process-wide registry needs no reset."""
from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.gateway import metrics
from services.gateway.drift import EPSILON, DriftMonitor, parse_reference, psi

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
EDGES = [round(i / 20, 6) for i in range(21)]
# A fashion_effnet-like reference: classes about even, scores mostly high.
CLASS_SHARE = [0.1] * 10
SCORE_SHARE = [0.0] * 6 + [0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.04, 0.04, 0.05, 0.05, 0.08, 0.12, 0.2, 0.3]
REFERENCE = json.dumps({"class_share": CLASS_SHARE, "score_edges": EDGES, "score_share": SCORE_SHARE,
                        "count": 6000, "split": "validation"})
PIXELS = np.full((28, 28, 1), 40, dtype=np.uint8)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def present(name: str, **labels: str) -> float:
    value = sample(name, **labels)
    assert value is not None, f"{name}{labels} is not exposed"
    return value


def draw(rng: np.random.Generator, n: int, class_share: list[float], score_share: list[float]) -> list[tuple]:
    """(class, score) pairs drawn from the given shares, scores uniform inside their bin."""
    classes = rng.choice(len(class_share), size=n, p=np.asarray(class_share) / sum(class_share))
    bins = rng.choice(len(score_share), size=n, p=np.asarray(score_share) / sum(score_share))
    scores = (np.asarray(EDGES)[bins] + rng.uniform(0, 0.05, n)).clip(0, 1)
    return list(zip(classes.tolist(), scores.tolist(), strict=True))


def feed(monitor: DriftMonitor, model: str, answers: list[tuple], reference: str = REFERENCE,
         labels: list[str] = LABELS, version: str = "4") -> None:
    for class_id, score in answers:
        monitor.observe(model, version, reference, labels, class_id, score, 28, 28, PIXELS)


def test_psi_is_about_zero_on_the_reference_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(0)
    share = np.asarray(SCORE_SHARE)
    assert psi(share, share) == 0.0
    same = np.bincount(rng.choice(20, 2000, p=share), minlength=20) / 2000
    assert psi(share, same) < 0.02  # sampling noise only: about (14 bins - 1) / 2000
    shifted_share = np.r_[share[10:], share[:10]]  # the mass moved to low scores
    shifted = np.bincount(rng.choice(20, 2000, p=shifted_share / shifted_share.sum()), minlength=20) / 2000
    assert psi(share, shifted) > 1.0
    # Empty bins count at EPSILON: finite, and symmetric in the formula.
    one_hot = np.eye(20)[19]
    assert np.isfinite(psi(one_hot, np.eye(20)[0]))
    assert psi(one_hot, np.eye(20)[0]) == pytest.approx(2 * (1 - EPSILON) * np.log(1 / EPSILON))


def test_drift_gauges_follow_the_window_against_the_reference() -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(window=2000, min_samples=200)
    model = "drift_same"
    feed(monitor, model, draw(rng, 199, CLASS_SHARE, SCORE_SHARE))
    assert sample("shopvision_gateway_drift_window_samples", model=model, version="4") == 199
    assert sample("shopvision_gateway_drift_psi", model=model, version="4", signal="class") is None  # < min_samples
    feed(monitor, model, draw(rng, 2801, CLASS_SHARE, SCORE_SHARE))
    assert sample("shopvision_gateway_drift_window_samples", model=model, version="4") == 2000  # a ring
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="class") < 0.02
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="score") < 0.02

    # Production shifts: Shirt and Bag dominate, scores fall. After a window of it, both figures are large.
    shifted_classes = [0.02] * 10
    shifted_classes[6] = shifted_classes[8] = 0.4
    low_scores = [0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05] + [0.0] * 9
    feed(monitor, model, draw(rng, 2000, shifted_classes, low_scores))
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="class") > 0.5
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="score") > 1.0


def test_answer_and_input_counters() -> None:
    monitor = DriftMonitor()
    model = "drift_counts"
    before = sample("shopvision_gateway_top1_score_count", model=model, version="2")
    assert before is None
    monitor.observe(model, "2", REFERENCE, LABELS, 6, 0.42, 1280, 640, np.full((28, 28, 1), 250, dtype=np.uint8))
    monitor.observe(model, "2", REFERENCE, LABELS, 6, 0.97, 28, 28, np.zeros((28, 28, 1), dtype=np.uint8))
    monitor.observe(model, "2", REFERENCE, LABELS, 1, 1.0, 300, 400, np.full((28, 28, 1), 100, dtype=np.uint8))
    assert sample("shopvision_gateway_predictions_total", model=model, version="2", label="Shirt") == 2
    assert sample("shopvision_gateway_predictions_total", model=model, version="2", label="Trouser") == 1
    assert sample("shopvision_gateway_top1_score_count", model=model, version="2") == 3
    assert sample("shopvision_gateway_top1_score_bucket", model=model, version="2", le="0.45") == 1
    assert sample("shopvision_gateway_top1_score_bucket", model=model, version="2", le="0.95") == 1
    assert sample("shopvision_gateway_top1_score_bucket", model=model, version="2", le="1.0") == 3
    assert sample("shopvision_gateway_input_megapixels_sum", model=model) == pytest.approx(
        (1280 * 640 + 28 * 28 + 300 * 400) / 1e6)
    assert sample("shopvision_gateway_input_aspect_ratio_bucket", model=model, le="1.01") == 2  # 1.0 and 0.75
    assert sample("shopvision_gateway_input_aspect_ratio_bucket", model=model, le="2.0") == 3
    buckets = {b: sample("shopvision_gateway_input_brightness_total", model=model, bucket=b)
               for b in metrics.BRIGHTNESS_BUCKETS}
    assert buckets == {"0-31": 1, "32-63": 0, "64-95": 0, "96-127": 1, "128-159": 0, "160-191": 0, "192-223": 0,
                       "224-255": 1}


def test_no_reference_no_drift_gauges_and_many_classes_no_label_counter() -> None:
    monitor = DriftMonitor(window=50, min_samples=10)
    labels = [f"n{i:04d}" for i in range(1000)]
    for i in range(100):
        monitor.observe("drift_imagenet", "1", "", labels, i, 0.5, 224, 224, PIXELS)
    assert sample("shopvision_gateway_top1_score_count", model="drift_imagenet", version="1") == 100
    assert sample("shopvision_gateway_predictions_total", model="drift_imagenet", version="1", label="n0001") is None
    assert sample("shopvision_gateway_drift_window_samples", model="drift_imagenet", version="1") is None
    for signal in ("class", "score"):
        assert sample("shopvision_gateway_drift_psi", model="drift_imagenet", version="1", signal=signal) is None
    # A reference that does not fit the labels is ignored the same way (and logged), not an error per call.
    for _ in range(20):
        monitor.observe("drift_bad", "1", json.dumps({"class_share": [1.0], "score_edges": EDGES,
                                                      "score_share": SCORE_SHARE}), LABELS, 0, 0.9, 28, 28, PIXELS)
    assert sample("shopvision_gateway_drift_psi", model="drift_bad", version="1", signal="class") is None
    with pytest.raises(ValueError):
        parse_reference("not json", 10)


def test_psi_is_recomputed_by_count_or_time_and_versions_are_separate() -> None:
    now = [0.0]
    monitor = DriftMonitor(window=1000, min_samples=100, recompute_every=50, recompute_s=1.0, clock=lambda: now[0])
    model = "drift_cadence"
    rng = np.random.default_rng(2)
    feed(monitor, model, draw(rng, 100, CLASS_SHARE, SCORE_SHARE))
    first = present("shopvision_gateway_drift_psi", model=model, version="4", signal="class")
    all_shirts = [(6, 0.9)] * 49
    feed(monitor, model, all_shirts)  # 49 new answers, no time passed: not recomputed yet
    assert sample("shopvision_gateway_drift_psi", model=model, version="4", signal="class") == first
    feed(monitor, model, [(6, 0.9)])  # the 50th
    after_count = present("shopvision_gateway_drift_psi", model=model, version="4", signal="class")
    assert after_count > first
    now[0] = 5.0
    feed(monitor, model, [(6, 0.9)])  # one answer, but a second has passed
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="class") > after_count
    # Another version has its own window and gauges.
    feed(monitor, model, draw(rng, 10, CLASS_SHARE, SCORE_SHARE), version="5")
    assert sample("shopvision_gateway_drift_window_samples", model=model, version="5") == 10
    assert sample("shopvision_gateway_drift_window_samples", model=model, version="4") == 151


def test_old_versions_are_forgotten_beyond_max_versions() -> None:
    monitor = DriftMonitor(window=10, min_samples=1, max_versions=2)
    for version in ("1", "2", "3"):
        feed(monitor, "drift_versions", [(0, 0.9)], version=version)
    assert sample("shopvision_gateway_drift_window_samples", model="drift_versions", version="1") is None
    assert sample("shopvision_gateway_drift_psi", model="drift_versions", version="1", signal="score") is None
    assert sample("shopvision_gateway_drift_window_samples", model="drift_versions", version="3") == 1


def test_a_new_reference_text_is_parsed_again_and_a_removed_one_drops_the_gauges() -> None:
    monitor = DriftMonitor(window=100, min_samples=10)
    model = "drift_recalibrated"
    feed(monitor, model, [(0, 0.97)] * 20)
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="class") > 1.0
    # Recalibrated: the same version now says every answer is class 0 with a top score.
    only_zero = json.dumps({"class_share": [1.0] + [0.0] * 9, "score_edges": EDGES,
                            "score_share": [0.0] * 19 + [1.0], "count": 10, "split": "validation"})
    feed(monitor, model, [(0, 0.97)], reference=only_zero)
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="class") < 0.01
    assert present("shopvision_gateway_drift_psi", model=model, version="4", signal="score") < 0.01
    feed(monitor, model, [(0, 0.97)], reference="")
    assert sample("shopvision_gateway_drift_psi", model=model, version="4", signal="class") is None
    assert sample("shopvision_gateway_drift_window_samples", model=model, version="4") is None
    assert present("shopvision_gateway_top1_score_count", model=model, version="4") == 22  # still counted


def test_brightness_of_a_large_input_from_a_grid_of_its_pixels() -> None:
    from services.gateway.drift import brightness_bucket

    assert brightness_bucket(np.full((224, 224, 3), 200, dtype=np.uint8)) == "192-223"
    half = np.zeros((224, 224, 3), dtype=np.uint8)
    half[112:] = 255  # mean 127.5
    assert brightness_bucket(half) == "96-127"
    assert brightness_bucket(np.full((28, 28, 1), 255, dtype=np.uint8)) == "224-255"
    assert brightness_bucket(np.zeros((0, 0, 1), dtype=np.uint8)) == "0-31"
