"""Shared machinery of detectors that score backbone patch features against normal ones.

A subclass implements three things on feature tensors (N, C, h, w): ``fit_features`` builds
its memory from normal features, ``score_features`` returns per-patch anomaly scores (N, h, w),
and ``image_scores`` reduces those to one score per image. This class does the rest: the
backbone, held-out normal scores and the threshold, and maps at each image's own size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..backbones import DEFAULT_BACKBONE
from ..data.io import as_image
from .base import BackboneDetector, Prediction
from .calibration import calibrate, refit_folds
from .maps import upsample_map
from .params import BACKBONE, BLUR_SIGMA, INPUT_SIZE, SEED


class PatchDetector(BackboneDetector):
    """Parameters every patch detector shares: ``backbone`` (name), ``size`` (side of the square
    backbone input, pixels), ``blur_sigma`` (map smoothing in input pixels, 0 = none), ``seed``
    (which normal images are held out for calibration, and any random choice of the method)."""

    parameter_constraints = {"backbone": BACKBONE, "size": INPUT_SIZE, "blur_sigma": BLUR_SIGMA, "seed": SEED}

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.size = size
        self.blur_sigma = blur_sigma
        self.seed = seed

    # -- to implement -----------------------------------------------------------------------
    def fit_features(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Default: the most anomalous patch decides (defects are local)."""
        return patch_scores.flatten(1).amax(dim=1)

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        self.fit_from_features(self.backbone_network.embed(images, progress="features", total=len(images)))

    def fit_from_features(self, features: torch.Tensor) -> PatchDetector:
        """Calibrate on held-out folds, then fit on all ``features`` (used by benchmarks that
        embed once for several detectors)."""
        scores, maps = [], []
        for held_out in refit_folds(features.shape[0], self.seed):
            self.fit_features(features[np.setdiff1d(np.arange(features.shape[0]), held_out)])
            fold_scores, fold_maps = self.score_feature_batch(features[held_out])
            scores.append(fold_scores)
            maps.append(fold_maps.numpy())
        self.set_calibration(calibrate(np.concatenate(scores) if scores else None, maps or None))
        self.fit_features(features)
        self._fitted = True
        return self

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        scores, patch_scores = self.score_feature_batch(self.backbone_network.embed(images))
        maps = [self.upsample_map(patch_map.numpy(), image.shape[:2]) for patch_map, image in zip(patch_scores, images)]
        return Prediction(scores=scores, maps=maps)

    def score_feature_batch(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores and patch maps for precomputed features (used by calibration and benchmarks)."""
        patch_scores = self.score_features(features)
        return self.image_scores(patch_scores, features).numpy().astype(np.float64), patch_scores

    def upsample_map(self, patch_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A patch map at the image's (height, width), smoothed by ``blur_sigma``."""
        return upsample_map(patch_map, self.backbone_network.input_hw, shape, self.blur_sigma)
