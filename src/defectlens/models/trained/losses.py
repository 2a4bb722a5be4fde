"""Losses of detectors trained on synthetic anomalies: per-pixel focal loss, AnoGen's weak box loss
for anomalies whose only label is a box (inside the box, pixels the model already calls normal with
probability above ``normal_threshold`` contribute nothing; focal loss everywhere else), and SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pixel binary focal loss, -(1 - p_t)^gamma log p_t (no reduction)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return (1.0 - p_true) ** gamma * bce


def box_weights(logits: torch.Tensor, box: torch.Tensor, normal_threshold: float) -> torch.Tensor:
    """AnoGen's weak box supervision as per-pixel weights: 0 inside the box where the model's normal
    probability is above ``normal_threshold`` (a box also holds normal pixels: the model is not
    pushed to call those anomalous), 1 everywhere else."""
    normal_probability = torch.sigmoid(-logits.detach())
    return 1.0 - ((box > 0.5) & (normal_probability > normal_threshold)).float()


def box_loss(logits: torch.Tensor, box: torch.Tensor, normal_threshold: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """The weak box loss, per pixel: focal loss against the box as target, zero inside the box
    where the model already calls a pixel normal beyond ``normal_threshold``."""
    return focal_loss(logits, box, gamma) * box_weights(logits, box, normal_threshold)


def pixel_weights(logits: torch.Tensor, target: torch.Tensor, weak: torch.Tensor, normal_threshold: float) -> torch.Tensor:
    """Per-pixel loss weights of a batch (B, 1, H, W): 1 for samples with an exact mask, the box
    weights for the samples flagged ``weak`` (whose target is a box)."""
    weights = box_weights(logits, target, normal_threshold)
    return torch.where(weak.view(-1, 1, 1, 1), weights, torch.ones_like(weights))


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
