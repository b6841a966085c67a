"""Replay the malformed-image corpus (tests/fuzz/corpus, written by make_corpus.py) through the real
preprocess service: each file gets its expected answer quickly and the service stays up and SERVING."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shopvision.v1 import preprocess_pb2, preprocess_pb2_grpc

from devstack.stack import Stack
from tests.fuzz.make_corpus import corpus

CORPUS = Path(__file__).resolve().parent / "corpus"
SPEC = preprocess_pb2.ImageSpec(height=224, width=224, channels=3, crop="center", resize_shorter=256,
                                background="keep")
EXPECTED = {"ok": {grpc.StatusCode.OK}, "bad": {grpc.StatusCode.INVALID_ARGUMENT},
            "any": {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}}


def test_corpus_is_committed_and_complete() -> None:
    # Names, not bytes: the valid seeds come from OpenCV's encoders, which may change between versions.
    on_disk = {path.name: path.stat().st_size for path in CORPUS.iterdir()}
    assert set(on_disk) == set(corpus()), "run: python -m tests.fuzz.make_corpus"
    assert len(on_disk) >= 30 and all(size < 16 * 1024 for size in on_disk.values())


def test_corpus_through_the_preprocess_service(stack: Stack) -> None:
    failures = []
    with grpc.insecure_channel(stack.preprocess_address) as channel:
        stub = preprocess_pb2_grpc.PreprocessorStub(channel)
        for path in sorted(CORPUS.iterdir()):
            started = time.monotonic()
            try:
                reply = stub.Preprocess(preprocess_pb2.PreprocessRequest(image=path.read_bytes(), spec=SPEC),
                                        timeout=10)
                code = grpc.StatusCode.OK
                assert (reply.height, reply.width, reply.channels) == (224, 224, 3)
                assert len(reply.pixels) == 224 * 224 * 3
            except grpc.RpcError as error:
                code = error.code()
            elapsed = time.monotonic() - started
            if code not in EXPECTED[path.name.split("-", 1)[0]] or elapsed > 5.0:
                failures.append(f"{path.name}: {code.name} in {elapsed:.1f} s")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert not failures, failures
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.processes["preprocess"].poll() is None
