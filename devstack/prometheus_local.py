"""A real Prometheus on loopback that scrapes a running stack and evaluates the shopvision rules.

    python -m devstack.prometheus_local [--port 9090] [--gateway-metrics-port 9101] ...

Used by ``python -m devstack.stack --prometheus`` (``make run RUN_ARGS=--prometheus``) so a newcomer can
open the Prometheus UI beside the stack, and by ``tests/observability`` to prove that every dashboard
query and every recording rule has data. The binary is Debian's ``prometheus`` (``make deps``).

The scrape jobs are named ``gateway``, ``preprocess`` and ``triton`` and every target carries a
``namespace`` label: the same labels the Kubernetes monitoring component gives them, so the
dashboards and rules need no local variant.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = REPO_ROOT / "deploy" / "k8s" / "components" / "monitoring" / "rules" / "shopvision.rules.yml"
# Every rule file of the monitoring component (the SLO rules, the model lifecycle's), as Kubernetes loads them.
RULES_FILES = sorted(RULES_FILE.parent.glob("*.rules.yml"))
JOBS = ("gateway", "preprocess", "triton")


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or refused a query."""


def scrape_targets(gateway_metrics: int, preprocess_metrics: int, triton_metrics: int,
                   host: str = "127.0.0.1") -> dict[str, list[str]]:
    """``{job: [host:port, ...]}`` for the three services of one stack."""
    return {"gateway": [f"{host}:{gateway_metrics}"],
            "preprocess": [f"{host}:{preprocess_metrics}"],
            "triton": [f"{host}:{triton_metrics}"]}


def config_document(targets: dict[str, list[str]], namespace: str, interval_s: float,
                    rule_files: list[Path]) -> dict[str, Any]:
    """The Prometheus configuration (JSON is valid YAML, so no YAML library is needed)."""
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addresses, "labels": {"namespace": namespace}}]}
            for job, addresses in targets.items()
        ],
    }


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("the prometheus binary is not installed: run `make deps` "
                              "(Debian package prometheus) or `apt-get install prometheus`")
    return found


@dataclass
class LocalPrometheus:
    """One Prometheus process on ``127.0.0.1:port`` with its own data directory; ``stop()`` removes it."""

    targets: dict[str, list[str]]
    port: int = 9090
    namespace: str = "local"
    interval_s: float = 1.0
    rule_files: list[Path] = field(default_factory=lambda: list(RULES_FILES))
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    _workdir: Path | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        binary = prometheus_binary()
        self._workdir = Path(tempfile.mkdtemp(prefix="shopvision-prometheus-"))
        config_file = self._workdir / "prometheus.yml"
        config_file.write_text(json.dumps(
            config_document(self.targets, self.namespace, self.interval_s, self.rule_files), indent=2))
        self._log = open(self.log_path or self._workdir / "prometheus.log", "ab")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={self._workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.log_path or (self._workdir / "prometheus.log" if self._workdir else None)
        return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- HTTP API --------------------------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; a query error raises :class:`PrometheusError`."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at the current time: the vector (or scalar, as one sample) it returns."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def scrapes_healthy(self) -> dict[str, str]:
        """``{scrape URL: health}`` of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run Prometheus on loopback, scraping a running shopvision stack, until Ctrl-C.")
    parser.add_argument("--port", type=int, default=9090, help="Prometheus UI/API port (default: %(default)s)")
    for service, port in (("gateway", 9101), ("preprocess", 9102), ("triton", 8002)):
        parser.add_argument(f"--{service}-metrics-port", type=int, default=port, metavar="PORT",
                            help=f"{service} metrics port to scrape (default: %(default)s)")
    parser.add_argument("--namespace", default="local",
                        help="namespace label given to every target (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="scrape and rule evaluation interval in seconds (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    prometheus = LocalPrometheus(
        scrape_targets(args.gateway_metrics_port, args.preprocess_metrics_port, args.triton_metrics_port),
        port=args.port, namespace=args.namespace, interval_s=args.interval)
    prometheus.start()
    rules = ", ".join(str(path.relative_to(REPO_ROOT)) for path in RULES_FILES)
    print(f"prometheus: {prometheus.url}  (rules: {rules}); Ctrl-C to stop", flush=True)
    try:
        while prometheus.process is not None and prometheus.process.poll() is None:
            time.sleep(1)
        print(f"prometheus exited: {prometheus.log_tail()}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        prometheus.stop()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
