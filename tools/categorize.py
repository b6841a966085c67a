"""Auto-categorise a catalog through the running gateway: top-k categories per product, review flags, a summary.

    python -m tools.categorize SOURCE [--output categories.csv] [--top-k 3] [--margin 0.1]

SOURCE is a folder of images, a CSV manifest or fashion-mnist:SPLIT[:N] (see
tools/catalog.py). Each image is classified with Classify; the output (CSV or
JSONL, by the suffix of ``--output``) has one row per product with its top-k
labels and scores, and ``needs_review`` set when the gateway does not call the
top answer ``confident`` (its score is below its class's threshold, chosen on
the model's validation split for a target precision; ``ListModels`` shows them),
or, with ``--threshold``, when the top score is below that one number instead;
also when the top two are closer than ``--margin``. The catalog's own category,
when it has one, is kept in ``given_category`` for comparison.

Resumable: products already in the output are skipped and new rows appended
(``--restart`` starts the file again). At the end a per-category summary of
the whole output is printed (and written as JSON with ``--summary``).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from tools.catalog import (
    CatalogItem,
    add_connection_arguments,
    call_metadata,
    open_channel,
    read_catalog,
    record_failure,
    run_concurrently,
    with_retries,
)

LOG = logging.getLogger("categorize")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder, CSV manifest, or fashion-mnist:train[:N] / test[:N]")
    add_connection_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("categories.csv"),
                        help="results, .csv or .jsonl (default: %(default)s)")
    parser.add_argument("--model", default="", help="model to classify with (default: the gateway's default model)")
    parser.add_argument("--top-k", type=int, default=3, help="categories kept per product (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="flag for review when the top score is below this one number instead of when the top "
                             "answer is not confident (Prediction.confident: the model's per-class thresholds) "
                             "(default: %(default)s = per-class)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="also flag when top-1 minus top-2 score is below this; 0 = off (default: %(default)s)")
    parser.add_argument("--summary", type=Path, default=None, help="also write the per-category summary as JSON here")
    parser.add_argument("--restart", action="store_true", help="overwrite the output instead of resuming it")
    return parser


def csv_columns(top_k: int) -> list[str]:
    ranked = [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("label", "score")]
    return ["product_id", "source", "given_category", "model", "model_version", *ranked, "needs_review"]


def needs_review(scores: list[float], confident: bool, threshold: float | None, margin: float) -> bool:
    """Whether a person should check the answer: the top one is not ``confident`` (or, with a ``threshold``,
    scores below it), or the top two are closer than ``margin``."""
    if not scores or (not confident if threshold is None else scores[0] < threshold):
        return True
    return margin > 0 and len(scores) > 1 and scores[0] - scores[1] < margin


def read_rows(output: Path) -> list[dict[str, Any]]:
    """Rows already written, as dicts with ``predictions`` [(label, score)] and ``needs_review`` (bool)."""
    if not output.exists() or output.stat().st_size == 0:
        return []
    rows: list[dict[str, Any]] = []
    if output.suffix == ".jsonl":
        for line in output.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # torn by an interrupted run: that product is classified again
            row["predictions"] = [(p["label"], p["score"]) for p in row["predictions"]]
            rows.append(row)
        return rows
    with open(output, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("needs_review"):
                continue  # torn last line
            ranks = sorted(int(key.split("_")[1]) for key in row if key.startswith("label_"))
            row["predictions"] = [(row[f"label_{r}"], float(row[f"score_{r}"])) for r in ranks if row[f"label_{r}"]]
            row["needs_review"] = row["needs_review"] == "true"
            rows.append(row)
    return rows


def check_resumable(output: Path, top_k: int) -> None:
    if output.suffix == ".csv" and output.exists() and output.stat().st_size:
        with open(output, newline="") as f:
            header = next(csv.reader(f), [])
        if header != csv_columns(top_k):
            raise SystemExit(f"{output} has other columns (another --top-k?): pass --restart or another --output")


class RowWriter:
    def __init__(self, output: Path, top_k: int) -> None:
        self._top_k = top_k
        self._jsonl = output.suffix == ".jsonl"
        new = not output.exists() or output.stat().st_size == 0
        output.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(output, "a", newline="")
        self._csv = None if self._jsonl else csv.writer(self._file)
        if self._csv is not None and new:
            self._csv.writerow(csv_columns(top_k))

    def write(self, item: CatalogItem, reply: recognition_pb2.ClassifyResponse, review: bool) -> None:
        if self._jsonl:
            self._file.write(json.dumps({
                "product_id": item.product_id, "source": item.source, "given_category": item.category,
                "model": reply.model, "model_version": reply.model_version,
                "predictions": [{"label": p.label, "score": round(p.score, 6)} for p in reply.predictions],
                "needs_review": review}) + "\n")
        else:
            assert self._csv is not None
            ranked: list[Any] = []
            for rank in range(self._top_k):
                p = reply.predictions[rank] if rank < len(reply.predictions) else None
                ranked += [p.label, f"{p.score:.6f}"] if p else ["", ""]
            self._csv.writerow([item.product_id, item.source, item.category, reply.model, reply.model_version,
                                *ranked, "true" if review else "false"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per predicted top-1 category: products, flagged for review, mean top score, agreement with given category."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["predictions"][0][0] if row["predictions"] else ""].append(row)
    summary = {}
    for label, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        given = [m for m in members if m.get("given_category")]
        summary[label] = {
            "products": len(members),
            "needs_review": sum(bool(m["needs_review"]) for m in members),
            "mean_top_score": sum(m["predictions"][0][1] for m in members if m["predictions"]) / len(members),
            "agrees_with_given": (sum(m["given_category"] == label for m in given) / len(given)) if given else None,
        }
    return summary


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    total = sum(s["products"] for s in summary.values())
    flagged = sum(s["needs_review"] for s in summary.values())
    width = max([len(label) for label in summary] + [8])
    lines = [f"{'category':<{width}}  {'products':>8}  {'review':>6}  {'mean top score':>14}  {'agrees':>6}"]
    for label, s in summary.items():
        agrees = "" if s["agrees_with_given"] is None else f"{100 * s['agrees_with_given']:.0f}%"
        lines.append(f"{label:<{width}}  {s['products']:>8}  {s['needs_review']:>6}  {s['mean_top_score']:>14.3f}"
                     f"  {agrees:>6}")
    lines.append(f"{'total':<{width}}  {total:>8}  {flagged:>6}")
    sys.stdout.write("\n".join(lines) + "\n")


async def classify_all(args: argparse.Namespace, items: list[CatalogItem]) -> tuple[int, int]:
    writer = RowWriter(args.output, args.top_k)
    errors_path = args.output.with_suffix(".errors.jsonl")
    metadata = call_metadata(args.token)
    try:
        async with open_channel(args.gateway, args.ca_cert) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            with open(errors_path, "w") as errors_file:

                async def classify_one(item: CatalogItem) -> None:
                    try:
                        request = recognition_pb2.ClassifyRequest(image=item.read(), top_k=args.top_k,
                                                                  model=args.model)
                        reply = await with_retries(lambda: stub.Classify(request, timeout=args.timeout,
                                                                         metadata=metadata), args.retries)
                    except Exception as error:
                        record_failure(errors_file, item, error)
                        raise
                    scores = [p.score for p in reply.predictions]
                    confident = bool(reply.predictions) and reply.predictions[0].confident
                    writer.write(item, reply, needs_review(scores, confident, args.threshold, args.margin))

                stats = await run_concurrently(items, classify_one, args.concurrency, "classifying", len(items),
                                               progress=not args.no_progress)
    finally:
        writer.close()
    if stats.failed == 0:
        errors_path.unlink(missing_ok=True)
    LOG.info("classified %d, failed %d in %.1f s: %.1f images/s", stats.done, stats.failed, stats.seconds,
             stats.per_second)
    return stats.done, stats.failed


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output.suffix not in (".csv", ".jsonl"):
        raise SystemExit(f"--output {args.output}: use a .csv or .jsonl file")
    if args.restart:
        args.output.unlink(missing_ok=True)
    check_resumable(args.output, args.top_k)
    items = read_catalog(args.source, args.limit)
    done = {row["product_id"] for row in read_rows(args.output)}
    todo = [item for item in items if item.product_id not in done]
    LOG.info("%d products in %s; %d already in %s; %d to classify", len(items), args.source, len(items) - len(todo),
             args.output, len(todo))
    _, failed = asyncio.run(classify_all(args, todo))
    summary = summarise(read_rows(args.output))
    print_summary(summary)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    if failed:
        LOG.error("%d items failed: see %s", failed, args.output.with_suffix(".errors.jsonl"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
