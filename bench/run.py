"""``make bench``: one run, side by side, same model, same images.

    python -m bench [--seconds 6] [--concurrency 1,4,16,32] [--out-doc docs/BENCHMARKS.md]

1. the in-process ONNX Runtime ceiling (the model file, uint8 NHWC batches of 1/8/32, 2 threads);
2. the in-process pipeline (``bench/pipeline.py``): the project's preprocessing + the same session, no RPC;
3. Triton direct: the preprocessed tensors through ``tritonclient`` to the public ensemble;
4. the full stack through the gateway (gateway → preprocess → Triton ensemble), JPEG bytes in, one image per
   ``Classify``, and ``ClassifyBatch`` of 32 images against 32 concurrent ``Classify`` calls;
5. Triton with the decode in a Python-backend model (``bench/triton_decode/``): JPEG bytes into an ensemble;
6. the naive peer (``bench/naive_server.py``): decode + preprocess + ONNX Runtime per request;
7. the framework peer (``bench/peers/ray_serve.py``): Ray Serve's gRPC ingress, the project's preprocessing,
   ``@serve.batch``, in its own environment (``.cache/peers/ray/``, installed on first use).

Each served system gets a closed-loop concurrency sweep; the stack also gets open-loop
(fixed-RPS) runs and, with the naive peer, an image-size sweep (640x480 to 4032x3024 JPEGs
synthesised from real sample photos). Besides latency and throughput every run records the
CPU time each process spent per image (from ``/proc``) and, for Triton, the average executed
batch. A private stack is started on free loopback ports, on a private model repository
(``.cache/bench/model_repository``: the served models linked, plus the decode ensemble of row 5),
and stopped at the end; so is each peer. A peer that cannot start is recorded with its error.

Writes ``docs/BENCHMARKS.md`` (the part between its ``bench:results`` markers), plots and
``results.json`` under ``docs/bench/``, and prints the side-by-side table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from bench import ceiling as ceiling_mod
from bench import pipeline as pipeline_mod
from bench import report
from bench.harness.data import (
    BATCH_CALL,
    CALL,
    ENSEMBLE,
    SIZES,
    ImageSet,
    classify_batch_payloads_from_bytes,
    classify_payloads_from_bytes,
    model_spec,
    synthesize,
    tensors,
)
from bench.harness.load import CallFn, GrpcTarget, closed_loop, open_loop
from bench.harness.procstat import model_counters, scrape, self_cpu_seconds, session_cpu_seconds
from bench.harness.results import configure_logging, machine_info, write_json, write_section
from bench.harness.stack import private_stack
from bench.harness.summary import describe, ok_rps, summarize
from bench.targets import NaivePeer, RayServePeer, TritonJpegTarget, TritonTarget
from bench.triton_decode import repository as decode_repository
from devstack.stack import REPO_ROOT, Stack
from services.common.spec import Spec

LOG = logging.getLogger("bench")
CLASSIFIER = "efficientnet_lite0_imagenet_onnx"


@dataclass(frozen=True)
class Plan:
    seconds: float
    size_seconds: float
    concurrency: tuple[int, ...]
    size_concurrency: tuple[int, ...]
    open_loop_fractions: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    threads: int
    warmup: int
    naive_workers: int
    pipeline_batch_sizes: tuple[int, ...] = (1, 8)
    batch_items: int = 32
    ray_replicas: int = 2
    ray_threads: int = 1
    ray_max_batch: int = 8

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
        return cls(args.seconds, args.size_seconds, ints(args.concurrency), ints(args.size_concurrency),
                   tuple(float(x) for x in args.open_loop.split(",") if x), ints(args.batch_sizes), args.threads,
                   args.warmup, args.naive_workers, ints(args.pipeline_batch_sizes), args.batch_items,
                   args.ray_replicas, args.ray_threads, args.ray_max_batch)


class Probe:
    """CPU seconds per process group and Prometheus counters, before and after a run."""

    def __init__(self, sessions: Mapping[str, int], metrics: Mapping[str, str]) -> None:
        self.sessions, self.metrics = dict(sessions), dict(metrics)

    def snapshot(self) -> dict[str, Any]:
        scraped = {}
        for name, url in self.metrics.items():
            try:
                scraped[name] = scrape(url)
            except OSError:
                scraped[name] = {}
        return {"cpu": session_cpu_seconds(self.sessions), "client": self_cpu_seconds(), "metrics": scraped,
                "t": time.perf_counter()}

    @staticmethod
    def _delta(after: Mapping[str, float], before: Mapping[str, float], key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def compare(self, before: dict[str, Any], after: dict[str, Any], ok: int) -> dict[str, Any]:
        per = max(ok, 1)
        cpu = {name: (after["cpu"][name] - before["cpu"][name]) * 1e3 / per for name in self.sessions}
        cpu["client"] = (after["client"] - before["client"]) * 1e3 / per
        out: dict[str, Any] = {"cpu_ms_per_image": cpu,
                               "cpu_util": sum(v for k, v in cpu.items()) * per / 1e3 / (after["t"] - before["t"])}
        if "triton" in self.metrics:
            b = model_counters(before["metrics"]["triton"], CLASSIFIER)
            a = model_counters(after["metrics"]["triton"], CLASSIFIER)
            d = {k: a[k] - b[k] for k in a}
            out["triton"] = {
                "avg_batch": d["inferences"] / d["executions"] if d["executions"] else 0.0,
                "queue_ms": d["queue_us"] / d["requests"] / 1e3 if d["requests"] else 0.0,
                "compute_ms": d["compute_us"] / d["requests"] / 1e3 if d["requests"] else 0.0,
            }
        hops = {}
        for service, key, label in (("gateway", 'shopvision_gateway_hop_duration_seconds_{}{{hop="preprocess"}}',
                                     "gateway→preprocess"),
                                    ("gateway", 'shopvision_gateway_hop_duration_seconds_{}{{hop="triton"}}',
                                     "gateway→triton"),
                                    ("preprocess", 'shopvision_preprocess_decode_duration_seconds_{}{{format="jpeg"}}',
                                     "decode"),
                                    ("preprocess", "shopvision_preprocess_transform_duration_seconds_{}", "transform")):
            if service not in self.metrics:
                continue
            b, a = before["metrics"][service], after["metrics"][service]
            count = self._delta(a, b, key.format("count"))
            if count:
                hops[label] = self._delta(a, b, key.format("sum")) / count * 1e3
        if hops:
            out["hops_ms"] = hops
        return out


async def measured(system: str, target: CallFn, probe: Probe, *, concurrency: int = 0, rps: float = 0.0,
                   seconds: float, warmup: int, extra: Mapping[str, Any] | None = None,
                   images_per_call: int = 1) -> dict[str, Any]:
    """One bounded run (closed loop at ``concurrency`` or open loop at ``rps``) with its CPU and hop costs
    (CPU per image: per call divided by ``images_per_call``)."""
    if warmup:
        await closed_loop(target, max(1, min(concurrency or 4, warmup)), total=warmup, timeout_s=30)
    before = probe.snapshot()
    if rps:
        run = await open_loop(target, rps, total=None, duration_s=seconds, timeout_s=30, max_in_flight=256)
    else:
        run = await closed_loop(target, concurrency, total=None, duration_s=seconds, timeout_s=30)
    after = probe.snapshot()
    label = f"{system} " + (f"rps={rps:.0f}" if rps else f"c={concurrency}")
    summary = summarize(run, label, call=CALL, tags={"system": system, "mode": "open" if rps else "closed"})
    summary.pop("histogram", None)
    record = {"system": system, "concurrency": concurrency, "rps_target": rps, "summary": summary,
              **probe.compare(before, after, summary["statusCodeDistribution"].get("OK", 0) * images_per_call),
              **({"images_per_call": images_per_call} if images_per_call != 1 else {}), **(extra or {})}
    LOG.info("%s  cpu/img %s", describe(summary),
             " ".join(f"{k}={v:.1f}ms" for k, v in record["cpu_ms_per_image"].items()))
    return record


async def stack_phase(stack: Stack, plan: Plan, images: Mapping[tuple[int, int], ImageSet],
                      base_tensors: Sequence[np.ndarray], decode_ensemble: str | None) -> dict[str, Any]:
    p = stack.ports
    sessions = {name: proc.pid for name, proc in stack.processes.items()}
    probe = Probe(sessions, {"triton": f"http://127.0.0.1:{p.triton_metrics}/metrics",
                             "gateway": f"http://127.0.0.1:{p.gateway_metrics}/metrics",
                             "preprocess": f"http://127.0.0.1:{p.preprocess_metrics}/metrics"})
    base = images[SIZES[0]]
    out: dict[str, Any] = {"triton": [], "stack": [], "stack_open": [], "stack_sizes": []}
    if decode_ensemble:
        out["triton_decode"] = await decode_sweep(stack, decode_ensemble, plan, probe, base.jpegs)

    triton = TritonTarget(stack.triton_grpc_address, ENSEMBLE, base_tensors)
    try:
        for c in plan.concurrency:
            out["triton"].append(await measured("triton-direct", triton, probe, concurrency=c,
                                                seconds=plan.seconds, warmup=plan.warmup))
    finally:
        await triton.close()

    async with GrpcTarget(stack.gateway_address, CALL, classify_payloads_from_bytes(base.jpegs)) as gateway:
        for c in plan.concurrency:
            out["stack"].append(await measured("stack", gateway, probe, concurrency=c, seconds=plan.seconds,
                                               warmup=plan.warmup))
        saturation = max(ok_rps(r["summary"]) for r in out["stack"])
        for fraction in plan.open_loop_fractions:
            out["stack_open"].append(await measured("stack", gateway, probe, rps=max(1.0, saturation * fraction),
                                                    seconds=plan.seconds, warmup=0,
                                                    extra={"fraction_of_saturation": fraction}))
        concurrent = next((r for r in out["stack"] if r["concurrency"] == plan.batch_items), None)
        if plan.batch_items and concurrent is None:
            concurrent = await measured("stack", gateway, probe, concurrency=plan.batch_items, seconds=plan.seconds,
                                        warmup=plan.warmup)
    if plan.batch_items:
        out["classify_batch"] = {"items": plan.batch_items, "concurrent": concurrent,
                                 "batch": await classify_batch_run(stack.gateway_address, plan, probe, base.jpegs)}
    out["stack_sizes"] = await size_sweep("stack", stack.gateway_address, probe, plan, images)
    return out


async def decode_sweep(stack: Stack, ensemble: str, plan: Plan, probe: Probe,
                       jpegs: Sequence[bytes]) -> list[dict[str, Any]]:
    """JPEG bytes straight into the Python-decode ensemble, after checking it agrees with the gateway."""
    target = TritonJpegTarget(stack.triton_grpc_address, ensemble, jpegs)
    try:
        theirs = [await target.top1(i) for i in range(len(jpegs))]
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            ours = [(p.class_id, p.label) for p in [
                (await stub.Classify(recognition_pb2.ClassifyRequest(image=j, top_k=1), timeout=60)).predictions[0]
                for j in jpegs]]
        agree = sum(a == b for a, b in zip(theirs, ours, strict=True))
        LOG.info("Triton python-decode ensemble %s: top-1 agrees with the stack on %d of %d JPEGs", ensemble,
                 agree, len(jpegs))
        runs = []
        for c in plan.concurrency:
            runs.append(await measured("triton-python-decode", target, probe, concurrency=c, seconds=plan.seconds,
                                       warmup=plan.warmup, extra={"top1_agrees": agree, "images": len(jpegs)}))
        return runs
    finally:
        await target.close()


async def classify_batch_run(address: str, plan: Plan, probe: Probe, jpegs: Sequence[bytes]) -> dict[str, Any]:
    """One caller sending ``ClassifyBatch`` of ``plan.batch_items`` images back to back (latency per call)."""
    payloads = classify_batch_payloads_from_bytes(jpegs, plan.batch_items)
    async with GrpcTarget(address, BATCH_CALL, payloads) as target:
        reply = recognition_pb2.ClassifyBatchResponse.FromString(await target(0, 60.0))
        failed = sum(item.HasField("error") for item in reply.items)
        if failed or len(reply.items) != plan.batch_items:
            LOG.warning("ClassifyBatch: %d of %d items failed (%d returned)", failed, plan.batch_items,
                        len(reply.items))
        # Twice the sweep's time: one call carries many images, so a run has few calls.
        return await measured("stack-classify-batch", target, probe, concurrency=1, seconds=plan.seconds * 2,
                              warmup=min(plan.warmup, 2), images_per_call=plan.batch_items,
                              extra={"items_failed_in_check": failed})


async def size_sweep(system: str, address: str, probe: Probe, plan: Plan,
                     images: Mapping[tuple[int, int], ImageSet]) -> list[dict[str, Any]]:
    """Cost versus image size: the same closed-loop points for each synthesised image size."""
    out = []
    for image_set in images.values():
        async with GrpcTarget(address, CALL, classify_payloads_from_bytes(image_set.jpegs)) as target:
            for c in plan.size_concurrency:
                out.append(await measured(
                    system, target, probe, concurrency=c, seconds=plan.size_seconds, warmup=min(plan.warmup, 4),
                    extra={"size": image_set.label, "megapixels": image_set.megapixels,
                           "jpeg_kib": image_set.mean_bytes / 1024}))
    return out


async def naive_phase(peer: NaivePeer, plan: Plan, images: Mapping[tuple[int, int], ImageSet]) -> dict[str, Any]:
    assert peer.process is not None
    probe = Probe({"naive": peer.process.pid}, {})
    base = images[SIZES[0]]
    out: dict[str, Any] = {"naive": [], "naive_sizes": []}
    async with GrpcTarget(peer.address, CALL, classify_payloads_from_bytes(base.jpegs)) as target:
        for c in plan.concurrency:
            out["naive"].append(await measured("naive", target, probe, concurrency=c, seconds=plan.seconds,
                                               warmup=plan.warmup))
    out["naive_sizes"] = await size_sweep("naive", peer.address, probe, plan, images)
    return out


async def ray_phase(peer: RayServePeer, plan: Plan, images: Mapping[tuple[int, int], ImageSet]) -> list[dict[str, Any]]:
    assert peer.process is not None
    probe = Probe({"ray": peer.process.pid}, {})
    out = []
    async with GrpcTarget(peer.address, CALL, classify_payloads_from_bytes(images[SIZES[0]].jpegs)) as target:
        for c in plan.concurrency:
            out.append(await measured("ray-serve", target, probe, concurrency=c, seconds=plan.seconds,
                                      warmup=plan.warmup, extra={"peer": peer.config}))
    return out


def framework_peer(plan: Plan, spec: Spec, images: Mapping[tuple[int, int], ImageSet],
                   log_dir: Path) -> dict[str, Any]:
    """The Ray Serve rows, or the reason there are none (the exact error, for BENCHMARKS.md)."""
    peer = RayServePeer(spec, replicas=plan.ray_replicas, intra_op_threads=plan.ray_threads,
                        max_batch_size=plan.ray_max_batch, log_path=log_dir / "ray-serve.log")
    try:
        with peer:
            return {"ray": asyncio.run(ray_phase(peer, plan, images))}
    except Exception as error:  # noqa: BLE001 - a peer that cannot run here is a result, not a crash
        LOG.exception("Ray Serve peer failed")
        return {"ray_error": f"{type(error).__name__}: {error}"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per sweep point (default: %(default)s)")
    parser.add_argument("--size-seconds", type=float, default=4.0,
                        help="seconds per image-size point (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="closed-loop sweep (default: %(default)s)")
    parser.add_argument("--size-concurrency", default="1,8",
                        help="concurrency levels of the image-size sweep (default: %(default)s)")
    parser.add_argument("--open-loop", default="0.5,0.85",
                        help="open-loop rates as fractions of the stack's best closed-loop rate (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="ceiling batch sizes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ceiling intra-op threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=16,
                        help="uncounted requests before each run (default: %(default)s)")
    parser.add_argument("--naive-workers", type=int, default=4,
                        help="gRPC worker threads of the naive peer (default: %(default)s)")
    parser.add_argument("--pipeline-batch-sizes", default="1,8",
                        help="batch sizes of the in-process pipeline (default: %(default)s)")
    parser.add_argument("--batch-items", type=int, default=32,
                        help="images per ClassifyBatch call, compared with as many concurrent Classify calls; "
                             "at most the gateway's GATEWAY_MAX_BATCH_ITEMS (32); 0 = skip (default: %(default)s)")
    parser.add_argument("--ray-replicas", type=int, default=2,
                        help="Ray Serve peer: deployment replicas (default: %(default)s)")
    parser.add_argument("--ray-threads", type=int, default=1,
                        help="Ray Serve peer: ONNX Runtime intra-op threads per replica (default: %(default)s)")
    parser.add_argument("--ray-max-batch", type=int, default=8,
                        help="Ray Serve peer: @serve.batch max_batch_size, 1 = off (default: %(default)s)")
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="model repository the private stack serves (default: %(default)s)")
    parser.add_argument("--stack-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the stack's services, e.g. PREPROCESS_WORKERS=1 (default: none)")
    parser.add_argument("--skip", default="",
                        help="comma list of phases to skip: pipeline,stack,triton_decode,naive,ray (default: none)")
    parser.add_argument("--out-doc", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md",
                        help="Markdown file whose bench:results section is rewritten (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "bench",
                        help="plots and results.json (default: %(default)s)")
    parser.add_argument("--from-results", type=Path, default=None,
                        help="measure nothing: re-render the Markdown, plots and table from this results.json "
                             "(default: measure)")
    parser.add_argument("--log-dir", type=Path, default=REPO_ROOT / ".cache" / "bench" / "logs",
                        help="service logs of the private stack (default: %(default)s)")
    return parser


def publish(results: dict[str, Any], out_doc: Path, out_dir: Path) -> None:
    """Write results.json, the plots and the doc's results section; print the side-by-side table."""
    write_json(results, out_dir / "results.json", indent=1, default=float)
    plots = report.plots(results, out_dir)
    write_section(out_doc, report.markdown(results, plots, out_doc.parent), report.BEGIN, report.END)
    print(report.table(results), flush=True)
    LOG.info("wrote %s, %s and %s", out_doc, out_dir / "results.json", ", ".join(str(p) for p in plots))


def main(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging()
    if args.from_results is not None:
        stored: dict[str, Any] = json.loads(args.from_results.read_text())
        publish(stored, args.out_doc, args.out_dir)
        return stored
    plan = Plan.from_args(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": machine_info(), "plan": asdict(plan)}
    results["meta"]["command"] = " ".join(["python -m bench", *(shlex.quote(a) for a in sys.argv[1:])])
    results["meta"]["stack_env"] = list(args.stack_env)

    LOG.info("synthesising JPEGs %s from %s", ", ".join(f"{w}x{h}" for w, h in SIZES), "sample photos")
    images = {size: synthesize(*size) for size in SIZES}
    spec = model_spec(args.model_repository)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    base_tensors = tensors(images[SIZES[0]], spec)
    model_file = args.model_repository / CLASSIFIER / "1" / "model.onnx"

    LOG.info("1/7 in-process ONNX Runtime ceiling (ORT's default spinning threads, then with spinning off)")
    results["ceiling"] = [asdict(r) for spinning in (True, False) for r in ceiling_mod.run(
        model_file, base_tensors, plan.batch_sizes, plan.threads, plan.seconds * 0.6, spinning=spinning)]
    if "pipeline" not in skip:
        LOG.info("2/7 in-process pipeline: the project's preprocessing + the same ONNX Runtime session, no RPC")
        results["pipeline"] = [asdict(r) for r in pipeline_mod.run(
            model_file, images[SIZES[0]].jpegs, spec, plan.pipeline_batch_sizes, plan.threads, plan.seconds * 0.6)]

    if "stack" not in skip:
        decode_ensemble = None
        repository = args.model_repository
        if "triton_decode" not in skip:
            repository = decode_repository.build(args.model_repository)
            decode_ensemble = decode_repository.jpeg_ensemble_name(ENSEMBLE)
        LOG.info("3-5/7 private stack on free ports (%s): Triton direct, Triton python-decode, the gateway",
                 repository)
        env = dict(item.split("=", 1) for item in args.stack_env)
        with private_stack(args.log_dir, env, model_repository=repository) as stack:
            results.update(asyncio.run(stack_phase(stack, plan, images, base_tensors, decode_ensemble)))
    if "naive" not in skip:
        LOG.info("6/7 naive peer")
        with NaivePeer(workers=args.naive_workers, log_path=args.log_dir / "naive.log") as peer:
            results.update(asyncio.run(naive_phase(peer, plan, images)))
    if "ray" not in skip:
        LOG.info("7/7 framework peer: Ray Serve (gRPC ingress)")
        results.update(framework_peer(plan, spec, images, args.log_dir))

    LOG.info("ceiling again (drift check)")
    best_batch = max(results["ceiling"], key=lambda r: r["images_per_s"])["batch"]
    results["ceiling_after"] = [asdict(r) for r in ceiling_mod.run(model_file, base_tensors, (best_batch,),
                                                                   plan.threads, plan.seconds * 0.6)]
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["wall_s"] = time.perf_counter() - started

    publish(results, args.out_doc, args.out_dir)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
