"""The public ``shopvision.v1.ProductRecognition`` servicer. Thin: validation, then preprocess → Triton."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from services.common.errors import InvalidInput, ShopvisionError, Unavailable, remaining_seconds
from services.common.logging import request_id_var
from services.gateway import metrics
from services.gateway.concurrency import AdmissionGate
from services.gateway.config import GatewayConfig
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.search.service import SimilarSearch
from services.gateway.triton import Model, TritonBackend

LOG = logging.getLogger(__name__)
REQUEST_ID_KEY = "x-request-id"


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` (trimmed to 128 printable characters) or a new one."""
    given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
    cleaned = "".join(ch for ch in str(given)[:128] if ch.isprintable())
    return cleaned or uuid.uuid4().hex


class ProductRecognitionServicer(recognition_pb2_grpc.ProductRecognitionServicer):
    def __init__(self, config: GatewayConfig, preprocess: PreprocessClient, triton: TritonBackend,
                 gate: AdmissionGate, search: SimilarSearch | None = None) -> None:
        self._config = config
        self._preprocess = preprocess
        self._triton = triton
        self._gate = gate
        self._search = search

    # -- helpers -------------------------------------------------------------------------------------------------
    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        caller = context.time_remaining()
        budget = self._config.default_timeout_s if caller is None else min(caller, 24 * 3600.0)
        return time.monotonic() + budget

    async def _model(self, name: str) -> Model:
        name = name or self._config.default_model
        model = self._triton.models.get(name)
        if model is None:
            # A model published a moment ago: when Triton says it is ready, re-read the models now;
            # otherwise look again at most once a second (unknown names must not hammer Triton).
            try:
                if await self._triton.model_ready(name):
                    await self._triton.refresh()
                else:
                    await self._triton.refresh_if_older(1.0)
            except Unavailable:
                if not self._triton.models:
                    raise
            model = self._triton.models.get(name)
        if model is None:
            available = ", ".join(sorted(self._triton.models)) or "none ready"
            raise InvalidInput(f"unknown model {name!r}; available models: {available}", reason="unknown_model")
        return model

    async def _classify_one(self, request: recognition_pb2.ClassifyRequest, deadline: float,
                            request_id: str) -> recognition_pb2.ClassifyResponse:
        start = time.perf_counter()
        size = len(request.image)
        metrics.REQUEST_BYTES.observe(size)
        if size == 0:
            raise InvalidInput("image is empty: send the bytes of a JPEG, PNG, WebP or BMP file", reason="empty")
        if size > self._config.max_image_bytes:
            raise InvalidInput(f"image is {size:,} bytes; the limit is {self._config.max_image_bytes:,}",
                               reason="too_large")
        model = await self._model(request.model)
        top_k = request.top_k or self._config.default_top_k
        if top_k > model.num_classes:
            raise InvalidInput(f"top_k={top_k} is larger than the {model.num_classes} classes of model {model.name}",
                               reason="bad_top_k")

        hop = time.perf_counter()
        pixels, prep = await self._preprocess.preprocess(request.image, model.spec, remaining_seconds(deadline),
                                                         request_id)
        preprocess_s = time.perf_counter() - hop
        metrics.HOP_SECONDS.labels("preprocess").observe(preprocess_s)

        hop = time.perf_counter()
        result = await self._triton.classify(model, pixels, top_k, remaining_seconds(deadline), request_id)
        inference_s = time.perf_counter() - hop
        metrics.HOP_SECONDS.labels("triton").observe(inference_s)

        return recognition_pb2.ClassifyResponse(
            predictions=[
                recognition_pb2.Prediction(label=label, score=score, class_id=class_id)
                for score, class_id, label in zip(result.scores, result.class_ids, result.labels, strict=True)],
            model=model.name,
            model_version=result.model_version,
            request_id=request_id,
            timings=recognition_pb2.Timings(preprocess_ms=preprocess_s * 1e3, inference_ms=inference_s * 1e3,
                                            total_ms=(time.perf_counter() - start) * 1e3),
            image_width=prep.original_width,
            image_height=prep.original_height,
        )

    # -- RPCs ----------------------------------------------------------------------------------------------------
    async def Classify(self, request: recognition_pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> recognition_pb2.ClassifyResponse:
        request_id = request_id_of(context)
        request_id_var.set(request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        deadline = self._deadline(context)
        self._gate.acquire()
        try:
            response = await self._classify_one(request, deadline, request_id)
        finally:
            self._gate.release()
        top = response.predictions[0] if response.predictions else None
        LOG.info("classified", extra={"fields": {
            "model": response.model, "version": response.model_version, "top1": top.label if top else "",
            "score": round(top.score, 4) if top else 0.0, "bytes": len(request.image),
            "total_ms": round(response.timings.total_ms, 2)}})
        return response

    async def ClassifyBatch(self, request: recognition_pb2.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.ClassifyBatchResponse:
        request_id = request_id_of(context)
        request_id_var.set(request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        count = len(request.requests)
        if count == 0:
            raise InvalidInput("requests is empty", reason="empty")
        if count > self._config.max_batch_items:
            raise InvalidInput(f"{count} images in one batch; the limit is {self._config.max_batch_items}",
                               reason="batch_too_large")
        deadline = self._deadline(context)
        self._gate.acquire(count)
        try:
            results = await asyncio.gather(
                *(self._classify_one(item, deadline, f"{request_id}-{i}") for i, item in enumerate(request.requests)),
                return_exceptions=True)
        finally:
            self._gate.release(count)
        items = []
        for result in results:
            if isinstance(result, ShopvisionError):
                metrics.REQUESTS.labels("ClassifyBatchItem", result.code.name).inc()
                items.append(recognition_pb2.ClassifyBatchItem(
                    error=recognition_pb2.ItemError(code=result.code.value[0], message=result.message)))
            elif isinstance(result, BaseException):
                raise result
            else:
                metrics.REQUESTS.labels("ClassifyBatchItem", "OK").inc()
                items.append(recognition_pb2.ClassifyBatchItem(response=result))
        return recognition_pb2.ClassifyBatchResponse(items=items)

    async def ListModels(self, request: recognition_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> recognition_pb2.ListModelsResponse:
        await self._triton.refresh_if_older(1.0)
        default = self._config.default_model
        return recognition_pb2.ListModelsResponse(
            default_model=default,
            models=[recognition_pb2.ModelInfo(
                name=m.name, versions=m.versions, labels=m.labels, input_height=m.spec.height,
                input_width=m.spec.width, input_channels=m.spec.channels, is_default=m.name == default)
                for m in sorted(self._triton.models.values(), key=lambda m: m.name)])

    # -- similar-product search (the work is in services/gateway/search/service.py) ------------------------------
    def _similar(self) -> SimilarSearch:
        if self._search is None:
            raise Unavailable("similar-product search is not enabled on this gateway", reason="search_disabled")
        return self._search

    async def _start_call(self, context: grpc.aio.ServicerContext) -> str:
        request_id = request_id_of(context)
        request_id_var.set(request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        return request_id

    async def SearchSimilar(self, request: recognition_pb2.SearchSimilarRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.SearchSimilarResponse:
        request_id = await self._start_call(context)
        search, deadline = self._similar(), self._deadline(context)
        self._gate.acquire()
        try:
            return await search.search(request, deadline, request_id)
        finally:
            self._gate.release()

    async def IndexProduct(self, request: recognition_pb2.IndexProductRequest,
                           context: grpc.aio.ServicerContext) -> recognition_pb2.IndexProductResponse:
        request_id = await self._start_call(context)
        search, deadline = self._similar(), self._deadline(context)
        self._gate.acquire()
        try:
            return await search.index_product(request, deadline, request_id)
        finally:
            self._gate.release()

    async def DeleteProduct(self, request: recognition_pb2.DeleteProductRequest,
                            context: grpc.aio.ServicerContext) -> recognition_pb2.DeleteProductResponse:
        await self._start_call(context)
        return await self._similar().delete(request)
