"""Shared fixtures: the real stack (PostgreSQL, Triton from the wheel, preprocess, gateway) on free loopback ports."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import Ports, Stack, sample_photo


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One shared stack for the session. Tests that break services use :func:`make_stack` instead."""
    running = Stack(ports=Ports.free(), log_dir=tmp_path_factory.mktemp("stack-logs"),
                    postgres_dir=tmp_path_factory.mktemp("stack-postgres") / "data")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator:
    """Factory for a private stack (own ports, logs and PostgreSQL data) that the test may kill parts of."""
    started: list[Stack] = []

    def factory(**extra_env: str) -> Stack:
        root = tmp_path / f"stack-{len(started)}"
        private = Stack(ports=Ports.free(), log_dir=root, extra_env=extra_env, postgres_dir=root / "postgres")
        started.append(private)
        return private.start()

    yield factory
    for private in started:
        private.stop()


@pytest.fixture(scope="session")
def gateway_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.gateway_address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        yield channel


@pytest.fixture(scope="session")
def gateway(gateway_channel: grpc.Channel) -> recognition_pb2_grpc.ProductRecognitionStub:
    return recognition_pb2_grpc.ProductRecognitionStub(gateway_channel)


def photo_bytes(name: str) -> bytes:
    """Bytes of a real photo shipped in scikit-image or scikit-learn."""
    path = sample_photo(name)
    if not path.exists():
        import sklearn

        path = Path(sklearn.__file__).parent / "datasets" / "images" / name
    return path.read_bytes()
