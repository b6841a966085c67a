"""Per-class confidence thresholds and the drift reference of a published model version, from its validation split.

    python -m training.calibrate --repository model_repository --model fashion_effnet
    python -m training.calibrate --repository model_repository --all --threads 2

For a public model's version (default: the latest) this scores the **validation split** its training run held
out (:func:`training.data.datasets.run_split` with the split arguments of the run's ``run.json``; the test set is
not read), in-process exactly as ``training.evaluate`` does: each image as a PNG upload through the preprocess
service's own code (``services.preprocess.imaging``) with the model's recipe, then the served ONNX file(s) in
ONNX Runtime and the softmax. A fused model (``<fused>_combine`` over several classifiers) is computed from its
members' ONNX files and the combine step's ``weights``, as the combine model does (weighted mean of the members'
softmax), so no running Triton is needed.

Threshold rule (one per class, for the class the model answers, i.e. its top-1):
the **lowest top-1 score t at which the validation answers naming that class with a score >= t are at least
--target-precision right** (default 0.95). Of all thresholds that give that precision, it leaves the most answers
confident. A tie at t is all in or all out; a class whose answers never reach the target (at any score) gets
the threshold 2.0: no score reaches it, the class is never confident. Precision-at-a-floor rather than the best-F1
point because ``confident`` is a promise to the caller (tools.categorize skips review on it): best-F1 would accept
whatever precision the class happens to balance at (Shirt around 0.85), the floor makes the promise the same for
every class and leaves the classes the model confuses to review.

Writes ``<model>/<version>/calibration.json`` (beside ``MODEL_CARD.md``): the thresholds, rule, per-class and
overall precision / coverage at the thresholds on validation, and the drift reference (top-1 class shares and the
top-1 score histogram, 20 bins over 0..1, on the same images). Then, unless ``--no-config``, when the version is
the one ``<model>/config.pbtxt`` serves, sets ``shopvision.thresholds``, ``shopvision.threshold_rule`` and
``shopvision.reference`` there (only those lines change), and refreshes the card's "Confidence thresholds"
section. Triton reads a changed config when the model is loaded again (explicit model control: its repository
API's load), and the gateway then on its next model refresh. Models without validation data on this machine
(the ImageNet model) are skipped with a message: the gateway uses its default threshold for them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from services.common import model_params
from services.common.spec import Spec
from training.data.datasets import (
    FASHION_MNIST,
    SPLIT_DEFAULTS,
    fashion_mnist_raw,
    load_dataset,
    run_split_of,
    source_labels,
    stratified_subset,
)
from training.data.uploads import encode_png, preprocess_all
from training.onnx import inference
from training.report import confidence
from training.report.confidence import confident_summary
from training.report.metrics import softmax
from training.repository import layout
from training.repository.parameters import set_parameters
from training.repository.recipe import read_config, spec_from_dict, spec_from_model_config

LOG = logging.getLogger("calibrate")
TARGET_PRECISION = 0.95
# Above every softmax score: the threshold of a class that never reaches the target precision.
NEVER_CONFIDENT = 2.0
SCORE_BINS = 20
CALIBRATION_FILE = "calibration.json"


class NoValidationData(Exception):
    """The model's validation split cannot be rebuilt here (no training run recorded, or its data is missing)."""


@dataclass(frozen=True)
class Member:
    """One ONNX classifier the public model runs, with its weight in the mean of probabilities."""

    classifier: str  # Triton model name, e.g. fashion_effnet_onnx
    version: int
    weight: float

    @property
    def public(self) -> str:
        return self.classifier.removesuffix(layout.CLASSIFIER_SUFFIX)


def rule_text(target: float = TARGET_PRECISION) -> str:
    """The ``shopvision.threshold_rule`` string (shown in ListModels and the model card)."""
    return (f"precision>={target:g} on the validation split: per class, the lowest top-1 score at or above which "
            f"that class's answers reach it; {NEVER_CONFIDENT:g} (never confident) where none does")


def class_threshold(scores: np.ndarray, correct: np.ndarray, target: float = TARGET_PRECISION) -> dict:
    """The threshold of one class from its answers: the top-1 ``scores`` of the images the model named this
    class for and whether each was ``correct``. Also the precision and coverage (share of these answers that
    are confident) at it; ``best_precision`` is the highest precision any threshold reaches."""
    answers = len(scores)
    if answers == 0:
        return {"threshold": NEVER_CONFIDENT, "answers": 0, "confident": 0, "precision": None, "coverage": 0.0,
                "best_precision": None}
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], correct[order].astype(np.int64)
    right = np.cumsum(hits)
    taken = np.arange(1, answers + 1)
    # A threshold can only fall below a group of tied scores: evaluate at the last answer of each group.
    group_end = np.r_[ranked[1:] != ranked[:-1], True]
    precision = right / taken
    reaches = group_end & (precision >= target - 1e-12)
    best = float(precision[group_end].max())
    if not reaches.any():
        return {"threshold": NEVER_CONFIDENT, "answers": answers, "confident": 0, "precision": None,
                "coverage": 0.0, "best_precision": best}
    last = int(np.flatnonzero(reaches)[-1])
    return {"threshold": float(ranked[last]), "answers": answers, "confident": last + 1,
            "precision": float(precision[last]), "coverage": (last + 1) / answers, "best_precision": best}


def choose_thresholds(probabilities: np.ndarray, labels: np.ndarray, classes: list[str] | tuple[str, ...],
                      target: float = TARGET_PRECISION) -> dict:
    """Per-class thresholds (label order) and the per-class / overall precision and coverage they give."""
    predicted = probabilities.argmax(axis=1)
    top1 = probabilities[np.arange(len(predicted)), predicted]
    correct = predicted == labels
    per_class = []
    for class_id, name in enumerate(classes):
        mine = predicted == class_id
        row = class_threshold(top1[mine], correct[mine], target)
        per_class.append({"class": name, **row, "support": int((labels == class_id).sum())})
    thresholds = [row["threshold"] for row in per_class]
    confident = top1 >= np.asarray(thresholds)[predicted]
    return {"thresholds": thresholds, "per_class": per_class,
            "overall": confident_summary(correct, confident)}


def score_edges(bins: int = SCORE_BINS) -> list[float]:
    return [round(i / bins, 6) for i in range(bins + 1)]


def reference_distribution(probabilities: np.ndarray, split: str) -> dict:
    """The drift reference: shares of each top-1 class and the top-1 score histogram (bins [a, b), the last one
    closed, as ``numpy.histogram`` and ``services.gateway.drift`` count them)."""
    count = len(probabilities)
    predicted = probabilities.argmax(axis=1)
    top1 = probabilities[np.arange(count), predicted]
    edges = score_edges()
    class_counts = np.bincount(predicted, minlength=probabilities.shape[1])
    score_counts, _ = np.histogram(top1, bins=np.asarray(edges))
    return {"class_share": [round(float(c) / count, 6) for c in class_counts], "score_edges": edges,
            "score_share": [round(float(c) / count, 6) for c in score_counts], "count": int(count), "split": split}


# -- the model's members, recipe and validation split, read from the repository ---------------------------------
def _parameters(config) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {key: value.string_value for key, value in config.parameters.items()}


def resolve_members(repository: Path, model: str, version: int) -> list[Member]:
    """The ONNX classifiers behind ``model`` version ``version`` and their weights (1 for a single model)."""
    config = read_config(repository / model / "config.pbtxt")
    pins = dict(item.rsplit(":", 1) for item in _parameters(config).get(model_params.MEMBERS, "").split(",")
                if ":" in item)
    latest = layout.versions(repository / model)[-1:] == [version]
    members: list[tuple[str, int]] = []
    combine = ""
    for step in config.ensemble_scheduling.step:
        if step.model_name.endswith(layout.CLASSIFIER_SUFFIX):
            pinned = int(pins.get(step.model_name, step.model_version))
            members.append((step.model_name, pinned))
        elif step.model_name.endswith(layout.COMBINE_SUFFIX):
            combine = step.model_name
    if not members:
        raise SystemExit(f"{model}: its ensemble runs no ONNX classifier ({layout.CLASSIFIER_SUFFIX})")
    if len(members) == 1:
        name, pinned = members[0]
        # A single model's classifier version is its public version (training.publish writes both); the config's
        # pin describes the version it serves.
        chosen = pinned if latest and pinned > 0 else version
        if not latest and not (repository / name / str(chosen)).is_dir():
            raise SystemExit(f"{model} v{version}: {repository / name / str(chosen)} is not in the repository")
        return [Member(name, chosen if chosen > 0 else _latest(repository, name), 1.0)]
    if not latest:
        LOG.warning("%s v%d is not the served version: its members are taken from the current config", model,
                    version)
    weights = _combine_weights(repository, combine, len(members))
    return [Member(name, pinned if pinned > 0 else _latest(repository, name), weight)
            for (name, pinned), weight in zip(members, weights, strict=True)]


def _latest(repository: Path, classifier: str) -> int:
    return int(layout.latest(repository / classifier).name)


def _combine_weights(repository: Path, combine: str, members: int) -> list[float]:
    """The combine step's ``weights`` parameter, normalised as its model.py does (equal when absent)."""
    given = _parameters(read_config(repository / combine / "config.pbtxt")).get("weights", "") if combine else ""
    weights = [float(w) for w in given.split(",")] if given else [1.0] * members
    if len(weights) != members:
        raise SystemExit(f"{combine}: {len(weights)} weights for {members} members")
    return [w / sum(weights) for w in weights]


def _split_source(repository: Path, model: str, version: int, members: list[Member]) -> tuple[str, dict[str, str]]:
    """(data source, split arguments) of the run that validated this version: its own ``run.json``, else the
    first member's (a fused model's weights were chosen on its members' shared split)."""
    candidates = [repository / model / str(version) / "run.json"]
    candidates += [repository / m.public / str(m.version) / "run.json" for m in members]
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if path.exists():
            run = json.loads(path.read_text())
            args = {key: str(run.get("args", {}).get(key, default)) for key, default in SPLIT_DEFAULTS.items()}
            source = str(run.get("meta", {}).get("data") or run.get("args", {}).get("data") or FASHION_MNIST)
            LOG.info("split of %s: %s", path, ", ".join(f"{k}={v}" for k, v in args.items()))
            return source, args
    raise NoValidationData(
        f"{model} v{version}: no run.json records how it was trained (looked at {', '.join(map(str, candidates))}); "
        "there is no validation split to calibrate it on here. The gateway uses its default threshold for it.")


def version_spec(repository: Path, model: str, version: int) -> Spec:
    """The version's recipe: its ``spec.json`` where published with one, else the ensemble's config."""
    recorded = repository / model / str(version) / "spec.json"
    if recorded.exists():
        return spec_from_dict(json.loads(recorded.read_text()))
    return spec_from_model_config(read_config(repository / model / "config.pbtxt"))


def model_labels(repository: Path, model: str) -> tuple[str, ...]:
    """The public model's labels (``labels.txt`` beside its config), in class order."""
    text = (Path(repository) / model / "labels.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def validation_images(source: str, split_args: dict[str, str], spec: Spec, classes: tuple[str, ...],
                      limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(model-ready images, labels, description) of the validation split, each image through the preprocess
    service's code as an upload; ``limit`` takes a class-balanced subset of it (0 = all)."""
    try:
        labels, _ = source_labels(source, "train", classes)
    except FileNotFoundError as error:
        raise NoValidationData(f"the training data {source!r} is not on this machine: {error}") from None
    _, val_idx = run_split_of(labels, split_args)
    whole = len(val_idx)
    if limit:
        val_idx = val_idx[stratified_subset(labels[val_idx], limit, int(split_args["seed"]))]
    split = (f"validation split of {source} (training.data.datasets.run_split, "
             + ", ".join(f"{k}={v}" for k, v in split_args.items()) + f"): {len(val_idx)} of {whole} images")
    start = time.perf_counter()
    if source == FASHION_MNIST:
        raw, all_labels = fashion_mnist_raw("train")
        images = preprocess_all([encode_png(x) for x in raw[val_idx]], spec)
        labels = all_labels[val_idx]
    else:
        dataset = load_dataset(source, spec, classes=classes, indices=val_idx)
        images, labels = dataset.images, dataset.labels
    LOG.info("%d validation images through the preprocessing in %.1f s", len(images), time.perf_counter() - start)
    return images, labels, split


def member_probabilities(repository: Path, members: list[Member], images: np.ndarray, threads: int = 1,
                         batch_size: int = 256) -> np.ndarray:
    """The served probabilities: each member's softmax, weighted (a single model: its softmax)."""
    total: np.ndarray | None = None
    for member in members:
        path = repository / member.classifier / str(member.version) / "model.onnx"
        if not path.exists():
            raise SystemExit(f"{path} is missing")
        sess = inference.session(path, threads)
        start = time.perf_counter()
        parts = []
        step = max(1, len(images) // batch_size // 10) * batch_size
        for i in range(0, len(images), batch_size):
            parts.append(softmax(inference.logits(sess, images[i:i + batch_size], batch_size)))
            if (i + batch_size) % step == 0 or i + batch_size >= len(images):
                done = min(i + batch_size, len(images))
                LOG.info("%s v%d: %d / %d images, %.0f img/s", member.classifier, member.version, done,
                         len(images), done / max(time.perf_counter() - start, 1e-9))
        probabilities = np.concatenate(parts).astype(np.float32)
        total = member.weight * probabilities if total is None else total + member.weight * probabilities
    assert total is not None
    return total.astype(np.float32)


def calibrate_model(repository: Path, model: str, version: int | None = None, limit: int = 0, *,
                    target_precision: float = TARGET_PRECISION, threads: int = 1, batch_size: int = 256) -> dict:
    """Compute ``model`` version ``version``'s (default: latest) thresholds and drift reference on its validation
    split (``limit`` images of it, class-balanced; 0 = all), write ``calibration.json`` into its version folder
    and return it. Raises :class:`NoValidationData` when the split cannot be rebuilt here."""
    repository = Path(repository)
    model_dir = repository / model
    version = version or int(layout.latest(model_dir).name)
    folder = model_dir / str(version)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a published version")
    classes = model_labels(repository, model)
    members = resolve_members(repository, model, version)
    source, split_args = _split_source(repository, model, version, members)
    spec = version_spec(repository, model, version)
    start = time.perf_counter()
    images, labels, split = validation_images(source, split_args, spec, classes, limit)
    probabilities = member_probabilities(repository, members, images, threads, batch_size)
    if probabilities.shape[1] != len(classes):
        raise SystemExit(f"{model}: the model has {probabilities.shape[1]} outputs, labels.txt {len(classes)}")
    chosen = choose_thresholds(probabilities, labels, classes, target_precision)
    calibration = {
        "model": model, "version": version, "rule": rule_text(target_precision),
        "target_precision": target_precision, "split": split, "source": source, "count": int(len(labels)),
        "limit": limit, "classes": list(classes),
        "computed": "in-process: PNG uploads through services.preprocess.imaging, ONNX Runtime, softmax"
                    + (", weighted mean of the members' probabilities (the combine step)" if len(members) > 1
                       else ""),
        "members": [{"classifier": m.classifier, "version": m.version, "weight": m.weight} for m in members],
        **chosen,
        "reference": reference_distribution(probabilities, split),
        "seconds": round(time.perf_counter() - start, 1),
    }
    layout.write_atomic(folder / CALIBRATION_FILE, json.dumps(calibration, indent=2) + "\n")
    overall = chosen["overall"]
    LOG.info("%s v%d: %d images in %.1f s; confident %.1f %% of answers at precision %s; wrote %s", model, version,
             len(labels), calibration["seconds"], 100 * overall["coverage"],
             "n/a" if overall["precision"] is None else f"{100 * overall['precision']:.2f} %",
             folder / CALIBRATION_FILE)
    return calibration


def calibration_parameters(calibration: dict) -> dict[str, str]:
    """The Triton config parameters that carry ``calibration`` to the gateway (compact JSON values)."""
    return {
        model_params.THRESHOLDS: json.dumps(calibration["thresholds"], separators=(",", ":")),
        model_params.THRESHOLD_RULE: calibration["rule"],
        model_params.REFERENCE: json.dumps(calibration["reference"], separators=(",", ":")),
    }


def write_config_parameters(repository: Path, model: str, calibration: dict) -> bool:
    """Set the calibration parameters in ``<model>/config.pbtxt`` when it serves the calibrated version
    (returns whether it did)."""
    served = int(layout.latest(repository / model).name)
    if calibration["version"] != served:
        LOG.info("%s v%d is not the version its config serves (v%d): config.pbtxt left as it is", model,
                 calibration["version"], served)
        return False
    path = repository / model / "config.pbtxt"
    text = path.read_text()
    updated = set_parameters(text, calibration_parameters(calibration))
    if updated != text:
        layout.write_atomic(path, updated)
        LOG.info("set %s in %s", ", ".join(calibration_parameters(calibration)), path)
    return True


def public_models(repository: Path) -> list[str]:
    """Models whose config says ``shopvision.public`` (candidates of a rollout are not among them)."""
    found = []
    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        name = path.parent.name
        if name.endswith(model_params.CANDIDATE_SUFFIX):
            continue
        if _parameters(read_config(path)).get(model_params.PUBLIC) == "true":
            found.append(name)
    return found


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=layout.REPOSITORY,
                        help="Triton model repository (default: %(default)s)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", default="", help="public model to calibrate, e.g. fashion_effnet")
    which.add_argument("--all", action="store_true",
                       help="every public model of the repository (those without validation data are skipped)")
    parser.add_argument("--version", type=int, default=0,
                        help="version to calibrate; 0 = the latest (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use a class-balanced subset of N validation images; 0 = all (default: %(default)s)")
    parser.add_argument("--target-precision", type=float, default=TARGET_PRECISION,
                        help="precision each class's confident answers must reach on validation "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime and OpenCV threads; 1 keeps a shared machine usable (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--no-config", action="store_true",
                        help="only write calibration.json and the card; leave config.pbtxt as it is")
    return parser


def main(args: argparse.Namespace) -> int:
    cv2.setNumThreads(args.threads)
    models = public_models(args.repository) if args.all else [args.model]
    if args.all and args.version:
        raise SystemExit("--version goes with --model, not --all")
    LOG.info("calibrating %s in %s: %s", ", ".join(models), args.repository, rule_text(args.target_precision))
    for model in models:
        try:
            calibration = calibrate_model(args.repository, model, args.version or None, args.limit,
                                          target_precision=args.target_precision, threads=args.threads,
                                          batch_size=args.batch_size)
        except NoValidationData as error:
            LOG.warning("skipped %s: %s", model, error)
            continue
        folder = args.repository / model / str(calibration["version"])
        confidence.refresh(folder)
        if not args.no_config:
            write_config_parameters(args.repository, model, calibration)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
