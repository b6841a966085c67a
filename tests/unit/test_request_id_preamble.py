"""Every public RPC sends its request id back in the initial and the trailing metadata (one preamble,
``ProductRecognitionServicer._start_call``), also when the call fails.

The real servicer runs in a real gRPC server behind the real error interceptor; its upstreams (preprocess,
Triton) are addresses where nothing listens and the catalog is off, so every call fails after its preamble:
that is enough to see what each RPC sends. The RPCs are read from the service descriptor, so a new RPC is
checked as soon as it exists.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import free_port
from services.common.errors import ErrorInterceptor
from services.common.grpc_server import create_server
from services.gateway.concurrency import AdmissionGate
from services.gateway.config import GatewayConfig
from services.gateway.preprocess_client import PreprocessClient
from services.gateway.server import observe
from services.gateway.servicer import ProductRecognitionServicer
from services.gateway.triton import TritonBackend

SERVICE = recognition_pb2.DESCRIPTOR.services_by_name["ProductRecognition"]
METHODS = [method.name for method in SERVICE.methods]


async def metadata_of(method: str, request_id: str | None) -> tuple[dict[str, str], dict[str, str], grpc.StatusCode]:
    config = GatewayConfig.from_env({})
    preprocess = PreprocessClient(f"127.0.0.1:{free_port()}", max_message_bytes=1 << 20, renew_every_s=0)
    triton = TritonBackend(f"127.0.0.1:{free_port()}", renew_every_s=0)
    server = create_server([ErrorInterceptor(observe)], max_message_bytes=4 << 20)
    recognition_pb2_grpc.add_ProductRecognitionServicer_to_server(
        ProductRecognitionServicer(config, preprocess, triton, AdmissionGate(4), search=None), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        descriptor = SERVICE.methods_by_name[method]
        request_type = getattr(recognition_pb2, descriptor.input_type.name)
        response_type = getattr(recognition_pb2, descriptor.output_type.name)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            rpc = channel.unary_unary(f"/{SERVICE.full_name}/{method}",
                                      request_serializer=request_type.SerializeToString,
                                      response_deserializer=response_type.FromString)
            call = rpc(request_type(), metadata=[("x-request-id", request_id)] if request_id else None, timeout=10)
            try:
                await call
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            return (dict(await call.initial_metadata() or ()), dict(await call.trailing_metadata() or ()), code)
    finally:
        await server.stop(0)
        await preprocess.close()
        await triton.close()


def test_every_rpc_is_checked() -> None:
    assert {"Classify", "ClassifyBatch", "ListModels", "SearchSimilar", "IndexProduct", "ListCatalogs"} <= set(
        METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_returns_the_callers_request_id_in_initial_and_trailing_metadata(method: str) -> None:
    initial, trailing, code = asyncio.run(metadata_of(method, "caller-id-42"))
    assert code != grpc.StatusCode.INTERNAL, code  # failed in the servicer's own checks, not by accident
    assert initial.get("x-request-id") == "caller-id-42", initial
    assert trailing.get("x-request-id") == "caller-id-42", trailing


@pytest.mark.parametrize("method", ["Classify", "ListModels", "ListCatalogs"])
def test_a_request_id_is_made_when_the_caller_sends_none(method: str) -> None:
    initial, trailing, _ = asyncio.run(metadata_of(method, None))
    assert len(initial["x-request-id"]) >= 16 and trailing["x-request-id"] == initial["x-request-id"]
