"""Retrain a served model on its base data plus callers' feedback, and publish the result as a canary.

    python -m training.retrain --model fashion_cnn --triton 127.0.0.1:8001                 # make retrain MODEL=...
    python -m training.retrain --model fashion_cnn --epochs 3 --limit-train 6000 --canary 5
    python -m training.retrain --model fashion_cnn --smoke --output-dir /tmp/retrain-smoke   # minutes on CPU

Steps, each leaving its files under ``--output-dir``:

1. ``feedback/``: ``python -m training.feedback export`` of the model's feedback (images, ``manifest.csv``,
   ``holdout.csv`` chosen by image hash, ``export.json``);
2. ``run/``: ``python -m training.train`` on the base data the served version was trained on (its ``run.json``)
   plus ``manifest.csv`` (``--extra-data``), with the recipe of the model's ``config.pbtxt`` and the training
   pipeline's settings for the served architecture (training/pipeline.py); ``--epochs`` and ``--limit-train``
   scale it;
3. ``python -m training.evaluate``: the untouched test split and the held-out feedback (``--feedback-holdout``),
   ``eval.json`` and ``MODEL_CARD.md`` with both;
4. ``python -m training.publish --canary PERCENT``: the next version as the candidate ``<model>__candidate``
   answering PERCENT % of callers, never straight to 100 %. ``python -m training.rollout`` then compares it with
   the served version and promotes it or rolls it back.

``retrain.json`` records what each step did.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from services.common import model_params
from services.common.config import env_str
from services.gateway.config import DEFAULT_DATABASE_URL
from training import evaluate, feedback, publish, train
from training.data.datasets import FASHION_MNIST
from training.pipeline import arch_flags
from training.repository import layout as repo

LOG = logging.getLogger("retrain")
SMOKE_LIMITS = {"limit_train": 300, "limit_val": 100, "limit_test": 300, "catalog_count": 50}


def percent(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 100.0:
        raise argparse.ArgumentTypeError(f"{value:g}: a canary answers more than 0 and less than 100 % of callers")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="public model to retrain, e.g. fashion_cnn")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository the model is served from (default: %(default)s)")
    parser.add_argument("--triton", default=env_str("GATEWAY_TRITON_ADDRESS", "127.0.0.1:8001"),
                        help="Triton gRPC address to load the canary into; '' = only write the files "
                             "(default: $GATEWAY_TRITON_ADDRESS or %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None, help="(default: runs/retrain/<model>)")
    feedback_group = parser.add_argument_group("feedback")
    feedback_group.add_argument("--database-url", default=env_str("GATEWAY_CATALOG_DATABASE_URL",
                                                                  DEFAULT_DATABASE_URL),
                                help="database holding the feedback (default: $GATEWAY_CATALOG_DATABASE_URL or the "
                                     "one make run starts)")
    feedback_group.add_argument("--since", default="",
                                help="only feedback given at or after this ISO-8601 time (default: all)")
    feedback_group.add_argument("--holdout-fraction", type=float, default=0.2,
                                help="share of the feedback photos held out for evaluation (default: %(default)s)")
    feedback_group.add_argument("--extra-repeat", type=int, default=1,
                                help="times each feedback photo is seen per epoch (default: %(default)s)")
    size = parser.add_argument_group("size and epochs")
    size.add_argument("--epochs", type=int, default=0,
                      help="training epochs; 0 = the pipeline's for the architecture (default: %(default)s)")
    size.add_argument("--limit-train", type=int, default=0,
                      help="base training images to use, spread over the classes; 0 = all (feedback is always "
                           "used whole) (default: %(default)s)")
    size.add_argument("--smoke", action="store_true",
                      help="CI scale: 1 epoch, 300 base images, 300 test images, 50 catalog photos; checks the "
                           "plumbing, not accuracy")
    size.add_argument("--data", default="",
                      help="base training data (default: the one the served version was trained on)")
    size.add_argument("--arch", default="", help="architecture (default: the served version's)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    run.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    run.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    run.add_argument("--canary", type=percent, default=10.0, metavar="PERCENT",
                     help="share of callers the retrained version answers, above 0 and below 100 "
                          "(default: %(default)s)")
    run.add_argument("--no-publish", action="store_true", help="stop after the model card")
    return parser


def served_run(repository: Path, model: str) -> dict:
    """``run.json`` of the newest published version of ``model``: its architecture and base data."""
    try:
        path = repo.latest(repository / model) / "run.json"
    except FileNotFoundError:
        raise SystemExit(f"{model} is not published in {repository}: retrain improves a served model") from None
    if not path.exists():
        raise SystemExit(f"{path} is missing: {model} was not published from a training.train run (a fused or "
                         "imported model); give --arch and --data")
    result: dict = json.loads(path.read_text())
    return result


def _step(name: str, module, argv: list[str]):  # type: ignore[no-untyped-def]
    LOG.info("%s: python -m %s %s", name, module.__name__, " ".join(argv))
    start = time.perf_counter()
    result = module.main(module.get_args_parser().parse_args(argv))
    LOG.info("%s: done in %.1f s", name, time.perf_counter() - start)
    return result


def export_feedback(args: argparse.Namespace, out: Path) -> dict:
    argv = ["export", "--model", args.model, "--output", str(out), "--database-url", args.database_url,
            "--holdout-fraction", str(args.holdout_fraction), *(["--since", args.since] if args.since else [])]
    summary: dict = _step("export feedback", feedback, argv)
    if not summary["train"]:
        raise SystemExit(f"no feedback photo of {args.model} to train on ({summary['photos']} photos, "
                         f"{summary['holdout']} held out): collect feedback with SubmitFeedback first")
    return summary


def train_argv(args: argparse.Namespace, served: dict, manifest: Path, run_dir: Path) -> list[str]:
    """training.train's arguments: the served arch's recipe, the base data plus the feedback, the scale asked."""
    meta = served.get("meta", {})
    arch = args.arch or meta.get("arch", "")
    argv = ["--arch", arch, *arch_flags(arch, args.smoke, args.epochs),
            "--data", args.data or meta.get("data", FASHION_MNIST),
            "--extra-data", str(manifest), "--extra-repeat", str(args.extra_repeat),
            "--recipe", str(args.repository / args.model / "config.pbtxt"), "--device", args.device,
            "--threads", str(args.threads), "--output-dir", str(run_dir), "--no-progress"]
    limit_train = args.limit_train or (SMOKE_LIMITS["limit_train"] if args.smoke else 0)
    if limit_train:
        argv += ["--limit-train", str(limit_train)]
    if args.smoke:
        argv += ["--limit-val", str(SMOKE_LIMITS["limit_val"])]
    return argv + (["--amp"] if args.amp else [])


def evaluate_argv(args: argparse.Namespace, run_dir: Path, holdout: Path) -> list[str]:
    argv = ["--run-dir", str(run_dir), "--feedback-holdout", str(holdout), "--threads", str(args.threads),
            "--name", f"{args.model} (retrained on feedback)"]
    if args.smoke:
        argv += ["--limit-test", str(SMOKE_LIMITS["limit_test"]), "--catalog-count",
                 str(SMOKE_LIMITS["catalog_count"]), "--no-benchmark"]
    return argv


def main(args: argparse.Namespace) -> dict:
    out: Path = args.output_dir or Path("runs") / "retrain" / args.model
    out.mkdir(parents=True, exist_ok=True)
    served = served_run(args.repository, args.model) if not (args.arch and args.data) else {}
    exported = export_feedback(args, out / "feedback")
    run_dir = out / "run"
    trained = _step("train", train, train_argv(args, served, out / "feedback" / feedback.MANIFEST, run_dir))
    report = _step("evaluate", evaluate, evaluate_argv(args, run_dir, out / "feedback" / feedback.HOLDOUT))
    summary = {"model": args.model, "feedback": exported, "run_dir": str(run_dir), "train_command":
               trained["command"], "val_top1": trained["val_top1"], "test_top1": report["test"]["top1"],
               "feedback_holdout": {k: report["feedback_holdout"].get(k) for k in ("count", "top1", "top5")},
               "model_card": str(run_dir / "MODEL_CARD.md"), "published": None}
    if not args.no_publish:
        argv = ["--run-dir", str(run_dir), "--model", args.model, "--repository", str(args.repository),
                "--canary", f"{args.canary:g}", "--description",
                f"{args.model} retrained on {exported['train']} feedback photos", "--triton", args.triton]
        version = _step("publish canary", publish, argv)
        summary["published"] = {"version": version, "candidate": model_params.candidate_name(args.model),
                                "canary_percent": args.canary, "triton": args.triton}
        LOG.info("%s version %d is a canary answering %g %% of callers as %s: python -m training.rollout shows "
                 "how it does, promotes it or rolls it back", args.model, version, args.canary,
                 model_params.candidate_name(args.model))
    (out / "retrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
