"""The caller's x-request-id travels gateway → preprocess → Triton and comes back, and every JSON log names it.

A private stack (own ports and logs) runs with Triton's verbose log on, which prefixes each inference
with ``[request id: ...]``, and the preprocess service at DEBUG, which logs each image it prepares.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from tests.conftest import photo_bytes

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(ports=Ports.free(), log_dir=tmp_path_factory.mktemp("traced-stack"),
                  extra_env={"TRITON_LOG_VERBOSE": "1", "PREPROCESS_LOG_LEVEL": "DEBUG"})
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def stub(traced_stack: Stack) -> Iterator[recognition_pb2_grpc.ProductRecognitionStub]:
    with grpc.insecure_channel(traced_stack.gateway_address) as channel:
        yield recognition_pb2_grpc.ProductRecognitionStub(channel)


def json_lines(path: Path) -> list[dict]:
    """The JSON log records of one service (lines that are not JSON, e.g. from libraries, are skipped)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def wait_for_log(path: Path, found, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        hits = [r for r in json_lines(path) if found(r)]
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


def test_request_id_travels_every_hop_and_comes_back(traced_stack: Stack, stub) -> None:
    request_id = f"obs-{uuid.uuid4().hex[:12]}"
    reply, call = stub.Classify.with_call(recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png")),
                                          metadata=[("x-request-id", request_id)], timeout=30)
    assert reply.request_id == request_id
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    assert dict(call.trailing_metadata())["x-request-id"] == request_id

    logs = traced_stack.log_dir
    assert logs is not None
    gateway = wait_for_log(logs / "gateway.log", lambda r: r.get("request_id") == request_id)
    assert [r["msg"] for r in gateway] == ["classified"], gateway
    assert gateway[0]["service"] == "gateway" and gateway[0]["level"] == "info"
    assert gateway[0]["model"] == reply.model and gateway[0]["top1"] == reply.predictions[0].label
    preprocess = wait_for_log(logs / "preprocess.log", lambda r: r.get("request_id") == request_id)
    assert [r["msg"] for r in preprocess] == ["preprocessed"], preprocess
    assert preprocess[0]["service"] == "preprocess" and preprocess[0]["format"] == "png"
    # Triton names the request id it was given on every step of the ensemble.
    deadline = time.monotonic() + 10
    while f"[request id: {request_id}]" not in (logs / "triton.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, "Triton's verbose log never names the request id"
        time.sleep(0.2)


def test_rejected_image_is_logged_with_its_request_id_by_both_services(traced_stack: Stack, stub) -> None:
    request_id = f"obs-bad-{uuid.uuid4().hex[:12]}"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(recognition_pb2.ClassifyRequest(image=b"not a photo, just text"),
                      metadata=[("x-request-id", request_id)], timeout=30)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.initial_metadata())["x-request-id"] == request_id
    logs = traced_stack.log_dir
    assert logs is not None
    for service, method in (("gateway", "Classify"), ("preprocess", "Preprocess")):
        records = wait_for_log(logs / f"{service}.log", lambda r: r.get("request_id") == request_id)
        assert records, f"{service} logged nothing with {request_id}"
        assert records[-1]["msg"].startswith(f"{method} failed: INVALID_ARGUMENT"), records
        assert records[-1]["code"] == "INVALID_ARGUMENT" and records[-1]["reason"] == "not_an_image"


def test_a_request_id_is_made_when_the_caller_sends_none(traced_stack: Stack, stub) -> None:
    reply, call = stub.Classify.with_call(recognition_pb2.ClassifyRequest(image=photo_bytes("chelsea.png")),
                                          timeout=30)
    assert len(reply.request_id) >= 16
    assert dict(call.initial_metadata())["x-request-id"] == reply.request_id
    assert traced_stack.log_dir is not None
    assert wait_for_log(traced_stack.log_dir / "gateway.log", lambda r: r.get("request_id") == reply.request_id)
