"""Catalog domain logic behind SearchSimilar, IndexProduct, GetProduct, ListProducts and the catalog calls.

Plain arguments in, dataclasses out: the servicer translates protobuf, this module knows nothing of gRPC
(as kserve keeps its data plane apart from the transport). A photo is embedded exactly like a Classify call
(the preprocess service with the model's recipe, then Triton), asking the catalog's model for its
``embedding`` output and top-1 category, always pinned to the version the catalog serves: vectors of two
versions never meet in one search.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    ShopvisionError,
    Unavailable,
    remaining_seconds,
)
from services.gateway import metrics
from services.gateway.catalog.filters import AttributeLimits, normalise_attributes, parse_filter
from services.gateway.catalog.store import (
    DEFAULT_CATALOG,
    CatalogRow,
    CatalogStore,
    Hit,
    NewProduct,
    ProductRow,
    StaleVersion,
    database_errors,
    decode_page_token,
    encode_page_token,
)
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.triton import Model, TritonBackend
from services.gateway.uploads import check_upload

LOG = logging.getLogger(__name__)

DEFAULT_K = 10
PREDICTED_CATEGORY = "@predicted"
CATEGORY_KEY = "category"
MAX_ID_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024
CATALOG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class CatalogSettings:
    default_model: str
    max_k: int = 100
    # Cosine similarity at or above which IndexProduct reports another product as a near-duplicate.
    duplicate_threshold: float = 0.97
    duplicate_candidates: int = 5
    limits: AttributeLimits = AttributeLimits()
    max_image_bytes: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class Embedded:
    vector: np.ndarray  # L2-normalised float32
    label: str
    model_version: str


@dataclass(frozen=True)
class IndexItem:
    product_id: str
    image: bytes
    catalog: str = ""
    metadata: Mapping[str, str] | None = None
    attributes: Sequence[tuple[str, str]] = ()
    category: str = ""
    model: str = ""


@dataclass
class _Prepared:
    """One validated item of an index call, with its catalog, pixels and embeddings by model version."""

    item: IndexItem
    product_id: str
    metadata: dict[str, str]
    attributes: dict[str, list[str]]
    catalog: CatalogRow
    model: Model
    pixels: np.ndarray
    embedded: dict[str, Embedded]
    request_id: str

    def category(self, serving_version: str) -> str:
        """The category stored: the caller's, else metadata's "category", else the serving model's top-1."""
        return (self.item.category.strip() or self.metadata.get(CATEGORY_KEY, "").strip()
                or self.embedded[serving_version].label)


@dataclass(frozen=True)
class Indexed:
    catalog: str
    model: str
    model_version: str
    label: str
    replaced: bool
    catalog_size: int
    near_duplicates: list[Hit]


@dataclass(frozen=True)
class SearchResult:
    catalog: str
    model: str
    model_version: str
    hits: list[Hit]


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise Unavailable("the model returned an embedding of norm 0 or not finite", reason="bad_embedding")
    return vector / norm


def catalog_name(name: str) -> str:
    name = name or DEFAULT_CATALOG
    if not CATALOG_NAME.fullmatch(name):
        raise InvalidInput(f"catalog {name[:140]!r} is not a valid name: 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit", reason="bad_catalog")
    return name


def validate_product_id(product_id: str) -> str:
    if not product_id:
        raise InvalidInput("product_id is empty", reason="bad_product_id")
    if len(product_id) > MAX_ID_CHARS or not product_id.isprintable():
        raise InvalidInput(f"product_id must be at most {MAX_ID_CHARS} printable characters", reason="bad_product_id")
    return product_id


def validate_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata is {size:,} bytes; the limit is {MAX_METADATA_BYTES:,}", reason="bad_metadata")
    if any(not key for key in metadata):
        raise InvalidInput("metadata has an empty key", reason="bad_metadata")
    return dict(metadata)


class Embedder:
    """Photo → L2-normalised embedding of a model version, through the preprocess service and Triton."""

    def __init__(self, preprocess: PreprocessClient, triton: TritonBackend) -> None:
        self._preprocess = preprocess
        self._triton = triton

    async def model(self, name: str) -> Model:
        model = await self._triton.find_model(name)
        if model is None:
            available = ", ".join(sorted(self._triton.models)) or "none ready"
            raise InvalidInput(f"unknown embedding model {name!r}; available models: {available}",
                               reason="unknown_model")
        return model

    async def pixels(self, model: Model, image: bytes, deadline: float, request_id: str) -> np.ndarray:
        """The photo through the preprocess service with the model's recipe (callers check the upload first)."""
        hop = time.perf_counter()
        pixels, _ = await self._preprocess.preprocess(image, model.spec, remaining_seconds(deadline), request_id)
        metrics.HOP_SECONDS.labels("preprocess").observe(time.perf_counter() - hop)
        return pixels

    async def embed_pixels(self, model: Model, pixels: np.ndarray, version: str, deadline: float,
                           request_id: str) -> Embedded:
        hop = time.perf_counter()
        embedding = await self._triton.embed(model, pixels, remaining_seconds(deadline), request_id, version)
        metrics.HOP_SECONDS.labels("triton").observe(time.perf_counter() - hop)
        if version and embedding.model_version != version:
            raise Unavailable(f"Triton answered with {model.name} version {embedding.model_version}, "
                              f"not the catalog's version {version}", reason="version_mismatch")
        return Embedded(l2_normalise(embedding.vector), embedding.label, embedding.model_version)


class CatalogService:
    def __init__(self, store: CatalogStore, embedder: Embedder, settings: CatalogSettings) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings

    async def close(self) -> None:
        await self.store.close()

    # -- catalogs ------------------------------------------------------------------------------------------------
    async def _existing(self, name: str, counts: bool = False) -> CatalogRow:
        name = catalog_name(name)
        async with database_errors("reading the catalog"):
            catalog = await self.store.get_catalog(name, counts)
            if catalog is None:
                names = [c.name for c in await self.store.list_catalogs()]
        if catalog is None:
            raise NotFound(f"catalog {name!r} does not exist; catalogs: {', '.join(names) or 'none yet'}",
                           reason="unknown_catalog")
        return catalog

    async def create_catalog(self, name: str, model: str, must_be_new: bool = True) -> CatalogRow:
        name = catalog_name(name)
        model_name = model or self.settings.default_model
        await self.embedder.model(model_name)  # an unknown model is refused before anything is written
        async with database_errors("creating the catalog"):
            catalog, created = await self.store.create_catalog(name, model_name)
        if not created and must_be_new:
            raise AlreadyExists(f"catalog {name!r} exists already (model {catalog.model})", reason="catalog_exists")
        return catalog

    async def list_catalogs(self) -> list[CatalogRow]:
        async with database_errors("listing catalogs"):
            return await self.store.list_catalogs()

    async def _catalog_for_write(self, name: str, model: str) -> CatalogRow:
        name = catalog_name(name)
        async with database_errors("reading the catalog"):
            catalog = await self.store.get_catalog(name)
        if catalog is None:
            return await self.create_catalog(name, model, must_be_new=False)
        if model and model != catalog.model:
            raise InvalidInput(f"catalog {name!r} is embedded with model {catalog.model!r}; leave model empty or "
                               f"create another catalog for {model!r}", reason="catalog_model")
        return catalog

    # -- writes --------------------------------------------------------------------------------------------------
    async def index(self, item: IndexItem, deadline: float, request_id: str) -> Indexed:
        result = (await self._index_many([item], deadline, [request_id]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def index_batch(self, items: Sequence[IndexItem], deadline: float,
                          request_id: str) -> list[Indexed | ShopvisionError]:
        """Each item succeeds or fails on its own; the same product twice in one batch fails the whole call.
        The items of one catalog are written in one transaction."""
        seen: dict[tuple[str, str], int] = {}
        for position, item in enumerate(items):
            key = (item.catalog or DEFAULT_CATALOG, item.product_id)
            if key in seen:
                raise InvalidInput(f"product_id {item.product_id!r} of catalog {key[0]!r} appears twice in one "
                                   f"batch (items {seen[key]} and {position})", reason="duplicate_in_batch")
            seen[key] = position
        return await self._index_many(items, deadline, [f"{request_id}-{i}" for i in range(len(items))])

    async def _index_many(self, items: Sequence[IndexItem], deadline: float,
                          item_ids: list[str]) -> list[Indexed | ShopvisionError]:
        prepared = await asyncio.gather(*(self._prepare(item, deadline, rid) for item, rid in zip(
            items, item_ids, strict=True)), return_exceptions=True)
        out: list[Indexed | ShopvisionError | None] = [None] * len(items)
        groups: dict[str, list[tuple[int, _Prepared]]] = {}
        for position, ready in enumerate(prepared):
            if isinstance(ready, BaseException):
                if not isinstance(ready, ShopvisionError):
                    raise ready
                out[position] = ready
            else:
                groups.setdefault(ready.catalog.name, []).append((position, ready))
        for group in groups.values():
            written: list[Indexed | ShopvisionError]
            try:
                written = list(await self._write_group([ready for _, ready in group], deadline))
            except ShopvisionError as error:  # the group's transaction failed: none of its items was written
                written = [error] * len(group)
            for (position, _), result in zip(group, written, strict=True):
                out[position] = result
        return [result for result in out if result is not None]

    async def _prepare(self, item: IndexItem, deadline: float, request_id: str) -> _Prepared:
        """Validate one item, find (or create) its catalog and embed it with every version the catalog needs."""
        product_id = validate_product_id(item.product_id)
        metadata = validate_metadata(item.metadata or {})
        attributes = normalise_attributes(item.attributes, self.settings.limits)
        check_upload(item.image, self.settings.max_image_bytes)
        catalog = await self._catalog_for_write(item.catalog, item.model)
        model = await self.embedder.model(catalog.model)
        ready = _Prepared(item, product_id, metadata, attributes, catalog, model,
                          await self.embedder.pixels(model, item.image, deadline, request_id), {}, request_id)
        if not catalog.model_version:  # the catalog's first product binds the version it serves
            first = await self.embedder.embed_pixels(model, ready.pixels, "", deadline, request_id)
            ready.embedded[first.model_version] = first
            async with database_errors("binding the catalog's model version"):
                ready.catalog = await self.store.bind_version(catalog, first.model_version, first.vector.shape[0])
        await self._embed_versions(ready, ready.catalog, deadline)
        return ready

    async def _embed_versions(self, ready: _Prepared, catalog: CatalogRow, deadline: float) -> None:
        for version in (catalog.model_version, catalog.reembed_version):
            if version and version not in ready.embedded:
                ready.embedded[version] = await self.embedder.embed_pixels(ready.model, ready.pixels, version,
                                                                           deadline, ready.request_id)

    async def _write_group(self, group: list[_Prepared], deadline: float) -> list[Indexed]:
        """Write products of one catalog in one transaction, embedding again if the catalog switched versions."""
        catalog = group[0].catalog
        for _ in range(WRITE_ATTEMPTS):
            products = [NewProduct(ready.product_id, ready.category(catalog.model_version), ready.metadata,
                                   ready.attributes, ready.item.image,
                                   {version: e.vector for version, e in ready.embedded.items()}) for ready in group]
            try:
                hop = time.perf_counter()
                async with database_errors("writing products"):
                    written = await self.store.put_many(catalog, products, self.settings.duplicate_candidates)
                metrics.HOP_SECONDS.labels("index").observe(time.perf_counter() - hop)
            except StaleVersion as stale:
                catalog = stale.catalog
                await asyncio.gather(*(self._embed_versions(ready, catalog, deadline) for ready in group))
                continue
            results = []
            for product, result in zip(products, written, strict=True):
                duplicates = [hit for hit in result.duplicates if hit.score >= self.settings.duplicate_threshold]
                LOG.info("indexed", extra={"fields": {
                    "catalog": catalog.name, "product_id": product.product_id, "label": product.category,
                    "replaced": result.replaced, "model_version": catalog.model_version,
                    "near_duplicates": len(duplicates), "batch": len(group)}})
                results.append(Indexed(catalog.name, catalog.model, catalog.model_version, product.category,
                                       result.replaced, result.catalog_size, duplicates))
            return results
        raise Unavailable(f"catalog {catalog.name!r} kept switching model versions; try again",
                          reason="catalog_busy")

    async def delete(self, catalog: str, product_id: str) -> int:
        product_id = validate_product_id(product_id)
        row = await self._existing(catalog)
        async with database_errors("deleting the product"):
            size = await self.store.delete(row, product_id)
        LOG.info("deleted", extra={"fields": {"catalog": row.name, "product_id": product_id}})
        return size

    # -- reads ---------------------------------------------------------------------------------------------------
    async def search(self, catalog: str, image: bytes, k: int, category: str, filter_text: str, deadline: float,
                     request_id: str) -> SearchResult:
        k = k or DEFAULT_K
        if k > self.settings.max_k:
            raise InvalidInput(f"k={k}; the limit is {self.settings.max_k}", reason="bad_k")
        where = parse_filter(filter_text, self.settings.limits)
        check_upload(image, self.settings.max_image_bytes)
        row = await self._existing(catalog)
        model = await self.embedder.model(row.model)
        pixels = await self.embedder.pixels(model, image, deadline, request_id)
        if not row.model_version:  # an empty catalog: nothing to compare with
            return SearchResult(row.name, row.model, "", [])
        query = await self.embedder.embed_pixels(model, pixels, row.model_version, deadline, request_id)
        wanted = query.label if category == PREDICTED_CATEGORY else category
        hop = time.perf_counter()
        async with database_errors("searching"):
            hits = await self.store.search(row, row.model_version, query.vector, k, wanted, where)
        metrics.HOP_SECONDS.labels("index").observe(time.perf_counter() - hop)
        LOG.info("searched", extra={"fields": {
            "catalog": row.name, "k": k, "category": wanted, "filter": bool(where), "matches": len(hits),
            "top_score": round(hits[0].score, 4) if hits else None}})
        return SearchResult(row.name, row.model, row.model_version, hits)

    async def get(self, catalog: str, product_id: str) -> ProductRow:
        row = await self._existing(catalog)
        async with database_errors("reading the product"):
            return await self.store.get_product(row, validate_product_id(product_id))

    async def list_products(self, catalog: str, page_size: int, page_token: str) -> tuple[list[ProductRow], str]:
        if page_size > MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size={page_size}; the limit is {MAX_PAGE_SIZE}", reason="bad_page_size")
        row = await self._existing(catalog)
        after = decode_page_token(page_token, row.name) if page_token else ""
        async with database_errors("listing products"):
            products, more = await self.store.list_products(row, after, page_size or DEFAULT_PAGE_SIZE)
        next_token = encode_page_token(row.name, products[-1].product_id) if more and products else ""
        return products, next_token


def attribute_pairs(attributes: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """The stored key -> values form as (key, value) pairs, in key order."""
    return [(key, value) for key in sorted(attributes) for value in attributes[key]]
