"""SPADE (Cohen & Hoshen, 2020): find the K normal images nearest in global features, then
score each patch by its distance to the nearest patch of those images (any position)."""

from __future__ import annotations

import torch

from ...backbones import DEFAULT_BACKBONE
from ..base import register
from ..memory import NearestNeighbours
from ..params import Integer
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector
from ..patchcore.model import flatten_patches


@register
class SPADE(PatchDetector):
    name = "spade"
    parameter_constraints = {"neighbour_images": Integer(1, 10**4)}

    def __init__(self, neighbour_images: int = 10, backbone: str = DEFAULT_BACKBONE, size: int = 256,
                 blur_sigma: float = 4.0, seed: int = 0, geometry: str = "square", tile_size: int | None = None,
                 tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``neighbour_images``: K, the normal images whose patches form each test image's gallery."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_max_pixels=tile_max_pixels, augment=augment,
                         augment_max_images=augment_max_images)
        self.neighbour_images = neighbour_images

    @staticmethod
    def _global(features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(2, 3))

    def fit_features(self, features: torch.Tensor) -> None:
        self.patches = features.contiguous()
        self._global_index = NearestNeighbours(self._global(features).numpy())

    def _nearest_images(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances, indices = self._global_index.search(self._global(features).numpy(), k=self.neighbour_images)
        return torch.from_numpy(distances), torch.from_numpy(indices)

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        _, nearest = self._nearest_images(features)
        maps = []
        for feature, gallery_ids in zip(features, nearest):
            gallery = flatten_patches(self.patches[gallery_ids])
            queries = flatten_patches(feature[None])
            maps.append(torch.cdist(queries, gallery).amin(dim=1).reshape(feature.shape[1:]))
        return torch.stack(maps)

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The paper's image score: mean distance to the K nearest normal images."""
        distances, _ = self._nearest_images(features)
        return distances.float().mean(dim=1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"patches": self.patches}

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self.fit_features(tensors["patches"].float())
