"""The index survives gateway restarts and crashes; a bad index directory stops start-up with a clear error."""
from __future__ import annotations

import signal
from pathlib import Path

import grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from tests.search.gateways import PrivateGateway
from tools.catalog import CatalogItem


def index_items(address: str, items: list[CatalogItem]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        for item in items:
            stub.IndexProduct(recognition_pb2.IndexProductRequest(
                product_id=item.product_id, image=item.read(), metadata={"category": item.category}), timeout=30)


def results(address: str, queries: list[CatalogItem]) -> list[list[tuple[str, str]]]:
    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        return [[(m.product_id, m.label) for m in stub.SearchSimilar(
            recognition_pb2.SearchSimilarRequest(image=q.read(), k=5), timeout=30).matches] for q in queries]


def test_index_survives_restart_and_crash(private_gateway, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          fashion_catalog: list[CatalogItem]) -> None:
    index_dir = tmp_path / "index"
    gateway: PrivateGateway = private_gateway(index_dir).start()
    index_items(gateway.address, fashion_catalog[:30])
    before = results(gateway.address, fashion_catalog[:8])
    assert [r[0][0] for r in before] == [item.product_id for item in fashion_catalog[:8]]

    gateway.stop()  # graceful: writes a snapshot
    assert (index_dir / "snapshot.npz").exists()
    gateway.start()
    assert results(gateway.address, fashion_catalog[:8]) == before

    index_items(gateway.address, fashion_catalog[30:40])  # only in the write-ahead log ...
    after = results(gateway.address, fashion_catalog[:8] + fashion_catalog[30:34])
    gateway.stop(signal.SIGKILL)  # ... when the gateway dies without a chance to snapshot
    gateway.start()
    assert results(gateway.address, fashion_catalog[:8] + fashion_catalog[30:34]) == after
    assert '"replayed_writes": 10' in gateway.log_text()


def test_corrupt_index_stops_start_up_with_a_clear_error(private_gateway, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         fashion_catalog: list[CatalogItem]) -> None:
    index_dir = tmp_path / "index"
    gateway: PrivateGateway = private_gateway(index_dir).start()
    index_items(gateway.address, fashion_catalog[:5])
    gateway.stop()
    snapshot = index_dir / "snapshot.npz"
    damaged = bytearray(snapshot.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(damaged))
    assert gateway.start_expecting_exit() != 0
    assert f"cannot open the search index: search index {snapshot} is corrupt" in gateway.log_text()


def test_index_of_another_model_version_stops_start_up(private_gateway, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       fashion_catalog: list[CatalogItem]) -> None:
    index_dir = tmp_path / "index"
    gateway: PrivateGateway = private_gateway(index_dir).start()
    index_items(gateway.address, fashion_catalog[:3])
    gateway.stop()
    pinned: PrivateGateway = private_gateway(index_dir, GATEWAY_SEARCH_MODEL_VERSION="2")
    assert pinned.start_expecting_exit() != 0
    log = pinned.log_text()
    assert "holds embeddings of efficientnet_lite0_imagenet version 1" in log
    assert "GATEWAY_SEARCH_MODEL_VERSION=2" in log and "tools.index_catalog" in log
    other: PrivateGateway = private_gateway(index_dir, GATEWAY_SEARCH_MODEL="another_model")
    assert other.start_expecting_exit() != 0
    assert "searches with 'another_model'" in other.log_text()
