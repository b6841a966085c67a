"""CPU time and resident memory of process trees, and counters from Prometheus endpoints, read around a run.

Each service of the stack runs in its own session (``start_new_session=True``), so the CPU
time of a service, its threads and its children (Triton's Python backend stubs) is the sum
over the processes of that session in ``/proc``.
"""
from __future__ import annotations

import os
import re
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devstack.stack import Stack

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rfind(")") + 2:].split()


def session_cpu_seconds(session_ids: Mapping[str, int]) -> dict[str, float]:
    """user+system CPU seconds of every live process in each session (and of children it reaped)."""
    totals = dict.fromkeys(session_ids, 0.0)
    by_sid = {sid: name for name, sid in session_ids.items()}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) pgrp(2) session(3) ... utime(11) stime(12) cutime(13) cstime(14)
        name = by_sid.get(int(fields[3]))
        if name is not None:
            totals[name] += sum(int(v) for v in fields[11:15]) / CLOCK_TICKS
    return totals


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Triton's backend stubs are children)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_bytes(int(child))
    except (OSError, ValueError):
        pass
    return total


@dataclass
class MemorySampler:
    """Samples the RSS of each service of ``stack`` every ``interval_s`` in a thread."""

    stack: Stack
    interval_s: float = 0.5
    samples: dict[str, list[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for name, proc in self.stack.processes.items():
            self.samples.setdefault(name, []).append(rss_bytes(proc.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()

    def report(self) -> dict[str, dict[str, float]]:
        return {name: {"start_mib": values[0] / 2**20, "peak_mib": max(values) / 2**20,
                       "end_mib": values[-1] / 2**20} for name, values in self.samples.items() if values}


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$')


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """A Prometheus text endpoint as ``{'name{labels}': value}``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def model_counters(samples: Mapping[str, float], model: str) -> dict[str, float]:
    """Triton's per-model counters summed over versions: requests, executions, queue and compute time."""
    wanted = {"nv_inference_count": "inferences", "nv_inference_exec_count": "executions",
              "nv_inference_request_success": "requests", "nv_inference_queue_duration_us": "queue_us",
              "nv_inference_compute_infer_duration_us": "compute_us"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for key, value in samples.items():
        name, _, labels = key.partition("{")
        if name in wanted and f'model="{model}"' in labels:
            out[wanted[name]] += value
    return out
