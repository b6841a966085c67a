"""Overload benchmark: offer 3x the measured capacity and check the excess is shed early and cheaply.

    python -m bench.overload [--factor 3] [--duration 30] [--max-in-flight 16] [--output overload.json]

Starts a private stack on free loopback ports, measures capacity with a closed loop, then offers
``factor`` x capacity in an open loop (requests start on schedule whether or not earlier ones have
returned). Reports the shed ratio (``RESOURCE_EXHAUSTED``), the latency of accepted calls, any other
error, and the resident memory of every service process. Not a test: run it by hand, record the
numbers in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from bench.loadgen import GrpcTarget, classify_payloads_from_bytes, closed_loop, describe, open_loop, summarize
from devstack.stack import Ports, Stack, sample_photo

LOG = logging.getLogger("overload")
CALL = "shopvision.v1.ProductRecognition.Classify"


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


def jpeg_photo(name: str = "coffee.png", quality: int = 90) -> bytes:
    """A sample photo as a JPEG (what shop clients send; cheaper for the load generator than PNG)."""
    image = cv2.imread(str(sample_photo(name)), cv2.IMREAD_COLOR)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buffer.tobytes()


def start_stack(log_dir: Path, env: dict[str, str]) -> Stack:
    stack = Stack(ports=Ports.free(), log_dir=log_dir, extra_env=env)
    LOG.info("starting a private stack (logs in %s) ...", log_dir)
    return stack.start()


def shed_summary(summary: dict[str, Any]) -> dict[str, Any]:
    codes = summary["statusCodeDistribution"]
    total = summary["count"] or 1
    ok_latencies = {row["percentage"]: row["latency"] / 1e6 for row in summary["latencyDistribution"]}
    return {
        "offered_rps": summary["options"].get("rps"),
        "calls": summary["count"],
        "ok_per_s": codes.get("OK", 0) / (summary["total"] / 1e9),
        "shed_ratio": codes.get("ResourceExhausted", 0) / total,
        "other_errors": {code: n for code, n in codes.items() if code not in ("OK", "ResourceExhausted")},
        "accepted_p50_ms": ok_latencies.get(50),
        "accepted_p99_ms": ok_latencies.get(99),
        "accepted_max_ms": summary["slowest"] / 1e6,
    }


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    payloads = classify_payloads_from_bytes([jpeg_photo()], top_k=5)
    async with GrpcTarget(stack.gateway_address, CALL, payloads, connections=4) as target:
        await closed_loop(target, concurrency=4, total=20)  # warm-up
        capacity_run = await closed_loop(target, concurrency=args.max_in_flight // 2, total=None,
                                         duration_s=args.capacity_duration, timeout_s=args.timeout)
        capacity = summarize(capacity_run, name="capacity", host=stack.gateway_address, call=CALL)
        LOG.info("%s", describe(capacity))
        rps = args.factor * capacity["statusCodeDistribution"].get("OK", 0) / (capacity["total"] / 1e9)
        with MemorySampler(stack) as memory:
            overload_run = await open_loop(target, rps=rps, total=None, duration_s=args.duration,
                                           timeout_s=args.timeout, max_in_flight=args.client_max_in_flight)
        overload = summarize(overload_run, name=f"{args.factor:g}x capacity", host=stack.gateway_address, call=CALL)
        LOG.info("%s", describe(overload))
    alive = {name: proc.poll() is None for name, proc in stack.processes.items()}
    return {"capacity": shed_summary(capacity), "overload": shed_summary(overload), "memory": memory.report(),
            "services_alive": alive, "settings": {"factor": args.factor, "duration_s": args.duration,
                                                   "gateway_max_in_flight": args.max_in_flight}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=30.0, help="overload seconds (default: %(default)s)")
    parser.add_argument("--capacity-duration", type=float, default=15.0,
                        help="seconds of the closed-loop capacity run (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=16,
                        help="GATEWAY_MAX_IN_FLIGHT of the private stack (default: %(default)s)")
    parser.add_argument("--client-max-in-flight", type=int, default=2000,
                        help="outstanding calls the load generator allows (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, s (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/bench-overload"),
                        help="service logs (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here (default: print)")
    return parser


def report_on_private_stack(
    args: argparse.Namespace, env: dict[str, str],
    measure_on: Callable[[Stack, argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
) -> dict[str, Any]:
    """Start a private stack with ``env``, run ``measure_on`` against it, print the JSON report
    (and write it to ``args.output`` when given), stop the stack."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stack = start_stack(args.log_dir, env)
    try:
        report = asyncio.run(measure_on(stack, args))
    finally:
        stack.stop()
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return report


def main(args: argparse.Namespace) -> dict[str, Any]:
    return report_on_private_stack(args, {"GATEWAY_MAX_IN_FLIGHT": str(args.max_in_flight)}, measure)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
