"""DeSTSeg's networks: the frozen pretrained teacher, the denoising student, the segmentation head,
and the teacher-student cosine features they are joined by."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import get_backbone
from ..trained import conv_block


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
