"""Average the weights of several checkpoints of one model (stochastic weight averaging) into a new run.

The checkpoints must be the same architecture on the same recipe and split, and
should lie in one basin: the ends of two cosine cycles of one run (a run and its
``--init-from`` continuation), or the last epochs of one run
(``--keep-epoch-checkpoints``). Float weights are averaged uniformly; batch-norm
statistics are then recomputed with one pass over training images (averaged
weights do not match any member's running statistics). Each member and the
average are scored on the run's validation split, so whether averaging paid is
measured before anything is published:

    python -m training.average --checkpoints runs/effnet/checkpoint.pth runs/effnet_cont/checkpoint.pth \\
        --output-dir runs/effnet_swa

The output directory is a run like ``training.train`` writes (``checkpoint.pth``,
``run.json`` with an ``average`` entry, ``curves.png`` of the last member,
``model.onnx`` with its parity check), so ``training.evaluate``,
``training.quantize`` and ``training.publish`` take it as it is.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from training.data.datasets import load_dataset, run_split_of, source_labels, stratified_subset
from training.fit.engine import batches, predict, progress
from training.nets.models import load_checkpoint
from training.onnx.export import export, store_weights_as_float16
from training.report.metrics import top_k_accuracy
from training.repository.recipe import spec_from_dict

LOG = logging.getLogger("average")

# What must agree between members: the model, its input, and the split it was validated on.
SAME_META = ("arch", "spec", "classes", "net_size", "stretch_contrast")
SAME_ARGS = ("data", "val_fraction", "seed", "limit_train", "limit_val")


def check_compatible(checkpoints: list[dict], paths: list[Path]) -> None:
    first, first_path = checkpoints[0], paths[0]
    for checkpoint, path in zip(checkpoints[1:], paths[1:], strict=True):
        for key in SAME_META:
            if checkpoint["meta"].get(key) != first["meta"].get(key):
                raise SystemExit(f"{path} and {first_path} differ in {key}: "
                                 f"{checkpoint['meta'].get(key)!r} vs {first['meta'].get(key)!r}")
        for key in SAME_ARGS:
            if checkpoint["args"].get(key) != first["args"].get(key):
                raise SystemExit(f"{path} and {first_path} were trained on different splits ({key}: "
                                 f"{checkpoint['args'].get(key)!r} vs {first['args'].get(key)!r})")


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of the floating-point tensors; integer ones (batch counters) are taken from the last state."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, images: torch.Tensor, batch_size: int, show_progress: bool = True) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them as the plain mean over ``images``
    (momentum ``None``), in training mode without gradients. Returns the number of layers updated."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(images) == 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    bar = progress(len(images), "batch-norm statistics", show_progress)
    for index in batches(len(images), batch_size, shuffle=False):
        model(images[index])
        bar.update(len(index))
    bar.close()
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True,
                        help="checkpoint.pth files of training.train (two or more)")
    parser.add_argument("--output-dir", type=Path, required=True, help="run directory to write")
    parser.add_argument("--bn-images", type=int, default=10000,
                        help="training images (class-balanced subset) to re-estimate batch-norm statistics on; "
                             "0 = keep the averaged statistics (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument("--float16-weights", action="store_true",
                        help="also write model.fp16w.onnx: float32 compute on weights stored as float16 (half size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")
    return parser


def main(args: argparse.Namespace) -> dict:
    started = time.time()
    if len(args.checkpoints) < 2:
        raise SystemExit("--checkpoints needs two or more checkpoints to average")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, started)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, started: float) -> dict:
    loaded = [load_checkpoint(path) for path in args.checkpoints]
    models, checkpoints = [m for m, _ in loaded], [c for _, c in loaded]
    check_compatible(checkpoints, args.checkpoints)
    last = checkpoints[-1]
    meta, run_args = last["meta"], last["args"]
    spec = spec_from_dict(meta["spec"])
    classes = tuple(meta["classes"])
    labels, _ = source_labels(run_args["data"], "train", classes)
    train_idx, val_idx = run_split_of(labels, run_args)
    val = load_dataset(run_args["data"], spec, split="train", classes=classes, indices=val_idx)
    val_images = torch.from_numpy(val.images)
    device = torch.device("cpu")

    def val_top1(model: nn.Module, name: str) -> float:
        logits = predict(model, val_images, args.batch_size, device, description=f"validation {name}",
                         show_progress=not args.no_progress)
        return top_k_accuracy(logits, val.labels, 1) if len(val) else float("nan")

    member_top1 = []
    for path, model in zip(args.checkpoints, models, strict=True):
        member_top1.append(val_top1(model, path.parent.name))
        LOG.info("member %s: validation top-1 %.2f %%", path, 100 * member_top1[-1])
    members = [{"checkpoint": str(path), "val_top1": top1}
               for path, top1 in zip(args.checkpoints, member_top1, strict=True)]

    model = models[-1]
    model.load_state_dict(average_state([c["model"] for c in checkpoints]))
    bn_layers, bn_images = 0, 0
    if args.bn_images > 0:
        subset = train_idx[stratified_subset(labels[train_idx], args.bn_images, int(run_args["seed"]))]
        bn_set = load_dataset(run_args["data"], spec, split="train", classes=classes, indices=subset)
        bn_images = len(bn_set)
        bn_layers = recompute_batch_norm(model, torch.from_numpy(bn_set.images), args.batch_size,
                                         not args.no_progress)
    model.eval()
    top1 = val_top1(model, "average")
    best = max(member_top1)
    LOG.info("average of %d checkpoints: validation top-1 %.2f %% (best member %.2f %%; %d batch-norm layers "
             "re-estimated on %d training images)", len(members), 100 * top1, 100 * best, bn_layers, bn_images)

    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    average = {"members": members, "val_top1": top1, "gain_over_best_member_pt": 100 * (top1 - best),
               "bn_layers": bn_layers, "bn_images": bn_images,
               "command": "python -m training.average " + shlex.join(sys.argv[1:])}
    torch.save({**last, "model": model.state_dict(), "average": average}, out / "checkpoint.pth")
    source_run = args.checkpoints[-1].parent
    run = json.loads((source_run / "run.json").read_text()) if (source_run / "run.json").exists() else {
        "command": "", "args": run_args, "meta": meta, "history": last["history"]}
    run.update({"val_top1": top1, "average": average, "train_images": len(train_idx), "val_images": len(val)})
    if (source_run / "curves.png").exists():
        shutil.copyfile(source_run / "curves.png", out / "curves.png")
    if not args.no_export:
        run["onnx"] = "model.onnx"
        run["onnx_parity_max_abs_diff"] = export(model, out / "model.onnx", spec.height, spec.width, spec.channels)
        if args.float16_weights:
            store_weights_as_float16(out / "model.onnx", out / "model.fp16w.onnx")
    average["wall_s"] = round(time.time() - started, 1)
    (out / "run.json").write_text(json.dumps(run, indent=2))
    LOG.info("wrote %s in %.0f s", out, average["wall_s"])
    return average


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
