"""Versioned schema migrations: numbered SQL files applied once each, in order, under an advisory lock.

Every gateway replica runs :func:`migrate` at start-up (and again before its first catalog call if the
database was down then). The transaction-scoped advisory lock makes concurrent replicas take turns: the
first applies what is missing, the others then find nothing to do. Each file runs in that same transaction
with its checksum recorded, so a half-applied migration never exists and an edited one is refused.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

LOG = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key: any constant shared by every replica ("shopvisi" as a big-endian int64).
LOCK_KEY = int.from_bytes(b"shopvisi", "big", signed=True)


class MigrationError(RuntimeError):
    """The database holds a migration that differs from the file of the same number."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """``NNNN_name.sql`` files in version order (numbers must be unique)."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        number, _, name = path.stem.partition("_")
        migrations.append(Migration(int(number), name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number in {directory}: {versions}")
    return migrations


async def migrate(conn: psycopg.AsyncConnection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the missing migrations; returns the versions applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await conn.execute("""
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())""")
        cursor = await conn.execute("SELECT version, checksum FROM schema_migrations")
        applied = {version: checksum for version, checksum in await cursor.fetchall()}
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(f"migration {migration.version} ({migration.name}) was applied with "
                                         "different contents: never edit an applied migration, add a new one")
                continue
            await conn.execute(migration.sql.encode())
            await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                               (migration.version, migration.name, migration.checksum))
            applied_now.append(migration.version)
            LOG.info("applied schema migration %04d_%s", migration.version, migration.name)
    return applied_now
