"""What the catalog CLIs share: catalog sources, the gateway connection, and a concurrent runner with a progress bar.

A catalog SOURCE is one of

* a folder of images, searched recursively: product id = the path relative to
  the folder without its suffix; category = the first sub-folder when the
  images sit in sub-folders (``catalog/<category>/...``), else none;
* a CSV manifest with a header row: ``path`` (relative to the CSV or absolute),
  optional ``product_id``, optional ``category`` (or ``label``); every other
  column becomes product metadata. A header-less ``path,label`` file (the
  training manifest) works too;
* ``fashion-mnist:train`` or ``fashion-mnist:test``, optionally ``:N`` for a
  class-balanced subset of N images (Debian package ``dataset-fashion-mnist``),
  each image encoded as PNG; id ``fashion-mnist-<split>-<index>``, category =
  the class name, attribute ``tone`` = dark / mid / light by the image's mean
  brightness (thirds of the training set), so filtered search has real data.

Manifest columns named ``attr.KEY`` become searchable attributes (several
values separated by ``|``: ``attr.color`` = ``red|blue``).
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import grpc

ATTRIBUTE_PREFIX = "attr."
# Mean-brightness thirds of the Fashion-MNIST training images (33.3rd and 66.7th percentiles: 54.6, 87.3).
TONE_THRESHOLDS = (54.6, 87.3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FASHION_MNIST = "fashion-mnist"
TOKEN_ENV = "SHOPVISION_TOKEN"
T = TypeVar("T")


@dataclass(frozen=True)
class CatalogItem:
    product_id: str
    category: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    data: bytes | None = None
    attributes: tuple[tuple[str, str], ...] = ()

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else self.product_id


def folder_items(root: Path) -> list[CatalogItem]:
    items = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(root)
        category = relative.parts[0] if len(relative.parts) > 1 else ""
        items.append(CatalogItem(relative.with_suffix("").as_posix(), category, {}, path))
    return items


def manifest_items(manifest: Path) -> list[CatalogItem]:
    with open(manifest, newline="") as f:
        rows = [row for row in csv.reader(f) if row and not row[0].lstrip().startswith("#")]
    if not rows:
        return []
    header = [column.strip().lower() for column in rows[0]]
    if "path" in header:
        body = rows[1:]
    else:  # training-style "path,label" without a header
        header, body = ["path", "category"], rows
    items = []
    for number, row in enumerate(body, 2 if body is not rows else 1):
        values = dict(zip(header, (value.strip() for value in row), strict=False))
        if not values.get("path"):
            raise ValueError(f"{manifest} row {number} has no path")
        path = Path(values.pop("path"))
        path = path if path.is_absolute() else manifest.parent / path
        product_id = values.pop("product_id", "") or path.with_suffix("").name
        category = values.pop("category", "") or values.pop("label", "")
        values.pop("label", None)
        attributes = tuple((key.removeprefix(ATTRIBUTE_PREFIX), value.strip())
                           for key in list(values) if key.startswith(ATTRIBUTE_PREFIX)
                           for value in values.pop(key).split("|") if value.strip())
        items.append(CatalogItem(product_id, category, {k: v for k, v in values.items() if k and v}, path,
                                 attributes=attributes))
    return items


def fashion_mnist_items(split: str, count: int) -> list[CatalogItem]:
    import cv2

    from training.data.datasets import FASHION_LABELS, fashion_mnist_raw, stratified_subset

    images, labels = fashion_mnist_raw(split)
    picked = stratified_subset(labels, count, seed=0) if count else range(len(labels))
    items = []
    for i in picked:
        ok, png = cv2.imencode(".png", images[i])
        if not ok:
            raise RuntimeError(f"cannot encode Fashion-MNIST {split} image {i} as PNG")
        mean = float(images[i].mean())
        tone = "dark" if mean < TONE_THRESHOLDS[0] else "mid" if mean < TONE_THRESHOLDS[1] else "light"
        items.append(CatalogItem(f"{FASHION_MNIST}-{split}-{int(i):05d}", FASHION_LABELS[int(labels[i])],
                                 {"source": FASHION_MNIST}, data=png.tobytes(), attributes=(("tone", tone),)))
    return items


def read_catalog(source: str, limit: int = 0) -> list[CatalogItem]:
    """The items of ``source`` (see the module doc), the first ``limit`` only when it is > 0."""
    if source.startswith(FASHION_MNIST):
        parts = source.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("train", "test"):
            raise ValueError(f"{source!r}: use {FASHION_MNIST}:train, {FASHION_MNIST}:test or {FASHION_MNIST}:train:N")
        items = fashion_mnist_items(parts[1], int(parts[2]) if len(parts) == 3 else limit)
    else:
        path = Path(source)
        if path.is_dir():
            items = folder_items(path)
        elif path.is_file():
            items = manifest_items(path)
        else:
            raise FileNotFoundError(f"catalog {source!r} is neither a folder, a CSV manifest nor {FASHION_MNIST}:SPLIT")
    seen: set[str] = set()
    for item in items:
        if item.product_id in seen:
            raise ValueError(f"catalog {source!r} lists product id {item.product_id!r} twice")
        seen.add(item.product_id)
    return items[:limit] if limit > 0 else items


def add_connection_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--gateway", default="127.0.0.1:50051", help="gateway address (default: %(default)s)")
    parser.add_argument("--ca-cert", type=Path, default=None,
                        help="PEM root certificate: connect with TLS (default: plaintext)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                        help=f"bearer token sent as 'authorization: Bearer ...' (default: ${TOKEN_ENV} or none)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in s (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N catalog items; 0 = all (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def open_channel(address: str, ca_cert: Path | None) -> grpc.aio.Channel:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    if ca_cert is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca_cert.read_bytes()), options=options)


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


def record_failure(errors_file: IO[str], item: CatalogItem, error: BaseException) -> None:
    """Append one JSON line naming the item and the gRPC status (or exception) it failed with."""
    message = error.details() if hasattr(error, "details") else str(error)
    code = error.code().name if hasattr(error, "code") else type(error).__name__
    errors_file.write(json.dumps({"product_id": item.product_id, "source": item.source,
                                  "code": code, "error": message}) + "\n")
    errors_file.flush()


async def with_retries(call: Callable[[], Awaitable[T]], retries: int) -> T:
    """``call()``, retried with exponential backoff on transient status codes."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or attempt == retries:
                raise
            await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
    raise AssertionError("unreachable")


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


async def run_concurrently(items: Iterable[CatalogItem], work: Callable[[CatalogItem], Awaitable[None]],
                           concurrency: int, description: str, total: int, progress: bool = True) -> RunStats:
    """Run ``work`` on every item with ``concurrency`` in flight; a failure is counted and does not stop the run."""
    from tqdm import tqdm

    stats = RunStats()
    queue: asyncio.Queue[CatalogItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress, dynamic_ncols=True)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await work(item)
                stats.done += 1
            except Exception:
                stats.failed += 1
                bar.set_postfix(failed=stats.failed)
            bar.update(1)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        stats.seconds = time.perf_counter() - start
        bar.close()
    return stats
