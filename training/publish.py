"""Publish a trained model as the next numbered version and make the running Triton serve it.

    python -m training.publish --run-dir runs/fashion_cnn --model fashion_cnn --triton 127.0.0.1:8001
    python -m training.publish --run-dir runs/fashion_cnn --model fashion_cnn --triton 127.0.0.1:8001 --canary 10
    python -m training.publish --fuse fashion_fused --members fashion_effnet,fashion_cnn --triton 127.0.0.1:8001

Writes, for model ``M`` and next version ``v`` (one above every version of
``M`` and ``M_onnx``):

* ``M_onnx/v/model.onnx`` and ``M_onnx/config.pbtxt`` (ONNX classifier);
* ``M/labels.txt``, ``M/config.pbtxt`` (public ensemble with the recipe, its steps
  pinned to ``M_onnx`` version ``v`` and ``postprocess_softmax`` 1) and ``M/v/`` with
  the model card, ``eval.json``, ``run.json``, ``spec.json`` and plots.

With ``--canary PERCENT`` or ``--shadow`` the new version does not replace the
served one: the ensemble files go to the candidate ``M__candidate/`` instead
(config pinned to ``M_onnx`` ``v`` with ``shopvision.rollout.*`` parameters,
labels, ``v/`` with the model card) and every gateway sends it PERCENT % of the
callers (canary) or a copy of the traffic (shadow). ``python -m training.rollout``
shows how it does, changes the split, promotes it or rolls it back.

Files are written atomically and a new model appears in the repository in one
rename. With ``--triton`` the classifier and then the ensemble are loaded
through Triton's repository API (explicit model control): Triton loads version
``v`` next to the running one and retires the old one once ``v`` is ready (see
:func:`load` for the one race and how the gateway absorbs it); the gateway
reports the ensemble's version, so responses switch from ``v-1`` to ``v``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from services.common import model_params
from services.common.spec import Spec
from training.calibrate import NoValidationData, calibrate_model, write_config_parameters
from training.onnx.export import INPUT_NAME, OUTPUT_NAMES
from training.onnx.inference import session
from training.report.runs import load_run
from training.repository import layout as repo
from training.repository.recipe import read_config, read_spec, spec_from_dict, spec_to_dict

LOG = logging.getLogger("publish")
CARD_FILES = ("MODEL_CARD.md", "eval.json", "run.json", "classify_eval.json", "quantization.json",
              "distillation.json", "fusion.json", "curves.png", "confusion_test.png", "confusion_catalog.png",
              "confusion_feedback.png")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--triton", default="",
                        help="Triton gRPC address; load the new version there (default: only write files)")
    parser.add_argument("--version", type=int, default=0, help="version to write; 0 = next (default: %(default)s)")
    single = parser.add_argument_group("publish a trained model")
    single.add_argument("--run-dir", type=Path, help="output directory of training.train (+ training.evaluate)")
    single.add_argument("--model", help="public model name, e.g. fashion_cnn")
    single.add_argument("--model-file", default="model.onnx",
                        help="ONNX file in the run directory, e.g. model.int8.onnx (default: %(default)s)")
    single.add_argument("--description", default="", help="one line for the config header")
    single.add_argument("--threads", type=int, default=1,
                        help="intra_op_thread_count of the classifier (default: %(default)s)")
    single.add_argument("--instances", type=int, default=1,
                        help="classifier instances; 2 single-threaded ones suit EfficientNet on 2 cores "
                             "(docs/BENCHMARKS.md) (default: %(default)s)")
    fused = parser.add_argument_group("publish a fused model (members must be published)")
    fused.add_argument("--fuse", default="", help="name of the fused public model")
    fused.add_argument("--members", default="", help="comma-separated published model names")
    fused.add_argument("--weights", default="", help="comma-separated weights (default: equal)")
    fused.add_argument("--report-dir", type=Path, default=None,
                       help="folder whose MODEL_CARD.md / fusion.json go into the fused version")
    rollout = single.add_mutually_exclusive_group()
    rollout.add_argument("--canary", type=float, default=None, metavar="PERCENT",
                         help="publish as a canary answering PERCENT %% of callers (0..100) instead of "
                              "replacing the served version (default: replace it)")
    rollout.add_argument("--shadow", action="store_true",
                         help="publish as a shadow: gets a copy of the traffic, never answers (default: off)")
    calibration = parser.add_argument_group("confidence thresholds and drift reference (training.calibrate)")
    calibration.add_argument("--calibrate-limit", type=int, default=0,
                             help="calibrate on N class-balanced images of the validation split; 0 = all of it "
                                  "(default: %(default)s)")
    calibration.add_argument("--no-calibrate", action="store_true",
                             help="publish without thresholds and reference: `confident` then compares with the "
                                  "gateway's default threshold and no drift figure is exported (default: calibrate)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for READY (default: %(default)s)")
    return parser


def calibrate_version(repository: Path, ensemble: str, version: int, limit: int) -> None:
    """Thresholds and drift reference of the version just written, into its folder and its ensemble's config,
    before Triton loads it (so the gateway reads them with the version)."""
    try:
        calibration = calibrate_model(repository, ensemble, version, limit)
    except NoValidationData as error:
        LOG.warning("%s version %d is published uncalibrated: %s", ensemble, version, error)
        return
    write_config_parameters(repository, ensemble, calibration)


def onnx_signature(path: Path, spec: Spec) -> tuple[int, int]:
    """(classes, embedding size) of the exported graph; checks its tensor names and input layout."""
    sess = session(path)
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    if set(inputs) != {INPUT_NAME} or not set(OUTPUT_NAMES) <= outputs:
        raise SystemExit(f"{path}: graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                         f"expected {INPUT_NAME!r} and {list(OUTPUT_NAMES)}")
    if inputs[INPUT_NAME].type != "tensor(uint8)" or inputs[INPUT_NAME].shape[1:] != [spec.height, spec.width,
                                                                                        spec.channels]:
        raise SystemExit(f"{path}: input is {inputs[INPUT_NAME].type} {inputs[INPUT_NAME].shape}, expected uint8 "
                         f"[batch, {spec.height}, {spec.width}, {spec.channels}]")
    logits, embedding = sess.run(list(OUTPUT_NAMES), {
        INPUT_NAME: np.zeros((1, spec.height, spec.width, spec.channels), dtype=np.uint8)})
    return int(logits.shape[1]), int(embedding.shape[1])


def _stage_dir(repository: Path) -> Path:
    """A scratch folder on the repository's file system but outside it (Triton sees every sub-folder)."""
    return Path(tempfile.mkdtemp(prefix=f".{repository.name}-publish-", dir=repository.resolve().parent))


def _move_in(staged: Path, target: Path) -> None:
    if target.exists():
        raise SystemExit(f"{target} already exists")
    staged.rename(target)


def rollout_of_args(args: argparse.Namespace) -> repo.Rollout | None:
    """The rollout ``--canary`` / ``--shadow`` ask for (None: publish straight to 100 %)."""
    if args.shadow:
        return repo.Rollout(args.model, "shadow", 0.0)
    if args.canary is not None:
        if not 0.0 <= args.canary <= 100.0:
            raise SystemExit(f"--canary {args.canary:g}: give a percentage within 0..100")
        return repo.Rollout(args.model, "canary", args.canary)
    return None


def write_model(repository: Path, model: str, run_dir: Path, model_file: str, version: int = 0,
                description: str = "", threads: int = 1, instances: int = 1,
                rollout: repo.Rollout | None = None) -> int:
    """Write ``model`` version ``version`` (0 = next) from a training run; returns the version. With
    ``rollout`` the ensemble side goes to the candidate ``<model>__candidate`` instead of ``model``."""
    run = load_run(run_dir)
    meta = run["meta"]
    spec = spec_from_dict(meta["spec"])
    classes = list(meta["classes"])
    onnx_path = run_dir / model_file
    num_classes, embedding_dim = onnx_signature(onnx_path, spec)
    if num_classes != len(classes):
        raise SystemExit(f"{onnx_path} has {num_classes} outputs but the run lists {len(classes)} classes")
    version = version or repo.next_version(repository, model)
    classifier = repo.classifier_name(model)
    description = description or f"{meta['arch']} for {len(classes)} categories, trained on {meta.get('data')}"
    ensemble_dir, classifier_dir = repository / model, repository / classifier
    candidate_dir = repository / model_params.candidate_name(model)
    if (ensemble_dir / str(version)).exists() or (classifier_dir / str(version)).exists():
        raise SystemExit(f"version {version} of {model} already exists")
    if candidate_dir.exists():
        raise SystemExit(f"a rollout of {model} is under way ({candidate_dir}): promote it or roll it back first "
                         f"(python -m training.rollout promote|rollback --model {model})")
    if rollout is not None and not (ensemble_dir / "config.pbtxt").exists():
        raise SystemExit(f"{model} is not published yet: a canary or shadow needs a served version to compare "
                         "with (publish without --canary / --shadow first)")
    if ensemble_dir.exists():
        served = read_spec(ensemble_dir / "config.pbtxt")
        if served != spec:
            LOG.warning("%s: recipe changes from %s to %s with version %d", model, served, spec, version)

    stage = _stage_dir(repository)
    try:
        staged_classifier = stage / classifier
        staged_ensemble = stage / (model if rollout is None else candidate_dir.name)
        repo.write_atomic(staged_classifier / str(version) / "model.onnx", onnx_path.read_bytes())
        repo.write_atomic(staged_classifier / "config.pbtxt", repo.classifier_config(
            model, spec, num_classes, embedding_dim, description, threads=threads, instances=instances))
        card_dir = staged_ensemble / str(version)
        card_dir.mkdir(parents=True)
        repo.copy_files([run_dir / name for name in CARD_FILES], card_dir)
        repo.write_atomic(card_dir / "spec.json", json.dumps(
            {**spec_to_dict(spec), "stretch_contrast": meta.get("stretch_contrast", False),
             "model_file": model_file, "classes": classes}, indent=2))
        repo.write_atomic(staged_ensemble / "labels.txt", "\n".join(classes) + "\n")
        repo.write_atomic(staged_ensemble / "config.pbtxt", repo.ensemble_config(
            model, spec, num_classes, embedding_dim, description, classifier_version=version, rollout=rollout))
        # A new model moves in as whole folders; an existing one gets its version folders first,
        # then labels and configs (each an atomic rename), so Triton never sees a half-written model.
        targets = ((staged_classifier, classifier_dir),
                   (staged_ensemble, ensemble_dir if rollout is None else candidate_dir))
        for staged, target in targets:
            if not target.exists():
                _move_in(staged, target)
                continue
            _move_in(staged / str(version), target / str(version))
            for item in sorted(staged.iterdir(), key=lambda p: p.name != "labels.txt"):
                repo.write_atomic(target / item.name, item.read_bytes())
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    LOG.info("wrote %s and %s version %d", ensemble_dir if rollout is None else candidate_dir, classifier_dir,
             version)
    return version


def pinned_classifier_version(repository: Path, model: str) -> int:
    """The classifier version published model ``model`` pins (its latest classifier folder when unpinned)."""
    classifier = repo.classifier_name(model)
    config = repository / model / "config.pbtxt"
    pinned = dict(repo.step_members(config.read_text())) if config.exists() else {}
    version = pinned.get(classifier, -1)
    if version > 0:
        return version
    return int(repo.latest(repository / classifier).name)


def write_fused(repository: Path, fused: str, members: list[str], weights: list[float], version: int = 0,
                report_dir: Path | None = None) -> int:
    """Write a fused public model over published ``members`` (same recipe and labels)."""
    if len(members) < 2:
        raise SystemExit("--members needs at least two published models")
    specs = [read_spec(repository / m / "config.pbtxt") for m in members]
    labels = [(repository / m / "labels.txt").read_text() for m in members]
    if any(s != specs[0] for s in specs) or any(lab != labels[0] for lab in labels):
        raise SystemExit(f"members {members} differ in recipe or labels; they must see the same input")
    weights = weights or [1.0] * len(members)
    if len(weights) != len(members):
        raise SystemExit(f"{len(weights)} weights for {len(members)} members")
    classifier_config = read_config(repository / repo.classifier_name(members[0]) / "config.pbtxt")
    embedding_dim = next(int(o.dims[-1]) for o in classifier_config.output if o.name == "embedding")
    num_classes = len([line for line in labels[0].splitlines() if line.strip()])
    version = version or max(repo.versions(repository / fused), default=0) + 1
    description = f"fusion of {' + '.join(members)} (weights {weights})"
    stage = _stage_dir(repository)
    try:
        repo.install_combine_model(stage, fused, len(members), weights)
        card_dir = stage / fused / str(version)
        card_dir.mkdir(parents=True)
        if report_dir is not None:
            repo.copy_files([report_dir / name for name in ("MODEL_CARD.md", "fusion.json")], card_dir)
        repo.write_atomic(stage / fused / "labels.txt", labels[0])
        repo.write_atomic(stage / fused / "config.pbtxt", repo.fused_config(
            fused, members, specs[0], num_classes, embedding_dim, description,
            member_versions=[pinned_classifier_version(repository, m) for m in members]))
        for name in (f"{fused}{repo.COMBINE_SUFFIX}", fused):
            target = repository / name
            if not target.exists():
                _move_in(stage / name, target)
                continue
            for item in sorted((stage / name).iterdir(), key=lambda p: p.name.isdigit(), reverse=True):
                if item.is_dir():
                    if not (target / item.name).exists():
                        _move_in(item, target / item.name)
                else:
                    repo.write_atomic(target / item.name, item.read_bytes())
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    LOG.info("wrote fused model %s version %d over %s", fused, version, members)
    return version


def load(triton: str, models: list[tuple[str, int]], timeout_s: float) -> None:
    """Load (or reload) ``models`` (name, version) in order through Triton's repository API and wait
    until each version is READY. Triton loads the new version while the old one serves and retires
    the old one once the new one is ready; a request Triton bound to the old version in that instant
    fails with "not at ready state", which the gateway retries (services/gateway/triton.py)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton)
    deadline = time.monotonic() + timeout_s
    try:
        for name, version in models:
            start = time.perf_counter()
            client.load_model(name)
            while not client.is_model_ready(name, str(version)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} version {version} not ready after {timeout_s:.0f} s")
                time.sleep(0.1)
            LOG.info("Triton serves %s version %d (%.1f s)", name, version, time.perf_counter() - start)
    finally:
        client.close()


def main(args: argparse.Namespace) -> int:
    if args.fuse:
        members = [m.strip() for m in args.members.split(",") if m.strip()]
        weights = [float(w) for w in args.weights.split(",")] if args.weights else []
        version = write_fused(args.repository, args.fuse, members, weights, args.version, args.report_dir)
        if not args.no_calibrate:
            calibrate_version(args.repository, args.fuse, version, args.calibrate_limit)
        if args.triton:
            load(args.triton, [(f"{args.fuse}{repo.COMBINE_SUFFIX}", 1), (args.fuse, version)], args.timeout)
        return version
    if not args.run_dir or not args.model:
        raise SystemExit("give --run-dir and --model (or --fuse and --members)")
    rollout = rollout_of_args(args)
    version = write_model(args.repository, args.model, args.run_dir, args.model_file, args.version,
                          args.description, args.threads, args.instances, rollout)
    ensemble = args.model if rollout is None else model_params.candidate_name(args.model)
    if not args.no_calibrate:
        calibrate_version(args.repository, ensemble, version, args.calibrate_limit)
    if args.triton:
        load(args.triton, [(repo.classifier_name(args.model), version), (ensemble, version)], args.timeout)
    return version


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
