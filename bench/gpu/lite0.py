"""EfficientNet-Lite0 (ImageNet) as a torch module that takes uint8 NHWC pixels, for the GPU benchmark.

Shared by the Triton model (``bench/gpu/model.py``) and the model-only ceiling
(``bench/gpu/measure.py``), so both run the very same network. Needs only torch and the
``efficientnet_lite_pytorch`` model code; the weights come as a state dict (fp16 on disk to
keep the bundle small, loaded as fp32).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class UInt8Lite0(nn.Module):
    """uint8 (N, H, W, 3) → logits (N, 1000), normalising ``(x - 127) / 128`` inside, as the ONNX export does."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        x = image.permute(0, 3, 1, 2).to(dtype).sub_(127.0).div_(128.0)
        return self.net(x.contiguous(memory_format=torch.channels_last))


def build(weights: Path, device: str = "cuda", half: bool = False) -> UInt8Lite0:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model = UInt8Lite0(net).eval().to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.half() if half else model
