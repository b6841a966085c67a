"""A stand-in for the preprocess service that is too slow to ever answer: the slow upstream of the deadline tests.

    python -m tests.integration.slow_preprocess --address 127.0.0.1:PORT --record calls.jsonl [--delay 120]

A real gRPC server (``shopvision.v1.Preprocessor`` and ``grpc.health.v1``, SERVING) whose ``Preprocess``
writes one JSON line per call to ``--record`` (the caller's ``x-request-id`` and the deadline the call
arrived with, in seconds, or null without one) and then sleeps ``--delay`` seconds: only a deadline ends
the call before that. The gateway under test is pointed at it with ``GATEWAY_PREPROCESS_ADDRESS``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

LOG = logging.getLogger("slow_preprocess")
SERVICE_NAME = preprocess_pb2.DESCRIPTOR.services_by_name["Preprocessor"].full_name


class SlowPreprocessor(preprocess_pb2_grpc.PreprocessorServicer):
    def __init__(self, record: Path, delay_s: float) -> None:
        self._record = record
        self._delay_s = delay_s

    async def Preprocess(self, request: preprocess_pb2.PreprocessRequest,
                         context: grpc.aio.ServicerContext) -> preprocess_pb2.PreprocessResponse:
        call = {"request_id": dict(context.invocation_metadata() or ()).get("x-request-id", ""),
                "time_remaining_s": context.time_remaining()}
        with self._record.open("a") as out:  # one short line per call, written before the wait
            out.write(json.dumps(call) + "\n")
        LOG.info("call %s with %s s left; sleeping %.0f s", call["request_id"], call["time_remaining_s"],
                 self._delay_s)
        await asyncio.sleep(self._delay_s)
        await context.abort(grpc.StatusCode.INTERNAL, f"the slow stand-in waited {self._delay_s:.0f} s")
        raise AssertionError("abort() returns only by raising")


async def serve(address: str, record: Path, delay_s: float) -> None:
    server = grpc.aio.server()
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(SlowPreprocessor(record, delay_s), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(address)
    await server.start()
    LOG.info("slow preprocess stand-in serving on %s (delay %.0f s, record %s)", address, delay_s, record)
    await server.wait_for_termination()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A preprocess stand-in that sleeps instead of answering.")
    parser.add_argument("--address", required=True, help="host:port to serve on")
    parser.add_argument("--record", type=Path, required=True, help="JSON-lines file, one line per call")
    parser.add_argument("--delay", type=float, default=120.0,
                        help="seconds each call sleeps before failing (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.address, args.record, args.delay))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
