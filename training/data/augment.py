"""Batch augmentations on the device, on served-format images (N, H, W, C) in 0..255.

Built once per run (:class:`Augment`), applied to whole batches with one
``grid_sample``: random scale and shift (a product is never framed exactly the
same way twice), horizontal flip, and an intensity gain (what is left of a
product's colour after the recipe's grayscale + background subtraction varies
with its tint and the photo's exposure), and random erasing (Zhong et al.,
2017: a random rectangle of the image set to zero, so the model cannot lean on
one part of the product).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augment:
    shift_px: float = 2.0
    scale: float = 0.1
    hflip: bool = True
    gain: float = 0.25
    erase: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.shift_px > 0 or self.scale > 0 or self.hflip or self.gain > 0 or self.erase > 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images`` uint8 or float (N, H, W, C) → float (N, H, W, C) in 0..255."""
        x = images.permute(0, 3, 1, 2).float()
        if not self.enabled:
            return x.permute(0, 2, 3, 1)
        n, _, h, w = x.shape

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, device="cpu").to(x.device) * (high - low) + low

        scale = uniform(1 - self.scale, 1 + self.scale) if self.scale > 0 else torch.ones(n, device=x.device)
        flip = (torch.rand(n, generator=generator, device="cpu").to(x.device) < 0.5).float() * 2 - 1 \
            if self.hflip else torch.ones(n, device=x.device)
        if self.shift_px > 0:
            # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
            tx = uniform(-self.shift_px, self.shift_px) * 2 / w
            ty = uniform(-self.shift_px, self.shift_px) * 2 / h
        else:
            tx = ty = torch.zeros(n, device=x.device)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = flip / scale
        theta[:, 1, 1] = 1 / scale
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.gain > 0:
            x = x * uniform(1 - self.gain, 1 + self.gain).view(n, 1, 1, 1)
        if self.erase > 0:
            x = x * (1 - self._erase_mask(n, h, w, generator).to(x.device))
        return x.clamp(0, 255).permute(0, 2, 3, 1)

    def _erase_mask(self, n: int, h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
        """(N, 1, H, W) mask on the CPU, 1 inside one rectangle (2-25 % of the area, aspect 0.3-3.3) for a share
        ``erase`` of the images and 0 elsewhere."""
        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (high - low) + low

        area = uniform(0.02, 0.25) * h * w
        aspect = torch.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
        eh = torch.sqrt(area * aspect).clamp(1, h)
        ew = torch.sqrt(area / aspect).clamp(1, w)
        top = torch.rand(n, generator=generator) * (h - eh)
        left = torch.rand(n, generator=generator) * (w - ew)
        chosen = (torch.rand(n, generator=generator) < self.erase).float()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
                  & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))).float()
        return (inside * chosen.view(n, 1, 1)).unsqueeze(1)
