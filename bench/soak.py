"""Soak benchmark: steady load for minutes, in windows; memory must stay flat and errors at zero.

    python -m bench.soak [--duration 300] [--window 30] [--concurrency 4] [--output soak.json]

Starts a private stack on free loopback ports and keeps ``concurrency`` closed-loop callers busy
with a rotation of real photos (JPEG, PNG, WebP) for ``duration`` seconds. Each window reports the
throughput, latency, errors and the resident memory of every service. Not a test: run it by hand,
record the numbers in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import cv2

from bench.harness.data import CALL, classify_payloads_from_bytes
from bench.harness.load import GrpcTarget, closed_loop
from bench.harness.procstat import MemorySampler, rss_bytes
from bench.harness.stack import report_on_private_stack
from bench.harness.summary import describe, summarize
from devstack.stack import Stack, sample_photo

LOG = logging.getLogger("soak")
PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


def photo_mix() -> list[bytes]:
    """Each sample photo once as JPEG, PNG and WebP."""
    images = []
    for name in PHOTOS:
        image = cv2.imread(str(sample_photo(name)), cv2.IMREAD_COLOR)
        for ext in (".jpg", ".png", ".webp"):
            ok, buffer = cv2.imencode(ext, image)
            assert ok
            images.append(buffer.tobytes())
    return images


async def soak(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    payloads = classify_payloads_from_bytes(photo_mix(), top_k=5)
    windows: list[dict[str, Any]] = []
    async with GrpcTarget(stack.gateway_address, CALL, payloads, connections=2) as target:
        await closed_loop(target, concurrency=2, total=30)  # warm-up
        elapsed = 0.0
        while elapsed < args.duration:
            with MemorySampler(stack) as memory:
                run = await closed_loop(target, concurrency=args.concurrency, total=None,
                                        duration_s=min(args.window, args.duration - elapsed), timeout_s=args.timeout)
            summary = summarize(run, name=f"window {len(windows) + 1}", host=stack.gateway_address, call=CALL)
            LOG.info("%s", describe(summary))
            elapsed += run.wall_s
            latencies = {row["percentage"]: row["latency"] / 1e6 for row in summary["latencyDistribution"]}
            windows.append({"calls": summary["count"], "codes": summary["statusCodeDistribution"],
                            "ok_per_s": summary["statusCodeDistribution"].get("OK", 0) / run.wall_s,
                            "p50_ms": latencies.get(50), "p99_ms": latencies.get(99),
                            "rss_mib": {name: m["end_mib"] for name, m in memory.report().items()}})
    errors = sum(n for w in windows for code, n in w["codes"].items() if code != "OK")
    growth = {name: windows[-1]["rss_mib"][name] - windows[0]["rss_mib"][name] for name in windows[0]["rss_mib"]}
    return {"windows": windows, "total_calls": sum(w["calls"] for w in windows), "errors": errors,
            "rss_growth_first_to_last_window_mib": growth,
            "services_alive": {name: proc.poll() is None for name, proc in stack.processes.items()},
            "final_rss_mib": {name: rss_bytes(proc.pid) / 2**20 for name, proc in stack.processes.items()},
            "settings": {"duration_s": args.duration, "window_s": args.window, "concurrency": args.concurrency}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="total seconds (default: %(default)s)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per report window (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop callers (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, s (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/bench-soak"),
                        help="service logs (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here (default: print)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    return report_on_private_stack(args, {}, soak)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
