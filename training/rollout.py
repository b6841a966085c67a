"""See how a candidate version does, change its share, promote it or roll it back (one command each).

    python -m training.rollout status   --model fashion_cnn [--metrics http://gw-1:9101/metrics ...] [--json]
    python -m training.rollout set      --model fashion_cnn --canary 50      # or --shadow
    python -m training.rollout promote  --model fashion_cnn
    python -m training.rollout rollback --model fashion_cnn

A rollout of public model ``M`` is the candidate ensemble ``M__candidate`` that
``python -m training.publish --canary PERCENT`` (or ``--shadow``) wrote and loaded: its
version folder is the candidate's public version ``v``, its steps are pinned to the
candidate's members (``M_onnx`` ``v``), and its parameters say canary or shadow and the
share of callers (services/common/model_params.py). Every gateway replica reads it from
Triton about once a second, so a change reaches all of them within ~2 s and survives
restarts. In the words of Argo Rollouts / Flagger / KServe:

* ``status``: the split, and per version and role (serving, canary, shadow) the
  requests, errors and p50 / p99 latency, plus the top-1 agreement of the candidate with
  the serving version, summed over the gateways' Prometheus endpoints (``--metrics``).
  The counters are totals since each gateway started.
* ``set --canary P`` / ``set --shadow``: rewrites the candidate's config (atomically) and
  reloads it.
* ``promote``: ``M``'s config becomes the candidate's (pinned to its members), the
  candidate's version folder moves to ``M/v``, Triton loads ``M`` version ``v`` (and
  retires the old one once ``v`` is ready), then the candidate is unloaded and removed.
  No call fails: the gateway retries a version swap and sends canary callers whose
  candidate is gone to ``M``.
* ``rollback``: unloads and removes the candidate, and removes the classifier version it
  brought (``M_onnx/v``) unless a public model pins it, so the next publish cannot push
  the served classifier version out of ``M_onnx``'s two loaded versions.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.common import model_params
from training.publish import load
from training.repository import layout as repo

LOG = logging.getLogger("rollout")
DEFAULT_METRICS = "http://127.0.0.1:9101/metrics"
REQUESTS = "shopvision_gateway_rollout_requests_total"
ERRORS = "shopvision_gateway_rollout_errors_total"
SECONDS = "shopvision_gateway_rollout_request_duration_seconds"
AGREEMENT = "shopvision_gateway_shadow_agreement_total"
DROPPED = "shopvision_gateway_shadow_dropped_total"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="public model name, e.g. fashion_cnn")
    common.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="Triton model repository (default: %(default)s)")
    common.add_argument("--triton", default="127.0.0.1:8001",
                        help="Triton gRPC address; empty: only change files (default: %(default)s)")
    common.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for a model to become READY (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", parents=[common], help="the split and how each version does")
    status.add_argument("--metrics", action="append", default=None, metavar="URL",
                        help=f"a gateway's Prometheus endpoint; repeat for every replica (default: {DEFAULT_METRICS})")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")
    change = commands.add_parser("set", parents=[common], help="change the canary share or switch to shadow")
    mode = change.add_mutually_exclusive_group(required=True)
    mode.add_argument("--canary", type=float, metavar="PERCENT", help="canary answering PERCENT %% of callers")
    mode.add_argument("--shadow", action="store_true", help="shadow: a copy of the traffic, never answers")
    commands.add_parser("promote", parents=[common], help="make the candidate the served version")
    commands.add_parser("rollback", parents=[common], help="remove the candidate; the served version stays")
    return parser


# -- the candidate on disk -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateFiles:
    model: str
    folder: Path
    version: int
    text: str

    @property
    def rollout(self) -> repo.Rollout:
        found = repo.rollout_of(self.text)
        if found is None:
            raise SystemExit(f"{self.folder}/config.pbtxt has no {model_params.CANDIDATE_OF} parameter")
        return found


def candidate_files(repository: Path, model: str) -> CandidateFiles:
    folder = repository / model_params.candidate_name(model)
    config = folder / "config.pbtxt"
    if not config.exists():
        raise SystemExit(f"no rollout of {model}: {config} does not exist (publish one with "
                         f"python -m training.publish --model {model} --canary PERCENT)")
    versions = repo.versions(folder)
    if len(versions) != 1:
        raise SystemExit(f"{folder} has version folders {versions}; a candidate has exactly one")
    return CandidateFiles(model, folder, versions[0], config.read_text())


def served_version(repository: Path, model: str) -> int:
    """The public version Triton serves under ``latest 1``: the highest version folder of ``model``."""
    return int(repo.latest(repository / model).name)


def _triton_client(address: str):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(address)


def unload(triton: str, name: str, timeout_s: float) -> None:
    """Unload ``name`` and wait until Triton no longer has it READY."""
    client = _triton_client(triton)
    deadline = time.monotonic() + timeout_s
    try:
        client.unload_model(name)
        while client.is_model_ready(name):
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} still READY {timeout_s:.0f} s after unloading it")
            time.sleep(0.1)
    finally:
        client.close()
    LOG.info("Triton unloaded %s", name)


# -- commands --------------------------------------------------------------------------------------------------------
def set_split(args: argparse.Namespace) -> None:
    candidate = candidate_files(args.repository, args.model)
    if args.shadow:
        rollout = repo.Rollout(args.model, "shadow", 0.0)
    else:
        if not 0.0 <= args.canary <= 100.0:
            raise SystemExit(f"--canary {args.canary:g}: give a percentage within 0..100")
        rollout = repo.Rollout(args.model, "canary", args.canary)
    text = candidate.text
    for key, value in rollout.parameters().items():
        text = repo.with_parameter(text, key, value)
    repo.write_atomic(candidate.folder / "config.pbtxt", text)
    if args.triton:
        load(args.triton, [(candidate.folder.name, candidate.version)], args.timeout)
    LOG.info("%s version %d: %s", candidate.folder.name, candidate.version, describe(rollout))


def promote(args: argparse.Namespace) -> None:
    candidate = candidate_files(args.repository, args.model)
    public_dir = args.repository / args.model
    target = public_dir / str(candidate.version)
    if target.exists():
        raise SystemExit(f"{target} already exists: version {candidate.version} of {args.model} was published")
    public_text = repo.as_public(candidate.text, args.model)
    labels = candidate.folder / "labels.txt"
    # The version folder first, then labels and config (atomic renames): Triton sees the new version only with
    # the config that pins its members.
    (candidate.folder / str(candidate.version)).rename(target)
    if labels.exists():
        repo.write_atomic(public_dir / "labels.txt", labels.read_bytes())
    repo.write_atomic(public_dir / "config.pbtxt", public_text)
    if args.triton:
        load(args.triton, [(args.model, candidate.version)], args.timeout)
        unload(args.triton, candidate.folder.name, args.timeout)
    shutil.rmtree(candidate.folder)
    LOG.info("promoted %s version %d (%s)", args.model, candidate.version,
             repo.parameter_of(public_text, model_params.MEMBERS))


def pinned_anywhere(repository: Path, name: str, version: int) -> list[str]:
    """The models of ``repository`` whose ensemble steps run ``name`` version ``version``."""
    users = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        if (name, version) in repo.step_members(config.read_text()):
            users.append(config.parent.name)
    return users


def rollback(args: argparse.Namespace) -> None:
    candidate = candidate_files(args.repository, args.model)
    if args.triton:
        unload(args.triton, candidate.folder.name, args.timeout)
    shutil.rmtree(candidate.folder)
    LOG.info("rolled back %s version %d", args.model, candidate.version)
    classifier = repo.classifier_name(args.model)
    brought = dict(repo.step_members(candidate.text)).get(classifier)
    if brought is None or not (args.repository / classifier / str(brought)).is_dir():
        return
    users = pinned_anywhere(args.repository, classifier, brought)
    if users:
        LOG.info("keeping %s version %d: %s pin it", classifier, brought, ", ".join(users))
        return
    shutil.rmtree(args.repository / classifier / str(brought))
    if args.triton:  # Triton unloads the removed version; the served one is unchanged and keeps serving
        served = max(repo.versions(args.repository / classifier), default=0)
        if served:
            load(args.triton, [(classifier, served)], args.timeout)
    LOG.info("removed %s version %d", classifier, brought)


# -- status ----------------------------------------------------------------------------------------------------------
@dataclass
class Series:
    """What one (version, role) did, summed over the gateways."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))  # le -> cumulative count

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile in seconds, interpolated in the histogram buckets as Prometheus does."""
        return histogram_quantile(q, sorted(self.buckets.items()))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over (upper bound, cumulative count) pairs sorted by bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # in the +Inf bucket: the highest finite bound is the best estimate
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass
class Observed:
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    agree: float = 0.0
    disagree: float = 0.0
    dropped: float = 0.0
    unreachable: list[str] = field(default_factory=list)


def scrape(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text: str = response.read().decode()
    return text


def observe(model: str, texts: list[str]) -> Observed:
    """Sum the rollout metrics of ``model`` over gateways' Prometheus expositions."""
    observed = Observed()

    def series(labels: dict[str, str]) -> Series:
        return observed.series.setdefault((labels.get("version", ""), labels.get("role", "")), Series())

    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model:
                    continue
                if sample.name == REQUESTS:
                    series(labels).requests += sample.value
                elif sample.name == ERRORS:
                    series(labels).errors += sample.value
                elif sample.name == f"{SECONDS}_bucket":
                    series(labels).buckets[float(labels["le"])] += sample.value
                elif sample.name == AGREEMENT:
                    if labels.get("agree") == "true":
                        observed.agree += sample.value
                    else:
                        observed.disagree += sample.value
                elif sample.name == DROPPED:
                    observed.dropped += sample.value
    return observed


def describe(rollout: repo.Rollout) -> str:
    if rollout.mode == "shadow":
        return "shadow (a copy of every call; the serving version answers)"
    return f"canary answering {rollout.percent:g} % of callers"


def status_report(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model
    public = args.repository / model / "config.pbtxt"
    if not public.exists():
        raise SystemExit(f"{public} does not exist: {model} is not published in {args.repository}")
    public_text = public.read_text()
    report: dict[str, Any] = {
        "model": model,
        "serving": {"version": str(served_version(args.repository, model)),
                    "members": repo.parameter_of(public_text, model_params.MEMBERS) or ""},
        "candidate": None,
    }
    folder = args.repository / model_params.candidate_name(model)
    if (folder / "config.pbtxt").exists():
        candidate = candidate_files(args.repository, model)
        rollout = candidate.rollout
        report["candidate"] = {"name": folder.name, "version": str(candidate.version), "mode": rollout.mode,
                               "percent": rollout.percent,
                               "members": repo.parameter_of(candidate.text, model_params.MEMBERS) or ""}
    texts, unreachable = [], []
    for url in args.metrics or [DEFAULT_METRICS]:
        try:
            texts.append(scrape(url))
        except OSError as error:
            unreachable.append(f"{url}: {error}")
    observed = observe(model, texts)
    rows = []
    for (version, role), numbers in sorted(observed.series.items(),
                                           key=lambda item: (int(item[0][0]) if item[0][0].isdigit() else 0,
                                                             item[0][1])):
        p50, p99 = numbers.quantile(0.5), numbers.quantile(0.99)
        rows.append({"version": version, "role": role, "requests": int(numbers.requests),
                     "errors": int(numbers.errors),
                     "error_ratio": numbers.errors / numbers.requests if numbers.requests else 0.0,
                     "p50_ms": None if p50 is None else round(p50 * 1e3, 2),
                     "p99_ms": None if p99 is None else round(p99 * 1e3, 2)})
    compared = observed.agree + observed.disagree
    report.update({
        "versions": rows,
        "agreement": {"compared": int(compared), "agreed": int(observed.agree),
                      "ratio": observed.agree / compared if compared else None,
                      "dropped": int(observed.dropped)},
        "gateways": len(texts),
        "unreachable": unreachable,
    })
    return report


def format_report(report: dict[str, Any]) -> str:
    serving, candidate = report["serving"], report["candidate"]
    lines = [f"model {report['model']}: serving version {serving['version']} ({serving['members']})"]
    if candidate is None:
        lines.append("no rollout under way")
    else:
        rollout = repo.Rollout(report["model"], candidate["mode"], candidate["percent"])
        lines.append(f"candidate version {candidate['version']} ({candidate['members']}): {describe(rollout)}")
    lines.append(f"{'version':>8} {'role':<8} {'requests':>9} {'errors':>7} {'error %':>8} {'p50 ms':>8} "
                 f"{'p99 ms':>8}")
    for row in report["versions"]:
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.1f}"
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
        lines.append(f"{row['version']:>8} {row['role']:<8} {row['requests']:>9} {row['errors']:>7} "
                     f"{100 * row['error_ratio']:>8.2f} {p50:>8} {p99:>8}")
    agreement = report["agreement"]
    share = "-" if agreement["ratio"] is None else f"{100 * agreement['ratio']:.1f} %"
    lines.append(f"top-1 agreement with the serving version: {agreement['agreed']}/{agreement['compared']} "
                 f"({share}); comparisons dropped: {agreement['dropped']}")
    lines.append(f"from {report['gateways']} gateway(s)" +
                 "".join(f"\nunreachable: {line}" for line in report["unreachable"]))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.command == "status":
        report = status_report(args)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    {"set": set_split, "promote": promote, "rollback": rollback}[args.command](args)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
