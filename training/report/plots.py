"""Training curves and confusion matrices as PNG (matplotlib, headless).

Plots are a by-product: where matplotlib is missing (e.g. a bare GPU machine)
they are skipped with a warning and can be drawn later from the JSON
(``python -m training.evaluate`` redraws them).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

LOG = logging.getLogger(__name__)


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        LOG.warning("matplotlib is not installed: skipping plots")
        return None
    return plt


def training_curves(history: list[dict], path: Path) -> Path | None:
    """Loss and top-1 accuracy per epoch, train vs validation."""
    plt = _pyplot()
    if plt is None or not history:
        return None
    epochs = [h["epoch"] + 1 for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * h["train_top1"] for h in history], "o-", label="train (augmented)")
    acc_ax.plot(epochs, [100 * h["val_top1"] for h in history], "o-", label="validation")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("top-1 %")
    acc_ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, classes: list[str] | tuple[str, ...], path: Path, title: str) -> Path | None:
    """Row-normalised confusion matrix (recall on the diagonal) with counts in the cells."""
    plt = _pyplot()
    if plt is None:
        return None
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
