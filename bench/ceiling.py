"""The in-process ONNX Runtime ceiling: the same model file, uint8 NHWC batches, nothing else in the way.

    python -m bench.ceiling [--batch-sizes 1,8,32] [--threads 2] [--seconds 4]

This is the compute the machine allows for the model; every served configuration in
``make bench`` is reported as a ratio to the best of these numbers.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness.procstat import self_cpu_seconds
from bench.harness.results import configure_logging

LOG = logging.getLogger("ceiling")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "model_repository" / "efficientnet_lite0_imagenet_onnx" / "1" / "model.onnx"


@dataclass(frozen=True)
class CeilingResult:
    batch: int
    threads: int
    spinning: bool
    images_per_s: float
    batch_p50_ms: float
    batch_p99_ms: float
    runs: int
    cpu_ms_per_image: float  # process CPU time (all ORT threads) per image


def session(model: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    """A session configured like the Triton backend's (intra-op threads, full graph optimisation).

    ``spinning=False`` stops idle intra-op threads from busy-waiting for work (ORT spins by default),
    which matters when other processes share the cores.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def measure(sess: ort.InferenceSession, images: Sequence[np.ndarray], batch: int, seconds: float,
            threads: int, warmup: int = 3, spinning: bool = True) -> CeilingResult:
    """Run ``batch``-image batches back to back for ``seconds`` and report images/s."""
    name = sess.get_inputs()[0].name
    feed = {name: np.stack([images[i % len(images)] for i in range(batch)])}
    for _ in range(warmup):
        sess.run(["logits"], feed)
    latencies = []
    cpu_start = self_cpu_seconds()
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        sess.run(["logits"], feed)
        latencies.append(time.perf_counter() - t)
        if time.perf_counter() - start >= seconds and len(latencies) >= 3:
            break
    elapsed = time.perf_counter() - start
    cpu_ms = (self_cpu_seconds() - cpu_start) * 1e3 / (len(latencies) * batch)
    ordered = np.sort(latencies)
    return CeilingResult(batch, threads, spinning, len(latencies) * batch / elapsed,
                         float(np.percentile(ordered, 50) * 1e3), float(np.percentile(ordered, 99) * 1e3),
                         len(latencies), cpu_ms)


def run(model: Path, images: Sequence[np.ndarray], batch_sizes: Sequence[int], threads: int,
        seconds: float, spinning: bool = True) -> list[CeilingResult]:
    sess = session(model, threads, spinning)
    results = []
    for batch in batch_sizes:
        result = measure(sess, images, batch, seconds, threads, spinning=spinning)
        LOG.info("ceiling batch=%d spinning=%s: %.1f img/s, %.1f CPU ms/img", batch, spinning,
                 result.images_per_s, result.cpu_ms_per_image)
        results.append(result)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX file (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per batch size (default: %(default)s)")
    parser.add_argument("--no-spinning", action="store_true",
                        help="idle ORT threads sleep instead of busy-waiting (default: ORT's, spinning)")
    return parser


def main(args: argparse.Namespace) -> list[CeilingResult]:
    configure_logging()
    from bench.harness.data import SIZES, model_spec, synthesize, tensors

    images = tensors(synthesize(*SIZES[0]), model_spec())
    results = run(args.model, images, [int(b) for b in args.batch_sizes.split(",")], args.threads, args.seconds,
                  spinning=not args.no_spinning)
    for result in results:
        print(asdict(result), flush=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
