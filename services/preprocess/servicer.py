"""The ``shopvision.v1.Preprocessor`` servicer: decode + transform in a worker thread pool."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.errors import InvalidInput
from services.common.logging import request_id_var
from services.common.spec import Spec
from services.common.tracing import set_span_attributes
from services.preprocess import metrics
from services.preprocess.imaging import preprocess

LOG = logging.getLogger(__name__)


def spec_from_message(message: preprocess_pb2.ImageSpec) -> Spec:
    if not message.height or not message.width:
        raise InvalidInput("spec must give height and width", reason="bad_spec")
    return Spec.with_defaults(message.height, message.width, channels=message.channels, crop=message.crop,
                              resize_shorter=message.resize_shorter, background=message.background)


class PreprocessServicer(preprocess_pb2_grpc.PreprocessorServicer):
    def __init__(self, executor: ThreadPoolExecutor, max_image_bytes: int, max_image_pixels: int) -> None:
        self._executor = executor
        self._max_image_bytes = max_image_bytes
        self._max_image_pixels = max_image_pixels

    async def Preprocess(
        self, request: preprocess_pb2.PreprocessRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.PreprocessResponse:
        self._start(context)
        metrics.IN_FLIGHT.inc()
        try:
            return await self._one(request.image, spec_from_message(request.spec))
        finally:
            metrics.IN_FLIGHT.dec()

    async def PreprocessBatch(
        self, request: preprocess_pb2.PreprocessBatchRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.PreprocessBatchResponse:
        """Every image with the one recipe, decoded in parallel on the worker threads; an image that a single
        Preprocess would refuse becomes that item's error (and is counted as a refusal), the others succeed."""
        self._start(context)
        spec = spec_from_message(request.spec)
        metrics.IN_FLIGHT.inc(len(request.images))
        try:
            results = await asyncio.gather(*(self._one(image, spec) for image in request.images),
                                           return_exceptions=True)
        finally:
            metrics.IN_FLIGHT.dec(len(request.images))
        items = []
        for result in results:
            if isinstance(result, InvalidInput):
                metrics.REJECTED.labels(result.reason).inc()
                items.append(preprocess_pb2.PreprocessBatchItem(error=preprocess_pb2.PreprocessError(
                    code=result.code.value[0], message=result.message, reason=result.reason)))
            elif isinstance(result, BaseException):
                raise result
            else:
                items.append(preprocess_pb2.PreprocessBatchItem(response=result))
        return preprocess_pb2.PreprocessBatchResponse(items=items)

    @staticmethod
    def _start(context: grpc.aio.ServicerContext) -> None:
        request_id = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        request_id_var.set(request_id)
        set_span_attributes({"shopvision.request_id": request_id})

    async def _one(self, image: bytes, spec: Spec) -> preprocess_pb2.PreprocessResponse:
        size = len(image)
        metrics.IMAGE_BYTES.observe(size)
        if size > self._max_image_bytes:
            raise InvalidInput(f"image is {size:,} bytes; the limit is {self._max_image_bytes:,}", reason="too_large")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, preprocess, image, spec, self._max_image_pixels)
        metrics.DECODE_SECONDS.labels(result.header.format).observe(result.decode_s)
        metrics.TRANSFORM_SECONDS.observe(result.transform_s)
        h, w, c = result.pixels.shape
        LOG.debug("preprocessed", extra={"fields": {
            "format": result.header.format, "bytes": size, "decode_ms": round(result.decode_s * 1e3, 2)}})
        return preprocess_pb2.PreprocessResponse(
            pixels=result.pixels.tobytes(), height=h, width=w, channels=c, format=result.header.format,
            original_width=result.header.width, original_height=result.header.height,
            decode_ms=result.decode_s * 1e3, transform_ms=result.transform_s * 1e3)
