"""GPU measurements for ``bench/gpu_bench.sh``: the model-only ceiling and Triton direct, side by side.

    python3 bench/gpu/measure.py --bundle .cache/gpu-bundle --triton 127.0.0.1:18000 --out gpu_results.json

1. **model-only ceiling**: EfficientNet-Lite0 in torch on the GPU, uint8 input already on the
   device, fp32 and fp16, batches of 1/64/256 back to back (CUDA-synchronised timing);
2. **Triton direct**: the same network in Triton's Python backend on the GPU (dynamic batching),
   fed the preprocessed uint8 tensors over Triton's HTTP API (binary tensor extension, one
   keep-alive connection per client thread), requests of 1 and of 32 images.

Each Triton number and the CPU numbers from the last ``make bench`` (``cpu_results.json`` in
the bundle) are reported as ratios to the GPU ceiling of the same precision measured in the
same run. Only the standard library, numpy and torch are needed (no tritonclient there).
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def torch_ceiling(bundle: Path, images: np.ndarray, batches: list[int], seconds: float) -> list[dict]:
    import torch

    sys.path.insert(0, str(bundle / "py"))
    from lite0 import build

    torch.backends.cudnn.benchmark = True
    results = []
    for half in (False, True):
        model = build(bundle / "lite0_fp16.pt", "cuda", half)
        for batch in batches:
            x = torch.from_numpy(np.stack([images[i % len(images)] for i in range(batch)])).cuda()
            with torch.inference_mode():
                for _ in range(10):
                    model(x)
                torch.cuda.synchronize()
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    for _ in range(5):
                        model(x)
                    torch.cuda.synchronize()
                    runs += 5
                elapsed = time.perf_counter() - start
            results.append({"precision": "fp16" if half else "fp32", "batch": batch,
                            "images_per_s": runs * batch / elapsed, "ms_per_batch": elapsed / runs * 1e3})
            print(f"ceiling {results[-1]}", flush=True)
        del model
        torch.cuda.empty_cache()
    return results


def infer_body(batch: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps({
        "inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": batch.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    return header + batch.tobytes(), len(header)


def triton_run(address: str, model: str, images: np.ndarray, request_batch: int, concurrency: int,
               seconds: float) -> dict:
    """``concurrency`` threads, each with its own keep-alive connection, sending requests back to back."""
    host, port = address.rsplit(":", 1)
    bodies = [infer_body(np.stack([images[(i + j) % len(images)] for j in range(request_batch)]))
              for i in range(len(images))]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        i = seed
        while time.perf_counter() < stop_at:
            body, header_len = bodies[i % len(bodies)]
            i += 1
            start = time.perf_counter()
            try:
                conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={
                    "Inference-Header-Content-Length": str(header_len), "Content-Type": "application/octet-stream"})
                reply = conn.getresponse()
                reply.read()
                ok = reply.status == 200
            except (OSError, http.client.HTTPException) as error:
                ok = False
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                reply_text = str(error)
            else:
                reply_text = "" if ok else f"HTTP {reply.status}"
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(reply_text)
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e3 if ordered else float("nan")

    result = {"model": model, "request_batch": request_batch, "concurrency": concurrency,
              "images_per_s": len(latencies) * request_batch / elapsed, "requests": len(latencies),
              "errors": len(errors), "first_error": errors[0] if errors else "",
              "p50_ms": pct(50), "p99_ms": pct(99), "mean_ms": statistics.fmean(ordered) * 1e3 if ordered else 0.0}
    print(f"triton {result}", flush=True)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(".cache/gpu-bundle"), help="(default: %(default)s)")
    parser.add_argument("--triton", default="127.0.0.1:18000", help="Triton HTTP address (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per point (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("gpu_results.json"), help="(default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    import torch

    images = np.load(args.bundle / "tensors.npy")
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(meta, flush=True)
    ceiling = torch_ceiling(args.bundle, images, [1, 64, 256], args.seconds)
    runs = []
    for model in ("lite0_gpu_fp32", "lite0_gpu_fp16"):
        for request_batch, concurrency in ((1, 1), (1, 16), (1, 64), (32, 4), (32, 16)):
            runs.append(triton_run(args.triton, model, images, request_batch, concurrency, args.seconds))
    best = {p: max(r["images_per_s"] for r in ceiling if r["precision"] == p) for p in ("fp32", "fp16")}
    for run in runs:
        run["ratio_to_gpu_ceiling"] = run["images_per_s"] / best[run["model"].rsplit("_", 1)[-1]]
    cpu = {}
    cpu_path = args.bundle / "cpu_results.json"
    if cpu_path.exists():
        cpu_results = json.loads(cpu_path.read_text())
        cpu_ceiling = max(r["images_per_s"] for r in cpu_results["ceiling"])
        cpu = {"cpu_ort_ceiling": cpu_ceiling, "cpu_ceiling_ratio_to_gpu_fp32": cpu_ceiling / best["fp32"]}
    out = {"meta": meta, "gpu_ceiling": ceiling, "triton": runs, "cpu": cpu}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("\n| what | precision | request batch | concurrency | img/s | × GPU ceiling | p50 / p99 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p, value in best.items():
        print(f"| GPU model-only ceiling (torch) | {p} | – | – | {value:.0f} | 1.00 | – |")
    for r in runs:
        print(f"| Triton direct (HTTP) | {r['model'].rsplit('_', 1)[-1]} | {r['request_batch']} | {r['concurrency']} | "
              f"{r['images_per_s']:.0f} | {r['ratio_to_gpu_ceiling']:.3f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} |")
    if cpu:
        print(f"| CPU ONNX Runtime ceiling (make bench) | fp32 | – | – | {cpu['cpu_ort_ceiling']:.0f} | "
              f"{cpu['cpu_ceiling_ratio_to_gpu_fp32']:.4f} | – |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
