"""Which version of a public model answers a Classify during a rollout, and the comparison copies.

* No rollout, or a shadow: the serving version answers (``role="serving"``).
* Canary: the candidate answers the callers whose bucket is below its percent (services/gateway/rollout.py).
  If the candidate is gone (promoted or rolled back a moment ago) or fails, the serving version answers at
  once, so ending a rollout fails no call; a gone candidate also triggers a re-read of the models.
* Comparisons, run after the answer and never delaying it: in shadow mode a copy of the same pixels goes to the
  candidate; in canary mode the canary's answers are sent again to the serving version. At most
  GATEWAY_SHADOW_MAX_IN_FLIGHT run at once, more are dropped (counted); top-1 agreement is counted.

Every inference here is counted by model, version and role (services/gateway/metrics.py), which is what
``python -m training.rollout status`` reads.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np

from services.common.errors import ShopvisionError, remaining_seconds
from services.gateway import metrics
from services.gateway.config import RolloutConfig
from services.gateway.rollout import CANARY, SERVING, SHADOW, Calibration, Candidate, InFlightLimit
from services.gateway.triton import Classification, Model, ModelGone, TritonBackend

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Who answers one image: ``role`` SERVING or CANARY; ``candidate`` is the rollout under way, if any."""

    model: Model
    role: str
    candidate: Candidate | None


@dataclass(frozen=True)
class Answers:
    """The answers to one batch: every image by the same version (``role``), with that version's calibration."""

    results: list[Classification]
    role: str
    calibration: Calibration


@dataclass(frozen=True)
class Answer:
    result: Classification
    role: str
    calibration: Calibration  # of the version that answered


class Router:
    def __init__(self, triton: TritonBackend, config: RolloutConfig) -> None:
        self._triton = triton
        self._config = config
        self._comparisons = InFlightLimit(config.shadow_max_in_flight)
        self._tasks: set[asyncio.Task] = set()
        self._refresh: asyncio.Task | None = None
        self._unroutable: set[tuple[str, str]] = set()  # (candidate, version) already warned about

    def route(self, model: Model, caller: str) -> Route:
        candidate = model.candidate
        if candidate is not None and candidate.spec != model.spec:
            # The pixels are made once, with the serving version's recipe (a fallback must reuse them): a
            # candidate with another recipe is not routed to. Said once per candidate version, not per request.
            if (candidate.triton_name, candidate.version) not in self._unroutable:
                self._unroutable.add((candidate.triton_name, candidate.version))
                LOG.warning("candidate %s has another preprocessing recipe than %s: not routed to",
                            candidate.triton_name, model.name)
            return Route(model, SERVING, None)
        role = CANARY if candidate is not None and candidate.answers(caller) else SERVING
        return Route(model, role, candidate)

    async def classify(self, route: Route, pixels: np.ndarray, top_k: int, deadline: float,
                       request_id: str) -> Answer:
        answers = await self.classify_many(route, pixels[None], top_k, deadline, request_id)
        return Answer(answers.results[0], answers.role, answers.calibration)

    async def classify_many(self, route: Route, pixels: np.ndarray, top_k: int, deadline: float,
                            request_id: str) -> Answers:
        """The images of ``pixels`` (N, H, W, C) in one inference request, answered by one version."""
        model, candidate = route.model, route.candidate
        if route.role == CANARY and candidate is not None:
            try:
                results = await self._timed(model.name, candidate.version, CANARY, self._triton.classify_once_many(
                    candidate.triton_name, pixels, top_k, remaining_seconds(deadline), request_id), len(pixels))
            except ShopvisionError as error:
                self._note_failure(candidate, error)
            else:
                self._compare_all(model, candidate, pixels, results, request_id)
                return Answers(results, CANARY, candidate.calibration)
        serving_version = model.versions[-1] if model.versions else ""
        results = await self._timed(model.name, serving_version, SERVING, self._triton.classify_many(
            model, pixels, top_k, remaining_seconds(deadline), request_id), len(pixels))
        if candidate is not None and candidate.mode == SHADOW:
            self._compare_all(model, candidate, pixels, results, request_id)
        return Answers(results, SERVING, model.calibration)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._refresh] if self._refresh is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- internals -----------------------------------------------------------------------------------------------
    @staticmethod
    async def _timed(model: str, version: str, role: str, call: Awaitable[list[Classification]],
                     images: int) -> list[Classification]:
        """``call``'s answers, counted as ``images`` requests of (model, version, role) with its latency."""
        start = time.perf_counter()
        try:
            results = await call
        except Exception:
            metrics.ROLLOUT_REQUESTS.labels(model, version, role).inc(images)
            metrics.ROLLOUT_ERRORS.labels(model, version, role).inc(images)
            raise
        version = (results[0].model_version if results else "") or version
        metrics.ROLLOUT_REQUESTS.labels(model, version, role).inc(images)
        metrics.ROLLOUT_ERRORS.labels(model, version, role)  # exists at 0 beside its requests: error ratios read 0
        metrics.ROLLOUT_SECONDS.labels(model, version, role).observe(time.perf_counter() - start)
        return results

    def _note_failure(self, candidate: Candidate, error: ShopvisionError) -> None:
        if isinstance(error, ModelGone):
            LOG.info("candidate %s is gone; re-reading the models", candidate.triton_name)
            self._refresh_soon()
        else:
            LOG.warning("candidate %s failed (%s); the serving version answers", candidate.triton_name,
                        error.message)

    def _refresh_soon(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_models())

    async def _refresh_models(self) -> None:
        try:
            await self._triton.refresh()
        except ShopvisionError as error:
            LOG.warning("model refresh after a gone candidate failed: %s", error.message)

    def _compare_all(self, model: Model, candidate: Candidate, pixels: np.ndarray, answered: list[Classification],
                     request_id: str) -> None:
        for index, (image, result) in enumerate(zip(pixels, answered, strict=True)):
            self._compare(model, candidate, image, result,
                          request_id if len(answered) == 1 else f"{request_id}-{index}")

    def _compare(self, model: Model, candidate: Candidate, pixels: np.ndarray, answered: Classification,
                 request_id: str) -> None:
        """Start the comparison call of one answer, unless GATEWAY_SHADOW_MAX_IN_FLIGHT are running."""
        if not answered.class_ids:
            return
        if not self._comparisons.try_acquire():
            metrics.SHADOW_DROPPED.labels(model.name).inc()
            return
        task = asyncio.create_task(self._comparison(model, candidate, pixels, answered.class_ids[0], request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _comparison(self, model: Model, candidate: Candidate, pixels: np.ndarray, answered_top: int,
                          request_id: str) -> None:
        timeout_s = self._config.shadow_timeout_s
        try:
            if candidate.mode == SHADOW:
                others = await self._timed(model.name, candidate.version, SHADOW, self._triton.classify_once_many(
                    candidate.triton_name, pixels[None], 1, timeout_s, f"{request_id}-shadow"), 1)
            else:
                others = await self._triton.classify_once_many(model.name, pixels[None], 1, timeout_s,
                                                               f"{request_id}-compare")
            other = others[0]
            agree = bool(other.class_ids) and other.class_ids[0] == answered_top
            metrics.SHADOW_AGREEMENT.labels(model.name, "true" if agree else "false").inc()
        except ShopvisionError as error:
            if isinstance(error, ModelGone) and candidate.mode == SHADOW:
                self._refresh_soon()
            LOG.debug("comparison call for %s failed: %s", model.name, error.message)
        except Exception:
            LOG.exception("comparison call for %s failed", model.name)
        finally:
            self._comparisons.release()
