"""Where a result was measured (machine, CPU features, versions) and the files results go to."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The CPU features that decide which kernels ONNX Runtime, OpenCV and pgvector run (recorded with every result).
RELEVANT_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                      "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def configure_logging() -> None:
    """The benchmarks' log format: timestamp, level, logger name (to stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """``model name`` and the relevant ``flags`` of the first CPU in /proc/cpuinfo (empty where unreadable)."""
    model, flags = "", []  # type: tuple[str, list[str]]
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    present = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return model, [flag for flag in RELEVANT_CPU_FLAGS if flag in present]


def machine_info() -> dict[str, Any]:
    """The machine a result is measured on: cores, CPU model and flags, platform, versions, date, load."""
    model, flags = cpu_model_and_flags()
    import onnxruntime

    return {"nproc": os.cpu_count(), "cpu_model": model, "cpu_flags": flags, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": os.getloadavg()}


def write_json(results: Any, path: Path | None, indent: int = 2,
               default: Callable[[Any], Any] | None = None) -> str:
    """``results`` as JSON text, also written to ``path`` (its folder created) when given."""
    text = json.dumps(results, indent=indent, default=default)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text


def write_section(doc: Path, section: str, begin: str, end: str) -> None:
    """Replace the text between the markers ``begin`` and ``end`` in ``doc`` (append the section when they are
    missing): the generated block of a Markdown file, its hand-written text around it kept."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
