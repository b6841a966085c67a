"""Bounded concurrency: beyond the limit, refuse at once instead of queueing without bound."""
from __future__ import annotations

from services.common.errors import Overloaded
from services.gateway import metrics


class AdmissionGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self, slots: int = 1) -> None:
        if self.in_flight + slots > self.limit:
            metrics.SHED.inc(slots)
            raise Overloaded(
                f"gateway is at its limit of {self.limit} images in flight; retry with backoff",
                reason="overloaded")
        self.in_flight += slots
        metrics.IN_FLIGHT.set(self.in_flight)

    def release(self, slots: int = 1) -> None:
        self.in_flight -= slots
        metrics.IN_FLIGHT.set(self.in_flight)
