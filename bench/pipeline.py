"""The in-process pipeline: the project's own preprocessing and the model in one process, no RPC.

    python -m bench.pipeline [--batch-sizes 1,8] [--threads 2] [--seconds 3]

Each step takes ``batch`` JPEGs, runs :func:`services.preprocess.imaging.preprocess` on each (the recipe
read from the model's ``config.pbtxt``, as the preprocess service does) and one ``session.run`` on the
stacked uint8 tensors (the ONNX Runtime session of :mod:`bench.ceiling`). The full stack divided by
this is the pure cost of serving: the same work with gRPC, processes and batching queues taken away.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from bench.ceiling import DEFAULT_MODEL, session
from bench.harness.procstat import self_cpu_seconds
from bench.harness.results import configure_logging
from services.common.spec import Spec
from services.preprocess.imaging import preprocess

LOG = logging.getLogger("pipeline")
# The preprocess service's default limit (PREPROCESS_MAX_IMAGE_PIXELS); the bench's photos are far below it.
MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class PipelineResult:
    batch: int
    threads: int
    images_per_s: float
    batch_p50_ms: float
    batch_p99_ms: float
    runs: int
    cpu_ms_per_image: float  # process CPU time (decode, transform and every ORT thread) per image
    preprocess_ms_per_image: float  # wall time of preprocess() per image
    top1: tuple[int, ...]  # class of each distinct JPEG (first batch), to check it agrees with the served rows


def step(sess: ort.InferenceSession, jpegs: Sequence[bytes], spec: Spec) -> tuple[np.ndarray, float]:
    """Decode + transform every JPEG, one ``session.run`` on the batch: the logits and the preprocess seconds."""
    start = time.perf_counter()
    pixels = np.stack([preprocess(jpeg, spec, MAX_PIXELS).pixels for jpeg in jpegs])
    prepared = time.perf_counter() - start
    return sess.run(["logits"], {sess.get_inputs()[0].name: pixels})[0], prepared


def measure(sess: ort.InferenceSession, jpegs: Sequence[bytes], spec: Spec, batch: int, seconds: float,
            threads: int, warmup: int = 2) -> PipelineResult:
    """Steps of ``batch`` JPEGs (rotating through ``jpegs``) back to back for ``seconds``."""
    if not jpegs:
        raise ValueError("no JPEGs")
    top1 = tuple(int(row.argmax()) for row in step(sess, jpegs, spec)[0])
    batches = [[jpegs[(i * batch + j) % len(jpegs)] for j in range(batch)] for i in range(len(jpegs))]
    for i in range(warmup):
        step(sess, batches[i % len(batches)], spec)
    latencies: list[float] = []
    preprocess_s = 0.0
    cpu_start = self_cpu_seconds()
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        _, prepared = step(sess, batches[len(latencies) % len(batches)], spec)
        latencies.append(time.perf_counter() - t)
        preprocess_s += prepared
        if time.perf_counter() - start >= seconds and len(latencies) >= 3:
            break
    elapsed = time.perf_counter() - start
    images = len(latencies) * batch
    ordered = np.sort(latencies)
    return PipelineResult(batch, threads, images / elapsed, float(np.percentile(ordered, 50) * 1e3),
                          float(np.percentile(ordered, 99) * 1e3), len(latencies),
                          (self_cpu_seconds() - cpu_start) * 1e3 / images, preprocess_s * 1e3 / images, top1)


def run(model: Path, jpegs: Sequence[bytes], spec: Spec, batch_sizes: Sequence[int], threads: int,
        seconds: float) -> list[PipelineResult]:
    """One session (spinning off, as the served classifier runs), one result per batch size; OpenCV on one
    thread, as the preprocess service runs it."""
    cv2.setNumThreads(1)
    sess = session(model, threads, spinning=False)
    results = []
    for batch in batch_sizes:
        result = measure(sess, jpegs, spec, batch, seconds, threads)
        LOG.info("in-process pipeline batch=%d: %.1f img/s, %.1f CPU ms/img (preprocess %.1f ms/img)", batch,
                 result.images_per_s, result.cpu_ms_per_image, result.preprocess_ms_per_image)
        results.append(result)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX file (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma list (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per batch size (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> list[PipelineResult]:
    configure_logging()
    from bench.harness.data import SIZES, model_spec, synthesize

    results = run(args.model, synthesize(*SIZES[0]).jpegs, model_spec(),
                  [int(b) for b in args.batch_sizes.split(",")], args.threads, args.seconds)
    for result in results:
        print(asdict(result), flush=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
