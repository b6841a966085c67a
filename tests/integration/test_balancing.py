"""Client-side load balancing: the gateway spreads its calls over every preprocess replica its target resolves to,
rides out a replica killed under load, and reaches a replica added at run time within seconds.

Real processes only. Each preprocess replica has a loopback address of its own (127.0.0.2, 127.0.0.3, ...: Linux
routes all of 127.0.0.0/8 to the loopback interface), all on one port, as pods behind a headless Service. A private
gateway (on the session stack's Triton) reaches them through a fixed ``ipv4:`` list or through a DNS name served by a
small DNS server in this process, whose answer a test changes as Kubernetes changes a headless Service's records
(``dns://127.0.0.1:PORT/NAME:PORT``: no hosts file, no resolver setting of the machine is touched).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Stack, free_port
from services.gateway.channels import RENEW_EVERY_S, RenewingChannel, channel_options
from tests.conftest import photo_bytes
from tests.metrics_util import parse, scrape, value

NAME = "preprocess.balancing.test"
PREPROCESS_CALLS = "shopvision_preprocess_image_bytes_count"  # Preprocess calls only (health checks not counted)
LOOPBACK_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalDns:
    """A DNS server on a free loopback UDP port that answers A queries from :meth:`set` (NXDOMAIN for other names)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._records: dict[str, tuple[str, ...]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set(self, name: str, *ips: str) -> None:
        self._records[name.lower()] = ips

    def target(self, name: str, port: int) -> str:
        """A gRPC target resolving ``name`` at this server."""
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                self._sock.sendto(self._answer(query), peer)
            except (struct.error, IndexError, UnicodeDecodeError):
                continue  # not a query we understand: no answer, the resolver retries or gives up

    def _answer(self, query: bytes) -> bytes:
        query_id, flags = struct.unpack(">HH", query[:4])
        end, labels = 12, []
        while query[end]:
            labels.append(query[end + 1:end + 1 + query[end]].decode("ascii"))
            end += 1 + query[end]
        qtype = struct.unpack(">H", query[end + 1:end + 3])[0]
        question = query[12:end + 5]
        ips = self._records.get(".".join(labels).lower())
        # Only A records (AAAA and other types: the name exists, with no record of that type).
        answers = [struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips or ()
                   if qtype == 1]
        rcode = 0 if ips is not None else 3
        header = struct.pack(">HHHHHH", query_id, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)


@dataclasses.dataclass
class Replica:
    """One preprocess process on ``ip:port`` (its metrics on ``ip:metrics_port``)."""

    ip: str
    port: int
    log: Path
    metrics_port: int = dataclasses.field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Replica:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREPROCESS_ADDRESS": self.address,
               "PREPROCESS_METRICS_PORT": str(self.metrics_port), "PREPROCESS_WORKERS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.preprocess"], cwd=REPO_ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not Stack.grpc_serving(self.address):
            assert self.process.poll() is None, f"preprocess on {self.address} exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"preprocess on {self.address} not serving after {timeout_s} s"
            time.sleep(0.1)
        return self

    def metric(self, name: str) -> float:
        url = f"http://{self.ip}:{self.metrics_port}/metrics"
        with LOOPBACK_DIRECT.open(url, timeout=5) as response:
            samples = parse(response.read().decode())
        assert (name, ()) in samples, f"{name} missing from {url}"
        return value(samples, name)

    def calls(self) -> float:
        """Preprocess calls this replica has received (from its own /metrics)."""
        return self.metric(PREPROCESS_CALLS)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclasses.dataclass
class TritonReplica:
    """A second Triton (the default model only) on ``ip``, on the same gRPC port as the session stack's Triton."""

    ip: str
    grpc_port: int
    root: Path
    http_port: int = dataclasses.field(default_factory=free_port)
    metrics_port: int = dataclasses.field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self, model_repository: Path, model: str, timeout_s: float = 180.0) -> TritonReplica:
        env = {**os.environ, "TRITON_HOST": self.ip, "TRITON_GRPC_PORT": str(self.grpc_port),
               "TRITON_HTTP_PORT": str(self.http_port), "TRITON_METRICS_PORT": str(self.metrics_port),
               "TRITON_MODEL_REPOSITORY": str(model_repository), "TRITON_LOAD_MODELS": model,
               "TRITON_BACKEND_DIRECTORY": str(self.root / "triton-backends")}
        with open(self.root / f"triton-{self.ip}.log", "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.triton"], cwd=REPO_ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, timeout_s, f"Triton on {self.ip} ready")
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, f"Triton on {self.ip} exited"
        try:
            with LOOPBACK_DIRECT.open(f"http://{self.ip}:{self.http_port}/v2/health/ready", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def inferences(self, model: str) -> float:
        """Successful inferences of ``model`` on this Triton (its own /metrics)."""
        with LOOPBACK_DIRECT.open(f"http://{self.ip}:{self.metrics_port}/metrics", timeout=5) as response:
            samples = parse(response.read().decode())
        return sum(number for (name, labels), number in samples.items()
                   if name == "nv_inference_request_success" and ("model", model) in labels)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)


class Fleet:
    """Preprocess replicas on one port (one loopback address each) and private gateways in front of them."""

    def __init__(self, stack: Stack, root: Path) -> None:
        self.stack = stack
        self.root = root
        self.port = free_port()
        self.replicas: list[Replica] = []
        self.gateways: list[Stack] = []

    def replica(self) -> Replica:
        ip = f"127.0.0.{len(self.replicas) + 2}"
        started = Replica(ip, self.port, self.root / f"preprocess-{ip}.log").start()
        self.replicas.append(started)
        return started

    def gateway(self, preprocess_target: str, triton_target: str | None = None, timeout_s: float = 60.0) -> Stack:
        """A gateway process with these targets (Triton: the session stack's by default)."""
        ports = dataclasses.replace(self.stack.ports, gateway=free_port(), gateway_metrics=free_port())
        gateway = Stack(ports=ports, log_dir=self.root / f"gateway-{len(self.gateways)}", extra_env={
            "GATEWAY_PREPROCESS_ADDRESS": preprocess_target,
            "GATEWAY_TRITON_ADDRESS": triton_target or self.stack.triton_grpc_address,
            "GATEWAY_CATALOG_DATABASE_URL": "", "GATEWAY_LOG_LEVEL": "DEBUG"})
        self.gateways.append(gateway)
        process = gateway.start_service("gateway")
        deadline = time.monotonic() + timeout_s
        while not Stack.grpc_serving(gateway.gateway_address):
            assert process.poll() is None, f"gateway exited: {gateway_log(gateway)[-2000:]}"
            assert time.monotonic() < deadline, f"gateway not serving after {timeout_s} s"
            time.sleep(0.1)
        return gateway

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for replica in self.replicas:
            replica.stop(signal.SIGKILL)


def gateway_log(gateway: Stack) -> str:
    assert gateway.log_dir is not None
    path = gateway.log_dir / "gateway.log"
    return path.read_text(errors="replace") if path.exists() else ""


class Load:
    """``workers`` threads calling Classify through a gateway until :meth:`stop` (or ``max_s``); every outcome kept."""

    def __init__(self, address: str, workers: int, max_s: float = 15.0, image: bytes | None = None) -> None:
        self._address = address
        self._image = image or photo_bytes("coffee.png")
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_s
        self.codes: list[grpc.StatusCode] = []
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    stub.Classify(recognition_pb2.ClassifyRequest(image=self._image, top_k=1), timeout=30)
                    self.codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    self.codes.append(error.code())
                    self.failures.append(f"{error.code().name}: {error.details()}")

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)
        return self


def large_photo() -> bytes:
    """A 27 MP JPEG of a real photo: long enough in preprocessing that a kill cuts a call off mid-flight."""
    pixels = cv2.imdecode(np.frombuffer(photo_bytes("coffee.png"), np.uint8), cv2.IMREAD_COLOR)
    ok, encoded = cv2.imencode(".jpg", cv2.resize(pixels, (6000, 4500)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held (fails the test after ``timeout_s``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    server = LocalDns()
    yield server
    server.close()


@pytest.fixture
def fleet(stack: Stack, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(stack, tmp_path)
    yield running
    running.close()


@pytest.mark.parametrize("syntax", ["ipv4", "dns"])
def test_calls_spread_over_every_replica(fleet: Fleet, dns: LocalDns, syntax: str) -> None:
    replicas = [fleet.replica(), fleet.replica()]
    dns.set(NAME, *(r.ip for r in replicas))
    target = ("ipv4:" + ",".join(r.address for r in replicas) if syntax == "ipv4" else dns.target(NAME, fleet.port))
    gateway = fleet.gateway(target)
    before = [r.calls() for r in replicas]
    image = photo_bytes("coffee.png")
    with grpc.insecure_channel(gateway.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        for _ in range(60):
            assert stub.Classify(recognition_pb2.ClassifyRequest(image=image, top_k=1), timeout=30).predictions
    shares = [r.calls() - b for r, b in zip(replicas, before, strict=True)]
    assert sum(shares) == 60, shares
    # Round robin alternates; pick_first (gRPC's default) would give one replica all 60.
    assert min(shares) >= 20, f"calls per replica: {shares}"


def test_a_replica_killed_under_load_costs_no_call(fleet: Fleet, dns: LocalDns) -> None:
    survivor, victim = fleet.replica(), fleet.replica()
    dns.set(NAME, survivor.ip, victim.ip)
    gateway = fleet.gateway(dns.target(NAME, fleet.port))
    load = Load(gateway.gateway_address, workers=4, max_s=20.0, image=large_photo())
    try:
        wait_until(lambda: survivor.calls() >= 3 and victim.calls() >= 3, 10.0, "both replicas serving the load")
        before_kill = survivor.calls()
        wait_until(lambda: victim.metric("shopvision_preprocess_in_flight_requests") > 0, 5.0, "a call on the victim")
        killed_at = len(load.codes)
        victim.stop(signal.SIGKILL)  # no drain, no GOAWAY: the call in flight on it is cut off
        time.sleep(6.0)
    finally:
        load.stop()
    assert not load.failures, f"{len(load.failures)} of {len(load.codes)} calls failed: {load.failures[:5]}"
    finished_after = len(load.codes) - killed_at
    assert finished_after >= 10, "too few calls after the kill to tell"
    # Every call that ended after the kill was preprocessed by the survivor, first try or retry, except those
    # already past preprocessing (at Triton) at the kill: at most one per worker.
    assert survivor.calls() - before_kill >= finished_after - 4
    retried = value(scrape(gateway.ports.gateway_metrics), "shopvision_gateway_retries_total",
                    upstream="preprocess", outcome="retried")
    assert retried >= 1, "no call was cut off by the kill: the retry path went untested"
    print(f"{finished_after} calls after the kill, none failed; preprocess calls retried: {retried:.0f}")


def test_a_replica_added_at_run_time_gets_calls_within_seconds(fleet: Fleet, dns: LocalDns) -> None:
    first = fleet.replica()
    dns.set(NAME, first.ip)
    gateway = fleet.gateway(dns.target(NAME, fleet.port))
    load = Load(gateway.gateway_address, workers=2, max_s=40.0)
    try:
        wait_until(lambda: first.calls() >= 5, 10.0, "the first replica serving the load")
        added = fleet.replica()
        dns.set(NAME, first.ip, added.ip)  # a scale-up: the new pod's address joins the headless Service's records
        seconds = wait_until(lambda: added.calls() > 0, RENEW_EVERY_S + 5.0, "calls reaching the added replica")
        print(f"added replica got its first call {seconds:.1f} s after its address was published")
        # A scale-down: the pod's address leaves the records, then the pod gets SIGTERM and drains.
        dns.set(NAME, added.ip)
        first.stop(signal.SIGTERM)
        after_stop = added.calls()
        wait_until(lambda: added.calls() - after_stop >= 20, 15.0, "the remaining replica taking the load")
    finally:
        load.stop()
    assert not load.failures, f"{len(load.failures)} of {len(load.codes)} calls failed: {load.failures[:5]}"
    # The Triton channel is renewed on the same period under this load (services/gateway/triton.py): no call lost.
    assert gateway_log(gateway).count("triton: channel renewed") >= 1


async def slow_server_and_channels() -> tuple[grpc.aio.Server, RenewingChannel]:
    """A loopback server whose ``/test.Slow/Sleep`` sleeps the seconds it is sent, and a channel to it renewed
    every 0.2 s."""
    async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(float(request.decode()))
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = RenewingChannel("slow", lambda: grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(max_send_bytes=1024)), lambda channel: channel, 0.2)
    return server, channels


def test_a_renewal_lets_calls_in_flight_finish() -> None:
    """A renewed channel's calls in flight end normally on the retired channel, which is closed afterwards."""
    async def scenario() -> None:
        server, channels = await slow_server_and_channels()
        try:
            first = channels.get()
            slow = asyncio.ensure_future(first.unary_unary("/test.Slow/Sleep")(b"1.0", timeout=5))
            await asyncio.sleep(0.3)
            channels.get()  # a renewal is due: it starts in the background
            await asyncio.sleep(0.3)
            renewed = channels.get()
            assert renewed is not first and channels.renewals == 1
            assert await renewed.unary_unary("/test.Slow/Sleep")(b"0", timeout=5) == b"0"
            assert await slow == b"1.0"  # not cancelled by the renewal
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.UsageError, match="closed"):  # the retired channel closed once its call ended
                await first.unary_unary("/test.Slow/Sleep")(b"0", timeout=5)
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.slow  # starts and kills a second Triton under load (~25 s)
def test_a_triton_added_at_run_time_gets_calls_and_losing_it_costs_none(stack: Stack, fleet: Fleet, dns: LocalDns,
                                                                       tmp_path: Path) -> None:
    model = "efficientnet_lite0_imagenet"  # the gateway's default model
    added = TritonReplica("127.0.0.2", stack.ports.triton_grpc, tmp_path)
    try:
        added.start(stack.model_repository, model)
        dns.set("triton.balancing.test", "127.0.0.1")  # the session stack's Triton
        gateway = fleet.gateway(stack.preprocess_address, dns.target("triton.balancing.test", stack.ports.triton_grpc))
        load = Load(gateway.gateway_address, workers=4, max_s=40.0)
        try:
            time.sleep(2.0)
            assert added.inferences(model) == 0
            dns.set("triton.balancing.test", "127.0.0.1", "127.0.0.2")  # a scale-up of the Triton Deployment
            seconds = wait_until(lambda: added.inferences(model) > 0, RENEW_EVERY_S + 5.0,
                                 "inferences reaching the added Triton")
            print(f"added Triton got its first inference {seconds:.1f} s after its address was published")
            wait_until(lambda: added.inferences(model) >= 10, 10.0, "the added Triton taking a share")
            killed_at = len(load.codes)
            added.stop(signal.SIGKILL)  # its address stays published: round robin must skip it on its own
            time.sleep(6.0)
        finally:
            load.stop()
    finally:
        added.stop(signal.SIGKILL)
    assert not load.failures, f"{len(load.failures)} of {len(load.codes)} calls failed: {load.failures[:5]}"
    assert len(load.codes) - killed_at >= 20, "too few calls after the kill to tell"
    retried = value(scrape(gateway.ports.gateway_metrics), "shopvision_gateway_retries_total",
                    upstream="triton", outcome="retried")
    print(f"{len(load.codes) - killed_at} calls after the Triton kill, none failed; inferences retried: {retried:.0f}")


def test_close_does_not_wait_on_a_retired_channel() -> None:
    """Shutdown closes the current channel at once and gives a retired one's last call only a moment."""
    async def scenario() -> None:
        server, channels = await slow_server_and_channels()
        try:
            first = channels.get()
            slow = asyncio.ensure_future(first.unary_unary("/test.Slow/Sleep")(b"30", timeout=60))
            await asyncio.sleep(0.3)
            channels.get()
            await asyncio.sleep(0.3)
            renewed = channels.get()
            assert renewed is not first
            started = time.monotonic()
            await channels.close(retired_wait_s=0.5)
            assert time.monotonic() - started < 2.0
            with pytest.raises(grpc.aio.UsageError, match="closed"):
                await renewed.unary_unary("/test.Slow/Sleep")(b"0", timeout=5)
            slow.cancel()  # what a server shutdown does to the handler awaiting it
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.UsageError, match="closed"):  # the retired channel went with its call
                await first.unary_unary("/test.Slow/Sleep")(b"0", timeout=5)
        finally:
            await server.stop(None)

    asyncio.run(scenario())
