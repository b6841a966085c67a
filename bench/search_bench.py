"""``make search-bench``: the shared catalog measured through the running stack, written into docs/SEARCH.md.

    python -m bench.search_bench [--size 60000] [--queries 2000] [--concurrency 8]

Starts a private stack on free loopback ports (Triton, preprocess, gateway and a fresh PostgreSQL + pgvector
under .cache/search-bench/), then

1. bulk-indexes ``--size`` Fashion-MNIST training images as products of one catalog on ``fashion_effnet``
   (``tools.index_catalog``'s own code: IndexProductBatch calls of ``--index-batch``, ``--index-concurrency``
   in flight) — img/s;
2. sends ``--queries`` Fashion-MNIST test images as SearchSimilar calls, ``--concurrency`` in flight, without a
   filter, with a category, with an attribute filter and with both — p50 / p99 / throughput per variant;
3. computes exact top-k for the same queries in-process (the served ONNX file with the serving path's own
   preprocessing, numpy over every stored vector read back from PostgreSQL, the same filters applied to the
   stored attributes) — recall@k of each variant's answers, and precision@k ("same category") without a filter.

The results (with command, machine, CPU model and flags, date) go to docs/bench/search-results.json and the
generated block of docs/SEARCH.md; the targets are the search issue's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.results import machine_info, write_section
from devstack.stack import REPO_ROOT, Ports, Stack

LOG = logging.getLogger("search_bench")
MODEL = "fashion_effnet"
CATALOG = "bench"
BEGIN = "<!-- search-bench:results:begin -->"
END = "<!-- search-bench:results:end -->"
VARIANTS = {  # name -> (category, filter)
    "no filter": ("", ""),
    "category": ("@predicted", ""),
    "attribute filter": ("", "tone = light OR tone = mid"),
    "category + attribute": ("@predicted", "tone = dark"),
}
TARGETS = {"recall": 0.98, "p99_ms": 50.0, "index_per_s": 100.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=60000,
                        help="products: Fashion-MNIST training images, class-balanced (default: %(default)s, all)")
    parser.add_argument("--queries", type=int, default=2000,
                        help="SearchSimilar calls per variant: Fashion-MNIST test images (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="matches per search (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="searches in flight (default: %(default)s)")
    parser.add_argument("--index-concurrency", type=int, default=3,
                        help="IndexProductBatch calls in flight while bulk indexing (default: %(default)s)")
    parser.add_argument("--index-batch", type=int, default=16,
                        help="products per IndexProductBatch call (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".cache" / "search-bench",
                        help="PostgreSQL data and logs of the private stack; emptied first (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "bench" / "search-results.json",
                        help="results JSON (default: %(default)s)")
    parser.add_argument("--doc", default=str(REPO_ROOT / "docs" / "SEARCH.md"),
                        help="markdown file whose generated block is rewritten (default: %(default)s); '' = none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while indexing")
    return parser


# -- helpers shared with the tests ---------------------------------------------------------------------------------
def search_gateway(address: str, queries: list, k: int, concurrency: int = 8, catalog: str = "",  # type: ignore[type-arg]
                   category: str = "", filter: str = "", latencies: list[float] | None = None) -> list[list]:
    """SearchSimilar's matches for each of ``queries`` (catalog items), in order, ``concurrency`` calls in flight;
    the wall time of each call in ms is appended to ``latencies`` when given."""
    import grpc
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

        def one(query) -> list:  # type: ignore[no-untyped-def, type-arg]
            request = recognition_pb2.SearchSimilarRequest(image=query.read(), k=k, catalog=catalog,
                                                           category=category, filter=filter)
            start = time.perf_counter()
            matches = list(stub.SearchSimilar(request, timeout=60).matches)
            if latencies is not None:
                latencies.append((time.perf_counter() - start) * 1e3)
            return matches

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


# -- the measurement ---------------------------------------------------------------------------------------------
def bulk_index(stack: Stack, args: argparse.Namespace, items: list) -> dict[str, Any]:  # type: ignore[type-arg]
    from tools import index_catalog

    index_args = index_catalog.get_args_parser().parse_args(
        ["fashion-mnist:train", "--gateway", stack.gateway_address, "--catalog", CATALOG, "--model", MODEL,
         "--concurrency", str(args.index_concurrency), "--batch-size", str(args.index_batch),
         "--state", str(args.work_dir / "index-state.jsonl")]
        + (["--no-progress"] if args.no_progress else []))
    stats, size = asyncio.run(index_catalog.index_all(index_args, items, args.work_dir / "index-state.jsonl"))
    result = {"products": stats.done, "failed": stats.failed, "seconds": round(stats.seconds, 1),
              "per_s": round(stats.per_second, 1), "catalog_size": size, "concurrency": args.index_concurrency,
              "batch": args.index_batch}
    LOG.info("bulk indexing: %s", result)
    return result


def stored_vectors(url: str) -> tuple[list[str], np.ndarray, list[str], list[dict[str, list[str]]]]:
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(url) as conn:
        register_vector(conn)
        rows = conn.execute(
            "SELECT e.product_id, e.embedding, p.category, p.attributes FROM embeddings e"
            "  JOIN products p USING (catalog_id, product_id) JOIN catalogs c USING (catalog_id)"
            " WHERE c.name = %s AND e.model_version = c.model_version ORDER BY e.product_id", (CATALOG,)).fetchall()
    ids = [r[0] for r in rows]
    vectors = np.stack([np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows])
    return ids, vectors, [r[2] for r in rows], [r[3] for r in rows]


def query_vectors(queries: list) -> tuple[np.ndarray, list[str]]:  # type: ignore[type-arg]
    """Embeddings and top-1 labels of the queries from the served ONNX file, through the serving preprocessing."""
    import onnxruntime as ort

    from training.data.uploads import preprocess_all
    from training.repository.layout import latest
    from training.repository.recipe import read_spec

    repository = REPO_ROOT / "model_repository"
    spec = read_spec(repository / MODEL / "config.pbtxt")
    session = ort.InferenceSession(str(latest(repository / f"{MODEL}_onnx") / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    labels = (repository / MODEL / "labels.txt").read_text().split("\n")
    vectors, predicted = [], []
    for start in range(0, len(queries), 256):
        chunk = queries[start:start + 256]
        logits, embedding = session.run(["logits", "embedding"], {"image": preprocess_all([q.read() for q in chunk],
                                                                                          spec)})
        vectors.append(embedding / np.linalg.norm(embedding, axis=1, keepdims=True))
        predicted += [labels[int(i)] for i in logits.argmax(axis=1)]
    return np.concatenate(vectors).astype(np.float32), predicted


def exact_answers(vectors: np.ndarray, categories: list[str], attributes: list[dict[str, list[str]]],
                  queries: np.ndarray, predicted: list[str], category: str, text: str, k: int) -> list[set[int]]:
    """Exact top-k of every query under the same category and attribute filter, by brute force over all vectors."""
    from services.gateway.catalog.filters import AttributeLimits, parse_filter

    where = parse_filter(text, AttributeLimits())
    passes = np.array([where.matches(a) for a in attributes])
    cats = np.array(categories)
    out: list[set[int]] = []
    for start in range(0, len(queries), 256):  # one matrix product per block of queries, not a copy per query
        scores = queries[start:start + 256] @ vectors.T
        for row, q in zip(scores, range(start, start + len(scores)), strict=True):
            mask = passes & (cats == predicted[q]) if category == "@predicted" else passes
            row = np.where(mask, row, -np.inf)
            top = np.argpartition(-row, k)[:k] if len(row) > k else np.arange(len(row))
            top = top[np.isfinite(row[top])]
            out.append(set(top[np.argsort(-row[top])].tolist()))
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tools.catalog import read_catalog

    results: dict[str, Any] = {"meta": machine_info(), "command": "python -m bench.search_bench " + " ".join(
        sys.argv[1:]), "model": MODEL, "k": args.k, "concurrency": args.concurrency, "targets": TARGETS}
    if args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True)
    items = read_catalog(f"fashion-mnist:train:{args.size}" if args.size < 60000 else "fashion-mnist:train")
    queries = read_catalog(f"fashion-mnist:test:{args.queries}")
    stack = Stack(ports=Ports.free(), log_dir=args.work_dir / "logs", postgres_dir=args.work_dir / "pg")
    stack.start()
    try:
        results["indexing"] = bulk_index(stack, args, items)
        ids, vectors, categories, attributes = stored_vectors(stack.postgres_url)
        position = {pid: i for i, pid in enumerate(ids)}
        LOG.info("%d vectors of dimension %d read back from PostgreSQL", *vectors.shape)
        query_vecs, predicted = query_vectors(queries)
        results["variants"] = {}
        for name, (category, text) in VARIANTS.items():
            latencies: list[float] = []
            start = time.perf_counter()
            answers = search_gateway(stack.gateway_address, queries, args.k, args.concurrency, CATALOG, category,
                                     text, latencies)
            seconds = time.perf_counter() - start
            truth = exact_answers(vectors, categories, attributes, query_vecs, predicted, category, text, args.k)
            found = [{position[m.product_id] for m in matches} for matches in answers]
            recall = sum(len(f & t) for f, t in zip(found, truth, strict=True)) / max(1, sum(len(t) for t in truth))
            short = sum(len(f) < len(t) for f, t in zip(found, truth, strict=True))
            row = {"category": category, "filter": text, "queries": len(queries), "recall_at_k": round(recall, 4),
                   "answers_short_of_k": short, "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                   "p99_ms": round(float(np.percentile(latencies, 99)), 1),
                   "per_s": round(len(queries) / seconds, 1)}
            if name == "no filter":
                row["precision_at_k"] = round(same_category_precision(queries, answers, args.k), 4)
            results["variants"][name] = row
            LOG.info("%-22s %s", name, row)
    finally:
        stack.stop()
    results["meta"]["date_end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def markdown(results: dict[str, Any]) -> str:
    meta, index, variants, targets = results["meta"], results["indexing"], results["variants"], results["targets"]
    lines = [BEGIN, "", "## Results of the last `make search-bench` run (generated)", "",
             f"`{results['command']}` — {meta['date']}, {meta['nproc']} cores, {meta['cpu_model']} "
             f"(flags: {' '.join(meta['cpu_flags'])}), {meta['platform']}; embedding model `{results['model']}`; "
             "stack, PostgreSQL and load generator on the same cores.", "",
             f"Bulk indexing: **{index['products']:,}** products in {index['seconds']} s = **{index['per_s']} img/s** "
             f"({index['failed']} failed; IndexProductBatch calls of {index.get('batch', 1)} through gateway → "
             f"preprocess → Triton → PostgreSQL, {index['concurrency']} calls in flight).", "",
             f"| variant | filter | recall@{results['k']} vs exact | answers short of k | p50 | p99 | searches/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in variants.items():
        shown = " AND ".join(part for part in (f"category {row['category']}" if row["category"] else "",
                                              f"`{row['filter']}`" if row["filter"] else "") if part) or "none"
        lines.append(f"| {name} | {shown} | {row['recall_at_k']:.4f} | {row['answers_short_of_k']} | "
                     f"{row['p50_ms']} ms | {row['p99_ms']} ms | {row['per_s']} |")
    worst_recall = min(row["recall_at_k"] for row in variants.values())
    worst_p99 = max(row["p99_ms"] for row in variants.values())
    precision = variants["no filter"].get("precision_at_k")
    lines += ["", f"Precision@{results['k']} (same category) without a filter: **{precision}**.", "",
              "| target | measured | |", "| --- | --- | --- |",
              f"| recall@10 ≥ {targets['recall']} against exact search, every variant | worst {worst_recall:.4f} | "
              f"{verdict(worst_recall >= targets['recall'])} |",
              f"| SearchSimilar p99 ≤ {targets['p99_ms']:.0f} ms at concurrency {results['concurrency']}, "
              f"with and without filters | worst {worst_p99} ms | {verdict(worst_p99 <= targets['p99_ms'])} |",
              f"| bulk indexing ≥ {targets['index_per_s']:.0f} img/s | {index['per_s']} img/s | "
              f"{verdict(index['per_s'] >= targets['index_per_s'])} |", "", END, ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the private stack is stopped, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = measure(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.doc:
        write_section(Path(args.doc), markdown(results), BEGIN, END)
    LOG.info("wrote %s%s", args.output, f" and {args.doc}" if args.doc else "")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
