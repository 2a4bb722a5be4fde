"""PatchCore (Roth et al., CVPR 2022): a coreset of normal patch features, nearest-neighbour
distance as the patch score, and the paper's re-weighting of the image score."""

from __future__ import annotations

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ..base import register
from ..memory import CORESETS, NearestNeighbours, greedy_coreset
from ..params import Choice, Integer
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, PatchDetector


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C), one row per patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


@register
class PatchCore(PatchDetector):
    name = "patchcore"
    parameter_constraints = {"bank_size": Integer(1, 10**7), "reweight_neighbours": Integer(0, 1024),
                             "top_k": Integer(1, 10**6), "coreset": Choice(CORESETS)}

    def __init__(self, bank_size: int = 4096, reweight_neighbours: int = 9, top_k: int = 1, coreset: str = "pooled",
                 backbone: str = DEFAULT_BACKBONE,
                 size: int = 256, blur_sigma: float = 4.0, seed: int = 0, geometry: str = "square",
                 tile_size: int | None = None, tile_overlap: float = 0.25,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``bank_size``: patches kept by the coreset. Search time grows linearly with it; 4096
        keeps prediction within budget on 2 cores (see benchmarks/). ``reweight_neighbours``:
        b in the paper's image-score re-weighting (0 disables it). ``top_k``: the image score
        reduces the top_k patch distances by their mean (1 = the paper's maximum); a mean is less
        at the mercy of one noisy patch. ``coreset``: "pooled" (each image's greedy k-center
        first, about 4 × bank_size patches in all, then the greedy over that pool) or "exact"
        (the paper's greedy over all patches; slower, see benchmarks/results/coreset_scale.md)."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, augment=augment,
                         augment_max_images=augment_max_images)
        self.bank_size = bank_size
        self.reweight_neighbours = reweight_neighbours
        self.top_k = top_k
        self.coreset = coreset

    def fit_features(self, features: torch.Tensor) -> None:
        patches = flatten_patches(features)
        keep = greedy_coreset(patches, self.bank_size, seed=self.seed, progress=True, groups=features.shape[0],
                              method=self.coreset)
        self._set_bank(patches[keep].contiguous())

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.bank = bank
        self._index = NearestNeighbours(bank.numpy())

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        count, _, height, width = features.shape
        distances, _ = self._index.search(flatten_patches(features).numpy(), k=1)
        return torch.from_numpy(distances[:, 0]).reshape(count, height, width)

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Max patch distance (or the mean of the ``top_k`` largest), scaled down when the
        nearest bank patch m* of the worst patch sits in a dense region of the bank (its
        neighbours are nearly as close): a distance there is less surprising than one near an
        isolated bank patch. Eq. 7 of the paper."""
        flat = patch_scores.flatten(1)
        worst = flat.argmax(dim=1)
        reduced = flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)
        neighbours = self.reweight_neighbours
        if neighbours <= 0 or self.bank.shape[0] <= neighbours:
            return reduced
        patches = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])
        worst_patches = patches[torch.arange(len(worst)), worst].numpy()
        _, nearest = self._index.search(worst_patches, k=1)
        # Bank neighbours of m* (m* itself comes first), then distances from the test patch to them.
        _, support = self._index.search(self.bank[nearest[:, 0]].numpy(), k=neighbours)
        to_support = np.linalg.norm(self.bank.numpy()[support] - worst_patches[:, None, :], axis=2)
        weights = 1.0 - torch.softmax(torch.from_numpy(to_support), dim=1)[:, 0]
        return weights.float() * reduced

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self._set_bank(tensors["bank"].float())
