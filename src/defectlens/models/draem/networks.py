"""DRAEM's two networks, CPU-sized: the reconstructive autoencoder and the discriminative U-Net."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..trained import conv_block


class Reconstructive(nn.Module):
    """Encoder-decoder without skip connections: anomalies cannot pass through to the output."""

    def __init__(self, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList(conv_block(a, b) for a, b in zip([3] + widths[:-1], widths))
        self.decoder = nn.ModuleList(conv_block(b, a) for a, b in itertools.pairwise(widths))
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.encoder):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
        for block in reversed(self.decoder):
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(x)


class Discriminative(nn.Module):
    """U-Net (five poolings, skip connections) from the image and its reconstruction to one
    anomaly logit per pixel."""

    def __init__(self, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList(conv_block(a, b) for a, b in zip([6] + widths[:-1], widths))
        self.decoder = nn.ModuleList(conv_block(a + b, a) for a, b in itertools.pairwise(widths))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.decoder), reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.out(x)
