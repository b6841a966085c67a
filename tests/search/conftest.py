"""Fixtures for similar-product search: a Fashion-MNIST catalog, and private gateways on the session stack."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.postgres import LocalPostgres
from devstack.stack import Stack
from tests.search.gateways import CATALOG_SIZE, QUERY_COUNT, PrivateGateway
from tests.search.postgres import running_postgres
from tools.catalog import CatalogItem, read_catalog


@pytest.fixture
def private_gateway(stack: Stack, tmp_path: Path) -> Iterator:
    """Factory: ``private_gateway(**env)`` → a not yet started :class:`PrivateGateway` on the stack's database."""
    made: list[PrivateGateway] = []

    def factory(**env: str) -> PrivateGateway:
        gateway = PrivateGateway.on(stack, tmp_path / f"gateway-{len(made)}", **env)
        made.append(gateway)
        return gateway

    yield factory
    for gateway in made:
        gateway.stack.stop()


@pytest.fixture(scope="session")
def fashion_catalog() -> list[CatalogItem]:
    return read_catalog(f"fashion-mnist:train:{CATALOG_SIZE}")


@pytest.fixture(scope="session")
def fashion_queries() -> list[CatalogItem]:
    return read_catalog(f"fashion-mnist:test:{QUERY_COUNT}")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A throw-away PostgreSQL of the catalog tests that need no Triton."""
    with running_postgres(tmp_path_factory.mktemp("catalog-pg") / "data") as server:
        yield server
