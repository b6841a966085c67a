"""The served input contract as a module: uint8 NHWC pixels in, ``(logits, embedding)`` out."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class UInt8NHWCWrapper(nn.Module):
    """Wraps ``features`` + ``head`` so that the graph starts from uint8 NHWC pixels.

    ``(x - mean) / std`` maps float pixels in [0, 255] to the network's input range;
    EfficientNet-Lite uses ``(x - 127) / 128``. Optionally the graph also resizes
    the image (bilinear) to ``net_size`` and repeats a grayscale channel to
    ``net_channels``, so a small grayscale input can feed an ImageNet backbone
    while only the small image travels on the wire. ``stretch_contrast`` scales
    each image so its brightest pixel is 255 (a product's contrast against its
    background then no longer depends on its colour or the photo's exposure).
    ``flip_tta`` (inference only) averages the pooled features of the image and
    its mirror image: test-time augmentation inside the graph, at twice the
    backbone's cost; logits and embedding are then those of the pair.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        head: nn.Module,
        mean: float = 127.0,
        std: float = 128.0,
        in_channels: int = 3,
        net_size: int | None = None,
        net_channels: int | None = None,
        stretch_contrast: bool = False,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.mean = mean
        self.std = std
        self.in_channels = in_channels
        self.net_size = net_size
        self.net_channels = net_channels
        self.stretch_contrast = stretch_contrast
        self.flip_tta = flip_tta

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float()
        if self.stretch_contrast:
            x = x * (255.0 / x.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1.0))
        if self.net_size is not None and tuple(x.shape[2:]) != (self.net_size, self.net_size):
            x = nn.functional.interpolate(x, size=(self.net_size, self.net_size), mode="bilinear",
                                          align_corners=False)
        x = (x - self.mean) / self.std
        if self.net_channels is not None and self.net_channels != self.in_channels:
            x = x.expand(-1, self.net_channels, -1, -1)
        embedding = self.features(x)
        if self.flip_tta and not self.training:
            # The head is linear (dropout is off in eval), so the head of the mean is the mean of the logits.
            embedding = (embedding + self.features(x.flip(3))) / 2
        logits = self.head(embedding)
        return logits, embedding
