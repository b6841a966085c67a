"""Domain exceptions and the one interceptor that maps them to gRPC status codes.

Servicers raise these; :class:`ErrorInterceptor` turns each into its status code
with the exception's message, counts it, and turns anything unexpected into a
generic ``INTERNAL`` logged with its traceback.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

LOG = logging.getLogger(__name__)

# Trailing metadata key that carries ShopvisionError.reason to the caller.
REASON_KEY = "x-error-reason"


class ShopvisionError(Exception):
    """Base of the errors a caller is told about. ``reason`` is a short, low-cardinality metric label."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).__name__.lower()


class InvalidInput(ShopvisionError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ShopvisionError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ShopvisionError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Overloaded(ShopvisionError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ShopvisionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ShopvisionError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ShopvisionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResultObserver(Protocol):
    """Called once per call with its method, final status code, the domain error (if any) and duration."""

    def __call__(self, method: str, code: grpc.StatusCode, error: ShopvisionError | None, seconds: float) -> None: ...


class OversizedRequest:
    """Stands in for a request whose serialized size is over the limit: it is never parsed."""

    def __init__(self, size: int) -> None:
        self.size = size


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`ShopvisionError` to its status code; anything else becomes ``INTERNAL``.

    With ``max_request_bytes``, a request larger than that is refused with
    ``INVALID_ARGUMENT`` (and counted) without being parsed into a second copy.
    The server's transport limit should sit above it (see ``transport_limit``),
    so only grossly oversized messages are cut off by gRPC itself.
    """

    def __init__(self, observe: ResultObserver | None = None, max_request_bytes: int | None = None) -> None:
        self._observe = observe or (lambda method, code, error, seconds: None)
        self._max_request_bytes = max_request_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        limit = self._max_request_bytes
        parse = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            if limit is not None and len(raw) > limit:
                return OversizedRequest(len(raw))
            return parse(raw) if parse else raw

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                if isinstance(request, OversizedRequest):
                    raise InvalidInput(f"request is {request.size:,} bytes; images are limited to {limit:,} bytes",
                                       reason="too_large")
                response = await behavior(request, context)
            except ShopvisionError as error:
                self._observe(method, error.code, error, time.perf_counter() - start)
                LOG.info("%s failed: %s %s", method, error.code.name, error.message,
                         extra={"fields": {"code": error.code.name, "reason": error.reason}})
                trailing = (*(context.trailing_metadata() or ()), (REASON_KEY, error.reason))
                await context.abort(error.code, error.message, trailing_metadata=trailing)
            except grpc.aio.AbortError:
                self._observe(method, context.code() or grpc.StatusCode.UNKNOWN, None, time.perf_counter() - start)
                raise
            except asyncio.CancelledError:
                self._observe(method, grpc.StatusCode.CANCELLED, None, time.perf_counter() - start)
                raise
            except Exception:
                self._observe(method, grpc.StatusCode.INTERNAL, None, time.perf_counter() - start)
                LOG.exception("%s failed with an unexpected error", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
            else:
                self._observe(method, grpc.StatusCode.OK, None, time.perf_counter() - start)
                return response

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def transport_limit(max_request_bytes: int) -> int:
    """gRPC's own receive limit: room above the counted application limit, capped at 256 MiB."""
    return min(2 * max_request_bytes + 1024 * 1024, 256 * 1024 * 1024)


def remaining_seconds(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value); DeadlineExceeded once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the work was done", reason="deadline")
    return remaining
