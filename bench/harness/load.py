"""The two load shapes every benchmark drives, and the gRPC target they usually drive.

* **closed loop** (:func:`closed_loop`): C workers, each sends its next request when the previous one returns.
* **open loop** (:func:`open_loop`): requests start on a fixed schedule whether or not earlier ones have
  returned (at most ``max_in_flight`` outstanding); latency is measured from the *scheduled* start, so a
  slow server cannot hide its queueing (no coordinated omission).

Every run is bounded by a request count and/or a wall-clock time, whichever comes first. A call is any
``async (index, timeout_s)`` function; :class:`GrpcTarget` sends pre-serialised requests as raw bytes over
``grpc.aio``, so the client spends its CPU on the transport, not on protobuf. Failures are data points,
counted by ghz's (Go) status code names.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# ghz reports status codes with Go's names (google.golang.org/grpc/codes String()).
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled", grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument", grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound", grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied", grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition", grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange", grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal", grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss", grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
_GO_BY_PYTHON_NAME = {code.name: name for code, name in GO_CODE_NAMES.items()}

# A call takes the request index (to rotate payloads) and a timeout in seconds, and raises on failure.
CallFn = Callable[[int, float], Awaitable[Any]]


# -- results ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    started: float  # time.perf_counter() at the (scheduled) start
    latency_s: float
    status: str  # ghz (Go) code name
    error: str  # "" when OK


@dataclass
class Run:
    """What one bounded run produced, before it is summarised."""

    results: list[Result]
    wall_s: float
    end_reason: str  # "normal" (count reached) or "timeout" (duration reached), as ghz says
    options: dict[str, Any] = field(default_factory=dict)


def status_of(error: BaseException) -> tuple[str, str]:
    """(ghz code name, message) of a failed call: grpc.aio errors, tritonclient errors, client-side timeouts."""
    if isinstance(error, grpc.aio.AioRpcError):
        return GO_CODE_NAMES.get(error.code(), "Unknown"), error.details() or ""
    status = getattr(error, "status", None)
    if callable(status):  # tritonclient.utils.InferenceServerException: status() is "StatusCode.X"
        raw = str(status() or "").replace("StatusCode.", "")
        message_of = getattr(error, "message", None)
        message = message_of() if callable(message_of) else str(error)
        return _GO_BY_PYTHON_NAME.get(raw, "Unknown"), str(message)
    if isinstance(error, asyncio.TimeoutError):
        return "DeadlineExceeded", "client-side timeout"
    return "Unknown", f"{type(error).__name__}: {error}"


async def _timed(call: CallFn, index: int, timeout_s: float, started: float) -> Result:
    try:
        await call(index, timeout_s)
    except Exception as error:  # noqa: BLE001 - every failure is a data point, counted by its code
        code, message = status_of(error)
        return Result(started, time.perf_counter() - started, code, f"rpc error: code = {code} desc = {message}")
    return Result(started, time.perf_counter() - started, "OK", "")


# -- the two load shapes ---------------------------------------------------------------------------------------------
def _bounds(total: int | None, duration_s: float | None) -> tuple[float, float]:
    if not total and not duration_s:
        raise ValueError("a run needs a bound: give total > 0 and/or duration_s > 0")
    return (float(total) if total else math.inf), (duration_s if duration_s else math.inf)


async def closed_loop(call: CallFn, concurrency: int, total: int | None = 200, duration_s: float | None = None,
                      timeout_s: float = 20.0) -> Run:
    """``concurrency`` workers, each sending its next request as soon as the previous one returned."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    limit, seconds = _bounds(total, duration_s)
    results: list[Result] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < limit and time.perf_counter() < stop_at:
            index = issued
            issued += 1
            results.append(await _timed(call, index, timeout_s, time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return Run(results, wall, "normal" if issued >= limit else "timeout",
               {"concurrency": concurrency, "total": total or 0, "duration": duration_s or 0, "timeout": timeout_s})


async def open_loop(call: CallFn, rps: float, total: int | None = None, duration_s: float | None = 10.0,
                    timeout_s: float = 20.0, max_in_flight: int = 1000) -> Run:
    """Start requests every ``1/rps`` seconds regardless of replies; latency counts from the scheduled start."""
    if rps <= 0:
        raise ValueError("rps must be > 0")
    limit, seconds = _bounds(total, duration_s)
    slots = asyncio.Semaphore(max_in_flight)
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()

    async def one(index: int, scheduled: float) -> None:
        try:
            results.append(await _timed(call, index, timeout_s, scheduled))
        finally:
            slots.release()

    index = 0
    while index < limit:
        scheduled = start + index / rps
        if scheduled - start >= seconds:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # the wait counts in the latency: it is measured from `scheduled`
        tasks.append(asyncio.create_task(one(index, scheduled)))
        index += 1
    if tasks:
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    return Run(results, wall, "normal" if index >= limit else "timeout",
               {"rps": rps, "total": total or 0, "duration": duration_s or 0, "timeout": timeout_s,
                "concurrency": max_in_flight})


# -- gRPC target -----------------------------------------------------------------------------------------------------
def method_path(call: str) -> str:
    """ghz's ``package.Service.Method`` (or ``package.Service/Method``) → ``/package.Service/Method``."""
    service, sep, method = call.replace("/", ".").rpartition(".")
    if not sep or not service or not method:
        raise ValueError(f"call {call!r} is not package.Service.Method")
    return f"/{service}/{method}"


class GrpcTarget:
    """Sends pre-serialised requests (rotating through ``payloads``) to one unary method."""

    def __init__(self, host: str, call: str, payloads: Sequence[bytes], connections: int = 1) -> None:
        if not payloads:
            raise ValueError("no request payloads")
        self.host, self.call = host, call
        self._payloads = list(payloads)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        # Distinct channel args keep grpc from sharing one subchannel across "connections".
        self._channels = [grpc.aio.insecure_channel(host, options=options + [("shopvision.loadgen.channel", i)])
                          for i in range(max(1, connections))]
        path = method_path(call)
        self._methods = [channel.unary_unary(path) for channel in self._channels]

    async def __call__(self, index: int, timeout_s: float) -> bytes:
        method = self._methods[index % len(self._methods)]
        return await method(self._payloads[index % len(self._payloads)], timeout=timeout_s)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> GrpcTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
