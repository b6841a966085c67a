"""Move a catalog to another version of its embedding model, from the stored reference images, without downtime.

    python -m tools.reembed --catalog fashion [--version 5] [--concurrency 8]
    python -m tools.reembed --catalog fashion --cancel

1. Marks the target version (default: the newest READY version of the catalog's embedding model in Triton) as
   being filled in; from then on every IndexProduct writes both versions.
2. Embeds every product that lacks the target version from its stored image (no re-upload), with bounded
   concurrency and a progress bar, while searches are still answered from the serving version.
3. Switches the catalog in one transaction once every product has the target version (products written
   meanwhile are caught up first), then, after ``--grace`` seconds, deletes the old version's vectors.

Resumable: the progress lives in the database, so running the same command again carries on where a stopped
run left off. Talks to PostgreSQL, the preprocess service and Triton directly (the gateway's own client code),
so the gateways keep serving untouched. Both versions must be loaded in Triton meanwhile: the classifier
configs keep two versions (``version_policy: latest 2``).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import numpy as np

from services.common.config import env_str
from services.gateway.catalog.service import Embedder, catalog_name
from services.gateway.catalog.store import CatalogRow, CatalogStore, database_errors
from services.gateway.config import DEFAULT_DATABASE_URL
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.triton import TritonBackend

LOG = logging.getLogger("reembed")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="default", help="catalog to move (default: %(default)s)")
    parser.add_argument("--version", default="",
                        help="target version of the catalog's embedding model (default: the newest READY one)")
    parser.add_argument("--database-url", default=env_str("GATEWAY_CATALOG_DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="catalog database (default: $GATEWAY_CATALOG_DATABASE_URL or the one make run starts)")
    parser.add_argument("--triton", default=env_str("GATEWAY_TRITON_ADDRESS", "127.0.0.1:8001"),
                        help="Triton gRPC address (default: $GATEWAY_TRITON_ADDRESS or %(default)s)")
    parser.add_argument("--preprocess", default=env_str("GATEWAY_PREPROCESS_ADDRESS", "127.0.0.1:50052"),
                        help="preprocess service address (default: $GATEWAY_PREPROCESS_ADDRESS or %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="images in flight (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="products read and committed per round (default: %(default)s)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds between the switch and deleting the old vectors, so searches embedded just "
                             "before the switch still find their version (default: %(default)s)")
    parser.add_argument("--keep-old", action="store_true", help="keep the old version's vectors after the switch")
    parser.add_argument("--cancel", action="store_true",
                        help="stop a re-embedding under way: forget the target version and its vectors")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-image deadline in s (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


async def target_version(triton: TritonBackend, embedder: Embedder, catalog: CatalogRow, wanted: str) -> str:
    """``wanted``, checked READY, or the newest READY version of the catalog's embedding model."""
    model = await embedder.model(catalog.model)
    if model.embedding_source is None:
        raise SystemExit(f"model {catalog.model} has no embedding step")
    ready = await triton.ready_versions(model.embedding_source.model)
    if wanted:
        if wanted not in ready:
            raise SystemExit(f"{model.embedding_source.model} version {wanted} is not READY in Triton "
                             f"(READY: {', '.join(ready) or 'none'}); load it first (training.publish)")
        return wanted
    if not ready:
        raise SystemExit(f"no version of {model.embedding_source.model} is READY in Triton")
    return max(ready, key=lambda v: int(v) if v.isdigit() else -1)


async def fill(store: CatalogStore, embedder: Embedder, catalog: CatalogRow, version: str,
               args: argparse.Namespace) -> int:
    """Embed every product that lacks ``version``; returns how many were written."""
    from tqdm import tqdm

    model = await embedder.model(catalog.model)
    todo = max(0, catalog.product_count - catalog.reembedded_count)
    bar = tqdm(total=todo, desc=f"re-embedding {catalog.name} into v{version}", unit="img",
               disable=args.no_progress, dynamic_ncols=True)
    gate = asyncio.Semaphore(max(1, args.concurrency))
    written = 0

    async def one(product_id: str, digest: bytes) -> tuple[str, bytes, object]:
        async with gate:
            image = await store.image(digest)
            deadline = time.monotonic() + args.timeout
            pixels = await embedder.pixels(model, image, deadline, f"reembed-{product_id}")
            embedded = await embedder.embed_pixels(model, pixels, version, deadline, f"reembed-{product_id}")
            return product_id, digest, embedded.vector

    try:
        while True:
            async with database_errors("reading products to re-embed"):
                batch = await store.missing(catalog, version, args.chunk)
            if not batch:
                return written
            rows = await asyncio.gather(*(one(pid, digest) for pid, digest, _ in batch))
            async with database_errors("writing embeddings"):
                written += await store.add_embeddings(catalog, version, rows)  # type: ignore[arg-type]
            bar.update(len(rows))
    finally:
        bar.close()


async def run(args: argparse.Namespace) -> int:
    name = catalog_name(args.catalog)
    store = CatalogStore(args.database_url)
    await store.pool.open(wait=True, timeout=30)
    preprocess = PreprocessClient(args.preprocess, max_message_bytes=64 * 1024 * 1024)
    triton = TritonBackend(args.triton)
    embedder = Embedder(preprocess, triton)
    try:
        await triton.refresh()
        catalog = await store.get_catalog(name, counts=True)
        if catalog is None:
            raise SystemExit(f"catalog {name!r} does not exist")
        if args.cancel:
            if not catalog.reembed_version:
                LOG.info("catalog %s is not re-embedding: nothing to cancel", name)
                return 0
            await store.cancel_reembed(catalog)
            LOG.info("cancelled re-embedding of %s into version %s", name, catalog.reembed_version)
            return 0
        if not catalog.model_version:
            LOG.info("catalog %s is empty: its first product will bind the version", name)
            return 0
        version = catalog.reembed_version or await target_version(triton, embedder, catalog, args.version)
        if args.version and catalog.reembed_version and catalog.reembed_version != args.version:
            raise SystemExit(f"catalog {name} is re-embedding into version {catalog.reembed_version}; finish or "
                             "--cancel that first")
        if version == catalog.model_version:
            LOG.info("catalog %s already serves %s version %s: nothing to do", name, catalog.model, version)
            return 0
        old_version, old_dim = catalog.model_version, catalog.dim
        start = time.perf_counter()
        if catalog.reembed_version != version:
            model = await embedder.model(catalog.model)
            blank = np.zeros((model.spec.height, model.spec.width, model.spec.channels), dtype=np.uint8)
            probe = await triton.embed(model, blank, 30.0, "reembed-probe", version)  # only its dimension matters
            catalog = await store.begin_reembed(catalog, version, int(probe.vector.shape[0]))
            LOG.info("catalog %s: filling in %s version %s beside the serving version %s (%d products)",
                     name, catalog.model, version, old_version, catalog.product_count)
        else:
            LOG.info("catalog %s: resuming re-embedding into version %s (%d of %d products done)",
                     name, version, catalog.reembedded_count, catalog.product_count)
        written = 0
        for _ in range(10):  # products indexed during a round get caught up by the next one
            written += await fill(store, embedder, catalog, version, args)
            try:
                catalog = await store.switch_version(catalog, version)
                break
            except RuntimeError as error:
                LOG.info("%s; another round", error)
                catalog = await store.get_catalog(name, counts=True) or catalog
        else:
            raise SystemExit(f"catalog {name}: products keep arriving without version {version}; run again")
        seconds = time.perf_counter() - start
        LOG.info("catalog %s now serves %s version %s: %d products, %d embedded by this run in %.1f s (%.1f img/s)",
                 name, catalog.model, version, catalog.product_count, written, seconds,
                 written / seconds if seconds else 0.0)
        if not args.keep_old and old_dim is not None:
            await asyncio.sleep(args.grace)
            dropped = await store.drop_version(catalog, old_version, old_dim)
            LOG.info("deleted %d vectors of the old version %s", dropped, old_version)
        return 0
    finally:
        await preprocess.close()
        await triton.close()
        await store.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
