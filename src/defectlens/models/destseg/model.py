"""DeSTSeg (Zhang et al., CVPR 2023): a frozen pretrained teacher (the embedded EfficientNet-Lite),
a denoising student trained to output the teacher's features of the *clean* image from the image
with synthetic anomalies (cosine distance), then a segmentation head, trained on synthetic
anomalies with the student frozen, that reads the teacher–student cosine features (element-wise
products of the normalised features, at three scales) and outputs the anomaly mask (focal + L1
loss; the weak box loss where an anomaly has only a box)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import DEFAULT_BACKBONE
from ..base import register
from ..params import BACKBONE, Integer, Real
from ..trained import AnomalySampler, TrainedDetector, focal_loss, pixel_weights, train_steps
from .networks import Segmentation, Student, Teacher, cosine_distance, cosine_features

# Image score: mean of the top 100 of 256×256 map pixels, as in the paper, as a share of pixels.
TOP_SHARE = 100 / 256**2


@register
class DeSTSeg(TrainedDetector):
    name = "destseg"
    max_steps = 600  # 4-6 min on 2 shared cores at the default size: enough for it (see benchmarks/results)

    parameter_constraints = {"backbone": BACKBONE, "width": Integer(2, 256), "seg_width": Integer(2, 512),
                             "student_share": Real(0.0, 1.0, open_low=True), "gamma": Real(0.0, 16.0)}

    def __init__(self, backbone: str = DEFAULT_BACKBONE, width: int = 16, seg_width: int = 48, student_share: float = 0.4,
                 gamma: float = 4.0, size: int = 256, crop: int = 128, batch_size: int = 8, steps: int | None = None,
                 lr: float = 1e-3, anomalies: int = 0, anomaly_source: str = "transplant",
                 sd_model: str | None = None, generated: int = 64, diffusion_size: int = 512, diffusion_steps: int = 30,
                 embedding_steps: int = 300, anogen_labels: str = "box", box_threshold: float = 0.5,
                 box_warmup: float = 0.25, seed: int = 0):
        """``backbone``: the frozen teacher. ``width``: first student width; ``seg_width``: the
        segmentation head's. ``student_share``: the share of the training steps spent on the
        student; the rest trains the segmentation head. ``gamma``: focal-loss exponent (paper: 4).
        The others: TrainedDetector."""
        self.backbone = backbone
        self.width = width
        self.seg_width = seg_width
        self.student_share = student_share
        self.gamma = gamma
        super().__init__(size=size, crop=crop, batch_size=batch_size, steps=steps, lr=lr, anomalies=anomalies,
                         anomaly_source=anomaly_source, sd_model=sd_model, generated=generated,
                         diffusion_size=diffusion_size, diffusion_steps=diffusion_steps,
                         embedding_steps=embedding_steps, anogen_labels=anogen_labels, box_threshold=box_threshold, box_warmup=box_warmup, seed=seed)

    def build(self) -> None:
        self.teacher = Teacher(self.backbone).eval()
        self.student = Student(self.width, self.teacher.channels)
        self.segmentation = Segmentation(sum(self.teacher.channels), self.seg_width)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "segmentation": self.segmentation}

    def _student(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.student(images, self.teacher.mean, self.teacher.std)

    def student_loss(self, batch) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(batch.clean)
        return cosine_distance(target, self._student(batch.augmented))

    def segmentation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly logits (B, 1, H, W) at the input's resolution."""
        with torch.no_grad():
            features = cosine_features(self.teacher(images), self._student(images))
        logits = self.segmentation(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def segmentation_loss(self, batch, normal_threshold: float) -> torch.Tensor:
        logits = self.segmentation_logits(batch.augmented)
        weights = pixel_weights(logits, batch.target, batch.weak, normal_threshold)
        l1 = (torch.sigmoid(logits) - batch.target).abs()
        return ((focal_loss(logits, batch.target, self.gamma) + l1) * weights).mean()

    def train_networks(self, sampler: AnomalySampler, steps: int) -> list[float]:
        size = self.batch_size
        student_steps = max(1, round(self.student_share * steps))
        losses = train_steps(lambda step: self.student_loss(sampler.batch(size)), self.student.parameters(),
                             student_steps, self.lr, desc="destseg student")
        self.student.eval()  # frozen from here on: its batch-norm statistics too
        head_steps = steps - student_steps
        losses += train_steps(
            lambda step: self.segmentation_loss(sampler.batch(size), self.normal_threshold_at(step, head_steps)),
            self.segmentation.parameters(), head_steps, self.lr, desc="destseg segmentation")
        return losses

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.segmentation_logits(images))[:, 0]

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        top = max(1, round(TOP_SHARE * flat.shape[1]))
        return flat.topk(top, dim=1).values.mean(dim=1)
