"""Measure similar-product search on Fashion-MNIST: ANN recall@10 and latency against exact search, precision@10.

    python -m tools.search_bench [--train 10000] [--test 1000] [--catalog-size 60000]

Embeddings are computed in-process with ONNX Runtime from the served ONNX file
(``model_repository/<model>_onnx/1/model.onnx``) on images transformed by the
serving path's own preprocessing (the model's ``config.pbtxt`` recipe), so they
are the vectors the gateway indexes; they are cached under ``--cache``.

Two numbers come out:

* **precision@10** ("same category") of exact search over the real embedded
  catalog (``--train`` images) for the ``--test`` queries;
* **recall@10 against exact search and single-query latency** of each ANN
  library on a catalog of ``--catalog-size`` vectors. Embedding all 60 000
  training images costs ~10 minutes of two CPU cores, so the catalog beyond the
  real embeddings is a documented stand-in: each extra vector is
  ``normalise(a*u + (1-a)*v + noise)`` for two real embeddings ``u, v`` of the
  same class, ``a ~ U(0.2, 0.8)``, noise ``N(0, sigma^2)`` per component with
  sigma = ``--noise`` times the real vectors' per-component spread. Pass
  ``--catalog-size 0`` to measure on the real vectors only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ONNX Runtime is imported before usearch on purpose: importing onnxruntime after usearch 2.26 (numkong 7.8)
# segfaults in this venv (seen 2026-11-27: `from usearch.index import Index; import onnxruntime` crashes).
import numpy as np
import onnxruntime  # noqa: F401

from services.gateway.search.index import l2_normalise

LOG = logging.getLogger("search_bench")
REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0_imagenet",
                        help="public model whose ONNX classifier makes the embeddings (default: %(default)s)")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--train", type=int, default=10_000,
                        help="Fashion-MNIST training images embedded as the real catalog (default: %(default)s)")
    parser.add_argument("--test", type=int, default=1_000,
                        help="Fashion-MNIST test images embedded as queries (default: %(default)s)")
    parser.add_argument("--catalog-size", type=int, default=60_000,
                        help="ANN catalog size, real + stand-in vectors; 0 = real only (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="stand-in noise, in units of the per-component spread (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default: %(default)s)")
    parser.add_argument("--libraries", default="usearch,faiss,hnswlib",
                        help="ANN libraries to compare, the importable ones are run (default: %(default)s)")
    parser.add_argument("--ef", type=int, default=64,
                        help="search depth of the gateway's index, as GATEWAY_SEARCH_EF (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="embedding batch size (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "search-bench",
                        help="where embeddings are cached (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="subset and stand-in seed (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--embed-only", action="store_true", help="compute and cache the embeddings, then stop")
    parser.add_argument("--gateway", default="",
                        help="instead: time Classify and SearchSimilar end to end on this running gateway, one call "
                             "at a time, alternating, with --test Fashion-MNIST test images (default: off)")
    parser.add_argument("--gateway-precision", type=int, default=0,
                        help="with --gateway: also measure SearchSimilar precision@k for N Fashion-MNIST test images "
                             "against the gateway's indexed catalog (default: 0 = skip)")
    return parser


def embed_fashion_mnist(args: argparse.Namespace, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, D) L2-normalised embeddings and labels of a seeded, class-balanced subset (cached)."""
    cache = args.cache / f"{args.model}-{split}-{count}-seed{args.seed}.npz"
    if cache.exists():
        data = np.load(cache)
        return data["embeddings"], data["labels"]
    import onnxruntime as ort
    from tqdm import tqdm

    from training.datasets import apply_recipe, fashion_mnist_raw, stratified_subset
    from training.recipe import config_path, read_spec
    from training.repository import latest

    spec = read_spec(config_path(args.repository, args.model))
    raw, labels = fashion_mnist_raw(split)
    picked = stratified_subset(labels, count, args.seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(latest(args.repository / f"{args.model}_onnx") / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    out = []
    start = time.perf_counter()
    for first in tqdm(range(0, len(picked), args.batch_size), desc=f"embedding {split}", unit="batch"):
        pixels = apply_recipe(raw[picked[first:first + args.batch_size]], spec)
        out.append(session.run(["embedding"], {"image": pixels})[0])
    LOG.info("embedded %d %s images in %.1f s", len(picked), split, time.perf_counter() - start)
    embeddings = l2_normalise(np.concatenate(out).astype(np.float32))
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=embeddings, labels=labels[picked])
    return embeddings, labels[picked]


def stand_in_catalog(real: np.ndarray, labels: np.ndarray, size: int, noise: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``real`` plus ``size - len(real)`` same-class blends of two real vectors with noise (see the module doc)."""
    extra = size - len(real)
    if extra <= 0:
        return real, labels
    spread = real.std(axis=0, keepdims=True)
    first = rng.integers(0, len(real), extra)
    partner = np.empty(extra, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rows = np.flatnonzero(labels[first] == label)
        partner[rows] = rng.choice(members, len(rows))
    mix = rng.uniform(0.2, 0.8, (extra, 1)).astype(np.float32)
    blend = mix * real[first] + (1 - mix) * real[partner]
    blend += rng.standard_normal(blend.shape, dtype=np.float32) * (noise * spread)
    return np.concatenate([real, l2_normalise(blend)]), np.concatenate([labels, labels[first]])


def exact_top_k(catalog: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest inner products per query, best first."""
    scores = queries @ catalog.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def precision_at_k(neighbours: np.ndarray, catalog_labels: np.ndarray, query_labels: np.ndarray) -> float:
    return float((catalog_labels[neighbours] == query_labels[:, None]).mean())


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


class Candidate:
    """One index under test: ``search(query, k) -> ids``; built once and cached under ``--cache``."""

    def __init__(self, name: str, build_s: float, search: Callable[[np.ndarray, int], np.ndarray],
                 set_ef: Callable[[int], None] | None) -> None:
        self.name, self.build_s, self.search, self.set_ef = name, build_s, search, set_ef


def timed_build(path: Path, build: Callable[[], Any], load: Callable[[], Any], save: Callable[[Any], None]
                ) -> tuple[Any, float]:
    """Load ``path`` when it exists (build time read beside it), else build, time and save."""
    seconds_file = path.with_suffix(".seconds")
    if path.exists() and seconds_file.exists():
        return load(), float(seconds_file.read_text())
    start = time.perf_counter()
    built = build()
    seconds = time.perf_counter() - start
    save(built)
    seconds_file.write_text(str(seconds))
    return built, seconds


def usearch_candidate(catalog: np.ndarray, cache: Path, dtype: str) -> Candidate:
    from usearch.index import Index

    def build() -> Index:
        index = Index(ndim=catalog.shape[1], metric="ip", dtype=dtype, connectivity=16, expansion_add=128)
        index.add(np.arange(len(catalog)), catalog, threads=2)
        return index

    index, seconds = timed_build(cache / f"usearch-{dtype}.usearch", build,
                                 lambda: Index.restore(cache / f"usearch-{dtype}.usearch"),
                                 lambda built: built.save(cache / f"usearch-{dtype}.usearch"))

    def set_ef(ef: int) -> None:
        index.expansion_search = ef

    return Candidate(f"usearch {dtype} M=16 efC=128", seconds,
                     lambda q, k: index.search(q, k, threads=1).keys, set_ef)


def faiss_candidate(catalog: np.ndarray, cache: Path) -> Candidate:
    import faiss

    def build() -> Any:
        faiss.omp_set_num_threads(2)
        index = faiss.IndexHNSWFlat(catalog.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
        index.add(catalog)
        return index

    path = cache / "faiss-hnswflat.faiss"
    index, seconds = timed_build(path, build, lambda: faiss.read_index(str(path)),
                                 lambda built: faiss.write_index(built, str(path)))
    faiss.omp_set_num_threads(1)

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    return Candidate("faiss HNSWFlat M=16 efC=128", seconds, lambda q, k: index.search(q[None], k)[1][0], set_ef)


def hnswlib_candidate(catalog: np.ndarray, cache: Path) -> Candidate:
    import hnswlib

    path = cache / "hnswlib.bin"

    def build() -> Any:
        index = hnswlib.Index(space="ip", dim=catalog.shape[1])
        index.init_index(max_elements=len(catalog), ef_construction=128, M=16)
        index.set_num_threads(2)
        index.add_items(catalog, np.arange(len(catalog)))
        return index

    def load() -> Any:
        index = hnswlib.Index(space="ip", dim=catalog.shape[1])
        index.load_index(str(path), max_elements=len(catalog))
        return index

    index, seconds = timed_build(path, build, load, lambda built: built.save_index(str(path)))
    index.set_num_threads(1)
    return Candidate("hnswlib M=16 efC=128", seconds, lambda q, k: index.knn_query(q, k)[0][0],
                     lambda ef: index.set_ef(ef))


def shopvision_candidate(catalog: np.ndarray, labels: np.ndarray, cache: Path, ef: int) -> tuple[Candidate, Any]:
    """The gateway's own index (usearch f16, global + per-category graphs), filled one put at a time."""
    from services.gateway.search.index import IndexParams, Product
    from services.gateway.search.store import PersistentIndex

    directory = cache / "shopvision-index"
    seconds_file = cache / "shopvision-index.seconds"
    params = IndexParams(dim=1, expansion_search=ef)
    start = time.perf_counter()
    store = PersistentIndex.open(directory, "bench", params, snapshot_ops=10 ** 9)
    load_s = time.perf_counter() - start
    if len(store) != len(catalog):
        if len(store):
            raise SystemExit(f"{directory} holds {len(store)} products, not {len(catalog)}: delete it")
        start = time.perf_counter()
        put_ms = []
        for i, vector in enumerate(catalog):
            t = time.perf_counter()
            store.put(Product(str(i), str(int(labels[i]))), vector, "1")
            put_ms.append((time.perf_counter() - t) * 1e3)
        seconds_file.write_text(json.dumps({"build_s": time.perf_counter() - start,
                                            "put_p50_ms": float(np.percentile(put_ms, 50)),
                                            "put_p99_ms": float(np.percentile(put_ms, 99))}))
        store.snapshot()
        store.close()
        start = time.perf_counter()
        store = PersistentIndex.open(directory, "bench", params, snapshot_ops=10 ** 9)
        load_s = time.perf_counter() - start
    built = json.loads(seconds_file.read_text())
    stats = {**built, "load_s": load_s, "snapshot_bytes": (directory / "snapshot.npz").stat().st_size}

    def search(q: np.ndarray, k: int, label: str = "") -> np.ndarray:
        return np.array([int(hit.product.product_id) for hit in store.search(q, k, label)])

    return Candidate(f"shopvision index (usearch f16, ef={ef})", built["build_s"], search, None), (store, stats)


def time_interleaved(candidates: list[Candidate], queries: np.ndarray, k: int
                     ) -> list[tuple[np.ndarray, list[float], list[float]]]:
    """Every candidate answers query i before any answers query i+1, so load changes hit all alike.

    Returns found ids, wall-clock ms and this thread's CPU ms per query: on a shared machine the wall-clock
    tail includes time spent preempted (a scheduler slice is ~4 ms), the CPU time does not.
    """
    found: list[list[np.ndarray]] = [[] for _ in candidates]
    wall: list[list[float]] = [[] for _ in candidates]
    cpu: list[list[float]] = [[] for _ in candidates]
    for warm in queries[:20]:
        for candidate in candidates:
            candidate.search(warm, k)
    for query in queries:
        for i, candidate in enumerate(candidates):
            start, start_cpu = time.perf_counter(), time.thread_time()
            found[i].append(candidate.search(query, k))
            wall[i].append((time.perf_counter() - start) * 1e3)
            cpu[i].append((time.thread_time() - start_cpu) * 1e3)
    return [(np.stack(f), w, c) for f, w, c in zip(found, wall, cpu, strict=True)]


def end_to_end(args: argparse.Namespace) -> dict:
    """p50/p99 of Classify and SearchSimilar on a running gateway, alternating so both see the same load."""
    import grpc
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    from tools.catalog import read_catalog

    queries = read_catalog(f"fashion-mnist:test:{args.test}")
    times: dict[str, list[float]] = {"Classify": [], "SearchSimilar": []}
    with grpc.insecure_channel(args.gateway) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        calls = {
            "Classify": lambda image: stub.Classify(recognition_pb2.ClassifyRequest(image=image), timeout=30),
            "SearchSimilar": lambda image: stub.SearchSimilar(recognition_pb2.SearchSimilarRequest(image=image),
                                                              timeout=30),
        }
        for i, query in enumerate(queries):
            image = query.read()
            for name, call in calls.items():
                start = time.perf_counter()
                call(image)
                if i >= 10:  # warm-up
                    times[name].append((time.perf_counter() - start) * 1e3)
    results: dict = {name: {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
                            "calls": len(t)} for name, t in times.items()}
    LOG.info("end to end on %s: %s", args.gateway, results)
    if args.gateway_precision:
        results["search_precision"] = gateway_precision(args.gateway, args.gateway_precision, args.k)
    print(json.dumps(results, indent=2))
    return results


def search_gateway(address: str, queries: list, k: int, concurrency: int = 8) -> list[list]:  # type: ignore[type-arg]
    """SearchSimilar's matches for each of ``queries`` (catalog items), in order, ``concurrency`` calls in flight."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

        def one(query) -> list:  # type: ignore[no-untyped-def, type-arg]
            request = recognition_pb2.SearchSimilarRequest(image=query.read(), k=k)
            return list(stub.SearchSimilar(request, timeout=60).matches)

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, queries))


def same_category_precision(queries: list, answers: list[list], k: int) -> float:  # type: ignore[type-arg]
    """Share of the returned matches whose label is the query's category; every answer must hold ``k`` matches."""
    same = 0
    for query, matches in zip(queries, answers, strict=True):
        if len(matches) != k:
            raise RuntimeError(f"{query.product_id}: {len(matches)} matches, expected {k}")
        same += sum(m.label == query.category for m in matches)
    return same / (k * len(queries))


def gateway_precision(address: str, count: int, k: int, concurrency: int = 8) -> dict:
    """Precision@k ("same category") of SearchSimilar on a running gateway for ``count`` Fashion-MNIST test
    images (class-balanced), against whatever catalog that gateway has indexed (labels from its metadata)."""
    from tools.catalog import read_catalog

    queries = read_catalog(f"fashion-mnist:test:{count}")
    start = time.perf_counter()
    precision = same_category_precision(queries, search_gateway(address, queries, k, concurrency), k)
    result = {"queries": len(queries), "k": k, "precision_at_k": precision,
              "seconds": round(time.perf_counter() - start, 1)}
    LOG.info("SearchSimilar precision@%d on %s: %s", k, address, result)
    return result


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.gateway:
        return end_to_end(args)
    train, train_labels = embed_fashion_mnist(args, "train", args.train)
    test, test_labels = embed_fashion_mnist(args, "test", args.test)
    if args.embed_only:
        return {}
    k = args.k
    results: dict = {"model": args.model, "dim": int(train.shape[1]), "real_catalog": len(train),
                     "queries": len(test), "k": k, "cpu_load_1min_before": os.getloadavg()[0]}
    truth_real = exact_top_k(train, test, k)
    results["precision_at_k_real"] = precision_at_k(truth_real, train_labels, test_labels)
    LOG.info("precision@%d (same category, exact search over %d real embeddings): %.4f",
             k, len(train), results["precision_at_k_real"])

    rng = np.random.default_rng(args.seed)
    catalog, catalog_labels = stand_in_catalog(train, train_labels, args.catalog_size, args.noise, rng)
    results["ann_catalog"] = len(catalog)
    truth = exact_top_k(catalog, test, k)
    results["precision_at_k_stand_in"] = precision_at_k(truth, catalog_labels, test_labels)
    cache = args.cache / f"indexes-{len(catalog)}-{len(train)}-seed{args.seed}-noise{args.noise}"
    cache.mkdir(parents=True, exist_ok=True)

    candidates: list[Candidate] = []
    makers = {"usearch": lambda: [usearch_candidate(catalog, cache, "f32"), usearch_candidate(catalog, cache, "f16")],
              "faiss": lambda: [faiss_candidate(catalog, cache)],
              "hnswlib": lambda: [hnswlib_candidate(catalog, cache)]}
    for name in args.libraries.split(","):
        try:
            candidates += makers[name]()
        except ImportError as error:
            LOG.warning("%s is not installed (%s): skipped", name, error)
    shopvision, (store, stats) = shopvision_candidate(catalog, catalog_labels, cache, args.ef)
    results["shopvision_index"] = stats
    LOG.info("shopvision index: %s", stats)

    exact = Candidate("exact (numpy, float32)", 0.0, lambda q, k: exact_top_k(catalog, q[None], k)[0], None)
    results["ann"] = []
    for ef in (32, 64, 128):
        for candidate in candidates:
            if candidate.set_ef:
                candidate.set_ef(ef)
        # Exact search runs apart: its multi-threaded BLAS would disturb the timing of the others.
        timed = candidates + ([shopvision] if ef == args.ef else []) + ([exact] if ef == 128 else [])
        runs = (time_interleaved(timed[:-1], test, k) + time_interleaved(timed[-1:], test, k) if ef == 128
                else time_interleaved(timed, test, k))
        for candidate, (found, wall, cpu) in zip(timed, runs, strict=True):
            row = {"index": candidate.name, "ef": ef if candidate.set_ef else None, "build_s": candidate.build_s,
                   "recall_at_k": recall_at_k(found, truth), "p50_ms": float(np.percentile(wall, 50)),
                   "p99_ms": float(np.percentile(wall, 99)), "cpu_p50_ms": float(np.percentile(cpu, 50)),
                   "cpu_p99_ms": float(np.percentile(cpu, 99))}
            results["ann"].append(row)
            LOG.info("%-40s ef=%-4s build %6.1f s  recall@%d %.4f  p50 %.3f ms  p99 %.3f ms  (CPU p50 %.3f p99 %.3f)",
                     row["index"], row["ef"], row["build_s"], k, row["recall_at_k"], row["p50_ms"], row["p99_ms"],
                     row["cpu_p50_ms"], row["cpu_p99_ms"])

    # Category-filtered search on the gateway's index against exact search within the category.
    recalls, times = [], []
    for query, label in zip(test, test_labels, strict=True):
        members = np.flatnonzero(catalog_labels == label)
        expected = members[exact_top_k(catalog[members], query[None], k)[0]]
        start = time.perf_counter()
        found = shopvision.search(query, k, str(int(label)))  # type: ignore[call-arg]
        times.append((time.perf_counter() - start) * 1e3)
        time.sleep(0.002)  # let the exact search's BLAS threads go idle before the next timing
        recalls.append(len(set(found.tolist()) & set(expected.tolist())) / k)
    results["category_search"] = {"recall_at_k": float(np.mean(recalls)), "p50_ms": float(np.percentile(times, 50)),
                                  "p99_ms": float(np.percentile(times, 99))}
    LOG.info("shopvision category-filtered search: %s", results["category_search"])
    results["cpu_load_1min_after"] = os.getloadavg()[0]
    store.close()
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
