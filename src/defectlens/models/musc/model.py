"""MuSc (Li et al., ICLR 2024) on the embedded backbone: zero-shot, vision only.

The unlabelled images of one ``predict`` call score each other (see mutual.py): no normal
images, no text, nothing to download. Each backbone level (stride 8 and stride 16 for
EfficientNet-Lite, each averaged over 3×3 neighbours) is scored on its own grid, the levels'
maps averaged; the image score is the mean of the top 1 % patch scores, re-scored with its most
similar images (RsCIN) as far as similar images' scores agree in the batch.

The paper's own settings are parameters too (docs/fidelity.md compares them): aggregation degrees
r ∈ {1, 3, 5} (``degrees=[1,3,5]``; applied on top of the backbone's own 3×3 averaging), the mean
of the lowest 30 % of distances over all other images (``keep=0.3 references=null``) and plain
RsCIN over k ∈ {1, 2, 3} (``rescore=plain rescore_neighbours=3``). The backbone input
keeps the images' aspect ratio (about size² pixels), so long parts keep their detail.

Transductive: the batch is the reference, so it should hold many images of one product (dozens
at least), with normal appearance the common one. Cost is O(N · references · patches²): each
image is compared with ``references`` others picked at random rather than with all N-1.
"""

from __future__ import annotations

import warnings
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones import DEFAULT_BACKBONE, get_backbone
from ...data.io import as_image
from ..base import BackboneDetector, LearningType, Prediction, register
from ..calibration import Calibration, batch_threshold, heatmap_range
from ..maps import upsample_map
from ..params import BACKBONE, BLUR_SIGMA, INPUT_SIZE, SEED, Boolean, Choice, Integer, ListOf, Optional, Real
from .mutual import mutual_scores, rescore, similar_image_mean


@register
class MuSc(BackboneDetector):
    name = "musc"
    learning_type = LearningType.ZERO_SHOT
    predict_chunk = None
    _fitted = True  # nothing to learn: a new musc predicts at once
    parameter_constraints = {"backbone": BACKBONE, "size": INPUT_SIZE, "keep_aspect": Boolean(),
                             "references": Optional(Integer(1, 10**6)), "keep": Real(0.0, 1.0, open_low=True),
                             "levels": Optional(ListOf(Integer(0, 16))), "degrees": Optional(ListOf(Choice((1, 3, 5, 7)))),
                             "rescore": Choice(("gated", "plain")), "top_fraction": Real(0.0, 1.0, open_low=True),
                             "rescore_neighbours": Integer(1, 1024), "blur_sigma": BLUR_SIGMA, "seed": SEED}

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int = 256, keep_aspect: bool = True,
                 references: int | None = 32, keep: float = 0.5, levels: list[int] | None = None,
                 degrees: list[int] | None = None, rescore: str = "gated", top_fraction: float = 0.01,
                 rescore_neighbours: int = 5, blur_sigma: float = 4.0, seed: int = 0):
        """``size``: backbone input side; with ``keep_aspect`` the input has about size² pixels at
        the first image's aspect ratio instead of being a square.
        ``references``: other images of the batch each image is compared with (None: all).
        ``keep``: fraction of those images, the best-matching ones, whose distances are averaged
        into a patch score; 0.5 tolerates a defect that recurs in up to half of the batch.
        ``levels``: which backbone levels to score (indices, finest first; None: all).
        ``degrees``: aggregation degrees r, each level scored at each r×r patch averaging and the
        maps averaged (the paper: [1, 3, 5]; None: [1], the backbone's 3×3 averaging alone).
        ``rescore``: "gated" mixes RsCIN in as far as similar images' scores agree in the batch;
        "plain" is the paper's RsCIN, always applied.
        ``top_fraction``: image score = mean of this fraction of highest patch scores.
        ``rescore_neighbours``: RsCIN window, 1 = off. ``blur_sigma``: map smoothing, input pixels."""
        self.backbone = backbone
        self.size = size
        self.keep_aspect = keep_aspect
        self.references = references
        self.keep = keep
        self.levels = levels
        self.degrees = degrees
        self.rescore = rescore
        self.top_fraction = top_fraction
        self.rescore_neighbours = rescore_neighbours
        self.blur_sigma = blur_sigma
        self.seed = seed

    def backbone_for(self, shape: tuple[int, int]):
        """The backbone at the input size for images of ``shape`` (height, width)."""
        if not self.keep_aspect:
            return self.backbone_network
        size, multiple = self.size, max(stride for _, stride in self.backbone_network.levels)
        aspect = shape[1] / shape[0]
        height = max(multiple, round(size / aspect**0.5 / multiple) * multiple)
        width = max(multiple, round(size * aspect**0.5 / multiple) * multiple)
        return get_backbone(self.backbone, (height, width))

    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        """Nothing to learn: musc scores each predict batch against itself."""
        if images:
            warnings.warn(f"musc is zero-shot: the {len(images)} images given to fit are not used; "
                          "it scores the images of each predict call against each other", stacklevel=3)

    def predict_images(self, images: list) -> Prediction:
        """Scores and maps of a batch scored against itself (at least 2 images). Sets
        ``threshold`` and ``map_range`` from this batch, as no normal images are known."""
        shapes: list[tuple[int, int]] = []

        def decoded():
            for item in images:
                image = as_image(item)
                shapes.append(image.shape[:2])
                yield image

        # Decode one image ahead to pick the input size; the rest stream through the backbone.
        stream = decoded()
        first = next(stream, None)
        if first is None:
            raise ValueError("musc scores the images of a batch against each other: give at least 2 images")
        backbone = self.backbone_for(shapes[0])
        features = backbone.embed(chain([first], stream), progress="features", total=len(images))
        scores, patch_maps = self.score_features(features)
        threshold = batch_threshold(scores)
        normal = scores <= threshold if threshold is not None else np.ones(len(scores), bool)
        self.set_calibration(Calibration(None, threshold, heatmap_range(patch_maps[torch.from_numpy(normal)].numpy())))
        maps = [upsample_map(m.numpy(), backbone.input_hw, shape, self.blur_sigma) for m, shape in zip(patch_maps, shapes)]
        return Prediction(scores=scores, maps=maps)

    def score_features(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Backbone features (N, C, h, w) of one batch -> image scores (N,) and patch maps (N, h, w)."""
        levels = self.split_levels(features)
        patch_maps = mutual_scores(levels, self.references, self.keep, self.seed,
                                   progress=True, degrees=tuple(self.degrees or (1,)))
        flat = patch_maps.flatten(1)
        top = max(1, round(self.top_fraction * flat.shape[1]))
        scores = flat.topk(top, dim=1).values.mean(dim=1)
        image_features = torch.cat([F.normalize(level.mean(dim=(2, 3)), dim=1) for level in levels], dim=1)
        image_features = F.normalize(image_features, dim=1)
        if self.rescore == "plain":
            scores = similar_image_mean(scores, image_features, self.rescore_neighbours)
        else:
            scores = rescore(scores, image_features, self.rescore_neighbours)
        return scores.numpy().astype(np.float64), patch_maps

    def split_levels(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's concatenated levels apart, each back on its own grid (average pooling
        undoes the upsampling of coarser levels up to a mild blur): 4× fewer patches for a
        stride-16 level, 16× less work to score it."""
        levels, start = [], 0
        finest = self.backbone_network.levels[0][1]
        for channels, stride in self.backbone_network.levels:
            level = features[:, start : start + channels]
            start += channels
            if stride > finest:
                level = F.avg_pool2d(level, stride // finest, ceil_mode=True)
            levels.append(level)
        chosen = self.levels
        return levels if chosen is None else [levels[i] for i in chosen]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors, extra) -> None:
        """A musc model file holds its parameters only."""
