"""The one retry engine of the gateway's idempotent downstream calls (preprocess and Triton inference), with
backoff and a budget so retries never multiply load.

Only a step that can safely run twice is retried (preprocessing and inference are pure functions of their
request), and only on errors that say the call did not get through. The caller says which errors those are and
how long each may be retried (``window_of``): Triton that is draining gets longer than one that cannot be reached.

* **Backoff**: exponential with full jitter, so retries from many requests spread out.
* **Window**: retries stop ``window_s`` after the call started and never go past the call's deadline; a dead
  upstream is still reported quickly, while a restart that takes a second or two is bridged. A caller whose
  retries wait for the connection to come back (gRPC ``wait_for_ready``, ``RetryPolicy.wait_for_ready``) gives
  each retry at most the rest of the window; otherwise a retry gets the rest of the deadline.
* **Budget**: a token bucket shared by all calls. Every call deposits ``ratio`` tokens and time adds
  ``min_per_s`` per second; a retry spends one. Retries therefore add at most ``ratio`` of the traffic (plus a
  small floor) however badly the upstream fails.

Each decision is counted in ``shopvision_gateway_retries_total{upstream, outcome}`` (:data:`OUTCOMES`).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.gateway import metrics

LOG = logging.getLogger(__name__)
T = TypeVar("T")

OUTCOMES = metrics.RETRY_OUTCOMES
RETRIED, BUDGET_EXHAUSTED, WINDOW_ELAPSED, ATTEMPTS_EXHAUSTED = OUTCOMES


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts``: tries in all, the first included (0: no limit, the windows bound the retries)."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    window_s: float = 3.0
    wait_for_ready: bool = True

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Pause before retry number ``retry`` (1, 2, ...): full jitter over an exponential cap."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(0.0, cap)

    def outcomes(self) -> tuple[str, ...]:
        """The outcomes a retrier with this policy can count."""
        return OUTCOMES if self.max_attempts else tuple(o for o in OUTCOMES if o != ATTEMPTS_EXHAUSTED)


class RetryBudget:
    """Retries allowed: ``ratio`` per call made plus ``min_per_s`` per second, saved up to ``cap``."""

    def __init__(self, ratio: float, min_per_s: float, cap: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = cap if cap is not None else max(10.0, 10.0 * min_per_s)
        self._clock = clock
        self._balance = min(self.cap, min_per_s)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._balance = min(self.cap, self._balance + (now - self._updated) * self.min_per_s)
        self._updated = now

    def deposit(self) -> None:
        """Record a call (first attempt)."""
        self._refill()
        self._balance = min(self.cap, self._balance + self.ratio)

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` when it is empty."""
        self._refill()
        if self._balance < 1.0:
            return False
        self._balance -= 1.0
        return True


class RetryWindowElapsed(Exception):
    """The upstream did not come back within the retry window (or the call's deadline came first)."""

    def __init__(self, last_error: BaseException) -> None:
        super().__init__(str(last_error))
        self.last_error = last_error


def _never(_: BaseException) -> bool:
    return False


class Retrier:
    """Runs one idempotent call with retries. ``attempt(number, timeout_s)`` makes try ``number`` (0 first)."""

    def __init__(self, upstream: str, policy: RetryPolicy, budget: RetryBudget,
                 rng: random.Random | None = None) -> None:
        self.upstream = upstream
        self.policy = policy
        self.budget = budget
        self._rng = rng or random.Random()

    def _count(self, outcome: str) -> None:
        metrics.RETRIES.labels(self.upstream, outcome).inc()

    async def call(
        self,
        attempt: Callable[[int, float], Awaitable[T]],
        timeout_s: float,
        retryable: Callable[[BaseException], bool],
        is_timeout: Callable[[BaseException], bool] = _never,
        window_of: Callable[[BaseException], float] | None = None,
    ) -> T:
        """Return the first successful attempt; raise the last error, or :class:`RetryWindowElapsed` when the
        window (``window_of(error)`` seconds from the start, else the policy's) ran out before the upstream came
        back. ``is_timeout`` names the errors of an attempt that ran out of time."""
        start = time.monotonic()
        deadline = start + timeout_s
        window_end = min(deadline, start + self.policy.window_s)
        self.budget.deposit()
        number = 0
        while True:
            limit = window_end if number > 0 and self.policy.wait_for_ready else deadline
            try:
                return await attempt(number, max(limit - time.monotonic(), 0.001))
            except Exception as error:
                if number > 0 and limit < deadline and is_timeout(error):
                    self._count(WINDOW_ELAPSED)  # the retry waited for the upstream until the window closed
                    raise RetryWindowElapsed(error) from error
                if not retryable(error):
                    raise
                if window_of is not None:
                    window_end = min(deadline, start + window_of(error))
                number += 1
                pause = self.policy.backoff(number, self._rng)
                if self.policy.max_attempts and number >= self.policy.max_attempts:
                    self._count(ATTEMPTS_EXHAUSTED)
                    raise
                if time.monotonic() + pause >= window_end:
                    self._count(WINDOW_ELAPSED)
                    raise RetryWindowElapsed(error) from error
                if not self.budget.try_spend():
                    self._count(BUDGET_EXHAUSTED)
                    raise
                self._count(RETRIED)
                LOG.info("retrying the %s call in %.2f s: %s", self.upstream, pause, error)
                await asyncio.sleep(pause)
