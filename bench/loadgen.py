"""Load generator for machines without ghz: closed-loop concurrency sweeps and open-loop fixed-RPS runs.

    python -m bench.loadgen --host 127.0.0.1:50051 --image photo.jpg --concurrency 1,4,16 --duration 10
    python -m bench.loadgen --ghz-config bench/ghz/classify_rps.json --output rps.json
    python -m bench.loadgen --ghz-config bench/ghz/classify_concurrency.json --concurrency 1,2,4,8,16,32 \\
        --duration 10 --output sweep.json --plot sweep.png

Every run is bounded by a request count (``--total``) and/or a wall-clock time (``--duration``),
whichever comes first. Requests are serialised once up front and sent as raw bytes over
``grpc.aio``, so the client spends its CPU on the transport, not on protobuf.

* **closed loop** (``--concurrency C``): C workers, each sends its next request when the
  previous one returns; a comma-separated list sweeps several levels.
* **open loop** (``--rps R``): requests start on a fixed schedule whether or not earlier ones
  have returned (at most ``--max-in-flight`` outstanding); latency is measured from the
  *scheduled* start, so a slow server cannot hide its queueing (no coordinated omission).

The JSON summary has the fields and units of ghz's ``--format json`` report: ``count``,
``total``/``average``/``fastest``/``slowest`` in nanoseconds, ``rps``, ``latencyDistribution``
(10/25/50/75/90/95/99th percentile of successful calls, ghz's nearest-rank rule),
``statusCodeDistribution`` with ghz's (Go) code names such as ``OK`` or ``InvalidArgument``,
``errorDistribution`` keyed by ``rpc error: code = ... desc = ...``, ``histogram`` and ``options``.
A sweep writes a JSON list of such summaries. ``--plot`` draws latency against throughput (PNG).

This module is the command line and the reading of ghz configs; the load shapes, the summary and the
request data are the shared harness's (:mod:`bench.harness`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.data import CALL as DEFAULT_CALL
from bench.harness.data import classify_payloads
from bench.harness.load import GrpcTarget, closed_loop, method_path, open_loop
from bench.harness.results import configure_logging, write_json
from bench.harness.summary import describe, plot_latency_vs_throughput, summarize

LOG = logging.getLogger("loadgen")
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- ghz configs -----------------------------------------------------------------------------------------------------
def parse_go_duration(text: str | int | float | None) -> float:
    """``"30s"``, ``"1m30s"``, ``"500ms"`` → seconds; numbers are taken as nanoseconds, as Go does."""
    if text in (None, "", 0):
        return 0.0
    if isinstance(text, (int, float)):
        return float(text) / 1e9
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    seconds, number, rest = 0.0, "", str(text).strip()
    i = 0
    while i < len(rest):
        if rest[i].isdigit() or rest[i] == ".":
            number += rest[i]
            i += 1
            continue
        unit = next((u for u in sorted(units, key=len, reverse=True) if rest.startswith(u, i)), None)
        if unit is None or not number:
            raise ValueError(f"{text!r} is not a Go duration such as 30s or 1m30s")
        seconds += float(number) * units[unit]
        number, i = "", i + len(unit)
    if number:
        raise ValueError(f"{text!r} is not a Go duration (a number needs a unit)")
    return seconds


def request_class(call: str) -> type:
    """The protobuf class of ``call``'s request, from the generated shopvision stubs."""
    from google.protobuf import descriptor_pool, message_factory
    from shopvision.v1 import preprocess_pb2, recognition_pb2  # noqa: F401 - registers the descriptors

    descriptor = descriptor_pool.Default().FindMethodByName(method_path(call)[1:].replace("/", "."))
    return message_factory.GetMessageClass(descriptor.input_type)


def resolve(path: str, base: Path) -> Path:
    """A config's relative path: from the working directory, as ghz reads it, else from ``base``."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base / candidate


def payloads_from_ghz_config(config: Mapping[str, Any], base: Path) -> list[bytes]:
    """Serialised requests from a ghz config's ``data`` / ``data-file`` (JSON) or ``binary-file``."""
    from google.protobuf import json_format

    call = config.get("call", DEFAULT_CALL)
    if config.get("binary-file"):
        return [resolve(config["binary-file"], base).read_bytes()]
    data = config.get("data")
    if data is None and config.get("data-file"):
        data = json.loads(resolve(config["data-file"], base).read_text())
    if data is None:
        raise ValueError("the ghz config has no data, data-file or binary-file")
    cls = request_class(call)
    items = data if isinstance(data, list) else [data]
    return [json_format.ParseDict(item, cls()).SerializeToString() for item in items]


# -- CLI -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSpec:
    """A run plan: flags given on the command line win over the ghz config, which wins over defaults."""

    host: str
    call: str
    concurrency: tuple[int, ...]
    rps: tuple[float, ...]
    total: int | None
    duration_s: float | None
    timeout_s: float
    connections: int
    warmup: int
    max_in_flight: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Mapping[str, Any]) -> LoadSpec:
        def pick(flag: Any, key: str, default: Any) -> Any:
            if flag is not None:
                return flag
            return config.get(key) if config.get(key) not in (None, "", 0) else default

        duration = args.duration if args.duration is not None else parse_go_duration(
            config.get("duration") or config.get("max-duration"))
        total = args.total if args.total is not None else (config.get("total") or (None if duration else 200))
        concurrency = args.concurrency or (int(config.get("concurrency") or 50),)
        rps_given = args.rps if args.rps is not None else ((float(config["rps"]),) if config.get("rps") else ())
        return cls(
            host=pick(args.host, "host", "127.0.0.1:50051"),
            call=pick(args.call, "call", DEFAULT_CALL),
            concurrency=tuple(concurrency),
            rps=tuple(rps_given),
            total=total or None,
            duration_s=duration or None,
            timeout_s=args.timeout if args.timeout is not None else (parse_go_duration(config.get("timeout")) or 20.0),
            connections=int(pick(args.connections, "connections", 1)),
            warmup=args.warmup,
            # ghz's concurrency caps outstanding calls under a rate limit too.
            max_in_flight=args.max_in_flight or (int(config.get("concurrency") or 0) if rps_given else 0) or 1000,
        )


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ghz-config", type=Path, default=None,
                        help="take host, call, data and load settings from this ghz JSON config (default: none)")
    parser.add_argument("--host", default=None, help="server address (default: the config's host or 127.0.0.1:50051)")
    parser.add_argument("--call", default=None, help=f"package.Service.Method (default: {DEFAULT_CALL})")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="send ClassifyRequest(image=<file>); repeat to rotate through several (default: none)")
    parser.add_argument("--top-k", type=int, default=5, help="top_k of requests built from --image (default: 5)")
    parser.add_argument("--model", default="", help="model of requests built from --image (default: the default)")
    parser.add_argument("--concurrency", type=_int_list, default=None,
                        help="closed loop: workers, or a comma list to sweep (default: the config's or 50)")
    parser.add_argument("--rps", type=_float_list, default=None,
                        help="open loop: requests/s, or a comma list to sweep; overrides --concurrency "
                             "(default: the config's rps, else closed loop)")
    parser.add_argument("--total", type=int, default=None,
                        help="requests per run (default: the config's total, else 200; unbounded with --duration)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per run, whichever of count and time comes first (default: the config's)")
    parser.add_argument("--timeout", type=float, default=None, help="per-call timeout in seconds (default: 20)")
    parser.add_argument("--connections", type=int, default=None, help="gRPC channels to spread calls over (default: 1)")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests before each run (default: 0)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="open loop: most outstanding requests (default: the config's concurrency, else 1000)")
    parser.add_argument("--name", default="", help="name recorded in the summary (default: derived from the load)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the ghz-style JSON summary here (a list for a sweep) (default: stdout only)")
    parser.add_argument("--details", action="store_true", help="include every call in the JSON (default: off)")
    parser.add_argument("--plot", type=Path, default=None, help="write a latency-vs-throughput PNG (default: none)")
    return parser


async def run_spec(spec: LoadSpec, payloads: Sequence[bytes], name: str = "",
                   details: bool = False) -> list[dict[str, Any]]:
    """Every run of ``spec`` (one per concurrency or rps level), summarised."""
    summaries = []
    async with GrpcTarget(spec.host, spec.call, payloads, spec.connections) as target:
        levels: list[tuple[str, float]] = ([("rps", r) for r in spec.rps] if spec.rps
                                           else [("concurrency", c) for c in spec.concurrency])
        for kind, level in levels:
            if spec.warmup:
                await closed_loop(target, max(1, min(spec.warmup, 8)), total=spec.warmup, timeout_s=spec.timeout_s)
            if kind == "rps":
                run = await open_loop(target, level, spec.total, spec.duration_s, spec.timeout_s, spec.max_in_flight)
            else:
                run = await closed_loop(target, int(level), spec.total, spec.duration_s, spec.timeout_s)
            label = name or f"{spec.call.rsplit('.', 1)[-1]} {kind}={level:g}"
            summary = summarize(run, label, spec.host, spec.call, {"mode": "open" if kind == "rps" else "closed"},
                                details)
            LOG.info("%s", describe(summary))
            summaries.append(summary)
    return summaries


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    configure_logging()
    config: dict[str, Any] = {}
    base = REPO_ROOT
    if args.ghz_config is not None:
        config = json.loads(args.ghz_config.read_text())
    spec = LoadSpec.from_args(args, config)
    if args.image:
        if spec.call != DEFAULT_CALL:
            raise SystemExit(f"--image builds ClassifyRequest messages; it cannot feed {spec.call}")
        payloads = classify_payloads(args.image, args.top_k, args.model)
    elif config:
        payloads = payloads_from_ghz_config(config, base)
    else:
        raise SystemExit("nothing to send: give --image FILE or --ghz-config FILE")
    summaries = asyncio.run(run_spec(spec, payloads, args.name, args.details))
    for summary in summaries:
        print(describe(summary), flush=True)
    if args.output is not None:
        write_json(summaries[0] if len(summaries) == 1 else summaries, args.output)
    if args.plot is not None:
        plot_latency_vs_throughput({spec.host: summaries}, args.plot)
    return summaries


if __name__ == "__main__":
    main(get_args_parser().parse_args())
