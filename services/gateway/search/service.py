"""Similar-product search behind the gateway's SearchSimilar, IndexProduct and DeleteProduct RPCs.

A photo is embedded exactly like a Classify call (preprocess service with the
model's recipe, then Triton), asking the search model for its ``embedding``
output and top-1 category in one inference. Once the index holds products,
every embedding is requested from the model version the index was built with,
so queries and catalog always share one embedding space.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
from shopvision.v1 import recognition_pb2

from services.common.errors import InvalidInput, NotFound, Unavailable, remaining_seconds
from services.gateway import metrics
from services.gateway.config import SearchConfig
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.search.index import IndexParams, Product, l2_normalise
from services.gateway.search.store import BindingMismatch, PersistentIndex
from services.gateway.triton import Embedding, Model, TritonBackend

LOG = logging.getLogger(__name__)

DEFAULT_K = 10
PREDICTED_CATEGORY = "@predicted"
CATEGORY_KEY = "category"
MAX_ID_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024


def validate_product_id(product_id: str) -> str:
    if not product_id:
        raise InvalidInput("product_id is empty", reason="bad_product_id")
    if len(product_id) > MAX_ID_CHARS or not product_id.isprintable():
        raise InvalidInput(f"product_id must be at most {MAX_ID_CHARS} printable characters", reason="bad_product_id")
    return product_id


def validate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata is {size:,} bytes; the limit is {MAX_METADATA_BYTES:,}", reason="bad_metadata")
    if any(not key for key in metadata):
        raise InvalidInput("metadata has an empty key", reason="bad_metadata")
    return metadata


class SimilarSearch:
    """Embeds photos through the serving path and keeps the catalog in a :class:`PersistentIndex`."""

    def __init__(self, config: SearchConfig, model: str, store: PersistentIndex, preprocess: PreprocessClient,
                 triton: TritonBackend, max_image_bytes: int) -> None:
        self._config = config
        self.model = model
        self.store = store
        self._preprocess = preprocess
        self._triton = triton
        self._max_image_bytes = max_image_bytes
        self._snapshot_task: asyncio.Task | None = None
        metrics.SEARCH_PRODUCTS.set(len(store))

    @classmethod
    def open(cls, config: SearchConfig, default_model: str, preprocess: PreprocessClient, triton: TritonBackend,
             max_image_bytes: int) -> SimilarSearch:
        """Load the index (``SearchIndexError`` when it cannot be used as it is)."""
        model = config.model or default_model
        params = IndexParams(dim=1, dtype=config.precision, expansion_search=config.ef,
                             exact_below=config.exact_below)
        directory = Path(config.directory) if config.directory else None
        if directory is None:
            LOG.warning("GATEWAY_SEARCH_DIR is not set: the search index lives in memory and is lost at shutdown")
        store = PersistentIndex.open(directory, model, params, config.snapshot_writes, config.model_version)
        return cls(config, model, store, preprocess, triton, max_image_bytes)

    async def close(self) -> None:
        if self._snapshot_task is not None:
            await self._snapshot_task
        await asyncio.to_thread(self.store.close)

    # -- embedding -----------------------------------------------------------------------------------------------
    async def _search_model(self) -> Model:
        model = self._triton.models.get(self.model)
        if model is None:
            await self._triton.refresh_if_older(1.0)
            model = self._triton.models.get(self.model)
        if model is None:
            raise Unavailable(f"search model {self.model!r} is not ready in Triton", reason="search_model")
        return model

    async def _embed(self, image: bytes, deadline: float, request_id: str) -> tuple[np.ndarray, Embedding]:
        size = len(image)
        metrics.REQUEST_BYTES.observe(size)
        if size == 0:
            raise InvalidInput("image is empty: send the bytes of a JPEG, PNG, WebP or BMP file", reason="empty")
        if size > self._max_image_bytes:
            raise InvalidInput(f"image is {size:,} bytes; the limit is {self._max_image_bytes:,}", reason="too_large")
        model = await self._search_model()
        hop = time.perf_counter()
        pixels, _ = await self._preprocess.preprocess(image, model.spec, remaining_seconds(deadline), request_id)
        metrics.HOP_SECONDS.labels("preprocess").observe(time.perf_counter() - hop)
        binding = self.store.binding
        version = binding.model_version if binding else self._config.model_version
        hop = time.perf_counter()
        embedding = await self._triton.embed(model, pixels, remaining_seconds(deadline), request_id, version)
        metrics.HOP_SECONDS.labels("triton").observe(time.perf_counter() - hop)
        try:
            self.store.check_embedding(embedding.model_version, int(embedding.vector.shape[0]))
        except BindingMismatch as error:
            raise Unavailable(str(error), reason="index_model_mismatch") from None
        return l2_normalise(embedding.vector), embedding

    # -- RPC bodies ----------------------------------------------------------------------------------------------
    async def search(self, request: recognition_pb2.SearchSimilarRequest, deadline: float,
                     request_id: str) -> recognition_pb2.SearchSimilarResponse:
        k = request.k or DEFAULT_K
        if k > self._config.max_k:
            raise InvalidInput(f"k={k}; the limit is {self._config.max_k}", reason="bad_k")
        vector, embedding = await self._embed(request.image, deadline, request_id)
        category = embedding.label if request.category == PREDICTED_CATEGORY else request.category
        hop = time.perf_counter()
        hits = await asyncio.to_thread(self.store.search, vector, k, category)
        metrics.HOP_SECONDS.labels("index").observe(time.perf_counter() - hop)
        LOG.info("searched", extra={"fields": {
            "k": k, "category": category, "matches": len(hits), "top_score": round(hits[0].score, 4) if hits else None,
            "catalog": len(self.store)}})
        return recognition_pb2.SearchSimilarResponse(matches=[
            recognition_pb2.Match(product_id=hit.product.product_id, score=hit.score, label=hit.product.label,
                                  metadata=dict(hit.product.metadata)) for hit in hits])

    async def index_product(self, request: recognition_pb2.IndexProductRequest, deadline: float,
                            request_id: str) -> recognition_pb2.IndexProductResponse:
        product_id = validate_product_id(request.product_id)
        metadata = validate_metadata(dict(request.metadata))
        vector, embedding = await self._embed(request.image, deadline, request_id)
        label = metadata.get(CATEGORY_KEY, "").strip() or embedding.label
        product = Product(product_id, label, metadata)
        try:
            replaced = await asyncio.to_thread(self.store.put, product, vector, embedding.model_version)
        except BindingMismatch as error:  # the index was bound by a concurrent first write
            raise Unavailable(str(error), reason="index_model_mismatch") from None
        except OSError as error:
            raise Unavailable(f"the search index cannot be written: {error}", reason="index_io") from None
        self._after_write()
        LOG.info("indexed", extra={"fields": {"product_id": product_id, "label": label, "replaced": replaced,
                                              "model_version": embedding.model_version}})
        return recognition_pb2.IndexProductResponse(replaced=replaced, label=label,
                                                    model_version=embedding.model_version,
                                                    catalog_size=len(self.store))

    async def delete(self, request: recognition_pb2.DeleteProductRequest) -> recognition_pb2.DeleteProductResponse:
        product_id = validate_product_id(request.product_id)
        try:
            await asyncio.to_thread(self.store.delete, product_id)
        except KeyError:
            raise NotFound(f"product {product_id!r} is not in the search catalog", reason="unknown_product") from None
        except OSError as error:
            raise Unavailable(f"the search index cannot be written: {error}", reason="index_io") from None
        self._after_write()
        LOG.info("deleted", extra={"fields": {"product_id": product_id}})
        return recognition_pb2.DeleteProductResponse(catalog_size=len(self.store))

    def _after_write(self) -> None:
        metrics.SEARCH_PRODUCTS.set(len(self.store))
        if self.store.snapshot_due and (self._snapshot_task is None or self._snapshot_task.done()):
            self._snapshot_task = asyncio.create_task(self._snapshot())

    async def _snapshot(self) -> None:
        try:
            await asyncio.to_thread(self.store.snapshot)
        except Exception:  # the WAL still holds every write: the next snapshot or a restart recovers
            LOG.exception("search index snapshot failed")
