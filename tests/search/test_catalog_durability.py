"""An acknowledged write is durable: PostgreSQL SIGKILLed under concurrent IndexProduct calls, brought back by the
dev stack's supervisor, and later stopped and started cleanly (as ``make run`` twice would).

A private gateway on the session stack's Triton and preprocess uses a PostgreSQL of its own that this test
kills. Every OK reply must name a product that is there afterwards with its image and its embedding; a call
that could not be committed must answer UNAVAILABLE; a product whose reply was lost is whole or absent.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from shopvision.v1 import recognition_pb2 as pb
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import Ports, Stack
from devstack.supervisor import Backoff, Supervisor
from tests.metrics_util import scrape, value
from tests.search.gateways import PrivateGateway
from tools.catalog import CatalogItem, read_catalog

CATALOG = "durable"
WRITERS = 4


@pytest.fixture
def supervised_postgres(tmp_path: Path) -> Iterator[Stack]:
    """A PostgreSQL of its own under the dev stack's supervisor (restarts it 0.5 s after it dies)."""
    db = Stack(ports=Ports.free(), log_dir=tmp_path / "pg-logs", postgres_dir=tmp_path / "pg")
    db.start_service("postgres")
    db.postgres.wait_ready(60)
    db.postgres.ensure_database()
    stop = threading.Event()
    supervisor = Supervisor(db, names=("postgres",), backoff=Backoff(initial_s=0.5))
    thread = threading.Thread(target=supervisor.run, args=(stop, 0.1), daemon=True)
    thread.start()
    db.supervisor = supervisor  # type: ignore[attr-defined]
    yield db
    stop.set()
    thread.join(10)
    db.stop_service("postgres")


def stored(url: str) -> dict[str, tuple[str, bool, bool]]:
    """product id -> (image sha256 hex, has its image row, has an embedding of the serving version)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT p.product_id, encode(p.image_sha256, 'hex'),"
            "       EXISTS (SELECT 1 FROM images i WHERE i.sha256 = p.image_sha256),"
            "       EXISTS (SELECT 1 FROM embeddings e WHERE e.catalog_id = p.catalog_id"
            "               AND e.product_id = p.product_id AND e.model_version = c.model_version)"
            "  FROM products p JOIN catalogs c USING (catalog_id) WHERE c.name = %s", (CATALOG,)).fetchall()
    return {pid: (digest, has_image, has_vector) for pid, digest, has_image, has_vector in rows}


def test_acknowledged_writes_survive_a_database_kill_and_a_restart(stack: Stack, supervised_postgres: Stack,
                                                                    tmp_path: Path) -> None:
    db = supervised_postgres
    gateway = PrivateGateway.on(stack, tmp_path / "gateway", GATEWAY_CATALOG_DATABASE_URL=db.postgres_url,
                                GATEWAY_CATALOG_STATEMENT_TIMEOUT_MS="3000").start()
    items = read_catalog("fashion-mnist:train:240")
    acked: dict[str, str] = {}
    failures: list[tuple[str, grpc.StatusCode]] = []
    killed = threading.Event()

    async def write_all() -> None:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

            async def writer(share: list[CatalogItem]) -> None:
                for item in share:
                    image = item.read()
                    try:
                        await stub.IndexProduct(pb.IndexProductRequest(
                            product_id=item.product_id, image=image, catalog=CATALOG, category=item.category,
                            model="fashion_cnn"), timeout=20)
                    except grpc.aio.AioRpcError as error:
                        failures.append((item.product_id, error.code()))
                        await asyncio.sleep(0.05)
                        continue
                    acked[item.product_id] = hashlib.sha256(image).hexdigest()

            await asyncio.gather(*(writer(items[i::WRITERS]) for i in range(WRITERS)))

    def kill_when_writing() -> None:
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(db.processes["postgres"].pid, signal.SIGKILL)  # mid-stream: transactions are in flight
        killed.set()

    killer = threading.Thread(target=kill_when_writing)
    killer.start()
    try:
        asyncio.run(write_all())
    finally:
        killer.join(70)
    assert killed.is_set()
    print(f"{len(acked)} writes acknowledged, {len(failures)} refused while the database was down")
    assert db.supervisor.restarts["postgres"] >= 1  # type: ignore[attr-defined]
    # A write that could not be committed said so: UNAVAILABLE (never OK, never INTERNAL).
    assert {code for _, code in failures} <= {grpc.StatusCode.UNAVAILABLE}, failures[:5]
    if failures:  # ... and a metric counted each database failure
        errors = value(scrape(gateway.stack.ports.gateway_metrics), "shopvision_gateway_upstream_errors_total",
                       upstream="postgres", code="UNAVAILABLE")
        assert errors >= len(failures)
    # The gateway wrote again once the database was back (whether the outage cost any call depends on timing:
    # the pool may reconnect within a call's deadline).
    assert len(acked) > 40 + WRITERS
    db.postgres.wait_ready(60)

    after_crash = stored(db.postgres_url)
    for product_id, digest in acked.items():
        assert product_id in after_crash, f"acknowledged {product_id} was lost"
        assert after_crash[product_id] == (digest, True, True)
    # Nothing half-written: whatever is there (acknowledged or not) has its image and its vector.
    assert all(has_image and has_vector for _, has_image, has_vector in after_crash.values())
    unacked_present = set(after_crash) - set(acked)
    assert unacked_present <= {pid for pid, _ in failures}

    # A clean stop and start of the database and of the gateway (make run, twice): the catalog is still there.
    gateway.stop()
    db.supervisor._names = ()  # type: ignore[attr-defined]  # this stop is on purpose: no restart
    db.stop_service("postgres")
    db.start_service("postgres")
    db.postgres.wait_ready(60)
    gateway.start()
    assert set(stored(db.postgres_url)) == set(after_crash)
    stub = recognition_pb2_grpc.ProductRecognitionStub(grpc.insecure_channel(gateway.address))
    some = sorted(acked)[:3]
    for product_id in some:
        product = stub.GetProduct(pb.GetProductRequest(catalog=CATALOG, product_id=product_id), timeout=10)
        assert product.image_sha256 == acked[product_id]
    item = next(i for i in items if i.product_id in acked)
    top = stub.SearchSimilar(pb.SearchSimilarRequest(image=item.read(), k=1, catalog=CATALOG), timeout=30)
    assert top.matches[0].product_id == item.product_id
    gateway.stop()
