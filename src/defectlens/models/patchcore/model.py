"""PatchCore (Roth et al., CVPR 2022): a coreset of normal patch features, nearest-neighbour
distance as the patch score, and the paper's re-weighting of the image score."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ..bank import SearchedBank
from ..base import register
from ..calibration import refit_folds
from ..memory import CORESETS, SEARCHES, greedy_coreset
from ..params import Choice, Integer
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector, samples_with_owners


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C), one row per patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def patch_groups(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h*w, C): each image's patches, one row each."""
    return features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])


def patches_at(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` of ``flatten_patches(features)``, gathered without flattening them all."""
    positions = features.shape[2] * features.shape[3]
    return features.flatten(2)[rows // positions, :, rows % positions]


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
        self._shared_order = None  # one calibrate_and_fit's greedy order, see there

    def fit_features(self, features: torch.Tensor) -> None:
        self._set_bank(patches_at(features, self._coreset(features)).contiguous())

    def calibrate_and_fit(self, features: torch.Tensor, views) -> None:
        """The final coreset's greedy is run once, on every training image, and continued past
        ``bank_size`` picks so that each held-out fold can take the first ``bank_size`` picks
        that none of its images (or their augmented copies) gave: a bank without the held-out
        patches, spread over the others as the greedy spreads it, for the cost of one coreset
        instead of six (a fold's own greedy would pick from a pool of its images alone; measured
        on BSData in benchmarks/results/coreset_scale.md). The final bank is fit_features', row
        for row."""
        count = features.shape[0]
        samples, owners = samples_with_owners(features, views)
        largest = max((len(fold) for fold in refit_folds(count, self.seed)), default=0) / count
        # Twice the picks a fold's images would give if the greedy took from all images evenly:
        # some images are more distinct than others, and a fold short of picks fits on fewer.
        extend = 0 if largest in (0, 1) else math.ceil(2 * self.bank_size * largest / (1 - largest))
        order = self._coreset(samples, extend)
        self._shared_order = order, owners[order // (features.shape[2] * features.shape[3])], samples
        try:
            super().calibrate_and_fit(features, views)
        finally:
            self._shared_order = None

    def fit_normal(self, features: torch.Tensor, views, keep: np.ndarray) -> None:
        if self._shared_order is None:
            return super().fit_normal(features, views, keep)
        order, row_owners, samples = self._shared_order
        rows = order[torch.isin(row_owners, torch.as_tensor(keep))][: self.bank_size]
        self._set_bank(patches_at(samples, rows).contiguous())

    def _coreset(self, features: torch.Tensor, extend: int = 0) -> torch.Tensor:
        """Patch rows of ``features`` in greedy order: the coreset, then ``extend`` more."""
        return greedy_coreset(flatten_patches(features), self.bank_size, seed=self.seed, progress=True,
                              groups=features.shape[0], method=self.coreset, extend=extend)

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
        groups = patch_groups(features).numpy()
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
        patches = patch_groups(features)
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
