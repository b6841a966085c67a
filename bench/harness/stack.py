"""A private stack for one benchmark: every service on free loopback ports, stopped when the run ends."""
from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness.results import configure_logging, write_json
from devstack.stack import REPO_ROOT, Ports, Stack

LOG = logging.getLogger("bench.stack")


@contextmanager
def private_stack(log_dir: Path, env: Mapping[str, str] | None = None,
                  model_repository: Path = REPO_ROOT / "model_repository") -> Iterator[Stack]:
    """The stack on free ports with ``env`` added to its services' environment, healthy, then stopped."""
    stack = Stack(ports=Ports.free(), model_repository=model_repository, log_dir=log_dir, extra_env=dict(env or {}))
    LOG.info("starting a private stack (logs in %s) ...", log_dir)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def report_on_private_stack(
    args: argparse.Namespace, env: dict[str, str],
    measure_on: Callable[[Stack, argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
) -> dict[str, Any]:
    """Start a private stack with ``env``, run ``measure_on`` against it, print the JSON report
    (and write it to ``args.output`` when given), stop the stack."""
    configure_logging()
    with private_stack(args.log_dir, env) as stack:
        report = asyncio.run(measure_on(stack, args))
    print(write_json(report, args.output, indent=2))
    return report
