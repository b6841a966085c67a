"""A run as ghz's ``--format json`` report, read back as latency percentiles and successful calls per second.

The summary has the fields and units of ghz's report: ``count``, ``total``/``average``/``fastest``/``slowest``
in nanoseconds, ``rps``, ``latencyDistribution`` (10/25/50/75/90/95/99th percentile of successful calls,
ghz's nearest-rank rule), ``statusCodeDistribution`` with ghz's (Go) code names such as ``OK`` or
``InvalidArgument``, ``errorDistribution`` keyed by ``rpc error: code = ... desc = ...``, ``histogram`` and
``options``. :func:`plot_latency_vs_throughput` draws several sweeps of such summaries (PNG).
"""
from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness.load import Run

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


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
