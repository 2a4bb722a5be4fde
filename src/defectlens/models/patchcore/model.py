"""PatchCore (Roth et al., CVPR 2022): a coreset of normal patch features, nearest-neighbour
distance as the patch score, and the paper's re-weighting of the image score."""

from __future__ import annotations

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ..bank import SearchedBank
from ..base import register
from ..memory import CORESETS, SEARCHES, greedy_coreset
from ..params import Choice, Integer
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C), one row per patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


@register
class PatchCore(SearchedBank, PatchDetector):
    name = "patchcore"
    parameter_constraints = {"bank_size": Integer(1, 10**7), "reweight_neighbours": Integer(0, 1024),
                             "top_k": Integer(1, 10**6), "coreset": Choice(CORESETS),
                             "search": Choice(SEARCHES)}

    def __init__(self, bank_size: int = 4096, reweight_neighbours: int = 9, top_k: int = 1, coreset: str = "pooled",
                 search: str = "flat",
                 backbone: str = DEFAULT_BACKBONE,
                 size: int = 256, blur_sigma: float = 4.0, seed: int = 0, geometry: str = "square",
                 tile_size: int | None = None, tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``bank_size``: patches kept by the coreset. Search time grows linearly with it; 4096
        keeps prediction within budget on 2 cores (see benchmarks/). ``reweight_neighbours``:
        b in the paper's image-score re-weighting (0 disables it). ``top_k``: the image score
        reduces the top_k patch distances by their mean (1 = the paper's maximum); a mean is less
        at the mercy of one noisy patch. ``coreset``: "pooled" (each image's greedy k-center
        first, about 4 × bank_size patches in all, then the greedy over that pool) or "exact"
        (the paper's greedy over all patches; slower, see benchmarks/results/coreset_scale.md).
        ``search``: the bank's nearest-neighbour index, "flat" (exact) or "ivf" / "hnsw"
        (approximate: a patch's distance is never below the exact one, sometimes above), or
        "auto" (IVF from 65,536 bank rows up); see benchmarks/results/real_suite.md for the cost."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_max_pixels=tile_max_pixels, augment=augment,
                         augment_max_images=augment_max_images)
        self.bank_size = bank_size
        self.reweight_neighbours = reweight_neighbours
        self.top_k = top_k
        self.coreset = coreset
        self.search = search

    def fit_features(self, features: torch.Tensor) -> None:
        patches = flatten_patches(features)
        keep = greedy_coreset(patches, self.bank_size, seed=self.seed, progress=True, groups=features.shape[0],
                              method=self.coreset)
        self._set_bank(patches[keep].contiguous())

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        count, _, height, width = features.shape
        distances, _ = self._index.search(flatten_patches(features).numpy(), k=1)
        return torch.from_numpy(distances[:, 0]).reshape(count, height, width)

    def score_feature_batch(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """``score_features`` and ``image_scores`` with one search: the nearest bank patch of the
        worst patch, which the re-weighting needs, comes from the search that scored it."""
        count, _, height, width = features.shape
        patches = flatten_patches(features).numpy()
        distances, nearest = self._index.search(patches, k=1)
        patch_scores = torch.from_numpy(distances[:, 0]).reshape(count, height, width)
        flat = patch_scores.flatten(1)
        rows = flat.argmax(dim=1).numpy() + np.arange(count) * flat.shape[1]
        reduced = flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)
        scores = self._reweighted(reduced, patches[rows], nearest[rows, 0])
        return scores.numpy().astype(np.float64), patch_scores

    def feature_scores(self, features: torch.Tensor) -> np.ndarray:
        """The image scores of ``score_feature_batch`` without a patch map: only the patches that
        may be among the ``top_k`` most distant are searched exactly (``largest_nearest``)."""
        groups = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1]).numpy()
        top, columns, nearest = self._index.largest_nearest(groups, self.top_k)
        reduced = torch.from_numpy(top).mean(dim=1)
        worst_patches = groups[np.arange(len(groups)), columns[:, 0]]
        return self._reweighted(reduced, worst_patches, nearest[:, 0]).numpy().astype(np.float64)

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Max patch distance (or the mean of the ``top_k`` largest), scaled down when the
        nearest bank patch m* of the worst patch sits in a dense region of the bank (its
        neighbours are nearly as close): a distance there is less surprising than one near an
        isolated bank patch. Eq. 7 of the paper."""
        flat = patch_scores.flatten(1)
        worst = flat.argmax(dim=1)
        reduced = flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)
        patches = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])
        worst_patches = patches[torch.arange(len(worst)), worst].numpy()
        _, nearest = self._index.search(worst_patches, k=1)
        return self._reweighted(reduced, worst_patches, nearest[:, 0])

    def _reweighted(self, reduced: torch.Tensor, worst_patches: np.ndarray, nearest: np.ndarray) -> torch.Tensor:
        """``reduced`` scaled by 1 - softmax of the distances from each worst patch to m*
        (``nearest``, its nearest bank row) and m*'s bank neighbours, m*'s term."""
        neighbours = self.reweight_neighbours
        if neighbours <= 0 or self.bank.shape[0] <= neighbours:
            return reduced
        # Bank neighbours of m* (m* itself comes first).
        _, support = self._index.search(self.bank[nearest].numpy(), k=neighbours)
        to_support = np.linalg.norm(self.bank.numpy()[support] - worst_patches[:, None, :], axis=2)
        weights = 1.0 - torch.softmax(torch.from_numpy(to_support), dim=1)[:, 0]
        return weights.float() * reduced

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.bank_tensors()

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self.load_bank(tensors)
