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
import logging
from pathlib import Path
from typing import Any

from bench.harness.data import CALL, classify_payloads_from_bytes, jpeg_photo
from bench.harness.load import GrpcTarget, closed_loop, open_loop
from bench.harness.procstat import MemorySampler
from bench.harness.stack import report_on_private_stack
from bench.harness.summary import describe, summarize
from devstack.stack import Stack

LOG = logging.getLogger("overload")


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


def main(args: argparse.Namespace) -> dict[str, Any]:
    return report_on_private_stack(args, {"GATEWAY_MAX_IN_FLIGHT": str(args.max_in_flight)}, measure)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
