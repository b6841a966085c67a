"""What each served model version answers and what it is sent, and how far that has drifted from its validation split.

:class:`DriftMonitor` is called once per answered image (``observe``) and keeps no image: it counts the top-1
label (models with at most ``max_classes_for_labels`` classes), the top-1 score, the decoded size and aspect
ratio, and the mean brightness of the model input (metrics in :mod:`services.gateway.metrics`, "drift" section).

The drift figure, per model version and signal, is the population stability index of the last ``window`` answers
against the version's reference distribution (``shopvision.reference``: top-1 class shares and the top-1 score
histogram on its validation split, written by ``training.calibrate``)::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with ``e_i`` the reference share of bin ``i``, ``a_i`` the window's, each floored at ``EPSILON`` (1e-4) so that an
empty bin on either side counts as rare rather than infinite. Rules of thumb: below 0.1 no shift, 0.1-0.25 a
moderate one, above 0.25 a large one; a window of n answers drawn from the reference itself reads about
(non-empty bins - 1) / n, its chi-square approximation (about 0.005 for 10 classes and 2000 answers).

Cost per call: O(1) counter and ring-buffer updates (the window holds (class, score bin) pairs and their counts);
the PSI, O(classes + bins), is recomputed at most once per ``recompute_every`` answers or ``recompute_s`` seconds.
The reference JSON is parsed once per (model, version) (again only when its text changes). Not thread-safe: the
gateway calls it from its event loop.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.gateway import metrics

LOG = logging.getLogger(__name__)
EPSILON = 1e-4
BRIGHTNESS_SAMPLE = 4096


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = EPSILON) -> float:
    """Population stability index of the shares ``actual`` against ``expected`` (same bins; see the module doc)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def score_bin(score: float, edges: np.ndarray) -> int:
    """Index of the bin of ``edges`` holding ``score``: [a, b) bins, the last one closed, outside values clipped
    into the first or last bin (as ``numpy.histogram`` counts the reference)."""
    return min(max(int(np.searchsorted(edges, score, side="right")) - 1, 0), len(edges) - 2)


def brightness_bucket(pixels: np.ndarray) -> str:
    """The ``metrics.BRIGHTNESS_BUCKETS`` label of the mean of uint8 ``pixels`` (H, W, C). Above
    ``BRIGHTNESS_SAMPLE`` values the mean is taken over an even grid of rows and columns: a 32-level bucket needs
    no more, and a 224×224×3 input then costs as little as a 28×28 one."""
    if pixels.ndim >= 2 and pixels.size > BRIGHTNESS_SAMPLE:
        step = math.ceil(math.sqrt(pixels.size / BRIGHTNESS_SAMPLE))
        pixels = pixels[::step, ::step]
    mean = float(pixels.mean()) if pixels.size else 0.0
    return metrics.BRIGHTNESS_BUCKETS[min(max(int(mean // 32), 0), len(metrics.BRIGHTNESS_BUCKETS) - 1)]


@dataclass(frozen=True)
class Reference:
    class_share: np.ndarray
    score_edges: np.ndarray
    score_share: np.ndarray


def parse_reference(text: str, num_classes: int) -> Reference:
    """The reference of ``shopvision.reference``; ``ValueError`` when it is malformed or has another class count."""
    try:
        data = json.loads(text)
        reference = Reference(np.asarray(data["class_share"], dtype=np.float64),
                              np.asarray(data["score_edges"], dtype=np.float64),
                              np.asarray(data["score_share"], dtype=np.float64))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"malformed reference: {error}") from None
    if reference.class_share.ndim != 1 or len(reference.class_share) != num_classes:
        raise ValueError(f"reference has {reference.class_share.size} class shares for {num_classes} labels")
    edges = reference.score_edges
    if edges.ndim != 1 or len(edges) < 2 or len(reference.score_share) != len(edges) - 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"reference has {edges.size} score edges (increasing) for {reference.score_share.size} bins")
    return reference


class _Window:
    """The last ``size`` answers as (class, score bin) pairs in a ring buffer, with the counts of each."""

    def __init__(self, size: int, classes: int, bins: int) -> None:
        self._classes = np.zeros(size, dtype=np.int32)
        self._bins = np.zeros(size, dtype=np.int32)
        self.class_counts = np.zeros(classes, dtype=np.int64)
        self.score_counts = np.zeros(bins, dtype=np.int64)
        self.count = 0
        self._next = 0

    def push(self, class_id: int, bin_index: int) -> None:
        size = len(self._classes)
        if self.count == size:
            self.class_counts[self._classes[self._next]] -= 1
            self.score_counts[self._bins[self._next]] -= 1
        else:
            self.count += 1
        self._classes[self._next] = class_id
        self._bins[self._next] = bin_index
        self.class_counts[class_id] += 1
        self.score_counts[bin_index] += 1
        self._next = (self._next + 1) % size


class _VersionState:
    """What one (model, version) keeps: its parsed reference, window and metric children."""

    def __init__(self, model: str, version: str, reference_json: str, labels: list[str], window: int,
                 max_classes_for_labels: int) -> None:
        self.reference_json = reference_json
        self.num_classes = len(labels)
        self.top1 = metrics.TOP1_SCORE.labels(model, version)
        self.predictions = ([metrics.PREDICTIONS.labels(model, version, label) for label in labels]
                            if 0 < len(labels) <= max_classes_for_labels else [])
        self.reference: Reference | None = None
        self.window: _Window | None = None
        self.window_gauge: Any = None
        self.psi_gauges: tuple[Any, Any] | None = None  # made at the first figure: none is exported before
        self.since_computed = 0
        self.computed_at = -math.inf
        self.set_reference(model, version, reference_json, window)

    def set_reference(self, model: str, version: str, reference_json: str, window: int) -> None:
        self.reference_json = reference_json
        self.psi_gauges = None
        reference = None
        if reference_json:
            try:
                reference = parse_reference(reference_json, self.num_classes)
            except ValueError as error:
                LOG.warning("model %s version %s: drift reference ignored: %s", model, version, error)
        if reference is None:
            self.reference, self.window, self.window_gauge = None, None, None
            return
        if (self.window is None or self.reference is None
                or len(reference.score_share) != len(self.reference.score_share)):
            self.window = _Window(window, self.num_classes, len(reference.score_share))
        self.reference = reference
        self.window_gauge = metrics.DRIFT_WINDOW.labels(model, version)
        self.computed_at = -math.inf


class DriftMonitor:
    """Counts answers and inputs per model version and exports the drift figure (see the module doc)."""

    def __init__(self, window: int = 2000, min_samples: int = 200, max_classes_for_labels: int = 100, *,
                 recompute_every: int = 50, recompute_s: float = 1.0, max_versions: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"window={window}, min_samples={min_samples}: need 1 <= min_samples <= window")
        self._window = window
        self._min_samples = min_samples
        self._max_classes = max_classes_for_labels
        self._recompute_every = recompute_every
        self._recompute_s = recompute_s
        self._max_versions = max_versions
        self._clock = clock
        self._versions: OrderedDict[tuple[str, str], _VersionState] = OrderedDict()
        self._inputs: dict[str, tuple] = {}

    def observe(self, model: str, version: str, reference_json: str, labels: list[str], class_id: int,
                score: float, width: int, height: int, pixels: np.ndarray) -> None:
        """One answered image: its top-1 ``class_id`` and ``score``, decoded ``width`` × ``height`` and the
        preprocessed uint8 ``pixels`` the model saw. ``reference_json`` is the version's ``shopvision.reference``
        ("" when it has none: then no drift figure); ``labels`` its labels in class order."""
        self._observe_input(model, width, height, pixels)
        state = self._state(model, version, reference_json, labels)
        known_class = 0 <= class_id < state.num_classes
        if state.predictions and known_class:
            state.predictions[class_id].inc()
        if not math.isfinite(score):
            return
        state.top1.observe(score)
        if state.window is None or state.reference is None or not known_class:
            return
        state.window.push(class_id, score_bin(score, state.reference.score_edges))
        state.window_gauge.set(state.window.count)
        state.since_computed += 1
        if state.window.count < self._min_samples:
            return
        now = self._clock()
        if state.since_computed >= self._recompute_every or now - state.computed_at >= self._recompute_s:
            self._publish(model, version, state, now)

    def _observe_input(self, model: str, width: int, height: int, pixels: np.ndarray) -> None:
        children = self._inputs.get(model)
        if children is None:
            brightness = {bucket: metrics.INPUT_BRIGHTNESS.labels(model, bucket)
                          for bucket in metrics.BRIGHTNESS_BUCKETS}  # every bucket exists at 0 from the start
            children = (metrics.INPUT_MEGAPIXELS.labels(model), metrics.INPUT_ASPECT_RATIO.labels(model), brightness)
            self._inputs[model] = children
        megapixels, aspect_ratio, brightness = children
        if width > 0 and height > 0:
            megapixels.observe(width * height / 1e6)
            aspect_ratio.observe(width / height)
        brightness[brightness_bucket(pixels)].inc()

    def _state(self, model: str, version: str, reference_json: str, labels: list[str]) -> _VersionState:
        key = (model, version)
        state = self._versions.get(key)
        if state is None:
            state = _VersionState(model, version, reference_json, labels, self._window, self._max_classes)
            self._versions[key] = state
            while len(self._versions) > self._max_versions:
                self._forget(*self._versions.popitem(last=False)[0])
        else:
            self._versions.move_to_end(key)
            if state.reference_json is not reference_json and state.reference_json != reference_json:
                had_reference = state.reference is not None
                state.set_reference(model, version, reference_json, self._window)
                if had_reference and state.reference is None:
                    self._forget(model, version)
        return state

    def _publish(self, model: str, version: str, state: _VersionState, now: float) -> None:
        assert state.window is not None and state.reference is not None
        if state.psi_gauges is None:
            state.psi_gauges = (metrics.DRIFT_PSI.labels(model, version, "class"),
                                metrics.DRIFT_PSI.labels(model, version, "score"))
        count = state.window.count
        # Over many classes a window of ``window`` answers leaves most classes with a handful of answers, and
        # sampling noise alone lifts the class PSI past the alert level (about 0.3 for 1 000 classes in 2 000
        # answers): such models are watched through their score distribution only.
        if state.num_classes <= self._max_classes:
            state.psi_gauges[0].set(psi(state.reference.class_share, state.window.class_counts / count))
        state.psi_gauges[1].set(psi(state.reference.score_share, state.window.score_counts / count))
        state.since_computed = 0
        state.computed_at = now

    @staticmethod
    def _forget(model: str, version: str) -> None:
        """Drop the drift gauges of a version no longer watched (its counters stay, as counters do)."""
        for signal in metrics.DRIFT_SIGNALS:
            try:
                metrics.DRIFT_PSI.remove(model, version, signal)
            except KeyError:
                pass
        try:
            metrics.DRIFT_WINDOW.remove(model, version)
        except KeyError:
            pass
