"""The catalog in PostgreSQL + pgvector: every query the gateway and the catalog tools run, in one place.

The pool owns the connections, pgvector's adapter sends vectors, and every value travels as a server-side
parameter. The only SQL composed at run time is an integer we computed (a vector dimension, a catalog id)
placed with :class:`psycopg.sql.Literal` into index DDL and into the cast that lets the planner use that
index, plus the filter expression that :mod:`services.gateway.catalog.filters` builds from placeholders.

Vectors are stored as float32 ``vector``: ``halfvec`` would halve memory and distance work, but on the fine-tuned
fashion embedding half-precision rounding reorders near-ties enough to cost recall@10 against exact float32
search (0.975 measured, docs/SEARCH.md). Each (catalog, model version) has its own partial HNSW index over
``embedding::vector(dim)``,
so a search never walks another catalog's graph, and a re-embedding fills a second index beside the one
that keeps answering.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.common.errors import InvalidInput, NotFound, Unavailable
from services.gateway import metrics
from services.gateway.catalog.filters import Filter, filter_sql
from services.gateway.catalog.migrate import migrate

LOG = logging.getLogger(__name__)

DEFAULT_CATALOG = "default"
# First key of the advisory lock that serialises index creation per catalog (the second key is the catalog id).
INDEX_LOCK = 0x73766978  # "svix"
# HNSW search depth of the near-duplicate check: it wants only the few closest products, which a shallow search
# finds (the searches of SearchSimilar use GATEWAY_SEARCH_EF).
DUPLICATE_EF_SEARCH = 40


@dataclass(frozen=True)
class StoreSettings:
    """Index and search parameters (GATEWAY_CATALOG_* / GATEWAY_SEARCH_*; see services/gateway/config.py)."""

    hnsw_m: int = 16
    hnsw_ef_construction: int = 128
    ef_search: int = 200
    # pgvector 0.8 iterative index scans: keep scanning the graph until the filter leaves k rows (or this many
    # tuples were visited), so a filtered search still returns k matches when k exist.
    max_scan_tuples: int = 20_000
    statement_timeout_ms: int = 5_000
    pool_min: int = 1
    pool_max: int = 8


@dataclass(frozen=True)
class CatalogRow:
    catalog_id: int
    name: str
    model: str
    model_version: str
    dim: int | None
    reembed_version: str
    reembed_dim: int | None
    created_at: datetime
    product_count: int = 0
    reembedded_count: int = 0


@dataclass(frozen=True)
class ProductRow:
    catalog: str
    product_id: str
    category: str
    metadata: dict[str, str]
    attributes: dict[str, list[str]]
    image_sha256: str
    image_bytes: int
    created_at: datetime
    updated_at: datetime
    model: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class Hit:
    product_id: str
    score: float
    category: str
    metadata: dict[str, str]
    attributes: dict[str, list[str]]


@dataclass(frozen=True)
class NewProduct:
    """One product to write: its reference image and one embedding per model version (serving, re-embedding)."""

    product_id: str
    category: str
    metadata: dict[str, str]
    attributes: dict[str, list[str]]
    image: bytes
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    replaced: bool
    catalog_size: int
    duplicates: list[Hit] = field(default_factory=list)


class StaleVersion(Exception):
    """The catalog switched versions between embedding and writing: embed again with :attr:`catalog`."""

    def __init__(self, catalog: CatalogRow) -> None:
        super().__init__(catalog.name)
        self.catalog = catalog


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def keep_image(conn: psycopg.AsyncConnection, digest: bytes, image: bytes) -> None:
    """Store the image (once per content) and hold it ``FOR KEY SHARE`` until commit, so a concurrent orphan
    clean-up cannot delete it under this write (if one just did, it is stored again). Products and feedback
    keep their photos through it."""
    while True:
        await conn.execute("INSERT INTO images (sha256, image) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                           (digest, image))
        cursor = await conn.execute("SELECT 1 FROM images WHERE sha256 = %s FOR KEY SHARE", (digest,))
        if await cursor.fetchone() is not None:
            return


def index_name(catalog_id: int, dim: int, version: str) -> str:
    """A stable, valid identifier for the HNSW index of one (catalog, version)."""
    digest = hashlib.sha1(version.encode()).hexdigest()[:10]
    return f"embeddings_hnsw_c{catalog_id}_d{dim}_{digest}"


def typed(dim: int) -> sql.Composable:
    """``vector(dim)``: the cast that matches the expression of the per-dimension HNSW indexes."""
    return sql.SQL("vector({})").format(sql.Literal(dim))


def encode_page_token(catalog: str, after: str) -> str:
    raw = json.dumps({"c": catalog, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, catalog: str) -> str:
    """The product id to continue after; ``InvalidInput`` for a token that is not one of ours for this catalog."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, token_catalog = data["a"], data["c"]
        if not isinstance(after, str) or not isinstance(token_catalog, str):
            raise ValueError
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidInput("page_token is malformed: pass next_page_token of the previous ListProducts reply",
                           reason="bad_page_token") from None
    if token_catalog != catalog:
        raise InvalidInput(f"page_token belongs to catalog {token_catalog!r}, not {catalog!r}",
                           reason="bad_page_token")
    return after


@contextlib.asynccontextmanager
async def database_errors(what: str) -> AsyncIterator[None]:
    """Turn a database failure into UNAVAILABLE: a write that could not be committed is never acknowledged."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.errors.QueryCanceled, PoolTimeout) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        LOG.warning("catalog database error while %s: %s", what, detail)
        metrics.UPSTREAM_ERRORS.labels("postgres", "UNAVAILABLE").inc()
        raise Unavailable(f"the catalog database is unavailable ({what}): {detail}", reason="catalog_db") from None


_CATALOG_COLUMNS = sql.SQL("catalog_id, name, model, model_version, dim, reembed_version, reembed_dim, created_at")


class CatalogStore:
    """Async access to the catalog tables through a psycopg pool. Opens lazily: the gateway starts (and
    classifies) while the database is still down; catalog calls answer UNAVAILABLE until it is reachable."""

    def __init__(self, url: str, settings: StoreSettings | None = None) -> None:
        self.url = url
        self.settings = settings or StoreSettings()
        self._migrated = False
        self.pool = AsyncConnectionPool(
            url, min_size=self.settings.pool_min, max_size=self.settings.pool_max, open=False,
            configure=self._configure, check=AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": 5}, name="catalog")

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        if not self._migrated:
            await migrate(conn)
            self._migrated = True
        await register_vector_async(conn)
        s = self.settings
        # Custom plans always: the per-catalog partial indexes match only when the planner sees the catalog id.
        for name, value in (("plan_cache_mode", "force_custom_plan"),
                            ("statement_timeout", str(s.statement_timeout_ms)),
                            ("hnsw.ef_search", str(s.ef_search)),
                            ("hnsw.iterative_scan", "relaxed_order"),
                            ("hnsw.max_scan_tuples", str(s.max_scan_tuples))):
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))

    def connection(self):  # type: ignore[no-untyped-def]
        return self.pool.connection(timeout=5.0)

    # -- catalogs ------------------------------------------------------------------------------------------------
    async def get_catalog(self, name: str, counts: bool = False) -> CatalogRow | None:
        async with self.connection() as conn:
            return await self._catalog(conn, name, counts)

    async def _catalog(self, conn: psycopg.AsyncConnection, name: str, counts: bool = False,
                       lock: str = "") -> CatalogRow | None:
        query = sql.SQL("SELECT {} FROM catalogs WHERE name = %s {}").format(_CATALOG_COLUMNS, sql.SQL(lock))
        row = await (await conn.execute(query, (name,))).fetchone()
        if row is None:
            return None
        catalog = CatalogRow(*row)
        if counts:
            catalog = await self._with_counts(conn, catalog)
        return catalog

    async def _with_counts(self, conn: psycopg.AsyncConnection, catalog: CatalogRow) -> CatalogRow:
        # The re-embedding progress is counted only while one runs (the count walks the catalog's vectors).
        cursor = await conn.execute(
            "SELECT coalesce((SELECT products FROM catalog_counts WHERE catalog_id = %(id)s), 0),"
            "       CASE WHEN %(v)s = '' THEN 0 ELSE (SELECT count(*) FROM embeddings"
            "            WHERE catalog_id = %(id)s AND model_version = %(v)s) END",
            {"id": catalog.catalog_id, "v": catalog.reembed_version})
        products, reembedded = await cursor.fetchone()  # type: ignore[misc]
        return dataclasses.replace(catalog, product_count=products, reembedded_count=reembedded)

    async def list_catalogs(self) -> list[CatalogRow]:
        async with self.connection() as conn:
            cursor = await conn.execute(sql.SQL("SELECT {} FROM catalogs ORDER BY name").format(_CATALOG_COLUMNS))
            return [await self._with_counts(conn, CatalogRow(*row)) for row in await cursor.fetchall()]

    async def create_catalog(self, name: str, model: str) -> tuple[CatalogRow, bool]:
        """The catalog ``name`` (created bound to ``model`` when new) and whether this call created it."""
        async with self.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO catalogs (name, model) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, model))
            created = await cursor.fetchone() is not None
            await conn.execute("INSERT INTO catalog_counts (catalog_id) SELECT catalog_id FROM catalogs WHERE name = %s"
                               " ON CONFLICT DO NOTHING", (name,))
            catalog = await self._catalog(conn, name, counts=True)
        assert catalog is not None
        if created:
            LOG.info("created catalog %s (model %s)", name, model)
        return catalog, created

    async def bind_version(self, catalog: CatalogRow, version: str, dim: int) -> CatalogRow:
        """Bind an empty catalog's serving version at its first write (a no-op when another writer did)."""
        async with self.connection() as conn:
            await self.ensure_index(conn, catalog.catalog_id, dim, version)
            await conn.execute("UPDATE catalogs SET model_version = %s, dim = %s, updated_at = now() "
                               "WHERE catalog_id = %s AND model_version = ''", (version, dim, catalog.catalog_id))
            bound = await self._catalog(conn, catalog.name)
        assert bound is not None
        return bound

    async def ensure_index(self, conn: psycopg.AsyncConnection, catalog_id: int, dim: int, version: str) -> None:
        """The partial HNSW index of one (catalog, version); built while the version has few rows (cheap)."""
        # CREATE INDEX IF NOT EXISTS is not safe against itself: two first writes racing (two replicas, or
        # concurrent calls) would both try. The advisory lock makes them take turns; the second finds it done.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (INDEX_LOCK, catalog_id))
            await self._create_index(conn, catalog_id, dim, version)

    async def _create_index(self, conn: psycopg.AsyncConnection, catalog_id: int, dim: int, version: str) -> None:
        s = self.settings
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON embeddings USING hnsw ((embedding::{typed}) vector_cosine_ops) "
            "WITH (m = {m}, ef_construction = {ef}) WHERE catalog_id = {catalog} AND model_version = {version}"
        ).format(name=sql.Identifier(index_name(catalog_id, dim, version)), typed=typed(dim), m=sql.Literal(s.hnsw_m),
                 ef=sql.Literal(s.hnsw_ef_construction), catalog=sql.Literal(catalog_id),
                 version=sql.Literal(version)))

    # -- writes --------------------------------------------------------------------------------------------------
    async def put(self, catalog: CatalogRow, product: NewProduct, duplicates_k: int = 0) -> WriteResult:
        """Insert or atomically replace one product (see :meth:`put_many`)."""
        return (await self.put_many(catalog, [product], duplicates_k))[0]

    async def put_many(self, catalog: CatalogRow, products: Sequence[NewProduct],
                       duplicates_k: int = 0) -> list[WriteResult]:
        """Insert or atomically replace products (distinct ids) with their images and embeddings, all in one
        transaction (a batch costs one commit, one catalog lock and one counter update), and find each one's
        ``duplicates_k`` nearest other products of the catalog in the same transaction.

        Holds the catalog row ``FOR SHARE``: a version switch (``FOR UPDATE``) waits for the write, and a write
        that was embedded for versions the catalog no longer needs raises :class:`StaleVersion`.
        """
        async with self.connection() as conn, conn.transaction():
            current = await self._catalog(conn, catalog.name, lock="FOR SHARE")
            if current is None:
                raise NotFound(f"catalog {catalog.name!r} was deleted", reason="unknown_catalog")
            needed = {v for v in (current.model_version, current.reembed_version) if v}
            if any(not needed <= set(product.embeddings) for product in products):
                raise StaleVersion(current)
            if duplicates_k:  # near-duplicates want only the closest few: a shallow search, this transaction only
                await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(DUPLICATE_EF_SEARCH),))
            replaced: list[bool] = []
            duplicates: list[list[Hit]] = []
            for product in products:
                replaced.append(await self._write(conn, current, product, needed))
                duplicates.append(await self._hits(conn, current, current.model_version,
                                                   product.embeddings[current.model_version], duplicates_k,
                                                   exclude=product.product_id) if duplicates_k else [])
            # Last, so that the counter's row lock (which serialises this catalog's writers) is held only briefly.
            size = await self._count(conn, current.catalog_id, replaced.count(False))
        return [WriteResult(was, size, dups) for was, dups in zip(replaced, duplicates, strict=True)]

    async def _write(self, conn: psycopg.AsyncConnection, catalog: CatalogRow, product: NewProduct,
                     needed: set[str]) -> bool:
        """One product's rows, in the caller's transaction; whether it replaced an existing product."""
        digest = sha256(product.image)
        await keep_image(conn, digest, product.image)
        cursor = await conn.execute(
            # The statement's snapshot gives the row as it was (no FOR UPDATE here: a locking CTE whose row the
            # upsert then updates returns nothing). A concurrent replace of the same id can make this image stale;
            # then at worst an unused image row stays behind, never a product without its image.
            "WITH old AS (SELECT image_sha256 FROM products WHERE catalog_id = %(c)s AND product_id = %(p)s)"
            " INSERT INTO products AS p (catalog_id, product_id, category, metadata, attributes, image_sha256,"
            "                            image_bytes) VALUES (%(c)s, %(p)s, %(cat)s, %(meta)s, %(attr)s, %(d)s, %(n)s)"
            " ON CONFLICT (catalog_id, product_id) DO UPDATE SET category = excluded.category,"
            "  metadata = excluded.metadata, attributes = excluded.attributes,"
            "  image_sha256 = excluded.image_sha256, image_bytes = excluded.image_bytes, updated_at = now()"
            " RETURNING (SELECT image_sha256 FROM old)",
            {"c": catalog.catalog_id, "p": product.product_id, "cat": product.category,
             "meta": Jsonb(product.metadata), "attr": Jsonb(product.attributes), "d": digest,
             "n": len(product.image)})
        row = await cursor.fetchone()
        previous = row[0] if row else None
        if previous is not None:
            await conn.execute("DELETE FROM embeddings WHERE catalog_id = %s AND product_id = %s",
                               (catalog.catalog_id, product.product_id))
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO embeddings (catalog_id, product_id, model_version, embedding, category) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(catalog.catalog_id, product.product_id, version, Vector(vector), product.category)
                 for version, vector in product.embeddings.items() if version in needed])
        if previous is not None and bytes(previous) != digest:
            await self._drop_orphan_image(conn, bytes(previous))
        return previous is not None

    async def delete(self, catalog: CatalogRow, product_id: str) -> int:
        """Remove one product (committed before this returns); the catalog's size after. NotFound when absent."""
        async with self.connection() as conn, conn.transaction():
            cursor = await conn.execute("DELETE FROM products WHERE catalog_id = %s AND product_id = %s "
                                        "RETURNING image_sha256", (catalog.catalog_id, product_id))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"product {product_id!r} is not in catalog {catalog.name!r}", reason="unknown_product")
            await self._drop_orphan_image(conn, row[0])
            return await self._count(conn, catalog.catalog_id, -1)

    async def _drop_orphan_image(self, conn: psycopg.AsyncConnection, digest: bytes) -> None:
        """Delete an image no product uses any more. A write of another transaction that took it meanwhile
        makes the delete fail on the foreign key: then it is not an orphan, and it stays."""
        try:
            async with conn.transaction():  # a savepoint: the failure must not abort the caller's transaction
                await conn.execute("DELETE FROM images WHERE sha256 = %(d)s AND NOT EXISTS "
                                   "(SELECT 1 FROM products WHERE image_sha256 = %(d)s)", {"d": digest})
        except psycopg.errors.ForeignKeyViolation:
            pass

    async def _count(self, conn: psycopg.AsyncConnection, catalog_id: int, change: int) -> int:
        """Apply ``change`` to the catalog's product counter (in the caller's transaction); the count after it."""
        if change == 0:
            row = await (await conn.execute("SELECT products FROM catalog_counts WHERE catalog_id = %s",
                                            (catalog_id,))).fetchone()
        elif change < 0:  # (the CHECK would refuse a negative row proposed to an upsert before its conflict)
            row = await (await conn.execute(
                "UPDATE catalog_counts SET products = products + %s WHERE catalog_id = %s RETURNING products",
                (change, catalog_id))).fetchone()
        else:
            row = await (await conn.execute(
                "INSERT INTO catalog_counts AS c (catalog_id, products) VALUES (%s, %s) ON CONFLICT (catalog_id)"
                " DO UPDATE SET products = c.products + excluded.products RETURNING c.products",
                (catalog_id, change))).fetchone()
        return int(row[0]) if row else 0

    # -- reads ---------------------------------------------------------------------------------------------------
    async def search(self, catalog: CatalogRow, version: str, vector: np.ndarray, k: int, category: str = "",
                     where: Filter | None = None, exclude: str = "", exact: bool = False) -> list[Hit]:
        """The ``k`` products nearest to ``vector`` among those embedded by ``version`` (one version only,
        never a mix), optionally of one category and matching an attribute filter. ``exact`` scans without
        the index (the reference that recall is measured against)."""
        async with self.connection() as conn:
            return await self._hits(conn, catalog, version, vector, k, category, where, exclude, exact)

    async def _hits(self, conn: psycopg.AsyncConnection, catalog: CatalogRow, version: str, vector: np.ndarray,
                    k: int, category: str = "", where: Filter | None = None, exclude: str = "",
                    exact: bool = False) -> list[Hit]:
        dim = int(vector.shape[0])
        query_vector = Vector(vector)
        condition, filter_params = filter_sql(where or Filter(()), sql.SQL("p.attributes"))
        query = sql.SQL(
            "SELECT e.product_id, (e.embedding::{typed} <=> %s::{typed}) AS distance, p.category, p.metadata,"
            "       p.attributes"
            "  FROM embeddings e JOIN products p ON p.catalog_id = e.catalog_id AND p.product_id = e.product_id"
            " WHERE e.catalog_id = {catalog} AND e.model_version = %s AND ({category}) AND ({filter})"
            "   AND e.product_id <> %s"
            " ORDER BY {order} LIMIT %s"
        ).format(typed=typed(dim), catalog=sql.Literal(catalog.catalog_id),
                 # Exact: the same distance on the untyped column, an expression no HNSW index matches.
                 order=sql.SQL("e.embedding <=> %s::vector" if exact else "e.embedding::{typed} <=> %s::{typed}"
                               ).format(typed=typed(dim)),
                 category=sql.SQL("e.category = %s") if category else sql.SQL("TRUE"), filter=condition)
        params = [query_vector, version, *([category] if category else []), *filter_params, exclude, query_vector, k]
        rows = await (await conn.execute(query, params)).fetchall()
        hits = [Hit(product_id, 1.0 - float(distance), cat, metadata, attributes)
                for product_id, distance, cat, metadata, attributes in rows]
        # relaxed_order iterative scans may return rows slightly out of order: the final order is by score.
        hits.sort(key=lambda hit: (-hit.score, hit.product_id))
        return hits

    async def get_product(self, catalog: CatalogRow, product_id: str) -> ProductRow:
        async with self.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_PRODUCT_SELECT + sql.SQL(" AND p.product_id = %(id)s"),
                                 {"catalog": catalog.catalog_id, "version": catalog.model_version, "id": product_id})
            row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"product {product_id!r} is not in catalog {catalog.name!r}", reason="unknown_product")
        return _product(catalog, row)

    async def list_products(self, catalog: CatalogRow, after: str, limit: int) -> tuple[list[ProductRow], bool]:
        """Up to ``limit`` products with ids after ``after`` in id order, and whether more follow."""
        async with self.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_PRODUCT_SELECT + sql.SQL(" AND p.product_id > %(after)s ORDER BY p.product_id"
                                                           " LIMIT %(limit)s"),
                                 {"catalog": catalog.catalog_id, "version": catalog.model_version, "after": after,
                                  "limit": limit + 1})
            rows = await cursor.fetchall()
        return [_product(catalog, row) for row in rows[:limit]], len(rows) > limit

    async def image(self, digest: bytes) -> bytes:
        async with self.connection() as conn:
            row = await (await conn.execute("SELECT image FROM images WHERE sha256 = %s", (digest,))).fetchone()
        if row is None:
            raise NotFound(f"no reference image {digest.hex()}", reason="unknown_image")
        return bytes(row[0])

    # -- re-embedding (tools/reembed.py) -------------------------------------------------------------------------
    async def begin_reembed(self, catalog: CatalogRow, version: str, dim: int) -> CatalogRow:
        """Mark ``version`` as being filled in: from now on every IndexProduct writes it too."""
        async with self.connection() as conn:
            await self.ensure_index(conn, catalog.catalog_id, dim, version)
            await conn.execute("UPDATE catalogs SET reembed_version = %s, reembed_dim = %s, updated_at = now() "
                               "WHERE catalog_id = %s", (version, dim, catalog.catalog_id))
            updated = await self._catalog(conn, catalog.name, counts=True)
        assert updated is not None
        return updated

    async def cancel_reembed(self, catalog: CatalogRow) -> None:
        """Forget the version being filled in and its vectors (the serving version is untouched)."""
        async with self.connection() as conn:
            current = await self._catalog(conn, catalog.name)
            if current is None or not current.reembed_version:
                return
            await conn.execute("UPDATE catalogs SET reembed_version = '', reembed_dim = NULL, updated_at = now() "
                               "WHERE catalog_id = %s", (current.catalog_id,))
        if current.reembed_dim is not None:
            await self.drop_version(current, current.reembed_version, current.reembed_dim)

    async def missing(self, catalog: CatalogRow, version: str, limit: int) -> list[tuple[str, bytes, str]]:
        """Products without an embedding of ``version``: (product_id, image sha256, category)."""
        async with self.connection() as conn:
            cursor = await conn.execute(
                "SELECT p.product_id, p.image_sha256, p.category FROM products p WHERE p.catalog_id = %(id)s"
                "   AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.catalog_id = p.catalog_id"
                "                   AND e.product_id = p.product_id AND e.model_version = %(v)s)"
                " ORDER BY p.product_id LIMIT %(limit)s", {"id": catalog.catalog_id, "v": version, "limit": limit})
            return [(pid, bytes(digest), category) for pid, digest, category in await cursor.fetchall()]

    async def add_embeddings(self, catalog: CatalogRow, version: str,
                             rows: Sequence[tuple[str, bytes, np.ndarray]]) -> int:
        """Store ``version`` embeddings of existing products (skipping any whose image changed meanwhile)."""
        async with self.connection() as conn, conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO embeddings (catalog_id, product_id, model_version, embedding, category)"
                    " SELECT p.catalog_id, p.product_id, %s, %s, p.category FROM products p"
                    "  WHERE p.catalog_id = %s AND p.product_id = %s AND p.image_sha256 = %s"
                    " ON CONFLICT DO NOTHING",
                    [(version, Vector(vector), catalog.catalog_id, pid, digest) for pid, digest, vector in rows])
                return cur.rowcount

    async def switch_version(self, catalog: CatalogRow, version: str) -> CatalogRow:
        """Serve ``version`` from now on, in one transaction, once every product has it (else ``RuntimeError``).
        The old version's rows stay until :meth:`drop_version`, so searches embedded just before the switch
        still find their version."""
        async with self.connection() as conn, conn.transaction():
            current = await self._catalog(conn, catalog.name, lock="FOR UPDATE")
            assert current is not None
            if current.reembed_version != version:
                raise RuntimeError(f"catalog {catalog.name} is not re-embedding into {version!r}")
            cursor = await conn.execute(
                "SELECT count(*) FROM products p WHERE p.catalog_id = %(id)s AND NOT EXISTS (SELECT 1 FROM"
                " embeddings e WHERE e.catalog_id = p.catalog_id AND e.product_id = p.product_id"
                " AND e.model_version = %(v)s)", {"id": current.catalog_id, "v": version})
            row = await cursor.fetchone()
            if row and row[0]:
                raise RuntimeError(f"{row[0]} products of {catalog.name} still lack a {version!r} embedding")
            await conn.execute(
                "UPDATE catalogs SET model_version = reembed_version, dim = reembed_dim, reembed_version = '',"
                " reembed_dim = NULL, updated_at = now() WHERE catalog_id = %s", (current.catalog_id,))
            switched = await self._catalog(conn, catalog.name, counts=True)
        assert switched is not None
        return switched

    async def drop_version(self, catalog: CatalogRow, version: str, dim: int) -> int:
        """Delete a version's embeddings and its index (never the serving or re-embedding version)."""
        async with self.connection() as conn:
            current = await self._catalog(conn, catalog.name)
            if current is None or version in (current.model_version, current.reembed_version):
                return 0
            cursor = await conn.execute("DELETE FROM embeddings WHERE catalog_id = %s AND model_version = %s",
                                        (catalog.catalog_id, version))
            await conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(
                sql.Identifier(index_name(catalog.catalog_id, dim, version))))
            return cursor.rowcount


_PRODUCT_SELECT = sql.SQL(
    "SELECT p.product_id, p.category, p.metadata, p.attributes, p.image_sha256, p.image_bytes, p.created_at,"
    "       p.updated_at, (SELECT e.model_version FROM embeddings e WHERE e.catalog_id = p.catalog_id"
    "                      AND e.product_id = p.product_id AND e.model_version = %(version)s) AS model_version"
    "  FROM products p WHERE p.catalog_id = %(catalog)s")


def _product(catalog: CatalogRow, row: dict) -> ProductRow:
    return ProductRow(catalog=catalog.name, product_id=row["product_id"], category=row["category"],
                      metadata=row["metadata"], attributes=row["attributes"],
                      image_sha256=bytes(row["image_sha256"]).hex(), image_bytes=row["image_bytes"],
                      created_at=row["created_at"], updated_at=row["updated_at"], model=catalog.model,
                      model_version=row["model_version"] or "")
