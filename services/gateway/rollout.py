"""Rollouts of model versions as every gateway replica reads them from Triton: pure parts, no I/O.

A rollout of public model ``M`` is a second ensemble ``M__candidate`` in Triton (written by
``python -m training.publish --canary|--shadow``, changed by ``python -m training.rollout``) whose
parameters say whose candidate it is, ``canary`` or ``shadow``, and the canary's share of callers
(services/common/model_params.py). Every replica reads the same configs, so they all split alike:

* canary: a caller is answered by the candidate when ``bucket_of(M, caller) < percent``; the bucket is a
  SHA-256 of (model, caller), so the split needs no shared state, survives restarts and keeps a caller
  on one version;
* shadow: the serving version answers and a copy goes to the candidate (services/gateway/routing.py).

Also here: each version's calibration (per-class thresholds, their rule, the drift reference) as the
config parameters carry it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from services.common import model_params
from services.common.spec import Spec

LOG = logging.getLogger(__name__)

SERVING, CANARY, SHADOW = "serving", "canary", "shadow"
BUCKETS = 10_000  # a bucket is 0.01 %: canary shares like 12.5 % split exactly


def parameters_of(config: dict) -> dict[str, str]:
    """A Triton model config's (JSON form) parameters as plain strings."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class Calibration:
    """What ``training.calibrate`` / ``training.publish`` recorded about a version: ``thresholds`` (one per class,
    empty when uncalibrated), how they were chosen, and the reference distribution (raw JSON for the drift
    monitor)."""

    thresholds: tuple[float, ...] = ()
    threshold_rule: str = ""
    reference_json: str = ""

    def confident(self, score: float, class_id: int, default_threshold: float) -> bool:
        """``score`` reaches this class's threshold (``default_threshold`` for an uncalibrated version)."""
        threshold = self.thresholds[class_id] if 0 <= class_id < len(self.thresholds) else default_threshold
        return score >= threshold


def calibration_of(name: str, params: dict[str, str], num_classes: int) -> Calibration:
    """The calibration parameters of model ``name``; malformed thresholds are logged and ignored (a model
    must keep serving when its calibration is broken: answers fall back to the default threshold)."""
    thresholds: tuple[float, ...] = ()
    raw = params.get(model_params.THRESHOLDS, "")
    if raw:
        try:
            values = json.loads(raw)
            if not isinstance(values, list) or len(values) != num_classes:
                raise ValueError(f"expected a JSON list of {num_classes} numbers")
            thresholds = tuple(float(v) for v in values)
        except (ValueError, TypeError) as error:
            LOG.error("model %s: ignoring %s=%r: %s", name, model_params.THRESHOLDS, raw[:200], error)
    return Calibration(thresholds, params.get(model_params.THRESHOLD_RULE, ""),
                       params.get(model_params.REFERENCE, ""))


@dataclass(frozen=True)
class Candidate:
    """A rollout under way: the Triton model ``triton_name`` (= ``<model>__candidate``) at ``version``."""

    model: str  # the public model it is a candidate for
    triton_name: str
    version: str
    mode: str
    percent: float
    spec: Spec
    members: str = ""
    calibration: Calibration = field(default_factory=Calibration)

    def answers(self, caller: str) -> bool:
        """Whether the canary answers ``caller`` (never in shadow mode)."""
        return self.mode == CANARY and bucket_of(self.model, caller) < self.percent


def candidate_of_config(name: str, params: dict[str, str], versions: list[str], spec: Spec,
                        num_classes: int) -> Candidate | None:
    """The :class:`Candidate` a READY Triton model's parameters describe (None when it is no candidate or its
    rollout parameters are malformed, which is logged: the serving version then answers everyone)."""
    model = params.get(model_params.CANDIDATE_OF, "")
    if not model or not versions:
        return None
    mode = params.get(model_params.ROLLOUT_MODE, CANARY) or CANARY
    try:
        percent = float(params.get(model_params.CANARY_PERCENT, "0") or 0.0)
    except ValueError:
        percent = -1.0
    if mode not in model_params.ROLLOUT_MODES or not 0.0 <= percent <= 100.0:
        LOG.error("candidate %s of %s has a bad rollout (mode %r, percent %r): ignored", name, model, mode,
                  params.get(model_params.CANARY_PERCENT))
        return None
    version = max(versions, key=lambda v: int(v) if v.isdigit() else 0)
    return Candidate(model, name, version, mode, percent, spec, params.get(model_params.MEMBERS, ""),
                     calibration_of(name, params, num_classes))


def bucket_of(model: str, caller: str) -> float:
    """Where ``caller`` falls for ``model``'s split, in [0, 100): the same on every replica and every restart."""
    digest = hashlib.sha256(f"{model}\x00{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS * (100.0 / BUCKETS)


class InFlightLimit:
    """At most ``limit`` comparison calls at once; past that they are dropped, never queued (they must not
    delay or slow down the calls that answer callers)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1
