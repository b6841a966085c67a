"""Smoke training runs shared by the training tests (a few hundred images, CPU, one thread)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training import train

REPO_ROOT = Path(__file__).resolve().parents[2]
FASHION_CONFIG = REPO_ROOT / "model_repository" / "fashion_cnn" / "config.pbtxt"

TrainRun = Callable[..., dict]


def _train_run(output_dir: Path, *extra: str) -> dict:
    """``python -m training.train`` in-process on a small, fast slice of Fashion-MNIST (flags in ``extra`` win)."""
    argv = ["--recipe", str(FASHION_CONFIG), "--limit-train", "300", "--limit-val", "100", "--epochs", "1",
            "--batch-size", "32", "--no-progress", "--threads", "1", "--output-dir", str(output_dir), *extra]
    threads = torch.get_num_threads()
    try:
        return train.main(train.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_run() -> TrainRun:
    return _train_run


@pytest.fixture(scope="session")
def fashion_config() -> Path:
    return FASHION_CONFIG


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``cnn``: seed CNN, 300 images, 1 epoch. ``effnet``: EfficientNet-Lite0 (ImageNet weights) at 32 px,
    64 images, 2 epochs with the backbone frozen in the first. ``resnet``: the small ResNet, like ``cnn``."""
    base = tmp_path_factory.mktemp("smoke-runs")
    _train_run(base / "cnn")
    _train_run(base / "effnet", "--arch", "efficientnet_lite0", "--net-size", "32", "--limit-train", "64",
               "--limit-val", "32", "--epochs", "2", "--freeze-epochs", "1", "--backbone-lr-scale", "0.25")
    _train_run(base / "resnet", "--arch", "resnet_small", "--aug-erase", "0.5")
    return {"cnn": base / "cnn", "effnet": base / "effnet", "resnet": base / "resnet"}
