"""Train a product classifier on the served pixels, checkpoint every epoch, export to ONNX.

    python -m training.train --arch seed_cnn --epochs 10 --output-dir runs/fashion_cnn
    python -m training.train --arch efficientnet_lite0 --device cuda --amp --output-dir runs/fashion_effnet
    python -m training.train --arch seed_cnn --teacher runs/fashion_effnet/checkpoint.pth --output-dir runs/student

The preprocessing recipe (input size, channels, crop, background) is read from
``--recipe`` (a ``config.pbtxt`` in the model repository) and every training
image goes through the serving path's own preprocessing with it. A stratified,
seeded validation split is held out of the training data; the test set is not
touched here (``python -m training.evaluate`` reports on it).

Output directory: ``checkpoint.pth`` (every epoch; ``--resume`` it),
``curves.png``, ``run.json`` (arguments, machine, wall time, history) and
``model.onnx`` (uint8 NHWC input; ``logits`` and ``embedding`` outputs; parity
with PyTorch checked).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from services.common.spec import Spec
from training.data.augment import Augment
from training.data.datasets import (
    FASHION_MNIST,
    SPLIT_DEFAULTS,
    Dataset,
    concatenate,
    load_dataset,
    load_extra,
    run_split,
    source_labels,
)
from training.fit.engine import predict, train_one_epoch
from training.nets.models import ARCHS, backbone_parameters, build_model, count_macs, features_of, load_checkpoint
from training.nets.wrapper import UInt8NHWCWrapper
from training.onnx.export import export
from training.report import plots
from training.report.metrics import top_k_accuracy
from training.repository.recipe import read_spec, spec_to_dict

LOG = logging.getLogger("train")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "model_repository" / "fashion_cnn" / "config.pbtxt"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=FASHION_MNIST,
                      help=f"'{FASHION_MNIST}', an image folder (one sub-folder per class) or a CSV manifest "
                           "path,label (default: %(default)s)")
    data.add_argument("--extra-data", default="",
                      help="more training images on top of --data: a CSV manifest path,label (e.g. "
                           "python -m training.feedback export's manifest.csv) or an image folder, labels mapped "
                           "onto --data's classes (an unknown label fails); all of them train, none validates, "
                           "--limit-train does not apply to them (default: none)")
    data.add_argument("--extra-repeat", type=int, default=1,
                      help="times each --extra-data image appears per epoch (oversampling a few corrections "
                           "among many base images) (default: %(default)s)")
    data.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE,
                      help="config.pbtxt whose 'image' dims and preprocess.* parameters define the input "
                           "(default: %(default)s)")
    data.add_argument("--val-fraction", type=float, default=SPLIT_DEFAULTS["val_fraction"],
                      help="stratified share of the training data held out for validation (default: %(default)s)")
    data.add_argument("--limit-train", type=int, default=SPLIT_DEFAULTS["limit_train"],
                      help="use only N training images, spread over the classes; 0 = all (default: %(default)s)")
    data.add_argument("--limit-val", type=int, default=SPLIT_DEFAULTS["limit_val"],
                      help="use only N validation images; 0 = all (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=list(ARCHS), default="seed_cnn", help="(default: %(default)s)")
    model.add_argument("--net-size", type=int, default=112,
                       help="side the graph resizes the input to for efficientnet_lite0 (default: %(default)s)")
    model.add_argument("--no-pretrained", action="store_true", help="start the backbone from random weights")
    model.add_argument("--no-contrast-stretch", action="store_true",
                       help="do not scale each image's brightest pixel to 255 in the graph (default: stretch)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    optim.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the head (default: %(default)s)")
    optim.add_argument("--backbone-lr-scale", type=float, default=0.5,
                       help="pretrained backbone's learning rate = lr × this (discriminative learning rates) "
                            "(default: %(default)s)")
    optim.add_argument("--freeze-epochs", type=int, default=0,
                       help="train only the new head for the first N epochs (staged unfreezing) "
                            "(default: %(default)s)")
    optim.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="linear warm-up before the cosine decay (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="(default: %(default)s)")
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--aug-shift", type=float, default=2.0, help="max shift in pixels (default: %(default)s)")
    aug.add_argument("--aug-scale", type=float, default=0.1, help="max relative zoom in/out (default: %(default)s)")
    aug.add_argument("--aug-gain", type=float, default=0.0,
                     help="max relative intensity change; mostly useful with --no-contrast-stretch "
                          "(default: %(default)s)")
    aug.add_argument("--no-hflip", action="store_true", help="no horizontal flips")
    aug.add_argument("--aug-erase", type=float, default=0.0,
                     help="share of images with one random rectangle erased (random erasing) "
                          "(default: %(default)s)")
    kd = parser.add_argument_group("knowledge distillation")
    kd.add_argument("--teacher", type=Path, default=None, help="checkpoint.pth of a trained teacher (default: none)")
    kd.add_argument("--kd-alpha", type=float, default=0.7,
                    help="weight of the soft-target loss when --teacher is given (default: %(default)s)")
    kd.add_argument("--kd-temperature", type=float, default=4.0, help="(default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads for torch and OpenCV; 1 keeps a shared 2-core machine usable, raise it on a "
                          "dedicated one (default: %(default)s)")
    run.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    run.add_argument("--seed", type=int, default=SPLIT_DEFAULTS["seed"], help="(default: %(default)s)")
    run.add_argument("--deterministic", action="store_true", help="use only deterministic algorithms (slower on GPU)")
    run.add_argument("--output-dir", type=Path, default=Path("runs") / "train", help="(default: %(default)s)")
    run.add_argument("--resume", type=Path, default=None, help="checkpoint.pth to continue from")
    run.add_argument("--init-from", type=Path, default=None,
                     help="start from this checkpoint's weights (same arch; --net-size may differ: progressive "
                          "resizing), with a fresh optimizer and schedule (default: the arch's own start)")
    run.add_argument("--keep-epoch-checkpoints", action="store_true",
                     help="also keep checkpoint_<epoch>.pth of every epoch (default: only the latest)")
    run.add_argument("--eval-batch-size", type=int, default=512, help="(default: %(default)s)")
    run.add_argument("--no-export", action="store_true", help="skip the ONNX export at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")
    return parser


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Factor of the peak learning rate at each step: linear warm-up, then cosine to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def command_line(args: argparse.Namespace) -> str:
    """The ``python -m training.train`` command that reproduces ``args`` (flags that differ from the defaults)."""
    defaults = vars(get_args_parser().parse_args([]))
    parts = ["python", "-m", "training.train"]
    for key, value in vars(args).items():
        if value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": str(os.cpu_count())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def start_runtime(args: argparse.Namespace) -> tuple[torch.device, torch.Generator]:
    """Threads, device and seeds, before anything draws a random number."""
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return torch.device(args.device), seed_everything(args.seed, args.deterministic)


def load_split(args: argparse.Namespace, spec: Spec) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """The stratified, seeded train / validation split through the recipe: (train, validation, classes)."""
    labels, classes = source_labels(args.data)
    train_idx, val_idx = run_split(labels, args.val_fraction, args.seed, args.limit_train, args.limit_val)
    # Only the images in use are decoded and put through the recipe.
    both = load_dataset(args.data, spec, split="train", classes=classes, indices=np.concatenate([train_idx, val_idx]))
    train_set = both.take(np.arange(len(train_idx)))
    val_set = both.take(np.arange(len(train_idx), len(both)))
    LOG.info("data %s: %d train / %d validation images, %d classes", args.data, len(train_set), len(val_set),
             len(classes))
    return with_extra(args, spec, train_set), val_set, tuple(classes)


def with_extra(args: argparse.Namespace, spec: Spec, train_set: Dataset) -> Dataset:
    """``train_set`` plus ``--extra-data`` (repeated ``--extra-repeat`` times), when given."""
    if not args.extra_data:
        return train_set
    if args.extra_repeat < 1:
        raise SystemExit(f"--extra-repeat {args.extra_repeat}: give 1 or more")
    try:
        extra = load_extra(args.extra_data, spec, train_set.classes)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"--extra-data: {error}") from None
    LOG.info("extra data %s: %d images (× %d) added to the training split", args.extra_data, len(extra),
             args.extra_repeat)
    return concatenate(train_set, extra, args.extra_repeat)


def build_student(args: argparse.Namespace, spec: Spec, num_classes: int,
                  device: torch.device) -> tuple[UInt8NHWCWrapper, int, int]:
    """The model to train (from ``--init-from`` if given) on ``device``: (model, MACs, parameters)."""
    model = build_model(args.arch, spec, num_classes, args.net_size, pretrained=not args.no_pretrained,
                        stretch_contrast=not args.no_contrast_stretch)
    if args.init_from is not None:
        init = torch.load(args.init_from, map_location="cpu", weights_only=False)
        if init["meta"]["arch"] != args.arch or init["meta"]["spec"] != spec_to_dict(spec):
            raise SystemExit(f"--init-from {args.init_from} is a {init['meta']['arch']} on {init['meta']['spec']}, "
                             f"not a {args.arch} on {spec_to_dict(spec)}")
        model.load_state_dict(init["model"])
        LOG.info("weights from %s (net size %s → %s)", args.init_from, init["meta"]["net_size"], args.net_size)
    macs = count_macs(model, spec)
    params = sum(p.numel() for p in model.parameters())
    # channels_last on every device: 2-3x faster EfficientNet training on the 2-core CPU (measured), and the
    # layout cuDNN prefers on the GPU.
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, macs, params


def make_optimizer(args: argparse.Namespace, model: UInt8NHWCWrapper, train_images: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[nn.Parameter]]:
    """AdamW with discriminative learning rates and the warm-up + cosine schedule: (optimizer, scheduler,
    the pretrained backbone's parameters)."""
    backbone = backbone_parameters(model, args.arch)
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": head, "lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr * args.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, train_images // args.batch_size) if train_images >= args.batch_size else 1
    schedule = warmup_cosine(args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), backbone


def load_teacher(args: argparse.Namespace, spec: Spec, device: torch.device) -> UInt8NHWCWrapper | None:
    """The frozen ``--teacher`` for distillation (it must share the recipe), or None."""
    if args.teacher is None:
        return None
    teacher, teacher_checkpoint = load_checkpoint(args.teacher)
    if teacher_checkpoint["meta"]["spec"] != spec_to_dict(spec):
        raise SystemExit(f"teacher {args.teacher} was trained on another recipe: "
                         f"{teacher_checkpoint['meta']['spec']} vs {spec_to_dict(spec)}")
    teacher.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def resume_from(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator) -> tuple[int, list[dict]]:
    """State of ``--resume`` restored in place: (first epoch to run, history so far)."""
    if args.resume is None:
        return 0, []
    checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    generator.set_state(checkpoint["generator"])
    torch.set_rng_state(checkpoint["torch_rng"])
    LOG.info("resumed from %s at epoch %d", args.resume, checkpoint["epoch"] + 1)
    return checkpoint["epoch"] + 1, checkpoint["history"]


def save_checkpoint(args: argparse.Namespace, out: Path, checkpoint: dict, epoch: int) -> None:
    """``checkpoint.pth`` replaced atomically (and ``checkpoint_<epoch>.pth`` kept if asked)."""
    tmp = out / "checkpoint.pth.tmp"
    torch.save(checkpoint, tmp)
    if args.keep_epoch_checkpoints:
        shutil.copyfile(tmp, out / f"checkpoint_{epoch}.pth")
    tmp.replace(out / "checkpoint.pth")


def main(args: argparse.Namespace) -> dict:
    started = time.time()
    device, generator = start_runtime(args)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    spec = read_spec(args.recipe)
    LOG.info("recipe from %s: %s", args.recipe, spec)
    train_set, val_set, classes = load_split(args, spec)
    model, macs, params = build_student(args, spec, len(classes), device)
    optimizer, scheduler, backbone = make_optimizer(args, model, len(train_set))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    augment = Augment(args.aug_shift, args.aug_scale, not args.no_hflip, args.aug_gain, args.aug_erase)
    teacher = load_teacher(args, spec, device)

    meta = {"arch": args.arch, "spec": spec_to_dict(spec), "classes": list(classes), "net_size": args.net_size,
            "stretch_contrast": not args.no_contrast_stretch,
            "recipe": str(args.recipe), "data": args.data, "extra_data": args.extra_data or None,
            "macs": macs, "params": params,
            "teacher": str(args.teacher) if args.teacher else None,
            "init_from": str(args.init_from) if args.init_from else None}
    start_epoch, history = resume_from(args, model, optimizer, scheduler, generator)

    train_images = torch.from_numpy(train_set.images).to(device)
    train_labels = torch.from_numpy(train_set.labels).to(device)
    val_images = torch.from_numpy(val_set.images).to(device)
    val_labels_t = torch.from_numpy(val_set.labels)
    for epoch in range(start_epoch, args.epochs):
        frozen = epoch < args.freeze_epochs and bool(backbone)
        for p in backbone:
            p.requires_grad_(not frozen)
        stats = train_one_epoch(
            model, train_images, train_labels, optimizer, scheduler, criterion, augment, args.batch_size, generator,
            device, amp=args.amp, teacher=teacher, kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature,
            frozen=features_of(model) if frozen else None, description=f"epoch {epoch + 1}/{args.epochs}",
            show_progress=not args.no_progress)
        logits = predict(model, val_images, args.eval_batch_size, device, args.amp, "validation",
                         not args.no_progress)
        val_loss = float(criterion(torch.from_numpy(logits), val_labels_t)) if len(val_set) else float("nan")
        val_top1 = top_k_accuracy(logits, val_set.labels, 1) if len(val_set) else float("nan")
        history.append({"epoch": epoch, "train_loss": stats.loss, "train_top1": stats.top1, "val_loss": val_loss,
                        "val_top1": val_top1, "images_per_s": stats.images_per_s, "seconds": stats.seconds,
                        "frozen_backbone": frozen})
        LOG.info("epoch %d/%d: train loss %.4f top1 %.2f%% | val loss %.4f top1 %.2f%% | %.0f img/s, %.1f s",
                 epoch + 1, args.epochs, stats.loss, 100 * stats.top1, val_loss, 100 * val_top1,
                 stats.images_per_s, stats.seconds)
        save_checkpoint(args, out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "history": history,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "meta": meta}, epoch)
        plots.training_curves(history, out / "curves.png")

    summary = {"command": command_line(args), "machine": machine(),
               "wall_s": round(time.time() - started, 1), "args": {k: str(v) for k, v in vars(args).items()},
               "meta": meta, "train_images": len(train_set), "val_images": len(val_set), "history": history,
               "val_top1": history[-1]["val_top1"] if history else None}
    if not args.no_export:
        cpu_model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
        summary["onnx"] = "model.onnx"
        summary["onnx_parity_max_abs_diff"] = export(cpu_model, out / "model.onnx", spec.height, spec.width,
                                                     spec.channels)
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    LOG.info("done in %.1f s: %s", summary["wall_s"], out)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
