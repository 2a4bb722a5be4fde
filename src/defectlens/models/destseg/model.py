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

from ...backbones import get_backbone
from ..base import register
from ..trained import (
    AnomalySampler,
    TrainedDetector,
    conv_block,
    focal_loss,
    pixel_weights,
    train_steps,
)

# Image score: mean of the top 100 of 256×256 map pixels, as in the paper, as a share of pixels.
TOP_SHARE = 100 / 256**2


class Teacher(nn.Module):
    """The backbone's stem and blocks, tapped at the last block of strides 4, 8 and 16."""

    def __init__(self, backbone: str):
        super().__init__()
        source = get_backbone(backbone)
        self.stem, self.blocks = source.stem, source.blocks
        self.register_buffer("mean", torch.tensor(source.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(source.std).view(1, 3, 1, 1))
        with torch.no_grad():
            sides = [x.shape[-1] for x in self._outputs(torch.zeros(1, 3, 64, 64))]
        # For each stride, the deepest block at that resolution.
        self.taps = [max(i for i, side in enumerate(sides) if side == 64 // stride) for stride in (4, 8, 16)]
        self.channels = [block._block_args.output_filters for block in (self.blocks[i] for i in self.taps)]
        self.requires_grad_(False)

    def _outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self._outputs((images - self.mean) / self.std)
        return [outputs[i] for i in self.taps]

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: batch-norm statistics stay the pretrained ones


class Student(nn.Module):
    """Encoder (to stride 32) and decoder without skip connections, which answers the teacher's
    three feature maps: anomalies must not pass through, the decoder has to restore normal features."""

    def __init__(self, width: int, channels: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        encoder_widths = [2 * width, 4 * width, 8 * width, 8 * width]  # strides 4, 8, 16, 32
        self.encoder = nn.ModuleList(conv_block(a, b) for a, b in zip([width] + encoder_widths[:-1], encoder_widths))
        decoder_widths = [8 * width, 4 * width, 2 * width]  # strides 16, 8, 4
        self.decoder = nn.ModuleList(conv_block(a, b) for a, b in zip([8 * width] + decoder_widths[:-1], decoder_widths))
        self.heads = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip(decoder_widths, reversed(channels)))

    def forward(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem((images - mean) / std)
        for block in self.encoder:
            x = block(F.max_pool2d(x, 2))
        outputs = []
        for block, head in zip(self.decoder, self.heads):
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
            outputs.append(head(x))
        return outputs[::-1]  # strides 4, 8, 16, like the teacher


class Segmentation(nn.Module):
    """Cosine features at stride 4 -> one anomaly logit per pixel, with growing dilations for context."""

    def __init__(self, channels_in: int, width: int):
        super().__init__()
        self.body = nn.Sequential(conv_block(channels_in, width), conv_block(width, width, dilation=2))
        self.context = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for d in (1, 4, 8))
        self.out = nn.Conv2d(3 * width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.out(torch.cat([branch(x) for branch in self.context], dim=1))


def cosine_features(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise products of channel-normalised teacher and student features (their channel sum
    is the cosine similarity), upsampled to the finest scale and concatenated."""
    size = teacher[0].shape[-2:]
    products = [F.normalize(t, dim=1) * F.normalize(s, dim=1) for t, s in zip(teacher, student)]
    return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in products], dim=1)


def cosine_distance(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pixels of 1 - cos(teacher, student), summed over scales."""
    return sum((1.0 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student))


@register
class DeSTSeg(TrainedDetector):
    name = "destseg"
    max_steps = 600  # 4-6 min on 2 shared cores at the default size: enough for it (see benchmarks/results)

    def __init__(self, backbone: str = "efficientnet-lite0", width: int = 16, seg_width: int = 48,
                 student_share: float = 0.4, gamma: float = 4.0, **params):
        """``backbone``: the frozen teacher. ``width``: first student width; ``seg_width``: the
        segmentation head's. ``student_share``: the share of the training steps spent on the
        student; the rest trains the segmentation head. ``gamma``: focal-loss exponent (paper: 4)."""
        super().__init__(backbone=backbone, width=width, seg_width=seg_width, student_share=student_share, gamma=gamma, **params)

    def build(self) -> None:
        self.teacher = Teacher(self.params["backbone"]).eval()
        self.student = Student(self.params["width"], self.teacher.channels)
        self.segmentation = Segmentation(sum(self.teacher.channels), self.params["seg_width"])

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
        return ((focal_loss(logits, batch.target, self.params["gamma"]) + l1) * weights).mean()

    def train_networks(self, sampler: AnomalySampler, steps: int) -> list[float]:
        size = self.params["batch"]
        student_steps = max(1, round(self.params["student_share"] * steps))
        losses = train_steps(lambda step: self.student_loss(sampler.batch(size)), self.student.parameters(),
                             student_steps, self.params["lr"], desc="destseg student")
        self.student.eval()  # frozen from here on: its batch-norm statistics too
        head_steps = steps - student_steps
        losses += train_steps(
            lambda step: self.segmentation_loss(sampler.batch(size), self.normal_threshold_at(step, head_steps)),
            self.segmentation.parameters(), head_steps, self.params["lr"], desc="destseg segmentation")
        return losses

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.segmentation_logits(images))[:, 0]

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        top = max(1, round(TOP_SHARE * flat.shape[1]))
        return flat.topk(top, dim=1).values.mean(dim=1)
