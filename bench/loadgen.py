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
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

LOG = logging.getLogger("loadgen")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALL = "shopvision.v1.ProductRecognition.Classify"
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# ghz reports status codes with Go's names (google.golang.org/grpc/codes String()).
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled", grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument", grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound", grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied", grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition", grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange", grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal", grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss", grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
_GO_BY_PYTHON_NAME = {code.name: name for code, name in GO_CODE_NAMES.items()}

# A call takes the request index (to rotate payloads) and a timeout in seconds, and raises on failure.
CallFn = Callable[[int, float], Awaitable[Any]]


# -- results ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    started: float  # time.perf_counter() at the (scheduled) start
    latency_s: float
    status: str  # ghz (Go) code name
    error: str  # "" when OK


@dataclass
class Run:
    """What one bounded run produced, before it is summarised."""

    results: list[Result]
    wall_s: float
    end_reason: str  # "normal" (count reached) or "timeout" (duration reached), as ghz says
    options: dict[str, Any] = field(default_factory=dict)


def status_of(error: BaseException) -> tuple[str, str]:
    """(ghz code name, message) of a failed call: grpc.aio errors, tritonclient errors, client-side timeouts."""
    if isinstance(error, grpc.aio.AioRpcError):
        return GO_CODE_NAMES.get(error.code(), "Unknown"), error.details() or ""
    status = getattr(error, "status", None)
    if callable(status):  # tritonclient.utils.InferenceServerException: status() is "StatusCode.X"
        raw = str(status() or "").replace("StatusCode.", "")
        message_of = getattr(error, "message", None)
        message = message_of() if callable(message_of) else str(error)
        return _GO_BY_PYTHON_NAME.get(raw, "Unknown"), str(message)
    if isinstance(error, asyncio.TimeoutError):
        return "DeadlineExceeded", "client-side timeout"
    return "Unknown", f"{type(error).__name__}: {error}"


async def _timed(call: CallFn, index: int, timeout_s: float, started: float) -> Result:
    try:
        await call(index, timeout_s)
    except Exception as error:  # noqa: BLE001 - every failure is a data point, counted by its code
        code, message = status_of(error)
        return Result(started, time.perf_counter() - started, code, f"rpc error: code = {code} desc = {message}")
    return Result(started, time.perf_counter() - started, "OK", "")


# -- the two load shapes ---------------------------------------------------------------------------------------------
def _bounds(total: int | None, duration_s: float | None) -> tuple[float, float]:
    if not total and not duration_s:
        raise ValueError("a run needs a bound: give total > 0 and/or duration_s > 0")
    return (float(total) if total else math.inf), (duration_s if duration_s else math.inf)


async def closed_loop(call: CallFn, concurrency: int, total: int | None = 200, duration_s: float | None = None,
                      timeout_s: float = 20.0) -> Run:
    """``concurrency`` workers, each sending its next request as soon as the previous one returned."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    limit, seconds = _bounds(total, duration_s)
    results: list[Result] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < limit and time.perf_counter() < stop_at:
            index = issued
            issued += 1
            results.append(await _timed(call, index, timeout_s, time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return Run(results, wall, "normal" if issued >= limit else "timeout",
               {"concurrency": concurrency, "total": total or 0, "duration": duration_s or 0, "timeout": timeout_s})


async def open_loop(call: CallFn, rps: float, total: int | None = None, duration_s: float | None = 10.0,
                    timeout_s: float = 20.0, max_in_flight: int = 1000) -> Run:
    """Start requests every ``1/rps`` seconds regardless of replies; latency counts from the scheduled start."""
    if rps <= 0:
        raise ValueError("rps must be > 0")
    limit, seconds = _bounds(total, duration_s)
    slots = asyncio.Semaphore(max_in_flight)
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()

    async def one(index: int, scheduled: float) -> None:
        try:
            results.append(await _timed(call, index, timeout_s, scheduled))
        finally:
            slots.release()

    index = 0
    while index < limit:
        scheduled = start + index / rps
        if scheduled - start >= seconds:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # the wait counts in the latency: it is measured from `scheduled`
        tasks.append(asyncio.create_task(one(index, scheduled)))
        index += 1
    if tasks:
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    return Run(results, wall, "normal" if index >= limit else "timeout",
               {"rps": rps, "total": total or 0, "duration": duration_s or 0, "timeout": timeout_s,
                "concurrency": max_in_flight})


# -- ghz-shaped summary ----------------------------------------------------------------------------------------------
def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def ghz_percentiles(sorted_latencies: Sequence[float], percentiles: Iterable[int] = PERCENTILES) -> list[float]:
    """ghz's rule: index ``int(p/100 * n)``, minus one when that product is a whole number."""
    n = len(sorted_latencies)
    out = []
    for p in percentiles:
        position = p / 100 * n
        index = int(position)
        if position == index:
            index -= 1
        out.append(sorted_latencies[max(index, 0)])
    return out


def _histogram(latencies: Sequence[float], fastest: float, slowest: float, buckets: int = 10) -> list[dict]:
    step = (slowest - fastest) / buckets
    marks = [fastest + step * i for i in range(buckets)] + [slowest]
    counts = [0] * len(marks)
    for latency in latencies:
        for i, mark in enumerate(marks):
            if latency <= mark or i == len(marks) - 1:
                counts[i] += 1
                break
    return [{"mark": mark, "count": count, "frequency": count / len(latencies)}
            for mark, count in zip(marks, counts, strict=True)]


def summarize(run: Run, name: str = "", host: str = "", call: str = "", tags: Mapping[str, str] | None = None,
              details: bool = False) -> dict[str, Any]:
    """The run as ghz's JSON report (durations in nanoseconds, latency percentiles over successful calls)."""
    results = run.results
    ok = sorted(r.latency_s for r in results if r.status == "OK")
    options = {"host": host, "call": call, "insecure": True, **{
        key: (_ns(value) if key in ("duration", "timeout") else value) for key, value in run.options.items()}}
    summary: dict[str, Any] = {
        "name": name,
        "endReason": run.end_reason,
        "options": options,
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "count": len(results),
        "total": _ns(run.wall_s),
        "average": _ns(sum(r.latency_s for r in results) / len(results)) if results else 0,
        "fastest": _ns(ok[0]) if ok else 0,
        "slowest": _ns(ok[-1]) if ok else 0,
        "rps": len(results) / run.wall_s if run.wall_s > 0 else 0.0,
        "errorDistribution": dict(Counter(r.error for r in results if r.error)),
        "statusCodeDistribution": dict(Counter(r.status for r in results)),
        "latencyDistribution": [{"percentage": p, "latency": _ns(v)}
                                for p, v in zip(PERCENTILES, ghz_percentiles(ok), strict=True)] if ok else [],
        "histogram": _histogram(ok, ok[0], ok[-1]) if ok else [],
        "tags": dict(tags or {}),
    }
    if details:
        summary["details"] = [{"timestamp": r.started, "latency": _ns(r.latency_s), "error": r.error,
                               "status": r.status} for r in results]
    return summary


def latency_ms(summary: Mapping[str, Any], percentage: int) -> float:
    """A percentile of a ghz summary in milliseconds (NaN when no call succeeded)."""
    for row in summary.get("latencyDistribution") or []:
        if row["percentage"] == percentage:
            return row["latency"] / 1e6
    return math.nan


def ok_rps(summary: Mapping[str, Any]) -> float:
    """Successful calls per second (ghz's ``rps`` counts failures too)."""
    seconds = summary["total"] / 1e9
    return summary["statusCodeDistribution"].get("OK", 0) / seconds if seconds > 0 else 0.0


def describe(summary: Mapping[str, Any]) -> str:
    """One line: the run's name, count, OK rate and latency percentiles."""
    codes = " ".join(f"{code}={n}" for code, n in sorted(summary["statusCodeDistribution"].items()))
    return (f"{summary['name'] or 'run':<28} n={summary['count']:<6} ok/s={ok_rps(summary):8.1f}  "
            f"p50={latency_ms(summary, 50):8.1f} p95={latency_ms(summary, 95):8.1f} "
            f"p99={latency_ms(summary, 99):8.1f} max={summary['slowest'] / 1e6:8.1f} ms  {codes}")


# -- plot ------------------------------------------------------------------------------------------------------------
def plot_latency_vs_throughput(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path,
                               title: str = "latency vs throughput") -> Path:
    """One line per series: p50 (solid) and p99 (dashed) latency against successful calls per second.

    Points are joined in the order given (the sweep's order) and labelled with their load level,
    so a system whose throughput falls at high concurrency shows it as a line turning back.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    for label, summaries in series.items():
        kept = [s for s in summaries if ok_rps(s) > 0]
        if not kept:
            continue
        x = [ok_rps(s) for s in kept]
        (line,) = axes.plot(x, [latency_ms(s, 50) for s in kept], marker="o", label=f"{label} p50")
        axes.plot(x, [latency_ms(s, 99) for s in kept], marker="x", linestyle="--", color=line.get_color(),
                  label=f"{label} p99")
        for rate, summary in zip(x, kept, strict=True):
            options = summary.get("options", {})
            level = f"{options['rps']:g}/s" if options.get("rps") else f"c={options.get('concurrency', '?')}"
            axes.annotate(level, (rate, latency_ms(summary, 50)), textcoords="offset points", xytext=(4, -10),
                          fontsize=7, color=line.get_color())
    axes.set_xlabel("throughput (successful requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


# -- gRPC target -----------------------------------------------------------------------------------------------------
def method_path(call: str) -> str:
    """ghz's ``package.Service.Method`` (or ``package.Service/Method``) → ``/package.Service/Method``."""
    service, sep, method = call.replace("/", ".").rpartition(".")
    if not sep or not service or not method:
        raise ValueError(f"call {call!r} is not package.Service.Method")
    return f"/{service}/{method}"


def request_class(call: str) -> type:
    """The protobuf class of ``call``'s request, from the generated shopvision stubs."""
    from google.protobuf import descriptor_pool, message_factory
    from shopvision.v1 import preprocess_pb2, recognition_pb2  # noqa: F401 - registers the descriptors

    descriptor = descriptor_pool.Default().FindMethodByName(method_path(call)[1:].replace("/", "."))
    return message_factory.GetMessageClass(descriptor.input_type)


class GrpcTarget:
    """Sends pre-serialised requests (rotating through ``payloads``) to one unary method."""

    def __init__(self, host: str, call: str, payloads: Sequence[bytes], connections: int = 1) -> None:
        if not payloads:
            raise ValueError("no request payloads")
        self.host, self.call = host, call
        self._payloads = list(payloads)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        # Distinct channel args keep grpc from sharing one subchannel across "connections".
        self._channels = [grpc.aio.insecure_channel(host, options=options + [("shopvision.loadgen.channel", i)])
                          for i in range(max(1, connections))]
        path = method_path(call)
        self._methods = [channel.unary_unary(path) for channel in self._channels]

    async def __call__(self, index: int, timeout_s: float) -> bytes:
        method = self._methods[index % len(self._methods)]
        return await method(self._payloads[index % len(self._payloads)], timeout=timeout_s)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> GrpcTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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


def classify_payloads_from_bytes(images: Iterable[bytes], top_k: int = 5, model: str = "") -> list[bytes]:
    """Serialised ``ClassifyRequest`` messages, one per encoded image."""
    from shopvision.v1 import recognition_pb2

    return [recognition_pb2.ClassifyRequest(image=image, top_k=top_k, model=model).SerializeToString()
            for image in images]


def classify_payloads(images: Sequence[Path], top_k: int = 5, model: str = "") -> list[bytes]:
    return classify_payloads_from_bytes((path.read_bytes() for path in images), top_k, model)


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2) + "\n")
    if args.plot is not None:
        plot_latency_vs_throughput({spec.host: summaries}, args.plot)
    return summaries


if __name__ == "__main__":
    main(get_args_parser().parse_args())
