"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive network learns to turn images with
synthetic anomalies back into the clean image (L2 + SSIM loss), and a discriminative U-Net reads
the image next to its reconstruction and segments the anomaly (focal loss). Widths are CPU-sized
(the paper's are 128 and 64); anomalies whose only label is a box train with the weak box loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import register
from ..params import Integer
from ..trained import AnomalySampler, TrainedDetector, focal_loss, gaussian_window, pixel_weights, ssim, train_steps
from .networks import Discriminative, Reconstructive


@register
class Draem(TrainedDetector):
    name = "draem"
    max_steps = 1000  # about 20 min on 2 shared cores at the default size (see benchmarks/results)

    parameter_constraints = {"width": Integer(2, 256), "score_pool": Integer(1, 255)}

    def __init__(self, width: int = 16, score_pool: int = 21, size: int = 256, crop: int = 128, batch_size: int = 8,
                 steps: int | None = None, lr: float = 1e-3, anomalies: int = 0, anomaly_source: str = "transplant",
                 sd_model: str | None = None, generated: int = 64, diffusion_size: int = 512, diffusion_steps: int = 30,
                 embedding_steps: int = 300, anogen_labels: str = "box",
                 box_threshold: float = 0.5, box_warmup: float = 0.25, seed: int = 0):
        """``width``: channels of the first level of both networks (doubling down to 8×).
        ``score_pool``: the image score is the maximum of the anomaly map averaged over
        ``score_pool``² working pixels, as in the paper (21 px at 256). The others: TrainedDetector."""
        self.width = width
        self.score_pool = score_pool
        super().__init__(size=size, crop=crop, batch_size=batch_size, steps=steps, lr=lr, anomalies=anomalies,
                         anomaly_source=anomaly_source, sd_model=sd_model, generated=generated,
                         diffusion_size=diffusion_size, diffusion_steps=diffusion_steps,
                         embedding_steps=embedding_steps, anogen_labels=anogen_labels, box_threshold=box_threshold, box_warmup=box_warmup, seed=seed)

    def build(self) -> None:
        self.reconstructive = Reconstructive(self.width)
        self.discriminative = Discriminative(self.width)
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
        return train_steps(lambda step: self.batch_loss(sampler.batch(self.batch_size), self.normal_threshold_at(step, steps)),
                           parameters, steps, self.lr, desc="draem training")

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(images)[1])[:, 0]

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        size = self.score_pool | 1
        pooled = F.avg_pool2d(maps[:, None], size, stride=1, padding=size // 2, count_include_pad=False)
        return pooled.flatten(1).amax(dim=1)
