"""Rebuild a served model from scratch with one command: the whole chain that made it, up to a published version.

    python -m training.recipes fashion_effnet                          # full scale, CPU, into the staging repository
    python -m training.recipes fashion_effnet --smoke                  # minutes on CPU: checks the chain, not accuracy
    python -m training.recipes fashion_fused --device cuda --threads 8 # a GPU (bf16 autocast)
    python -m training.recipes fashion_cnn --repository model_repository --triton 127.0.0.1:8001  # the served one

Recipes (each stage is the ``python -m training.<tool>`` command logged in ``chain.json``):

* ``fashion_cnn`` (v1): ``train`` the seed CNN (10 epochs, no zoom), ``quantize`` (INT8 measured, not served),
  ``evaluate`` (test set, catalog-style photos, recipe comparison, model card), ``publish``.
* ``fashion_effnet`` (v4): ``train`` EfficientNet-Lite0 from the ImageNet weights at 112 px (8 epochs, v2),
  ``restart1`` (5 epochs from it, peak lr 8e-4) and ``restart2`` (4 more, 6e-4): two warm restarts; ``average``
  the two restarts' weights (batch-norm statistics re-estimated); ``export`` with test-time flip averaging in the
  graph and float16-stored weights (``model.fp16w.onnx``, the served file); ``quantize``; ``evaluate``;
  ``publish`` (2 instances).
* ``fashion_fused`` (v4): the two chains above (stages already done are skipped), then ``fusion`` (weights chosen
  on the validation split, ``training.compare fusion --weights val``) and ``publish`` of the ensemble over the two
  versions just published.
* ``efficientnet_lite0_imagenet``: nothing to train; ``export`` the ImageNet weights (what ``make models`` does).

v4 was chosen among candidates on the validation split (docs/MODELS.md); the recipe replays the chosen chain, not
the choice. ``--smoke`` keeps every stage and shrinks the data (300 training / 100 validation / 300 test images,
one epoch per cycle, 32 px, 50 catalog photos).

Layout: ``<output-dir>/<model>/<stage run>/`` (run directories as ``training.train`` writes them) and
``<output-dir>/<model>/chain.json``: each stage's command and wall time, the machine (CPU model, cores, GPU),
the date and this command. Resumable: a stage whose output exists is skipped (its wall time kept from the earlier
``chain.json``), an interrupted training continues from its ``checkpoint.pth``; ``--force`` redoes everything.

Publishing goes to ``--repository``, by default ``build/staging/model_repository``: a copy of the served
``model_repository/`` made on first use, so the new version lands beside the served ones without touching them.
Pass ``--repository model_repository`` (``make train-fashion-effnet PUBLISH=1``) to publish into the served
repository, and ``--triton`` to have a running Triton load it. The published version folder gets ``chain.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from training import average, compare, evaluate, export_imagenet, onnx_export, publish, quantize, train
from training.repository import layout

LOG = logging.getLogger("recipes")
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVED_REPOSITORY = REPO_ROOT / "model_repository"
STAGING_REPOSITORY = REPO_ROOT / "build" / "staging" / "model_repository"
PUBLISHED = "published.json"


@dataclass(frozen=True)
class Stage:
    """One step of a chain: ``python -m <tool> <argv()>``, done once ``done()`` holds."""

    name: str
    tool: ModuleType
    argv: Callable[[], list[str]]  # built when the stage runs: it may read what earlier stages wrote
    done: Callable[[], bool]
    after: Callable[[object], None] | None = None  # gets the tool's return value


@dataclass(frozen=True)
class Chain:
    """What every recipe needs to know: where runs go, where versions are published, the scale and the device."""

    root: Path
    repository: Path
    smoke: bool
    device: str
    threads: int
    triton: str

    def run_dir(self, model: str, run: str) -> Path:
        return self.root / model / run

    def train_flags(self) -> list[str]:
        flags = ["--device", self.device, "--threads", str(self.threads), "--seed", "0", "--no-progress"]
        flags += ["--amp"] if self.device == "cuda" else []
        return flags + (["--limit-train", "300", "--limit-val", "100"] if self.smoke else [])

    def test_flags(self) -> list[str]:
        return ["--threads", str(self.threads)] + (["--limit-test", "300"] if self.smoke else [])

    def catalog_count(self) -> int:
        return 50 if self.smoke else 2000


def _exists(path: Path) -> Callable[[], bool]:
    return path.exists


def _train_stage(chain: Chain, model: str, run: str, flags: list[str]) -> Stage:
    """``training.train`` into ``<model>/<run>``; continues from its own checkpoint after an interruption (a
    checkpoint without ``run.json``), starts afresh otherwise."""
    out = chain.run_dir(model, run)

    def argv() -> list[str]:
        interrupted = (out / "checkpoint.pth").exists() and not (out / "run.json").exists()
        resume = ["--resume", str(out / "checkpoint.pth")] if interrupted else []
        return [*flags, *chain.train_flags(), *resume, "--output-dir", str(out)]
    return Stage(run, train, argv, _exists(out / "run.json"))


def _published(chain: Chain, model: str) -> Path:
    return chain.root / model / PUBLISHED


def _is_published(chain: Chain, model: str) -> Callable[[], bool]:
    """Done only if published into this chain's repository (a staging run does not count for the served one)."""
    def done() -> bool:
        path = _published(chain, model)
        if not path.exists():
            return False
        record = json.loads(path.read_text())
        return bool(Path(record["repository"]).resolve() == chain.repository.resolve()
                    and (chain.repository / model / str(record["version"])).is_dir())
    return done


def _record_published(chain: Chain, model: str) -> Callable[[object], None]:
    def after(version: object) -> None:
        record = {"model": model, "repository": str(chain.repository), "version": version}
        _published(chain, model).parent.mkdir(parents=True, exist_ok=True)
        _published(chain, model).write_text(json.dumps(record, indent=2) + "\n")
        LOG.info("published %s version %s into %s", model, version, chain.repository)
    return after


def _triton(chain: Chain) -> list[str]:
    return ["--triton", chain.triton] if chain.triton else []


def fashion_cnn(chain: Chain) -> list[Stage]:
    model = "fashion_cnn"
    run = chain.run_dir(model, "train")
    epochs = ["--epochs", "1", "--batch-size", "32"] if chain.smoke else ["--epochs", "10", "--batch-size", "128"]
    quantize_scale = ["--calibration-count", "64", "--rounds", "1", "--seconds", "0.2"] if chain.smoke else []
    evaluate_scale = ["--no-benchmark", "--compare-count", "50"] if chain.smoke else []
    return [
        _train_stage(chain, model, "train", ["--arch", "seed_cnn", *epochs, "--lr", "2e-3", "--aug-scale", "0.0"]),
        Stage("quantize", quantize, lambda: ["--run-dir", str(run), *chain.test_flags(), *quantize_scale],
              _exists(run / "quantization.json")),
        Stage("evaluate", evaluate, lambda: [
            "--run-dir", str(run), "--name", model, "--catalog-count", str(chain.catalog_count()),
            "--compare-recipes", *evaluate_scale, *chain.test_flags()], _exists(run / "eval.json")),
        Stage("publish", publish, lambda: [
            "--repository", str(chain.repository), "--run-dir", str(run), "--model", model, *_triton(chain)],
              _is_published(chain, model), _record_published(chain, model)),
    ]


def fashion_effnet(chain: Chain) -> list[Stage]:
    model = "fashion_effnet"
    run = {name: chain.run_dir(model, name) for name in ("train", "restart1", "restart2", "average", "export")}
    size, batch = ("32", "32") if chain.smoke else ("112", "128")
    net = ["--arch", "efficientnet_lite0", "--net-size", size, "--batch-size", batch, "--backbone-lr-scale", "0.5",
           "--freeze-epochs", "0"]

    def epochs(full: int) -> list[str]:
        return ["--epochs", "1" if chain.smoke else str(full)]
    served_file = "model.fp16w.onnx"
    quantize_scale = ["--calibration-count", "64", "--rounds", "1", "--seconds", "0.2"] if chain.smoke else []
    return [
        _train_stage(chain, model, "train", [*net, *epochs(8), "--lr", "2e-3", "--warmup-epochs", "0.5"]),
        _train_stage(chain, model, "restart1", [*net, *epochs(5), "--lr", "8e-4", "--warmup-epochs", "0.3",
                                                "--init-from", str(run["train"] / "checkpoint.pth")]),
        _train_stage(chain, model, "restart2", [*net, *epochs(4), "--lr", "6e-4", "--warmup-epochs", "0.3",
                                                "--init-from", str(run["restart1"] / "checkpoint.pth")]),
        # The served file comes from the export stage, so the average needs no ONNX of its own.
        Stage("average", average, lambda: [
            "--checkpoints", str(run["restart1"] / "checkpoint.pth"), str(run["restart2"] / "checkpoint.pth"),
            "--output-dir", str(run["average"]), "--bn-images", "64" if chain.smoke else "10000",
            "--batch-size", batch, "--threads", str(chain.threads), "--no-export", "--no-progress"],
              _exists(run["average"] / "run.json")),
        Stage("export", onnx_export, lambda: [
            "--run-dir", str(run["average"]), "--output-run-dir", str(run["export"]), "--flip-tta",
            "--float16-weights"], _exists(run["export"] / served_file)),
        Stage("quantize", quantize, lambda: ["--run-dir", str(run["export"]), *chain.test_flags(), *quantize_scale],
              _exists(run["export"] / "quantization.json")),
        Stage("evaluate", evaluate, lambda: [
            "--run-dir", str(run["export"]), "--model-file", served_file, "--name", model,
            "--catalog-count", str(chain.catalog_count()), *(["--no-benchmark"] if chain.smoke else []),
            *chain.test_flags()], _exists(run["export"] / "eval.json")),
        Stage("publish", publish, lambda: [
            "--repository", str(chain.repository), "--run-dir", str(run["export"]), "--model", model,
            "--model-file", served_file, "--instances", "2", *_triton(chain)],
              _is_published(chain, model), _record_published(chain, model)),
    ]


def fashion_fused(chain: Chain) -> list[Stage]:
    model, members = "fashion_fused", ("fashion_effnet", "fashion_cnn")
    report = chain.run_dir(model, "fusion")
    member_runs = (chain.run_dir("fashion_effnet", "export"), chain.run_dir("fashion_cnn", "train"))

    def publish_argv() -> list[str]:
        weights = json.loads((report / "fusion.json").read_text())["weights"]
        return ["--repository", str(chain.repository), "--fuse", model, "--members", ",".join(members),
                "--weights", ",".join(f"{w:.2f}" for w in weights), "--report-dir", str(report), *_triton(chain)]
    own = [
        Stage("fusion", compare, lambda: [
            "fusion", "--members", ",".join(str(r) for r in member_runs), "--weights", "val",
            "--output-dir", str(report), "--catalog-count", str(chain.catalog_count()), *chain.test_flags()],
              _exists(report / "fusion.json")),
        Stage("publish", publish, publish_argv, _is_published(chain, model), _record_published(chain, model)),
    ]
    return [*_prefixed("fashion_effnet", fashion_effnet(chain)), *_prefixed("fashion_cnn", fashion_cnn(chain)), *own]


def efficientnet_lite0_imagenet(chain: Chain) -> list[Stage]:
    model = "efficientnet_lite0_imagenet"
    return [Stage("export", export_imagenet, lambda: ["--repository", str(chain.repository)],
                  _is_published(chain, model), lambda _: _record_published(chain, model)(1))]


def _prefixed(prefix: str, stages: list[Stage]) -> list[Stage]:
    return [Stage(f"{prefix}: {s.name}", s.tool, s.argv, s.done, s.after) for s in stages]


RECIPES: dict[str, Callable[[Chain], list[Stage]]] = {
    "fashion_cnn": fashion_cnn, "fashion_effnet": fashion_effnet, "fashion_fused": fashion_fused,
    "efficientnet_lite0_imagenet": efficientnet_lite0_imagenet}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(RECIPES), help="served model to rebuild")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="runs and chain.json go to <output-dir>/<model>/ (default: runs/recipes, "
                             "runs/recipes-smoke with --smoke)")
    parser.add_argument("--repository", type=Path, default=STAGING_REPOSITORY,
                        help="model repository to publish into; created as a copy of --seed-from if missing "
                             "(default: %(default)s)")
    parser.add_argument("--seed-from", type=Path, default=SERVED_REPOSITORY,
                        help="repository a missing --repository starts as a copy of (default: %(default)s)")
    parser.add_argument("--triton", default="", help="Triton gRPC address to load the published version on "
                                                     "(default: only write files)")
    parser.add_argument("--smoke", action="store_true", help="every stage on a few hundred images (minutes on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="training device; cuda adds bf16 autocast (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every stage (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo the stages whose outputs exist")
    return parser


def command_line(args: argparse.Namespace) -> str:
    """The ``python -m training.recipes`` command that reproduces ``args`` (flags that differ from the defaults)."""
    defaults = vars(get_args_parser().parse_args([args.model]))
    parts = ["python", "-m", "training.recipes", args.model]
    for key, value in vars(args).items():
        if key == "model" or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def machine() -> dict[str, object]:
    """Where the chain ran: CPU model (``/proc/cpuinfo``), cores, GPU, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextlib.contextmanager
def _argv_of(tool: ModuleType, argv: list[str]) -> Iterator[None]:
    """Tools that record their own command line read ``sys.argv``: make it theirs while they run."""
    saved = sys.argv
    sys.argv = [tool.__name__, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def seed_repository(repository: Path, seed_from: Path) -> None:
    if repository.exists() or repository.resolve() == seed_from.resolve():
        return
    LOG.info("%s: new staging repository, a copy of %s", repository, seed_from)
    repository.parent.mkdir(parents=True, exist_ok=True)
    staged = repository.with_name(f".{repository.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(seed_from, staged, ignore=shutil.ignore_patterns("__pycache__"))
    staged.rename(repository)


def check_scale(root: Path, smoke: bool) -> None:
    """Refuse to resume full-scale stages on smoke-scale runs (or the other way round): they would be skipped."""
    for path in sorted(root.glob("*/chain.json")):
        if json.loads(path.read_text()).get("smoke") != smoke:
            raise SystemExit(f"{path.parent} holds {'full' if smoke else 'smoke'}-scale runs; "
                             f"give another --output-dir")


def earlier_stages(root: Path, model: str) -> dict[str, dict]:
    """Stages recorded by earlier runs under ``root``: this model's by name, other models' (the members a fused
    chain runs) as ``"<model>: <stage>"``, so a skipped stage keeps the wall time it took when it ran."""
    found: dict[str, dict] = {}
    for path in sorted(root.glob("*/chain.json")):
        record = json.loads(path.read_text())
        prefix = "" if record.get("model") == model else f"{record.get('model')}: "
        for stage in record.get("stages", []):
            name = f"{prefix}{stage['name']}".removeprefix(f"{model}: ")
            if stage.get("ran") or name not in found:
                found[name] = {**stage, "date": stage.get("date", record.get("date"))}
    return found


class ChainLog:
    """``chain.json``, rewritten after every stage so an interrupted chain still says how far it got."""

    def __init__(self, path: Path, model: str, command: str, chain: Chain) -> None:
        self.path = path
        self.earlier = earlier_stages(path.parent.parent, model)
        self.record: dict = {
            "model": model, "command": command, "smoke": chain.smoke, "device": chain.device,
            "threads": chain.threads, "repository": str(chain.repository),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "stages": [], "wall_s": 0.0, "wall_s_ran_now": 0.0}

    def add(self, stage: Stage, command: str, wall_s: float | None) -> None:
        entry = {"name": stage.name, "command": command, "wall_s": wall_s, "ran": wall_s is not None}
        if wall_s is None:
            earlier = self.earlier.get(stage.name, {})
            entry.update(command=earlier.get("command", ""), wall_s=earlier.get("wall_s"), date=earlier.get("date"))
        else:
            entry["date"] = self.record["date"]
        self.record["stages"].append(entry)
        self.record["wall_s"] = round(sum(s["wall_s"] or 0.0 for s in self.record["stages"]), 1)
        self.record["wall_s_ran_now"] = round(sum(s["wall_s"] for s in self.record["stages"] if s["ran"]), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=2) + "\n")


def run_stages(stages: list[Stage], log: ChainLog, force: bool) -> None:
    for stage in stages:
        if stage.done() and not force:
            LOG.info("%s: done before, skipping", stage.name)
            log.add(stage, "", None)
            continue
        argv = stage.argv()
        command = shlex.join(["python", "-m", stage.tool.__name__, *argv])
        LOG.info("%s: %s", stage.name, command)
        start = time.perf_counter()
        with _argv_of(stage.tool, argv):
            result = stage.tool.main(stage.tool.get_args_parser().parse_args(argv))
        if stage.after is not None:
            stage.after(result)
        wall_s = round(time.perf_counter() - start, 1)
        LOG.info("%s: done in %.1f s", stage.name, wall_s)
        log.add(stage, command, wall_s)


def main(args: argparse.Namespace) -> dict:
    import torch

    root = args.output_dir or Path("runs") / ("recipes-smoke" if args.smoke else "recipes")
    check_scale(root, args.smoke)
    if args.smoke and args.repository.resolve() == SERVED_REPOSITORY.resolve():
        raise SystemExit("--smoke models are not for serving: give a staging --repository")
    chain = Chain(root, args.repository, args.smoke, args.device, args.threads, args.triton)
    log = ChainLog(chain.root / args.model / "chain.json", args.model, command_line(args), chain)
    seed_repository(chain.repository, args.seed_from)
    threads = torch.get_num_threads()
    try:
        run_stages(RECIPES[args.model](chain), log, args.force)
    finally:
        torch.set_num_threads(threads)
    published = json.loads(_published(chain, args.model).read_text())
    version_dir = chain.repository / args.model / str(published["version"])
    if version_dir.is_dir():
        layout.write_atomic(version_dir / "chain.json", json.dumps(log.record, indent=2) + "\n")
    LOG.info("%s: chain done in %.0f s (stages: %s); published version %s in %s", args.model,
             log.record["wall_s"], ", ".join(f"{s['name']} {s['wall_s']} s" for s in log.record["stages"]),
             published["version"], chain.repository)
    return log.record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
