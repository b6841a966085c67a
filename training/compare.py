"""Side-by-side reports: knowledge distillation (student with vs without KD) and classifier fusion.

    python -m training.compare distillation --teacher runs/effnet --student runs/student_kd \\
        --baseline runs/cnn --output-dir runs/student_kd
    python -m training.compare fusion --members runs/effnet,runs/cnn --weights 0.7,0.3 --output-dir runs/fused
    python -m training.compare fusion --members runs/effnet,runs/resnet --weights val --output-dir runs/fused

``--weights val`` picks the fusion weights on the members' shared validation
split (never on the test set): a grid in steps of 0.05.
Every model is scored with ONNX Runtime on the same test images (after the
shared recipe) and, for fusion, on the same catalog-style photos through the
real preprocessing code. Latency is ONNX Runtime at batch 1 on ``--threads``;
a fused model's latency is the sum of its members' (they share the CPU).
Writes ``distillation.json`` or ``fusion.json`` (with a Markdown table the model
card embeds) into ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.data.catalog import render_set
from training.data.datasets import (
    FASHION_MNIST,
    fashion_mnist_raw,
    load_dataset,
    run_split_of,
    source_labels,
    stratified_subset,
)
from training.data.uploads import preprocess_all
from training.onnx import inference
from training.report.metrics import softmax, top_k_accuracy
from training.report.runs import load_run
from training.repository.recipe import spec_from_dict

LOG = logging.getLogger("compare")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["distillation", "fusion"])
    parser.add_argument("--teacher", type=Path, help="distillation: the teacher's run directory")
    parser.add_argument("--student", type=Path, help="distillation: the student trained with KD")
    parser.add_argument("--baseline", type=Path, help="distillation: the same student trained without KD")
    parser.add_argument("--members", default="", help="fusion: comma-separated run directories")
    parser.add_argument("--weights", default="",
                        help="fusion: comma-separated weights, or 'val' to choose them on the validation split "
                             "(default: equal)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the JSON report goes")
    parser.add_argument("--limit-test", type=int, default=0, help="test images; 0 = all (default: %(default)s)")
    parser.add_argument("--catalog-count", type=int, default=1000,
                        help="catalog-style photos for fusion; 0 = none (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default: %(default)s)")
    return parser


class Scored:
    """A run's ONNX model with its metadata, scored on shared inputs."""

    def __init__(self, run_dir: Path, threads: int) -> None:
        self.run_dir = run_dir
        self.run = load_run(run_dir)
        self.meta = self.run["meta"]
        self.spec = spec_from_dict(self.meta["spec"])
        self.session = inference.session(run_dir / "model.onnx", threads)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(inference.logits(self.session, images))

    def latency_ms(self, images: np.ndarray) -> float:
        return 1000.0 / inference.throughput(self.session, images, 1, 1.0)


def _test_images(scored: Scored, limit: int) -> tuple[np.ndarray, np.ndarray]:
    source, classes = scored.meta.get("data", FASHION_MNIST), tuple(scored.meta["classes"])
    labels, _ = source_labels(source, "test", classes)
    test = load_dataset(source, scored.spec, split="test", classes=classes,
                        indices=stratified_subset(labels, limit, 0))
    return test.images, test.labels


def _validation_images(scored: Scored) -> tuple[np.ndarray, np.ndarray]:
    """The validation split ``training.train`` held out for this run (same data, fraction, seed and limit)."""
    args, classes = scored.run["args"], tuple(scored.meta["classes"])
    labels, _ = source_labels(args["data"], "train", classes)
    _, val_idx = run_split_of(labels, args)
    val = load_dataset(args["data"], scored.spec, split="train", classes=classes, indices=val_idx)
    return val.images, val.labels


def _simplex(parts: int, steps: int) -> list[tuple[int, ...]]:
    """Every way to split ``steps`` units over ``parts`` members (the weight grid)."""
    if parts == 1:
        return [(steps,)]
    return [(first, *rest) for first in range(steps, -1, -1) for rest in _simplex(parts - 1, steps - first)]


def validation_weights(members: list[Scored], step: float = 0.05) -> tuple[np.ndarray, float]:
    """Weights on a grid (multiples of ``step``, summing to 1) with the best validation top-1 (ties: the most even
    weights), and that top-1. Every member must have been validated on the same split."""
    splits = {(m.run["args"]["data"], m.run["args"]["val_fraction"], m.run["args"]["seed"],
               m.run["args"]["limit_val"]) for m in members}
    if len(splits) != 1:
        raise SystemExit(f"the members were validated on different splits: {sorted(splits)}")
    images, labels = _validation_images(members[0])
    probabilities = [m.probabilities(images) for m in members]
    steps = round(1 / step)
    grid = [np.array(units) / steps for units in _simplex(len(members), steps)]
    scores = [top_k_accuracy(sum(w * p for w, p in zip(weights, probabilities, strict=True)), labels, 1)
              for weights in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -float(np.ptp(grid[i]))))
    LOG.info("validation top-1 of %s: members %s; best weights %s: %.2f %%",
             ", ".join(m.run_dir.name for m in members),
             ", ".join(f"{100 * top_k_accuracy(p, labels, 1):.2f} %" for p in probabilities),
             ", ".join(f"{w:.2f}" for w in grid[best]), 100 * scores[best])
    return grid[best], scores[best]


def distillation(args: argparse.Namespace) -> dict:
    runs = {"teacher": Scored(args.teacher, args.threads), "student with KD": Scored(args.student, args.threads),
            "student without KD": Scored(args.baseline, args.threads)}
    images, labels = _test_images(runs["teacher"], args.limit_test)
    rows = {}
    for name, scored in runs.items():
        probabilities = scored.probabilities(images)
        rows[name] = {"run": str(scored.run_dir), "arch": scored.meta["arch"], "macs": scored.meta["macs"],
                      "params": scored.meta["params"], "top1": top_k_accuracy(probabilities, labels, 1),
                      "latency_ms": scored.latency_ms(images)}
    ratio = rows["teacher"]["macs"] / rows["student with KD"]["macs"]
    gain = 100 * (rows["student with KD"]["top1"] - rows["student without KD"]["top1"])
    return {"rows": rows, "flops_ratio": ratio, "kd_gain_pt": gain, "test_images": len(labels),
            "markdown": [
                f"The student has ×{ratio:.1f} fewer multiply-accumulates than the teacher (target ≥ ×5: "
                f"{'met' if ratio >= 5 else 'NOT met'}); it was trained with and without KD on the same data and "
                f"schedule. {len(labels)} test images, ONNX Runtime, {args.threads} thread(s):", "",
                "| model | arch | M MACs | params | test top-1 | latency (batch 1) |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
                *(f"| {name} | {r['arch']} | {r['macs'] / 1e6:.1f} | {r['params']:,} | {100 * r['top1']:.2f} % | "
                  f"{r['latency_ms']:.2f} ms |" for name, r in rows.items()),
                "", f"KD changes the student's top-1 by {gain:+.2f} pt."]}


def fusion(args: argparse.Namespace) -> dict:
    members = [Scored(Path(p), args.threads) for p in args.members.split(",") if p]
    if len(members) < 2:
        raise SystemExit("--members needs at least two run directories")
    if any(m.meta["spec"] != members[0].meta["spec"] or m.meta["classes"] != members[0].meta["classes"]
           for m in members):
        raise SystemExit("fusion members must share the recipe and the classes")
    chosen_on_val = None
    if args.weights == "val":
        weights, chosen_on_val = validation_weights(members)
    else:
        weights = np.array([float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(members))
    weights = weights / weights.sum()
    images, labels = _test_images(members[0], args.limit_test)
    sets = {"test": (images, labels)}
    if args.catalog_count and members[0].meta.get("data", FASHION_MNIST) == FASHION_MNIST:
        raw, raw_labels = fashion_mnist_raw("test")
        pick = stratified_subset(raw_labels, args.catalog_count, 0)
        photos = [p.data for p in render_set(raw[pick], 0)]
        sets["catalog"] = (preprocess_all(photos, members[0].spec), raw_labels[pick])
    rows: dict[str, dict] = {}
    for name, (x, y) in sets.items():
        probabilities = [m.probabilities(x) for m in members]
        fused = sum(w * p for w, p in zip(weights, probabilities, strict=True))
        for member, p in zip(members, probabilities, strict=True):
            rows.setdefault(member.run_dir.name, {})[f"{name}_top1"] = top_k_accuracy(p, y, 1)
        rows.setdefault("fused", {})[f"{name}_top1"] = top_k_accuracy(fused, y, 1)
    latencies = [m.latency_ms(images) for m in members]
    for member, latency in zip(members, latencies, strict=True):
        rows[member.run_dir.name]["latency_ms"] = latency
    rows["fused"]["latency_ms"] = float(sum(latencies))
    best_member = max(rows[m.run_dir.name]["test_top1"] for m in members)
    columns = [f"{name} top-1" for name in sets]
    how = "" if chosen_on_val is None else f", chosen on the validation split where the fusion scores " \
                                            f"{100 * chosen_on_val:.2f} %"
    return {"weights": weights.tolist(), "weights_validation_top1": chosen_on_val, "rows": rows,
            "beats_every_member": rows["fused"]["test_top1"] > best_member,
            "markdown": [
                f"Probability fusion (weights {', '.join(f'{w:.2f}' for w in weights)}{how}) vs its members; "
                f"ONNX Runtime, {args.threads} thread(s), latency at batch 1 (fused = sum of members):", "",
                "| model | " + " | ".join(columns) + " | latency |", "| --- |" + " ---: |" * (len(columns) + 1),
                *(f"| {name} | " + " | ".join(f"{100 * r[f'{s}_top1']:.2f} %" for s in sets)
                  + f" | {r['latency_ms']:.2f} ms |" for name, r in rows.items())]}


def main(args: argparse.Namespace) -> dict:
    if args.kind == "distillation":
        if not (args.teacher and args.student and args.baseline):
            raise SystemExit("distillation needs --teacher, --student and --baseline")
        result, name = distillation(args), "distillation.json"
    else:
        result, name = fusion(args), "fusion.json"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / name).write_text(json.dumps(result, indent=2))
    LOG.info("%s:\n%s", name, "\n".join(result["markdown"]))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
