"""The whole Fashion-MNIST model pipeline in one command (resumable: finished steps are skipped).

    python -m training.pipeline --device cuda --amp --threads 8 --output-dir runs/fashion      # GPU (H100)
    python -m training.pipeline --stages evaluate,quantize,compare --output-dir runs/fashion    # CPU, after it
    python -m training.pipeline --smoke --output-dir /tmp/fashion-smoke                         # minutes on CPU

Stages and what they leave under ``--output-dir``:

* ``train``: ``cnn/`` (the seed CNN baseline), ``effnet/`` (EfficientNet-Lite0
  fine-tune: staged unfreezing + discriminative learning rates), ``student/``
  (the seed CNN distilled from ``effnet``; ``cnn`` is the same student without
  KD, trained on the same data and schedule), ``resnet/`` (a small ResNet from
  scratch with random erasing: the second member of the fused ensemble). Each:
  checkpoint, curves, ONNX.
* ``evaluate``: test-set and catalog-style reports + model card in each run.
* ``quantize``: INT8 ``model.int8.onnx`` of ``effnet``, ``resnet`` and ``cnn`` with the
  FP32-vs-INT8 measurement.
* ``compare``: ``student/distillation.json``; ``fused/fusion.json``,
  ``fused_student/fusion.json`` and ``fused_resnet/fusion.json`` (EfficientNet
  + CNN / + student / + ResNet, the last with weights chosen on validation).
* ``SUMMARY.md``: every headline number in one table.

Publish the results with ``python -m training.publish`` (``make publish``).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from training import compare, evaluate, quantize, train
from training.report.model_card import write_model_card

LOG = logging.getLogger("pipeline")
STAGES = ("train", "evaluate", "quantize", "compare")
RUNS = ("cnn", "effnet", "resnet", "student")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs") / "fashion", help="(default: %(default)s)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch, OpenCV, ONNX Runtime) "
                                                                 "(default: %(default)s)")
    parser.add_argument("--recipe", type=Path, default=train.DEFAULT_RECIPE, help="(default: %(default)s)")
    parser.add_argument("--cnn-epochs", type=int, default=DEFAULT_EPOCHS["seed_cnn"], help="(default: %(default)s)")
    parser.add_argument("--resnet-epochs", type=int, default=DEFAULT_EPOCHS["resnet_small"],
                        help="(default: %(default)s)")
    parser.add_argument("--effnet-epochs", type=int, default=DEFAULT_EPOCHS["efficientnet_lite0"],
                        help="(default: %(default)s)")
    parser.add_argument("--net-size", type=int, default=DEFAULT_NET_SIZE,
                        help="EfficientNet input side (default: %(default)s)")
    parser.add_argument("--catalog-count", type=int, default=10000,
                        help="catalog-style photos per evaluation (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few hundred images, one epoch, small catalog: checks the plumbing, not accuracy")
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    return parser


def _run(step: str, done: Path, force: bool, module, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    if done.exists() and not force:
        LOG.info("%s: %s exists, skipping", step, done)
        return
    LOG.info("%s: python -m %s %s", step, module.__name__, " ".join(argv))
    start = time.perf_counter()
    module.main(module.get_args_parser().parse_args(argv))
    LOG.info("%s: done in %.1f s", step, time.perf_counter() - start)


def summary(out: Path) -> str:
    lines = ["# Fashion-MNIST pipeline summary", "",
             "| run | arch | M MACs | val top-1 | test top-1 | test top-5 | catalog top-1 | train wall |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in RUNS:
        run_path, eval_path = out / name / "run.json", out / name / "eval.json"
        if not run_path.exists():
            continue
        run = json.loads(run_path.read_text())
        report = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        test, catalog = report.get("test", {}), report.get("catalog", {})

        def pct(x: float | None) -> str:
            return "" if x is None else f"{100 * x:.2f} %"
        lines.append(f"| {name} | {run['meta']['arch']} | {run['meta']['macs'] / 1e6:.1f} | {pct(run.get('val_top1'))} "
                     f"| {pct(test.get('top1'))} | {pct(test.get('top5'))} | {pct(catalog.get('top1'))} "
                     f"| {run['wall_s']:.0f} s on {run['machine'].get('gpu', run['machine']['processor'])} |")
    for path in (out / "effnet" / "quantization.json", out / "resnet" / "quantization.json",
                 out / "cnn" / "quantization.json", out / "student" / "distillation.json",
                 out / "fused" / "fusion.json", out / "fused_student" / "fusion.json",
                 out / "fused_resnet" / "fusion.json"):
        if path.exists():
            lines += ["", f"## {path.parent.name}/{path.name}", "", *json.loads(path.read_text())["markdown"]]
    return "\n".join(lines) + "\n"


# The training settings of each architecture (batch, learning rates, schedule), at full and at smoke scale; the
# epochs are the pipeline's flags. training.retrain trains with the same settings.
ARCH_FLAGS = {
    "seed_cnn": ["--batch-size", "128", "--lr", "2e-3"],
    "resnet_small": ["--batch-size", "128", "--lr", "2e-3", "--aug-erase", "0.5"],
    "efficientnet_lite0": ["--batch-size", "256", "--lr", "2e-3", "--backbone-lr-scale", "0.5", "--freeze-epochs", "1"],
}
SMOKE_ARCH_FLAGS = {
    "seed_cnn": ["--batch-size", "32"],
    "resnet_small": ["--batch-size", "32", "--aug-erase", "0.5"],
    "efficientnet_lite0": ["--batch-size", "32", "--freeze-epochs", "0"],
}
DEFAULT_EPOCHS = {"seed_cnn": 15, "resnet_small": 24, "efficientnet_lite0": 15}
DEFAULT_NET_SIZE = 112
SMOKE_NET_SIZE = 32


def arch_flags(arch: str, smoke: bool, epochs: int = 0, net_size: int = DEFAULT_NET_SIZE) -> list[str]:
    """training.train's flags for ``arch`` (without ``--arch``): ``epochs`` (0 = the default, 1 at smoke scale)
    and, for EfficientNet, its input side."""
    table = SMOKE_ARCH_FLAGS if smoke else ARCH_FLAGS
    if arch not in table:
        raise SystemExit(f"no training settings for architecture {arch!r}; choose from {sorted(table)}")
    flags = ["--epochs", str(epochs or (1 if smoke else DEFAULT_EPOCHS[arch])), *table[arch]]
    if arch == "efficientnet_lite0":
        flags = ["--net-size", str(SMOKE_NET_SIZE if smoke else net_size), *flags]
    return flags


def main(args: argparse.Namespace) -> None:
    out: Path = args.output_dir
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    common = ["--device", args.device, "--threads", str(args.threads), "--recipe", str(args.recipe)]
    common += ["--amp"] if args.amp else []
    epochs = {"seed_cnn": args.cnn_epochs, "resnet_small": args.resnet_epochs, "efficientnet_lite0": args.effnet_epochs}
    flags = {arch: ["--arch", arch, *arch_flags(arch, args.smoke, 0 if args.smoke else epochs[arch], args.net_size)]
             for arch in epochs}
    cnn, resnet, effnet = flags["seed_cnn"], flags["resnet_small"], flags["efficientnet_lite0"]
    catalog, limit = args.catalog_count, []
    if args.smoke:
        limit = ["--limit-train", "300", "--limit-val", "100", "--no-progress"]
        catalog = min(catalog, 50)
    test_limit = ["--limit-test", "300"] if args.smoke else []
    threads = ["--threads", str(args.threads)]

    if "train" in stages:
        _run("train cnn", out / "cnn" / "run.json", args.force, train,
             [*common, *cnn, *limit, "--output-dir", str(out / "cnn")])
        _run("train effnet", out / "effnet" / "run.json", args.force, train,
             [*common, *effnet, *limit, "--output-dir", str(out / "effnet")])
        _run("train resnet", out / "resnet" / "run.json", args.force, train,
             [*common, *resnet, *limit, "--output-dir", str(out / "resnet")])
        _run("train student", out / "student" / "run.json", args.force, train,
             [*common, *cnn, *limit, "--teacher", str(out / "effnet" / "checkpoint.pth"),
              "--output-dir", str(out / "student")])
    if "quantize" in stages:
        for name in ("effnet", "resnet", "cnn"):
            _run(f"quantize {name}", out / name / "quantization.json", args.force, quantize,
                 ["--run-dir", str(out / name), *threads, *test_limit,
                  *(["--calibration-count", "64", "--rounds", "1"] if args.smoke else [])])
    if "compare" in stages:
        _run("distillation report", out / "student" / "distillation.json", args.force, compare,
             ["distillation", "--teacher", str(out / "effnet"), "--student", str(out / "student"),
              "--baseline", str(out / "cnn"), "--output-dir", str(out / "student"), *threads, *test_limit])
        for fused, members, weights in (("fused", "effnet,cnn", "0.7,0.3"), ("fused_student", "effnet,student",
                                                                              "0.7,0.3"),
                                          ("fused_resnet", "effnet,resnet", "val")):
            _run(f"fusion report {fused}", out / fused / "fusion.json", args.force, compare,
                 ["fusion", "--members", ",".join(str(out / m) for m in members.split(",")), "--weights", weights,
                  "--output-dir", str(out / fused), "--catalog-count", str(min(catalog, 2000)), *threads,
                  *test_limit])
    if "evaluate" in stages:
        for name in RUNS:
            _run(f"evaluate {name}", out / name / "eval.json", args.force, evaluate,
                 ["--run-dir", str(out / name), "--catalog-count", str(catalog), *threads, *test_limit,
                  *(["--compare-recipes"] if name != "student" else [])])
    for name in RUNS:
        # Re-render the cards: quantization / distillation reports may have arrived after the evaluation.
        if (out / name / "eval.json").exists():
            write_model_card(out / name, json.loads((out / name / "run.json").read_text()),
                             json.loads((out / name / "eval.json").read_text()))
    (out / "SUMMARY.md").write_text(summary(out))
    LOG.info("wrote %s", out / "SUMMARY.md")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
