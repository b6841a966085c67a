"""The public ``shopvision.v1.ProductRecognition`` servicer. Thin: validation, then preprocess → Triton."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime
from typing import cast

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from shopvision.v1 import preprocess_pb2, recognition_pb2, recognition_pb2_grpc

from services.common.errors import InvalidInput, ShopvisionError, Unavailable, remaining_seconds
from services.common.logging import request_id_var
from services.common.tracing import set_span_attributes
from services.gateway import metrics
from services.gateway.catalog.service import CatalogService, Indexed, IndexItem, attribute_pairs
from services.gateway.catalog.store import CatalogRow, Hit, ProductRow
from services.gateway.concurrency import AdmissionGate
from services.gateway.config import GatewayConfig
from services.gateway.drift import DriftMonitor
from services.gateway.feedback import FeedbackItem, FeedbackService
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.rollout import Calibration
from services.gateway.routing import Route, Router
from services.gateway.security import authenticated_caller
from services.gateway.triton import Classification, Model, TritonBackend
from services.gateway.uploads import check_upload

LOG = logging.getLogger(__name__)
REQUEST_ID_KEY = "x-request-id"
CALLER_ID_KEY = "x-caller-id"


def metadata_text(context: grpc.aio.ServicerContext, key: str) -> str:
    """The caller's ``key`` metadata trimmed to 128 printable characters ('' when absent)."""
    given = dict(context.invocation_metadata() or ()).get(key, "")
    return "".join(ch for ch in str(given)[:128] if ch.isprintable())


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` (trimmed to 128 printable characters) or a new one."""
    return metadata_text(context, REQUEST_ID_KEY) or uuid.uuid4().hex


def stated_caller(context: grpc.aio.ServicerContext) -> str:
    """Who says they are calling: the bearer token's caller when tokens are on, else the ``x-caller-id``
    metadata (trimmed like a request id), else the client certificate's common name; '' when none."""
    authenticated = authenticated_caller.get()
    if authenticated:
        return "token:" + authenticated
    stated = metadata_text(context, CALLER_ID_KEY)
    if stated:
        return stated
    names = (context.auth_context() or {}).get("x509_common_name")
    return "cn:" + names[0].decode(errors="replace") if names else ""


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """The caller for a rollout's split: :func:`stated_caller`, else a new random id (a random canary share)."""
    return stated_caller(context) or uuid.uuid4().hex


class ProductRecognitionServicer(recognition_pb2_grpc.ProductRecognitionServicer):
    def __init__(self, config: GatewayConfig, preprocess: PreprocessClient, triton: TritonBackend,
                 gate: AdmissionGate, search: CatalogService | None = None,
                 router: Router | None = None,
                 feedback: FeedbackService | None = None, drift: DriftMonitor | None = None) -> None:
        self._config = config
        self._preprocess = preprocess
        self._triton = triton
        self._gate = gate
        self._search = search
        self._router = router or Router(triton, config.rollout)
        self._feedback = feedback
        self._drift = drift or DriftMonitor()

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    async def _start_call(context: grpc.aio.ServicerContext, span: dict[str, str] | None = None) -> str:
        """The preamble of every RPC: the request id (the caller's or a new one) for the logs and the trace, sent
        back in the initial and the trailing metadata; ``span``: more attributes of the call's span."""
        request_id = request_id_of(context)
        request_id_var.set(request_id)
        set_span_attributes({"shopvision.request_id": request_id, **(span or {})})
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return request_id

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        caller = context.time_remaining()
        budget = self._config.default_timeout_s if caller is None else min(caller, 24 * 3600.0)
        return time.monotonic() + budget

    async def _model(self, name: str) -> Model:
        name = name or self._config.default_model
        model = await self._triton.find_model(name)
        if model is None:
            available = ", ".join(sorted(self._triton.models)) or "none ready"
            raise InvalidInput(f"unknown model {name!r}; available models: {available}", reason="unknown_model")
        return model

    async def _checked(self, request: recognition_pb2.ClassifyRequest) -> tuple[Model, int]:
        """The model and top_k of one image to classify, after the checks every image gets."""
        check_upload(request.image, self._config.max_image_bytes)
        model = await self._model(request.model)
        top_k = request.top_k or self._config.default_top_k
        if top_k > model.num_classes:
            raise InvalidInput(f"top_k={top_k} is larger than the {model.num_classes} classes of model {model.name}",
                               reason="bad_top_k")
        return model, top_k

    def _response(self, model: Model, result: Classification, calibration: Calibration, pixels: np.ndarray,
                  prep: preprocess_pb2.PreprocessResponse, top_k: int, request_id: str,
                  timings: recognition_pb2.Timings) -> recognition_pb2.ClassifyResponse:
        """One answered image as the API gives it (best ``top_k`` first), counted by the drift monitor."""
        if result.class_ids:  # what live traffic looks like, against the answering version's reference
            self._drift.observe(model.name, result.model_version, calibration.reference_json, model.labels,
                                result.class_ids[0], result.scores[0], prep.original_width, prep.original_height,
                                pixels)
        threshold = self._config.rollout.confidence_threshold
        return recognition_pb2.ClassifyResponse(
            predictions=[
                recognition_pb2.Prediction(label=label, score=score, class_id=class_id,
                                           confident=calibration.confident(score, class_id, threshold))
                for score, class_id, label in list(zip(result.scores, result.class_ids, result.labels,
                                                       strict=True))[:top_k]],
            model=model.name, model_version=result.model_version, request_id=request_id, timings=timings,
            image_width=prep.original_width, image_height=prep.original_height)

    async def _classify_one(self, request: recognition_pb2.ClassifyRequest, deadline: float,
                            request_id: str, caller: str) -> recognition_pb2.ClassifyResponse:
        start = time.perf_counter()
        model, top_k = await self._checked(request)

        hop = time.perf_counter()
        pixels, prep = await self._preprocess.preprocess(request.image, model.spec, remaining_seconds(deadline),
                                                         request_id)
        preprocess_s = time.perf_counter() - hop
        metrics.HOP_SECONDS.labels("preprocess").observe(preprocess_s)

        hop = time.perf_counter()
        # The serving version, or during a rollout the canary for this caller (services/gateway/routing.py).
        answer = await self._router.classify(self._router.route(model, caller), pixels, top_k, deadline, request_id)
        inference_s = time.perf_counter() - hop
        metrics.HOP_SECONDS.labels("triton").observe(inference_s)
        return self._response(model, answer.result, answer.calibration, pixels, prep, top_k, request_id,
                              recognition_pb2.Timings(preprocess_ms=preprocess_s * 1e3, inference_ms=inference_s * 1e3,
                                                      total_ms=(time.perf_counter() - start) * 1e3))

    async def _classify_group(self, model: Model, items: list[tuple[int, recognition_pb2.ClassifyRequest, int]],
                              deadline: float, request_id: str, caller: str) -> dict[int, object]:
        """The images of one batch that ask for ``model``, in chunks of GATEWAY_BATCH_CHUNK_IMAGES (at most the
        ensemble's max_batch_size) sent at once; per item index its response or its error."""
        size = min(self._config.batch_chunk_images, model.max_batch_size)
        route = self._router.route(model, caller)
        out: dict[int, object] = {}
        for answered in await asyncio.gather(*(self._classify_chunk(model, route, items[first:first + size],
                                                                    deadline, request_id)
                                               for first in range(0, len(items), size))):
            out.update(answered)
        return out

    async def _classify_chunk(self, model: Model, route: Route,
                              items: list[tuple[int, recognition_pb2.ClassifyRequest, int]], deadline: float,
                              request_id: str) -> dict[int, object]:
        """One PreprocessBatch call (or a few, within the message limit) and one inference request for the
        images of ``items`` (index, request, top_k)."""
        start = time.perf_counter()
        out: dict[int, object] = {}
        try:
            prepared = await self._preprocess.preprocess_batch(
                [request.image for _, request, _ in items], model.spec, remaining_seconds(deadline), request_id,
                self._config.max_image_bytes)
        except ShopvisionError as error:
            return {index: error for index, _, _ in items}
        preprocess_s = time.perf_counter() - start
        metrics.HOP_SECONDS.labels("preprocess").observe(preprocess_s)
        ready = []
        for (index, _, top_k), result in zip(items, prepared, strict=True):
            if isinstance(result, ShopvisionError):
                out[index] = result
            else:
                ready.append((index, top_k, *result))
        if not ready:
            return out
        hop = time.perf_counter()
        try:
            answers = await self._router.classify_many(route, np.stack([item[2] for item in ready]),
                                                       max(item[1] for item in ready), deadline, request_id)
        except ShopvisionError as error:
            return out | {item[0]: error for item in ready}
        inference_s = time.perf_counter() - hop
        metrics.HOP_SECONDS.labels("triton").observe(inference_s)
        timings = recognition_pb2.Timings(preprocess_ms=preprocess_s * 1e3, inference_ms=inference_s * 1e3,
                                          total_ms=(time.perf_counter() - start) * 1e3)
        for (index, top_k, pixels, prep), answer in zip(ready, answers.results, strict=True):
            out[index] = self._response(model, answer, answers.calibration, pixels, prep, top_k,
                                        f"{request_id}-{index}", timings)
        return out

    async def _classify_batch(self, requests: list[recognition_pb2.ClassifyRequest], deadline: float,
                              request_id: str, caller: str) -> list[object]:
        """Each image checked on its own; the valid ones grouped by model, each group preprocessed and inferred
        as a batch (one hop each, not one per image); per image its response or its error, in request order."""
        checked = await asyncio.gather(*(self._checked(request) for request in requests), return_exceptions=True)
        results: dict[int, object] = {}
        groups: dict[str, tuple[Model, list[tuple[int, recognition_pb2.ClassifyRequest, int]]]] = {}
        for index, (request, check) in enumerate(zip(requests, checked, strict=True)):
            if isinstance(check, BaseException):
                results[index] = check
            else:
                model, top_k = check
                groups.setdefault(model.name, (model, []))[1].append((index, request, top_k))
        for answered in await asyncio.gather(*(self._classify_group(model, items, deadline, request_id, caller)
                                               for model, items in groups.values())):
            results.update(answered)
        return [results[index] for index in range(len(requests))]

    # -- RPCs ----------------------------------------------------------------------------------------------------
    async def Classify(self, request: recognition_pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> recognition_pb2.ClassifyResponse:
        request_id = await self._start_call(context, {"shopvision.model": request.model or self._config.default_model})
        deadline = self._deadline(context)
        self._gate.acquire()
        try:
            response = await self._classify_one(request, deadline, request_id, caller_of(context))
        finally:
            self._gate.release()
        set_span_attributes({"shopvision.model_version": response.model_version})
        top = response.predictions[0] if response.predictions else None
        LOG.info("classified", extra={"fields": {
            "model": response.model, "version": response.model_version, "top1": top.label if top else "",
            "score": round(top.score, 4) if top else 0.0, "bytes": len(request.image),
            "total_ms": round(response.timings.total_ms, 2)}})
        return response

    async def ClassifyBatch(self, request: recognition_pb2.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.ClassifyBatchResponse:
        request_id = await self._start_call(context)
        count = len(request.requests)
        if count == 0:
            raise InvalidInput("requests is empty", reason="empty")
        if count > self._config.max_batch_items:
            raise InvalidInput(f"{count} images in one batch; the limit is {self._config.max_batch_items}",
                               reason="batch_too_large")
        set_span_attributes({"shopvision.model": ",".join(  # the distinct models of the (bounded) batch
            sorted({item.model or self._config.default_model for item in request.requests}))})
        deadline = self._deadline(context)
        caller = caller_of(context)
        self._gate.acquire(count)
        try:
            results = await self._classify_batch(list(request.requests), deadline, request_id, caller)
        finally:
            self._gate.release(count)
        items = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ShopvisionError):
                raise result
            error = item_error("ClassifyBatchItem", result)
            items.append(recognition_pb2.ClassifyBatchItem(error=error) if error else
                         recognition_pb2.ClassifyBatchItem(response=result))
        return recognition_pb2.ClassifyBatchResponse(items=items)

    async def ListModels(self, request: recognition_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> recognition_pb2.ListModelsResponse:
        await self._start_call(context)
        await self._triton.refresh_if_older(1.0)
        default = self._config.default_model
        return recognition_pb2.ListModelsResponse(
            default_model=default,
            models=[model_info(m, default) for m in sorted(self._triton.models.values(), key=lambda m: m.name)])

    # -- the catalog: similar-product search and products (domain logic in services/gateway/catalog/service.py) ---
    def _catalog(self) -> CatalogService:
        if self._search is None:
            raise Unavailable("the product catalog is not enabled on this gateway (GATEWAY_CATALOG_DATABASE_URL "
                              "is empty)", reason="search_disabled")
        return self._search

    async def SearchSimilar(self, request: recognition_pb2.SearchSimilarRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.SearchSimilarResponse:
        request_id = await self._start_call(context)
        catalog, deadline = self._catalog(), self._deadline(context)
        self._gate.acquire()
        try:
            result = await catalog.search(request.catalog, request.image, request.k, request.category,
                                          request.filter, deadline, request_id)
        finally:
            self._gate.release()
        return recognition_pb2.SearchSimilarResponse(
            matches=[match_pb(hit) for hit in result.hits], catalog=result.catalog, model=result.model,
            model_version=result.model_version)

    async def IndexProduct(self, request: recognition_pb2.IndexProductRequest,
                           context: grpc.aio.ServicerContext) -> recognition_pb2.IndexProductResponse:
        request_id = await self._start_call(context)
        catalog, deadline = self._catalog(), self._deadline(context)
        self._gate.acquire()
        try:
            return indexed_pb(await catalog.index(index_item(request), deadline, request_id))
        finally:
            self._gate.release()

    async def IndexProductBatch(self, request: recognition_pb2.IndexProductBatchRequest,
                                context: grpc.aio.ServicerContext) -> recognition_pb2.IndexProductBatchResponse:
        request_id = await self._start_call(context)
        catalog = self._catalog()
        count = len(request.requests)
        if count == 0:
            raise InvalidInput("requests is empty", reason="empty")
        if count > self._config.max_batch_items:
            raise InvalidInput(f"{count} products in one batch; the limit is {self._config.max_batch_items}",
                               reason="batch_too_large")
        deadline = self._deadline(context)
        self._gate.acquire(count)
        try:
            results = await catalog.index_batch([index_item(item) for item in request.requests], deadline,
                                                request_id)
        finally:
            self._gate.release(count)
        items = []
        for result in results:
            error = item_error("IndexProductBatchItem", result)
            items.append(recognition_pb2.IndexProductBatchItem(error=error) if error else
                         recognition_pb2.IndexProductBatchItem(response=indexed_pb(cast(Indexed, result))))
        return recognition_pb2.IndexProductBatchResponse(items=items)

    async def DeleteProduct(self, request: recognition_pb2.DeleteProductRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.DeleteProductResponse:
        await self._start_call(context)
        size = await self._catalog().delete(request.catalog, request.product_id)
        return recognition_pb2.DeleteProductResponse(catalog_size=size)

    async def GetProduct(self, request: recognition_pb2.GetProductRequest,
                         context: grpc.aio.ServicerContext) -> recognition_pb2.Product:
        await self._start_call(context)
        return product_pb(await self._catalog().get(request.catalog, request.product_id))

    async def ListProducts(self, request: recognition_pb2.ListProductsRequest,
                           context: grpc.aio.ServicerContext) -> recognition_pb2.ListProductsResponse:
        await self._start_call(context)
        products, token = await self._catalog().list_products(request.catalog, request.page_size,
                                                              request.page_token)
        return recognition_pb2.ListProductsResponse(products=[product_pb(p) for p in products],
                                                    next_page_token=token)

    async def CreateCatalog(self, request: recognition_pb2.CreateCatalogRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.Catalog:
        await self._start_call(context)
        return catalog_pb(await self._catalog().create_catalog(request.name, request.model))

    async def ListCatalogs(self, request: recognition_pb2.ListCatalogsRequest,
                           context: grpc.aio.ServicerContext) -> recognition_pb2.ListCatalogsResponse:
        await self._start_call(context)
        return recognition_pb2.ListCatalogsResponse(
            catalogs=[catalog_pb(c) for c in await self._catalog().list_catalogs()])

    # -- feedback: the one RPC that keeps a caller's photo (domain logic in services/gateway/feedback.py) ---------
    def _feedback_service(self) -> FeedbackService:
        if self._feedback is None:
            raise Unavailable("feedback is stored in the catalog database, which is not enabled on this gateway "
                              "(GATEWAY_CATALOG_DATABASE_URL is empty)", reason="feedback_disabled")
        return self._feedback

    async def SubmitFeedback(self, request: recognition_pb2.SubmitFeedbackRequest,
                             context: grpc.aio.ServicerContext) -> recognition_pb2.SubmitFeedbackResponse:
        request_id = await self._start_call(context, {"shopvision.model": request.model or self._config.default_model})
        feedback, deadline = self._feedback_service(), self._deadline(context)
        self._gate.acquire()
        try:
            check_upload(request.image, self._config.max_image_bytes)
            model = await self._model(request.model)
            item = feedback.validate(FeedbackItem(
                model=model.name, label=request.label, image=request.image, request_id=request.request_id,
                product_id=request.product_id, caller=stated_caller(context)), model.labels)
            # Decoded exactly as Classify decodes it, pixels discarded: an undecodable photo is refused with the
            # preprocess service's INVALID_ARGUMENT before anything is stored.
            await self._preprocess.preprocess(request.image, model.spec, remaining_seconds(deadline), request_id)
            stored = await feedback.submit(item, model.labels)
        finally:
            self._gate.release()
        return recognition_pb2.SubmitFeedbackResponse(feedback_id=stored.feedback_id, duplicate=stored.duplicate)


def item_error(method: str, result: object) -> recognition_pb2.ItemError | None:
    """Count one batch item under ``method`` and give its ItemError when it failed (None when it succeeded)."""
    if isinstance(result, ShopvisionError):
        metrics.REQUESTS.labels(method, result.code.name).inc()
        return recognition_pb2.ItemError(code=result.code.value[0], message=result.message)
    metrics.REQUESTS.labels(method, "OK").inc()
    return None


# -- protobuf <-> domain --------------------------------------------------------------------------------------------
def model_info(model: Model, default: str) -> recognition_pb2.ModelInfo:
    candidate = model.candidate
    return recognition_pb2.ModelInfo(
        name=model.name, versions=model.versions, labels=model.labels, input_height=model.spec.height,
        input_width=model.spec.width, input_channels=model.spec.channels, is_default=model.name == default,
        thresholds=model.thresholds, threshold_rule=model.threshold_rule,
        candidate_version=candidate.version if candidate else "", rollout_mode=candidate.mode if candidate else "",
        canary_percent=candidate.percent if candidate else 0.0)


def index_item(request: recognition_pb2.IndexProductRequest) -> IndexItem:
    return IndexItem(product_id=request.product_id, image=request.image, catalog=request.catalog,
                     metadata=dict(request.metadata), attributes=[(a.key, a.value) for a in request.attributes],
                     category=request.category, model=request.model)


def attributes_pb(attributes: dict[str, list[str]]) -> list[recognition_pb2.Attribute]:
    return [recognition_pb2.Attribute(key=key, value=value) for key, value in attribute_pairs(attributes)]


def match_pb(hit: Hit) -> recognition_pb2.Match:
    return recognition_pb2.Match(product_id=hit.product_id, score=hit.score, label=hit.category,
                                 metadata=hit.metadata, attributes=attributes_pb(hit.attributes))


def indexed_pb(result: Indexed) -> recognition_pb2.IndexProductResponse:
    return recognition_pb2.IndexProductResponse(
        replaced=result.replaced, label=result.label, model_version=result.model_version,
        catalog_size=result.catalog_size, near_duplicates=[match_pb(hit) for hit in result.near_duplicates],
        catalog=result.catalog, model=result.model)


def timestamp_pb(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def product_pb(product: ProductRow) -> recognition_pb2.Product:
    return recognition_pb2.Product(
        catalog=product.catalog, product_id=product.product_id, category=product.category,
        metadata=product.metadata, attributes=attributes_pb(product.attributes), model=product.model,
        model_version=product.model_version, image_sha256=product.image_sha256, image_bytes=product.image_bytes,
        create_time=timestamp_pb(product.created_at), update_time=timestamp_pb(product.updated_at))


def catalog_pb(catalog: CatalogRow) -> recognition_pb2.Catalog:
    return recognition_pb2.Catalog(
        name=catalog.name, model=catalog.model, model_version=catalog.model_version,
        product_count=catalog.product_count, reembed_version=catalog.reembed_version,
        reembedded_count=catalog.reembedded_count, create_time=timestamp_pb(catalog.created_at))
