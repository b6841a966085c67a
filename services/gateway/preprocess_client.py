"""Client of the internal preprocess service (one shared channel)."""
from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.errors import REASON_KEY, DeadlineExceeded, InvalidInput, ShopvisionError, Unavailable
from services.common.spec import Spec
from services.gateway import metrics
from services.gateway.retry import Retrier, RetryWindowElapsed


def _code_is(code: grpc.StatusCode):
    return lambda error: isinstance(error, grpc.aio.AioRpcError) and error.code() == code


class PreprocessClient:
    def __init__(self, address: str, max_message_bytes: int, retrier: Retrier | None = None) -> None:
        self.address = address
        self._retrier = retrier
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._stub = preprocess_pb2_grpc.PreprocessorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self, timeout_s: float = 1.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def preprocess(self, image: bytes, spec: Spec, timeout_s: float,
                         request_id: str) -> tuple[np.ndarray, preprocess_pb2.PreprocessResponse]:
        request = preprocess_pb2.PreprocessRequest(image=image, spec=preprocess_pb2.ImageSpec(
            height=spec.height, width=spec.width, channels=spec.channels, crop=spec.crop,
            resize_shorter=spec.resize_shorter, background=spec.background))

        async def attempt(number: int, timeout: float) -> preprocess_pb2.PreprocessResponse:
            # A retry waits for the connection to come back (a restart) instead of failing at once.
            return await self._stub.Preprocess(request, timeout=timeout, metadata=[("x-request-id", request_id)],
                                               wait_for_ready=number > 0)

        try:
            if self._retrier is None:
                reply = await attempt(0, timeout_s)
            else:
                reply = await self._retrier.call(attempt, timeout_s,
                                                 retryable=_code_is(grpc.StatusCode.UNAVAILABLE),
                                                 is_timeout=_code_is(grpc.StatusCode.DEADLINE_EXCEEDED))
        except RetryWindowElapsed:
            metrics.UPSTREAM_ERRORS.labels("preprocess", "UNAVAILABLE").inc()
            raise Unavailable("preprocess service is unavailable: not back within the retry window",
                              reason="preprocess") from None
        except grpc.aio.AioRpcError as error:
            raise self._to_error(error) from None
        pixels = np.frombuffer(reply.pixels, dtype=np.uint8).reshape(reply.height, reply.width, reply.channels)
        return pixels, reply

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
