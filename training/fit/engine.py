"""One training epoch and batched prediction, with progress bars (images/s and ETA).

Data stays on the device as one uint8 tensor (Fashion-MNIST is 47 MB), so
there is no DataLoader: batches are index slices, augmented on the device.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.data.augment import Augment

LOG = logging.getLogger(__name__)


def progress(total: int, description: str, enabled: bool = True) -> Any:
    """A tqdm bar counting images (shows img/s and ETA); a no-op bar where tqdm is missing or disabled."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Quiet:
            def update(self, _: int) -> None: ...
            def set_postfix(self, **_: Any) -> None: ...
            def close(self) -> None: ...
        return _Quiet()
    return tqdm(total=total, desc=description, unit="img", unit_scale=True, dynamic_ncols=True, leave=False)


def batches(count: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    stop = count - count % batch_size if drop_last and count >= batch_size else count
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss, scaled by T² so its gradients match the hard loss's size."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


@dataclass
class EpochStats:
    loss: float
    top1: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module, augment: Augment,
                    batch_size: int, generator: torch.Generator, device: torch.device, amp: bool = False,
                    teacher: nn.Module | None = None, kd_alpha: float = 0.0, kd_temperature: float = 4.0,
                    frozen: nn.Module | None = None, description: str = "train",
                    show_progress: bool = True) -> EpochStats:
    """One pass over the shuffled data. ``frozen`` (a sub-module not being trained) keeps its
    batch-norm statistics fixed."""
    model.train()
    if frozen is not None:
        frozen.eval()
    total_loss, correct, seen = 0.0, 0, 0
    bar = progress(len(labels), description, show_progress)
    start = time.perf_counter()
    for index in batches(len(labels), batch_size, shuffle=True, generator=generator, drop_last=True):
        index = index.to(images.device)
        x = augment(images[index], generator)
        y = labels[index]
        with autocast(device, amp):
            logits, _ = model(x)
            loss = criterion(logits.float(), y)
            if teacher is not None and kd_alpha > 0:
                with torch.no_grad():
                    teacher_logits, _ = teacher(x)
                loss = (1 - kd_alpha) * loss + kd_alpha * distillation_loss(
                    logits.float(), teacher_logits.float(), kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        size = int(y.shape[0])
        total_loss += float(loss.detach()) * size
        correct += int((logits.detach().argmax(dim=1) == y).sum())
        seen += size
        bar.update(size)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", top1=f"{100 * correct / seen:.2f}%",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    seconds = time.perf_counter() - start
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, seconds)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, amp: bool = False,
            description: str = "eval", show_progress: bool = True) -> np.ndarray:
    """Logits (N, classes) as float32 numpy, in input order."""
    model.eval()
    outputs = []
    bar = progress(len(images), description, show_progress)
    for index in batches(len(images), batch_size, shuffle=False):
        with autocast(device, amp):
            logits, _ = model(images[index.to(images.device)])
        outputs.append(logits.float().cpu())
        bar.update(len(index))
    bar.close()
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)
