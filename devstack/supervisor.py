"""Keep the local stack running: a service that exits is started again, with backoff, and logged.

``make run`` (``python -m devstack.stack``) runs a :class:`Supervisor` over its :class:`~devstack.stack.Stack`
in a background thread from before the first process starts, so a crashed PostgreSQL, Triton, preprocess or
gateway heals at any moment (start-up and smoke check included) the way a Kubernetes pod with
``restartPolicy: Always`` does: the first restart after ``initial_s``, each further one twice as late (up to
``max_s``), and the delay starts over once a process has stayed up for ``reset_after_s``. A restart that
itself fails (an exception from ``start_service``) is retried on the same schedule.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

LOG = logging.getLogger("supervisor")


class Supervised(Protocol):
    """What the supervisor needs from a stack: its child processes and a way to start one again."""

    processes: dict

    def start_service(self, name: str): ...


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, restarts: int) -> float:
        """Pause before restart number ``restarts + 1`` of a process that keeps crashing."""
        return min(self.max_s, self.initial_s * 2 ** restarts)


class Supervisor:
    def __init__(self, stack: Supervised, names: Iterable[str] = ("postgres", "triton", "preprocess", "gateway"),
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._stack = stack
        self._names = tuple(names)
        self._backoff = backoff or Backoff()
        self._clock = clock
        now = clock()
        self._started_at = {name: now for name in self._names}
        self._crashes = {name: 0 for name in self._names}  # consecutive quick crashes, drives the delay
        self._due: dict[str, float] = {}  # name -> when to start it again
        self._seen: dict[str, Any] = {}  # name -> the process last looked at (to notice outside starts)
        self.restarts = {name: 0 for name in self._names}  # total restarts, for tests and logs

    def poll(self) -> None:
        """One supervision step: notice exited processes and start those whose backoff has passed."""
        now = self._clock()
        for name in self._names:
            if name in self._due:
                if now >= self._due[name]:
                    del self._due[name]
                    self._restart(name, now)
                continue
            proc = self._stack.processes.get(name)
            if proc is None:
                continue  # not started yet (the stack starts services in order)
            if name not in self._seen or self._seen[name] is not proc:
                self._seen[name] = proc  # started by the stack itself, not by us: its uptime starts now
                self._started_at[name] = now
            if proc.poll() is None:
                continue
            uptime = now - self._started_at[name]
            delay = self._schedule(name, now, uptime)
            LOG.error("%s (pid %d) exited with code %s after %.1f s; restarting in %.1f s",
                      name, proc.pid, proc.returncode, uptime, delay)

    def _schedule(self, name: str, now: float, uptime: float) -> float:
        if uptime >= self._backoff.reset_after_s:
            self._crashes[name] = 0
        delay = self._backoff.delay(self._crashes[name])
        self._crashes[name] += 1
        self._due[name] = now + delay
        return delay

    def _restart(self, name: str, now: float) -> None:
        self._started_at[name] = now
        try:
            proc = self._stack.start_service(name)
        except Exception:
            # E.g. PostgreSQL's data directory briefly unreachable: never let one failed start end supervision.
            delay = self._schedule(name, now, 0.0)
            LOG.exception("could not restart %s; trying again in %.1f s", name, delay)
            return
        self._seen[name] = proc
        self.restarts[name] += 1
        LOG.warning("restarted %s (pid %d, restart %d)", name, proc.pid, self.restarts[name])

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Poll until ``stop`` is set."""
        while not stop.wait(interval_s):
            try:
                self.poll()
            except Exception:  # a bug in one step must not leave the stack unsupervised
                LOG.exception("supervision step failed")
