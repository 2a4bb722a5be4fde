"""The backbone's feature graph as one module, from uint8 pixels to patch features, for export.

Normalisation is part of the graph, so an exported file needs nothing from defectlens to run:
resized RGB uint8 images (N, H, W, 3) in, the same (N, C, h, w) features as
``EfficientNetLite.embed`` out.
"""

from __future__ import annotations

import torch

from ..backbones.efficientnet_lite import EfficientNetLite


class FeatureGraph(torch.nn.Module):
    def __init__(self, backbone: EfficientNetLite):
        super().__init__()
        self.backbone = backbone
        # The same affine map as PatchBackbone.to_tensor: x / (255 std) - mean / std.
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in backbone.std]).reshape(1, 3, 1, 1))
        self.register_buffer("offset", torch.tensor([-m / s for m, s in zip(backbone.mean, backbone.std)]).reshape(1, 3, 1, 1))
        # The stem and the blocks are modules of the backbone: registered here so that export sees their weights.
        self.stem, self.blocks = backbone.stem, backbone.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward(images.permute(0, 3, 1, 2).float() * self.scale + self.offset)
