"""Private gateways for the search tests: more gateway processes on the session stack's Triton and preprocess.

Each has its own port; by default all of them use the session stack's PostgreSQL, which is the point: every
replica serves the same catalogs. Pass ``GATEWAY_CATALOG_DATABASE_URL`` to point one at another database.
Tests keep apart by catalog name.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

from devstack.stack import Stack, free_port

CATALOG_SIZE = 200  # Fashion-MNIST training images, 20 per class
QUERY_COUNT = 50  # Fashion-MNIST test images, 5 per class


@dataclasses.dataclass
class PrivateGateway:
    stack: Stack
    root: Path

    @classmethod
    def on(cls, stack: Stack, root: Path, **env: str) -> PrivateGateway:
        ports = dataclasses.replace(stack.ports, gateway=free_port(), gateway_metrics=free_port())
        extra = {"GATEWAY_CATALOG_DATABASE_URL": stack.postgres_url, **env}
        return cls(Stack(ports=ports, log_dir=root / "logs", extra_env=extra), root)

    @property
    def address(self) -> str:
        return self.stack.gateway_address

    @property
    def log(self) -> Path:
        return self.root / "logs" / "gateway.log"

    def start(self, timeout_s: float = 60.0) -> PrivateGateway:
        self.stack.start_service("gateway")
        deadline = time.monotonic() + timeout_s
        while not Stack.grpc_serving(self.address):
            code = self.stack.processes["gateway"].poll()
            if code is not None:
                raise RuntimeError(f"gateway exited with code {code}: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"private gateway not serving after {timeout_s} s")
            time.sleep(0.1)
        return self

    def start_expecting_exit(self, timeout_s: float = 60.0) -> int:
        """Start and wait until the process exits on its own; returns its exit code."""
        return self.stack.start_service("gateway").wait(timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stack.stop_service("gateway", sig)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
