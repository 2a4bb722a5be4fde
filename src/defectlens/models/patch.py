"""Shared machinery of detectors that score backbone patch features against normal ones.

A subclass implements three things on feature tensors (N, C, h, w): ``fit_features`` builds
its memory from normal features, ``score_features`` returns per-patch anomaly scores (N, h, w),
and ``image_scores`` reduces those to one score per image. This class does the rest: the
backbone, held-out normal scores and the threshold, and maps at each image's own size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.io import as_image
from ..engine.threshold import held_out_folds, threshold_from_normal_scores
from .base import BackboneDetector, Prediction
from .maps import upsample_map

# Below this many normal images every fold leaves one image out; above it a single split
# holds out a fifth, which keeps calibration to one extra fit on large sets.


class PatchDetector(BackboneDetector):
    def __init__(self, backbone: str = "efficientnet-lite0", size: int = 256, blur_sigma: float = 4.0, seed: int = 0, **params):
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, **params)

    # -- to implement -----------------------------------------------------------------------
    def fit_features(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Default: the most anomalous patch decides (defects are local)."""
        return patch_scores.flatten(1).amax(dim=1)

    # -- contract ---------------------------------------------------------------------------
    def fit(self, images: Sequence, masks=None, labels=None) -> PatchDetector:
        images = list(images)
        if not images:
            raise ValueError(f"{self.name} learns from normal images: give at least one")
        return self.fit_from_features(self.backbone.embed(images, progress="features", total=len(images)))

    def fit_from_features(self, features: torch.Tensor) -> PatchDetector:
        """Calibrate the threshold on held-out folds, then fit on all ``features``."""
        self.normal_scores = self._held_out_scores(features)
        self.threshold = None if self.normal_scores is None else threshold_from_normal_scores(self.normal_scores)
        self.fit_features(features)
        return self

    def predict(self, images: Sequence) -> Prediction:
        images = [as_image(image) for image in images]
        scores, patch_scores = self.score_feature_batch(self.backbone.embed(images))
        maps = [self.upsample_map(patch_map.numpy(), image.shape[:2]) for patch_map, image in zip(patch_scores, images)]
        return Prediction(scores=scores, maps=maps)

    def score_feature_batch(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores and patch maps for precomputed features (used by calibration and benchmarks)."""
        patch_scores = self.score_features(features)
        return self.image_scores(patch_scores, features).numpy().astype(np.float64), patch_scores

    # -- internals --------------------------------------------------------------------------
    def upsample_map(self, patch_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A patch map at the image's (height, width), smoothed by ``blur_sigma``."""
        return upsample_map(patch_map, self.backbone.input_hw, shape, self.params["blur_sigma"])

    def _held_out_scores(self, features: torch.Tensor) -> np.ndarray | None:
        """Scores of normal images from models fitted without them: the basis of the threshold."""
        count = features.shape[0]
        if count < 2:
            return None
        scores, maps = [], []
        for held_out in held_out_folds(count, self.params["seed"]):
            keep = np.setdiff1d(np.arange(count), held_out)
            self.fit_features(features[keep])
            fold_scores, fold_maps = self.score_feature_batch(features[held_out])
            scores.append(fold_scores)
            maps.append(fold_maps.flatten())
        normal_patches = torch.cat(maps)
        # Heatmap colours: blue at a typical normal patch, red beyond the worst normal patch.
        self.map_range = (float(normal_patches.median()), float(normal_patches.max()) * 1.25)
        return np.concatenate(scores)
