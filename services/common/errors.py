"""Domain exceptions and the one interceptor that maps them to gRPC status codes.

Servicers raise these; :class:`ErrorInterceptor` turns each into its status code
with the exception's message, counts it, and turns anything unexpected into a
generic ``INTERNAL`` logged with its traceback.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`ShopvisionError` to its status code; anything else becomes ``INTERNAL``."""

    def __init__(self, observe: ResultObserver | None = None) -> None:
        self._observe = observe or (lambda method, code, error, seconds: None)

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

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = await behavior(request, context)
            except ShopvisionError as error:
                self._observe(method, error.code, error, time.perf_counter() - start)
                LOG.info("%s failed: %s %s", method, error.code.name, error.message,
                         extra={"fields": {"code": error.code.name, "reason": error.reason}})
                await context.abort(error.code, error.message, trailing_metadata=((REASON_KEY, error.reason),))
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
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
