"""Client of the internal preprocess service: one channel, balanced over its replicas (services/gateway/channels.py)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.errors import REASON_KEY, DeadlineExceeded, InvalidInput, ShopvisionError, Unavailable
from services.common.spec import Spec
from services.gateway import metrics
from services.gateway.channels import RENEW_EVERY_S, RenewingChannel, channel_options
from services.gateway.retry import Retrier, RetryWindowElapsed

# The pixels one PreprocessBatch reply may carry (the preprocess service's message limit is about one upload).
MAX_REPLY_PIXELS = 16 * 1024 * 1024


def _spec_message(spec: Spec) -> preprocess_pb2.ImageSpec:
    return preprocess_pb2.ImageSpec(height=spec.height, width=spec.width, channels=spec.channels, crop=spec.crop,
                                    resize_shorter=spec.resize_shorter, background=spec.background)


def _pixels(reply: preprocess_pb2.PreprocessResponse) -> np.ndarray:
    return np.frombuffer(reply.pixels, dtype=np.uint8).reshape(reply.height, reply.width, reply.channels)


def _code_is(code: grpc.StatusCode):
    return lambda error: isinstance(error, grpc.aio.AioRpcError) and error.code() == code


@dataclass(frozen=True)
class _Stubs:
    channel: grpc.aio.Channel
    preprocessor: preprocess_pb2_grpc.PreprocessorStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def open(cls, address: str, options: list[tuple[str, str | int]]) -> _Stubs:
        channel = grpc.aio.insecure_channel(address, options=options)
        return cls(channel, preprocess_pb2_grpc.PreprocessorStub(channel), health_pb2_grpc.HealthStub(channel))


class PreprocessClient:
    """``address`` is any gRPC target (``host:port``, ``dns:///host:port``, ``ipv4:a:p,b:q``); calls rotate over
    every address it resolves to, and the name is resolved again every ``renew_every_s``."""

    def __init__(self, address: str, max_message_bytes: int, retrier: Retrier | None = None,
                 renew_every_s: float = RENEW_EVERY_S) -> None:
        self.address = address
        self._retrier = retrier
        options = channel_options(max_send_bytes=max_message_bytes)
        self._channels = RenewingChannel("preprocess", lambda: _Stubs.open(address, options),
                                         lambda stubs: stubs.channel, renew_every_s)

    async def close(self) -> None:
        await self._channels.close()

    async def ready(self, timeout_s: float = 1.0) -> bool:
        try:
            reply = await self._channels.get().health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def preprocess(self, image: bytes, spec: Spec, timeout_s: float,
                         request_id: str) -> tuple[np.ndarray, preprocess_pb2.PreprocessResponse]:
        request = preprocess_pb2.PreprocessRequest(image=image, spec=_spec_message(spec))
        reply = await self._call(lambda stubs: stubs.preprocessor.Preprocess, request, timeout_s, request_id)
        return _pixels(reply), reply

    async def preprocess_batch(self, images: list[bytes], spec: Spec, timeout_s: float, request_id: str,
                               max_request_bytes: int) -> list[tuple[np.ndarray, preprocess_pb2.PreprocessResponse]
                                                               | ShopvisionError]:
        """Every image with one recipe, in as few PreprocessBatch calls as the message limit allows (each image is
        at most ``max_request_bytes``, checked by the caller); per image its pixels, or the error a single call
        would have raised. The calls run at once."""
        chunks: list[list[bytes]] = [[]]
        size = 0
        for image in images:
            if chunks[-1] and (size + len(image) > max_request_bytes
                               or (len(chunks[-1]) + 1) * spec.height * spec.width * spec.channels > MAX_REPLY_PIXELS):
                chunks.append([])
                size = 0
            chunks[-1].append(image)
            size += len(image)
        replies = await asyncio.gather(*(self._call(
            lambda stubs: stubs.preprocessor.PreprocessBatch,
            preprocess_pb2.PreprocessBatchRequest(images=chunk, spec=_spec_message(spec)), timeout_s,
            request_id) for chunk in chunks if chunk))
        out: list[tuple[np.ndarray, preprocess_pb2.PreprocessResponse] | ShopvisionError] = []
        for reply in replies:
            for item in reply.items:
                if item.HasField("error"):
                    out.append(InvalidInput(item.error.message or "invalid image", reason=item.error.reason or "image"))
                else:
                    out.append((_pixels(item.response), item.response))
        return out

    async def _call(self, method: Callable[[_Stubs], Any], request: Any, timeout_s: float, request_id: str) -> Any:
        async def attempt(number: int, timeout: float) -> Any:
            # A retry waits for a ready replica (round robin skips the one that failed, or a restarted one comes
            # back) instead of failing at once.
            return await method(self._channels.get())(
                request, timeout=timeout, metadata=[("x-request-id", request_id)], wait_for_ready=number > 0)

        try:
            if self._retrier is None:
                return await attempt(0, timeout_s)
            return await self._retrier.call(attempt, timeout_s, retryable=_code_is(grpc.StatusCode.UNAVAILABLE),
                                            is_timeout=_code_is(grpc.StatusCode.DEADLINE_EXCEEDED))
        except RetryWindowElapsed:
            metrics.UPSTREAM_ERRORS.labels("preprocess", "UNAVAILABLE").inc()
            raise Unavailable("preprocess service is unavailable: not back within the retry window",
                              reason="preprocess") from None
        except grpc.aio.AioRpcError as error:
            raise self._to_error(error) from None

    @staticmethod
    def _to_error(error: grpc.aio.AioRpcError) -> ShopvisionError:
        code = error.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # The preprocess service names the reason in its message; keep the caller's view of it.
            trailing = dict(error.trailing_metadata() or ())
            return InvalidInput(error.details() or "invalid image", reason=str(trailing.get(REASON_KEY, "image")))
        metrics.UPSTREAM_ERRORS.labels("preprocess", code.name).inc()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded("deadline exceeded while waiting for the preprocess service", reason="deadline")
        return Unavailable(f"preprocess service is unavailable: {code.name} {error.details()}", reason="preprocess")
