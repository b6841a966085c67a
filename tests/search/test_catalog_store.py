"""The catalog store against a real PostgreSQL + pgvector (no Triton): migrations, filtered ANN search against exact
search with the same SQL filter, the plan that uses the per-catalog index, page tokens."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import psycopg
import pytest

from devstack.postgres import LocalPostgres
from services.common.errors import InvalidInput
from services.gateway.catalog.filters import AttributeLimits, Filter, parse_filter
from services.gateway.catalog.migrate import Migration, MigrationError, load_migrations, migrate
from services.gateway.catalog.store import (
    CatalogStore,
    NewProduct,
    decode_page_token,
    encode_page_token,
    index_name,
)

DIM = 64
PRODUCTS = 2000
CATEGORIES = [f"cat{i}" for i in range(10)]
TONES = ("dark", "mid", "light")
BRANDS = ("acme", "globex", "initech", "umbrella")


def fresh_database(server: LocalPostgres, name: str) -> str:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def test_migrations_apply_once_even_from_several_replicas_at_once(postgres: LocalPostgres) -> None:
    url = fresh_database(postgres, "migrations")

    async def replica() -> list[int]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await migrate(conn)

    async def all_at_once() -> list[list[int]]:
        return await asyncio.gather(*(replica() for _ in range(4)))

    applied = asyncio.run(all_at_once())
    versions = [m.version for m in load_migrations()]
    assert sorted(applied, key=len) == [[], [], [], versions]  # exactly one replica applied them
    assert asyncio.run(replica()) == []  # idempotent
    with psycopg.connect(url) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")] == versions

    edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in load_migrations()]

    async def with_edited() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrate(conn, edited)

    with pytest.raises(MigrationError, match="different contents"):
        asyncio.run(with_edited())


def clustered_products(rng: np.random.Generator) -> list[NewProduct]:
    centres = rng.normal(size=(len(CATEGORIES), DIM))
    products = []
    for i in range(PRODUCTS):
        c = i % len(CATEGORIES)
        vector = (centres[c] + 0.6 * rng.normal(size=DIM)).astype(np.float32)
        attributes = {"tone": [TONES[int(rng.integers(3))]],
                      "brand": sorted({BRANDS[int(rng.integers(4))] for _ in range(int(rng.integers(1, 3)))})}
        products.append(NewProduct(f"p{i:05d}", CATEGORIES[c], {}, attributes, f"image {i}".encode(),
                                   {"1": vector / np.linalg.norm(vector)}))
    return products


async def fill_and_search(url: str) -> dict[str, object]:
    rng = np.random.default_rng(7)
    store = CatalogStore(url)
    await store.open()
    try:
        a, _ = await store.create_catalog("a", "m")
        a = await store.bind_version(a, "1", DIM)
        b, _ = await store.create_catalog("b", "m")
        b = await store.bind_version(b, "1", DIM)
        products = clustered_products(rng)
        for start in range(0, PRODUCTS, 50):
            await asyncio.gather(*(store.put(a, p) for p in products[start:start + 50]))
        # Catalog b holds copies of a's first 100 vectors under other ids: they must never show up in a.
        for p in products[:100]:
            await store.put(b, NewProduct("b-" + p.product_id, p.category, {}, p.attributes, p.image, p.embeddings))
        limits = AttributeLimits()
        cases: list[tuple[str, Filter]] = [
            ("", Filter(())),
            ("", parse_filter("tone = light", limits)),
            ("cat3", Filter(())),
            ("cat3", parse_filter("(brand = acme OR brand = globex) AND tone = dark", limits)),
            ("", parse_filter("brand = umbrella AND tone = mid", limits)),
        ]
        recalls, short = [], []
        for category, where in cases:
            for _ in range(20):
                query = products[int(rng.integers(PRODUCTS))].embeddings["1"] + 0.3 * rng.normal(size=DIM)
                query = (query / np.linalg.norm(query)).astype(np.float32)
                ann = await store.search(a, "1", query, 10, category, where)
                exact = await store.search(a, "1", query, 10, category, where, exact=True)
                assert all(h.product_id.startswith("p") for h in ann)  # never catalog b's
                assert all(where.matches(h.attributes) and (not category or h.category == category) for h in ann)
                truth = {h.product_id for h in exact}
                recalls.append(len({h.product_id for h in ann} & truth) / max(1, len(truth)))
                if len(ann) < len(exact):
                    short.append((category, where, len(ann), len(exact)))
        async with store.connection() as conn:
            plan = await (await conn.execute(
                "EXPLAIN SELECT product_id FROM embeddings e WHERE e.catalog_id = %s AND e.model_version = '1' "
                f"ORDER BY e.embedding::vector({DIM}) <=> %s::vector({DIM}) LIMIT 10",
                (a.catalog_id, str(products[0].embeddings["1"].tolist())))).fetchall()
        return {"recall": float(np.mean(recalls)), "short": short, "plan": "\n".join(r[0] for r in plan),
                "index": index_name(a.catalog_id, DIM, "1")}
    finally:
        await store.close()


@pytest.mark.slow  # fills a catalog and compares HNSW with exact search (~15 s)
def test_filtered_ann_search_matches_exact_search_with_the_same_filter(postgres: LocalPostgres) -> None:
    result = asyncio.run(fill_and_search(fresh_database(postgres, "recall")))
    print(f"recall@10 of filtered HNSW search against exact search, {PRODUCTS} products: {result['recall']:.4f}")
    assert result["recall"] >= 0.98
    assert result["short"] == []  # iterative scans: k matches whenever k exist
    assert str(result["index"]) in str(result["plan"])  # the planner uses the catalog's own HNSW index


def test_page_tokens_round_trip_and_refuse_garbage() -> None:
    token = encode_page_token("shoes", "sku-42")
    assert decode_page_token(token, "shoes") == "sku-42"
    for bad in ("garbage!", "e30", token + "x", encode_page_token("bags", "sku-42")):
        with pytest.raises(InvalidInput) as error:
            decode_page_token(bad, "shoes")
        assert error.value.reason == "bad_page_token"


def test_the_schema_has_the_columns_the_catalog_needs(postgres: LocalPostgres, tmp_path: Path) -> None:
    url = fresh_database(postgres, "schema")

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrate(conn)

    asyncio.run(apply())
    with psycopg.connect(url) as conn:
        columns = {(t, c) for t, c in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'")}
    for needed in [("catalogs", "name"), ("catalogs", "model"), ("catalogs", "model_version"),
                   ("products", "product_id"), ("products", "category"), ("products", "attributes"),
                   ("products", "image_sha256"), ("products", "created_at"), ("products", "updated_at"),
                   ("embeddings", "embedding"), ("embeddings", "model_version"), ("images", "image")]:
        assert needed in columns


def test_first_writes_racing_into_a_new_catalog_all_succeed(postgres: LocalPostgres) -> None:
    """Replicas (here: concurrent calls on separate connections) binding a new catalog's version and index at once."""

    async def race() -> set[str]:
        stores = [CatalogStore(fresh_url) for _ in range(4)]
        for store in stores:
            await store.open()
        try:
            catalog, _ = await stores[0].create_catalog("racing", "m")
            rows = await asyncio.gather(*(store.bind_version(catalog, "3", DIM) for store in stores for _ in range(2)))
            vector = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
            # 16 new ids, then 8 of them again (replaces), then 4 deleted: the kept counter must equal count(*).
            for ids in (range(16), range(8)):
                await asyncio.gather(*(stores[i % 4].put(rows[0], NewProduct(f"r{i}", "c", {}, {}, b"x",
                                                                             {"3": vector})) for i in ids))
            sizes = await asyncio.gather(*(stores[i % 4].delete(rows[0], f"r{i}") for i in range(4)))
            assert sorted(sizes) == [12, 13, 14, 15]
            counted = await stores[0].get_catalog("racing", counts=True)
            assert counted is not None and counted.product_count == 12
            return {row.model_version for row in rows}
        finally:
            for store in stores:
                await store.close()

    fresh_url = fresh_database(postgres, "racing")
    assert asyncio.run(race()) == {"3"}
