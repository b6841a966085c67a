"""Run an exported model with ONNX Runtime (what the serving backend runs) and time it."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from training.onnx.export import INPUT_NAME, OUTPUT_NAMES


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session configured like the Triton backend (``intra_op_thread_count`` = ``threads``)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 (N, H, W, C) images, in order."""
    parts = [sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: images[i:i + batch_size]})[0]
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def throughput(sess: ort.InferenceSession, images: np.ndarray, batch_size: int, seconds: float = 2.0) -> float:
    """Images per second at ``batch_size`` (after one warm-up call), over at least ``seconds``."""
    batch = np.ascontiguousarray(images[:batch_size])
    if len(batch) < batch_size:
        batch = np.resize(batch, (batch_size, *images.shape[1:]))
    sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})
    done, start = 0, time.perf_counter()
    while True:
        sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})
        done += batch_size
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def interleaved_throughput(sessions: dict[str, ort.InferenceSession], images: np.ndarray, batch_size: int,
                           rounds: int = 3, seconds: float = 1.0) -> dict[str, float]:
    """Median images/s of each session, measured in alternating rounds (A B A B ...) so that other
    load on a shared machine hits every model alike."""
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            samples[name].append(throughput(sess, images, batch_size, seconds))
    return {name: float(np.median(values)) for name, values in samples.items()}
