"""A throw-away real PostgreSQL (devstack's LocalPostgres) for catalog tests that need no Triton."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.postgres import LocalPostgres
from devstack.stack import free_port


@contextmanager
def running_postgres(data_dir: Path) -> Iterator[LocalPostgres]:
    server = LocalPostgres(data_dir, port=free_port())
    server.initialise()
    proc = subprocess.Popen(server.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        server.wait_ready(60)
        server.ensure_database()
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
