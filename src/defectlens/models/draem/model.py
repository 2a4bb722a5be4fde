"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive network learns to turn images with
synthetic anomalies back into the clean image (L2 + SSIM loss), and a discriminative U-Net reads
the image next to its reconstruction and segments the anomaly (focal loss). Widths are CPU-sized
(the paper's are 128 and 64); anomalies whose only label is a box train with the weak box loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..base import register
from ..trained import (
    AnomalySampler,
    TrainedDetector,
    conv_block,
    focal_loss,
    pixel_weights,
    train_steps,
)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    line = torch.exp(-offsets**2 / (2 * sigma**2))
    line = line / line.sum()
    return (line[:, None] * line[None, :])[None, None]


def ssim(first: torch.Tensor, second: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity of two (B, C, H, W) batches of images in [0, 1]."""
    channels = first.shape[1]
    kernel = window.expand(channels, 1, *window.shape[-2:])
    pad = window.shape[-1] // 2

    def local_mean(x):
        return F.conv2d(x, kernel, padding=pad, groups=channels)

    mean_a, mean_b = local_mean(first), local_mean(second)
    var_a = local_mean(first * first) - mean_a**2
    var_b = local_mean(second * second) - mean_b**2
    covariance = local_mean(first * second) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    similarity = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return similarity.mean()


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


@register
class Draem(TrainedDetector):
    name = "draem"
    max_steps = 1000  # about 20 min on 2 shared cores at the default size (see benchmarks/results)

    def __init__(self, width: int = 16, score_pool: int = 21, **params):
        """``width``: channels of the first level of both networks (doubling down to 8×).
        ``score_pool``: the image score is the maximum of the anomaly map averaged over
        ``score_pool``² working pixels, as in the paper (21 px at 256)."""
        super().__init__(width=width, score_pool=score_pool, **params)

    def build(self) -> None:
        self.reconstructive = Reconstructive(self.params["width"])
        self.discriminative = Discriminative(self.params["width"])
        self.window = gaussian_window()

    def networks(self) -> dict[str, nn.Module]:
        return {"reconstructive": self.reconstructive, "discriminative": self.discriminative}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and anomaly logits (B, 1, H, W)."""
        reconstruction = self.reconstructive(images)
        return reconstruction, self.discriminative(torch.cat([reconstruction, images], dim=1))

    def batch_loss(self, batch, normal_threshold: float) -> torch.Tensor:
        reconstruction, logits = self.forward(batch.augmented)
        reconstruction_loss = F.mse_loss(reconstruction, batch.clean) + 1.0 - ssim(reconstruction, batch.clean, self.window)
        weights = pixel_weights(logits, batch.target, batch.weak, normal_threshold)
        return reconstruction_loss + (focal_loss(logits, batch.target) * weights).mean()

    def train_networks(self, sampler: AnomalySampler, steps: int) -> list[float]:
        parameters = [*self.reconstructive.parameters(), *self.discriminative.parameters()]
        return train_steps(lambda step: self.batch_loss(sampler.batch(self.params["batch"]), self.normal_threshold_at(step, steps)),
                           parameters, steps, self.params["lr"], desc="draem training")

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(images)[1])[:, 0]

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        size = self.params["score_pool"] | 1
        pooled = F.avg_pool2d(maps[:, None], size, stride=1, padding=size // 2, count_include_pad=False)
        return pooled.flatten(1).amax(dim=1)
