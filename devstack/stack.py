"""Run the whole stack on loopback: Triton (from the nvidia-pytriton wheel), preprocess and gateway.

    python -m devstack.stack [--no-smoke] [--gateway-port 50051] ...

Used by ``make run`` (foreground until Ctrl-C) and by the integration tests
(:class:`Stack` on free ports). Each service is a real process started with
the same entry point a container runs (``python -m services.<name>``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.supervisor import Backoff, Supervisor

LOG = logging.getLogger("stack")
REPO_ROOT = Path(__file__).resolve().parents[1]


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

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(7)))


@dataclass
class Stack:
    """The three services as child processes; ``start()`` returns once all report healthy."""

    ports: Ports = field(default_factory=Ports)
    model_repository: Path = REPO_ROOT / "model_repository"
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    @property
    def preprocess_address(self) -> str:
        return f"127.0.0.1:{self.ports.preprocess}"

    @property
    def triton_grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports.triton_grpc}"

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
        })
        env.update(self.extra_env)
        return env

    def start_service(self, name: str) -> subprocess.Popen:
        """Start (or restart) one of ``triton``, ``preprocess``, ``gateway``."""
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(log)
            out: IO[bytes] | None = log
        else:
            out = None
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=REPO_ROOT, env=self.env(),
                                stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start(self, timeout_s: float = 180.0) -> Stack:
        try:
            for name in ("triton", "preprocess", "gateway"):
                self.start_service(name)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

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

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        checks = {"triton": self.triton_ready,
                  "preprocess": lambda: self.grpc_serving(self.preprocess_address),
                  "gateway": self.gateway_ready}
        deadline = time.monotonic() + timeout_s
        pending = dict(checks)
        while pending:
            for name, check in list(pending.items()):
                proc = self.processes.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up"
                                       + (f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""))
                if check():
                    LOG.info("%s is ready", name)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s: {', '.join(pending)}")
            time.sleep(0.25)

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in ("gateway", "preprocess", "triton"):
            self.stop_service(name)
        for log in self._logs:
            log.close()
        self._logs.clear()


def smoke_check(address: str, image: Path) -> str:
    """Classify ``image`` through the gateway and return a one-line summary."""
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        reply = stub.Classify(recognition_pb2.ClassifyRequest(image=image.read_bytes(), top_k=3), timeout=30)
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
    parser = argparse.ArgumentParser(description="Run Triton, preprocess and gateway on loopback until Ctrl-C.")
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=value, dest=name, metavar="PORT",
                            help=f"{name.replace('_', ' ')} port (default: %(default)s)")
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--log-dir", default=str(REPO_ROOT / ".cache" / "logs"),
                        help="write each service's JSON log to DIR/<service>.log; '-' prints them here instead "
                             "(default: %(default)s)")
    parser.add_argument("--no-smoke", action="store_true", help="skip classifying a sample photo after start-up")
    parser.add_argument("--restart-backoff", type=float, default=1.0,
                        help="seconds before restarting a service that exited; doubles per crash up to 30 "
                             "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="start-up timeout in seconds (default: %(default)s)")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run Prometheus (Debian package) scraping the stack, with the shopvision rules")
    parser.add_argument("--prometheus-port", type=int, default=9090, metavar="PORT",
                        help="Prometheus UI/API port with --prometheus (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ports = Ports(**{name: getattr(args, name) for name in vars(Ports())})
    log_dir = None if args.log_dir == "-" else Path(args.log_dir)
    stack = Stack(ports=ports, model_repository=args.model_repository, log_dir=log_dir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    prometheus = None
    try:
        LOG.info("starting Triton, preprocess and gateway ...")
        stack.start(args.timeout)
        print(f"\nshopvision is up:\n"
              f"  gateway     grpc://{stack.gateway_address}   (shopvision.v1.ProductRecognition; reflection on)\n"
              f"  preprocess  grpc://{stack.preprocess_address}\n"
              f"  triton      http://127.0.0.1:{ports.triton_http}  grpc://{stack.triton_grpc_address}\n"
              f"  metrics     http://127.0.0.1:{ports.gateway_metrics}/metrics  "
              f"http://127.0.0.1:{ports.preprocess_metrics}/metrics  http://127.0.0.1:{ports.triton_metrics}/metrics\n"
              + (f"  logs        {log_dir}/{{triton,preprocess,gateway}}.log\n" if log_dir else ""),
              flush=True)
        if args.prometheus:
            from devstack.prometheus_local import LocalPrometheus, scrape_targets

            prometheus = LocalPrometheus(scrape_targets(ports.gateway_metrics, ports.preprocess_metrics,
                                                        ports.triton_metrics), port=args.prometheus_port,
                                         interval_s=5.0).start()
            print(f"  prometheus  {prometheus.url}/graph   (rules: {prometheus.url}/rules, "
                  f"alerts: {prometheus.url}/alerts)\n", flush=True)
        if not args.no_smoke and not stack.gateway_tls:
            print("smoke check: " + smoke_check(stack.gateway_address, sample_photo()), flush=True)
        print("serving; press Ctrl-C to stop", flush=True)
        # Heal like a pod: a service that exits is started again with backoff (devstack/supervisor.py).
        Supervisor(stack, backoff=Backoff(initial_s=args.restart_backoff)).run(threading.Event())
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        LOG.info("all services stopped")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
