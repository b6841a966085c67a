"""Retries of idempotent downstream calls, with backoff and a budget so they never multiply load.

Only a step that can safely run twice is retried (preprocessing is a pure function of its
request), and only on errors that say the call did not get through (``UNAVAILABLE``).

* **Backoff**: exponential with full jitter, so retries from many requests spread out.
* **Window**: retries wait for the connection to come back (``wait_for_ready``) for at most
  ``window_s`` in total and never past the call's deadline; a dead upstream is still
  reported quickly, while a restart that takes a second or two is bridged.
* **Budget**: a token bucket shared by all calls. Every call deposits ``ratio`` tokens and
  time adds ``min_per_s`` per second; a retry spends one. Retries therefore add at most
  ``ratio`` of the traffic (plus a small floor) however badly the upstream fails.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.gateway import metrics

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    window_s: float = 3.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Pause before retry number ``retry`` (1, 2, ...): full jitter over an exponential cap."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(0.0, cap)


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
    """The upstream did not come back within the retry window (which ended before the call's deadline)."""

    def __init__(self, last_error: BaseException) -> None:
        super().__init__(str(last_error))
        self.last_error = last_error


class Retrier:
    """Runs one idempotent call with retries. ``attempt(number, timeout_s)`` makes try ``number`` (0 first)."""

    def __init__(self, upstream: str, policy: RetryPolicy, budget: RetryBudget,
                 rng: random.Random | None = None) -> None:
        self.upstream = upstream
        self.policy = policy
        self.budget = budget
        self._rng = rng or random.Random()

    async def call(
        self,
        attempt: Callable[[int, float], Awaitable[T]],
        timeout_s: float,
        retryable: Callable[[BaseException], bool],
        is_timeout: Callable[[BaseException], bool],
    ) -> T:
        """Return the first successful attempt; raise the last error (or :class:`RetryWindowElapsed`)."""
        start = time.monotonic()
        deadline = start + timeout_s
        window_end = min(deadline, start + self.policy.window_s)
        self.budget.deposit()
        number = 0
        while True:
            limit = deadline if number == 0 else window_end
            try:
                return await attempt(number, max(limit - time.monotonic(), 0.001))
            except Exception as error:
                cut_by_window = number > 0 and window_end < deadline and is_timeout(error)
                if cut_by_window:
                    metrics.RETRIES.labels(self.upstream, "window_elapsed").inc()
                    raise RetryWindowElapsed(error) from error
                if not retryable(error):
                    raise
                number += 1
                pause = self.policy.backoff(number, self._rng)
                if number >= self.policy.max_attempts:
                    metrics.RETRIES.labels(self.upstream, "attempts_exhausted").inc()
                    raise
                if time.monotonic() + pause >= window_end:
                    metrics.RETRIES.labels(self.upstream, "window_elapsed").inc()
                    raise RetryWindowElapsed(error) from error
                if not self.budget.try_spend():
                    metrics.RETRIES.labels(self.upstream, "budget_exhausted").inc()
                    raise
                metrics.RETRIES.labels(self.upstream, "retried").inc()
                await asyncio.sleep(pause)
