"""Index a product catalog for similar-product search through the running gateway (one IndexProduct per image).

    python -m tools.index_catalog SOURCE [--catalog NAME] [--model MODEL] [--gateway 127.0.0.1:50051]

Products go in IndexProductBatch calls of ``--batch-size`` (one transaction each
on the gateway), ``--concurrency`` calls in flight. SOURCE is a folder of images,
a CSV manifest or fashion-mnist:SPLIT[:N] (see
tools/catalog.py). A folder's sub-folder or the manifest's ``category`` column
becomes the product's category; without one the model's prediction is stored.

Resumable: each indexed product id is appended to the state file, and a rerun
skips the ids listed there (``--restart`` forgets them). Failures go to
``<state>.errors.jsonl``; the command exits 1 when any item failed.

The catalog (default ``default``) is created on first use, bound to ``--model``
(default: the gateway's GATEWAY_SEARCH_MODEL; ``fashion_effnet`` for a
fashion-mnist source, whose fine-tuned embedding finds look-alikes far better
than the ImageNet one). Every gateway replica serves the same catalog from
PostgreSQL. After a new version of the catalog's model is published, move the
catalog to it with ``python -m tools.reembed --catalog NAME`` (no re-upload).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path

import grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from tools.catalog import (
    FASHION_MNIST,
    CatalogItem,
    RunStats,
    add_connection_arguments,
    call_metadata,
    open_channel,
    read_catalog,
    record_failure,
    with_retries,
)

LOG = logging.getLogger("index_catalog")
STATE_DIR = Path(".cache") / "index_catalog"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder, CSV manifest, or fashion-mnist:train[:N] / test[:N]")
    add_connection_arguments(parser)
    parser.add_argument("--state", type=Path, default=None,
                        help=f"resume file of indexed ids (default: {STATE_DIR}/<source>@<gateway>#<catalog>.jsonl)")
    parser.add_argument("--restart", action="store_true", help="forget the resume file and index everything")
    parser.add_argument("--catalog", default="default", help="catalog to index into (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="embedding model of a catalog this run creates (default: fashion_effnet for a "
                             "fashion-mnist source, else the gateway's GATEWAY_SEARCH_MODEL)")
    # Batches in flight: 3 x 16 images keeps Triton's batcher fed and stays under the gateway's default
    # GATEWAY_MAX_IN_FLIGHT of 64 (above it a call is refused with RESOURCE_EXHAUSTED).
    parser.set_defaults(concurrency=3)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="products per IndexProductBatch call, written in one transaction (default: %(default)s)")
    parser.add_argument("--predict-category", action="store_true",
                        help="do not send the catalog's category: store the model's prediction instead")
    return parser


def default_state(source: str, gateway: str, catalog: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{source.rstrip('/')}@{gateway}#{catalog}").strip("_")
    return STATE_DIR / f"{slug}.jsonl"


def default_model(source: str) -> str:
    """``fashion_effnet`` for Fashion-MNIST sources, else empty (the gateway's GATEWAY_SEARCH_MODEL)."""
    return "fashion_effnet" if source.startswith(FASHION_MNIST) else ""


def read_done(state: Path) -> set[str]:
    if not state.exists():
        return set()
    done = set()
    for line in state.read_text().splitlines():
        try:
            done.add(json.loads(line)["product_id"])
        except (ValueError, KeyError):
            continue  # a line torn by an interrupted run: that product is indexed again
    return done


def index_request(item: CatalogItem, args: argparse.Namespace, model: str) -> recognition_pb2.IndexProductRequest:
    product_metadata = dict(item.metadata)
    if item.category and not args.predict_category:
        product_metadata["category"] = item.category
    return recognition_pb2.IndexProductRequest(
        product_id=item.product_id, image=item.read(), metadata=product_metadata, catalog=args.catalog, model=model,
        attributes=[recognition_pb2.Attribute(key=k, value=v) for k, v in item.attributes])


async def index_all(args: argparse.Namespace, items: list[CatalogItem], state: Path) -> tuple[RunStats, int]:
    """IndexProductBatch calls of ``--batch-size`` items, ``--concurrency`` calls in flight; each item that fails
    (in its batch, or with its whole batch) is recorded, the others are appended to the resume file."""
    from tqdm import tqdm

    state.parent.mkdir(parents=True, exist_ok=True)
    errors_path = state.with_suffix(".errors.jsonl")
    metadata = call_metadata(args.token)
    model = default_model(args.source) if args.model is None else args.model
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), max(1, args.batch_size))]
    stats = RunStats()
    catalog_size = 0
    bar = tqdm(total=len(items), desc="indexing", unit="img", disable=args.no_progress, dynamic_ncols=True)
    async with open_channel(args.gateway, args.ca_cert) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        with open(state, "a") as done_file, open(errors_path, "w") as errors_file:
            queue: asyncio.Queue[list[CatalogItem]] = asyncio.Queue()
            for batch in batches:
                queue.put_nowait(batch)

            async def send(batch: list[CatalogItem]) -> None:
                nonlocal catalog_size
                request = recognition_pb2.IndexProductBatchRequest(
                    requests=[index_request(item, args, model) for item in batch])
                try:
                    reply = await with_retries(lambda: stub.IndexProductBatch(
                        request, timeout=args.timeout, metadata=metadata), args.retries)
                except Exception as error:  # the whole batch failed (e.g. the gateway stayed down)
                    for item in batch:
                        record_failure(errors_file, item, error)
                    stats.failed += len(batch)
                    return
                for item, answer in zip(batch, reply.items, strict=True):
                    if answer.WhichOneof("result") == "error":
                        record_failure(errors_file, item, ItemFailure(answer.error.code, answer.error.message))
                        stats.failed += 1
                        continue
                    done = answer.response
                    catalog_size = max(catalog_size, done.catalog_size)
                    done_file.write(json.dumps({
                        "product_id": item.product_id, "label": done.label, "replaced": done.replaced,
                        "catalog": done.catalog, "near_duplicates": [d.product_id for d in done.near_duplicates],
                        "model_version": done.model_version}) + "\n")
                    stats.done += 1
                done_file.flush()

            async def worker() -> None:
                while not queue.empty():
                    batch = queue.get_nowait()
                    await send(batch)
                    bar.update(len(batch))
                    if stats.failed:
                        bar.set_postfix(failed=stats.failed)

            start = time.perf_counter()
            try:
                await asyncio.gather(*(worker() for _ in range(max(1, args.concurrency))))
            finally:
                stats.seconds = time.perf_counter() - start
                bar.close()
    if stats.failed == 0:
        errors_path.unlink(missing_ok=True)
    return stats, catalog_size


class ItemFailure(Exception):
    """One item's error inside an IndexProductBatch reply, shaped like a gRPC error for record_failure."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return next((c for c in grpc.StatusCode if c.value[0] == self._code), grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return self._message


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    items = read_catalog(args.source, args.limit)
    state = args.state or default_state(args.source, args.gateway, args.catalog)
    if args.restart:
        state.unlink(missing_ok=True)
    done = read_done(state)
    todo = [item for item in items if item.product_id not in done]
    LOG.info("%d products in %s; %d already indexed (resume file %s); %d to index",
             len(items), args.source, len(items) - len(todo), state, len(todo))
    stats, catalog_size = asyncio.run(index_all(args, todo, state))
    LOG.info("indexed %d, failed %d in %.1f s: %.1f images/s; catalog %s holds %s products",
             stats.done, stats.failed, stats.seconds, stats.per_second, args.catalog, catalog_size or "?")
    if stats.failed:
        LOG.error("%d items failed: see %s", stats.failed, state.with_suffix(".errors.jsonl"))
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
