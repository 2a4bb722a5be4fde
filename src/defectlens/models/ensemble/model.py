"""Score fusion of patch detectors: the members score one backbone pass, each member's image
scores become z-scores against its own held-out normal scores and its maps are scaled by its
own normal map range, and the fused score is their mean (``fusion="mean"``), their largest
(``fusion="max"``) or a soft maximum of them (``fusion="soft_max"``). The fused detector's threshold
comes from held-out normal images only (models/calibration.py): the members' held-out scores, fused
(see ``calibrate_and_fit``).

Why a maximum: a member blind to a defect type adds only noise to a mean. PaDiM's per-position
Gaussians do not fit DeepPCB's unaligned boards (0.723 alone, tiled), and the mean pulled tiled
patchknn's 0.924 down to 0.873 there; the maximum keeps it (0.924) and costs 0.005 on the sets
where both members see the defects (BSData, ELPV: 0.955 / 0.944 / 0.925 against 0.960 / 0.950 /
0.930 for the mean).

Why a soft maximum: T·log(e^(a/T) + e^(b/T)) with T = ``SOFT_MAX_TEMPERATURE`` normal spreads
is the larger z-score where the members disagree by more than about 2T (a defect one of them is
blind to) and moves towards their mean where they agree (a good image's noise, which the mean
averages down). On the suite's four real sets, full-shot, the default's members recorded and every
rule applied to the same z-scores: max 0.9684 / 0.9879 / 0.9527 / 0.9305 (BSData, DeepPCB, ELPV
mono, poly; mean 0.9599), mean 0.9712 / 0.9472 / 0.9571 / 0.9323, soft maximum at T = 0.25, 0.5,
1, 2: mean 0.9606, 0.9611, 0.9607, 0.9590; at T = 0.5 0.9700 / 0.9877 / 0.9550 / 0.9318. The maps
take the plain maximum: they are scaled to each member's normal map range, not to its score spread,
so a temperature in spreads means nothing there.

Why z-scores: members' raw scores live on unrelated scales (an L2 distance, a Mahalanobis
distance, a cosine distance); against each member's own normal spread, "3" means the same thing
for all of them, so no member dominates by its units.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ...errors import UsageError
from ..base import REGISTRY, register
from ..calibration import Calibration, calibrate
from ..params import Choice, Constraint, ListOf, Optional, ParameterError, Params
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector, subset_views

MEMBER_METHODS = ("patchcore", "padim", "spade", "patchknn")
# The pair with the best full-shot mean image AUROC over the real-data suite's four sets
# (benchmarks/results/real_suite.md): 0.881, above either member alone (patchknn 0.867, padim 0.858).
DEFAULT_MEMBERS = ("padim", "patchknn")
#: The soft maximum's temperature, in members' normal score spreads (module doc).
SOFT_MAX_TEMPERATURE = 0.5


def soft_maximum(z_scores, axis: int = 0) -> np.ndarray:
    """T·log Σ e^(z/T) over ``axis``: at least the largest z-score, at most T·log(members) above it."""
    return SOFT_MAX_TEMPERATURE * np.logaddexp.reduce(np.asarray(z_scores, dtype=np.float64) / SOFT_MAX_TEMPERATURE,
                                                      axis=axis)


#: How members' z-scores combine over members.
FUSIONS = {"mean": np.mean, "max": np.max, "soft_max": soft_maximum}
#: How their scaled maps combine (the soft maximum's temperature is in score spreads: maps take the maximum).
MAP_FUSIONS = {"mean": np.mean, "max": np.max, "soft_max": np.max}
#: Parameters the ensemble sets for all its members (one backbone pass, one layout).
SHARED = ("backbone", "size", "blur_sigma", "seed", "geometry", "tile_size", "tile_overlap", "tile_max_pixels", "augment",
          "augment_max_images")


class MemberParams(Constraint):
    """{member method: {parameter: value}}; each member checks its own values."""

    def accepts(self, value):
        return isinstance(value, dict) and all(isinstance(name, str) and Params().accepts(params)
                                               for name, params in value.items())

    def describe(self):
        return 'an object {member method: {parameter: value}}, e.g. {"patchcore": {"bank_size": 16384}}'


@register
class Ensemble(PatchDetector):
    name = "ensemble"
    parameter_constraints = {"members": ListOf(Choice(MEMBER_METHODS)), "member_params": Optional(MemberParams()),
                             "fusion": Choice(tuple(FUSIONS))}

    def __init__(self, members: tuple[str, ...] = DEFAULT_MEMBERS, member_params: dict | None = None,
                 fusion: str = "mean",
                 backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0,
                 geometry: str = "square", tile_size: int | None = None, tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``members``: the patch detectors fused. ``member_params``: their own parameters by
        method name (backbone, size, geometry and the other shared ones are the ensemble's).
        ``fusion``: "mean", "max" or "soft_max" of the members' normalised scores (maps: mean or
        max; module doc)."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_max_pixels=tile_max_pixels, augment=augment,
                         augment_max_images=augment_max_images)
        self.members = members
        self.member_params = member_params
        self.fusion = fusion

    @classmethod
    def check_params(cls, params) -> None:
        super().check_params(params)
        members = params.get("members", DEFAULT_MEMBERS)
        for method, own in (params.get("member_params") or {}).items():
            if method not in members:
                raise ParameterError(f"ensemble: member_params names {method!r}, which is not among the members {list(members)}")
            shared = sorted(set(own) & set(SHARED))
            if shared:
                raise ParameterError(f"ensemble: member_params of {method} sets {', '.join(shared)}: set those on the ensemble")
            REGISTRY[method].check_params(own)

    def _new_members(self) -> list[PatchDetector]:
        shared = {name: getattr(self, name) for name in SHARED}
        # Members never embed: the ensemble hands them its one backbone pass.
        return [REGISTRY[method](**shared, **(self.member_params or {}).get(method, {})) for method in self.members]

    def fit_normal(self, features: torch.Tensor, views: tuple[torch.Tensor, np.ndarray] | None,
                   keep: np.ndarray) -> None:
        """Fit and calibrate each member on the images ``keep`` indexes (and their augmented
        copies), then keep its normalisation: (score mean, score std, map low, map high) of its
        held-out normal images."""
        self.fitted_members = self._new_members()
        views = subset_views(views, keep)
        if not np.array_equal(keep, np.arange(features.shape[0])):  # all in order: no index copy
            features = features[keep]
        # The members fit at once, each in its thread: much of a fit runs on one core (patchknn's
        # per-image greedy is a Python loop of small products, PaDiM's many small factorisations),
        # and the other core takes the other member meanwhile. The default's fit of 200 images at
        # 256 px: 10.7 -> 9.5 s (farm-bench A/B; speed.md), the same model file byte for byte.
        with ThreadPoolExecutor(len(self.fitted_members), thread_name_prefix="defectlens-member") as pool:
            for fitting in [pool.submit(member.fit_from_features, features, canvas_hw=self.canvas_hw, views=views)
                            for member in self.fitted_members]:
                fitting.result()
        norms = []
        for member in self.fitted_members:
            scores = member.normal_scores
            if scores is None or len(scores) < 2:
                raise UsageError(f"ensemble: {member.name} needs held-out normal scores to be normalised; "
                                 "fit the ensemble on at least 2 normal images")
            spread = float(np.std(scores, ddof=1)) or max(abs(float(np.mean(scores))) * 1e-3, 1e-12)
            low, high = member.map_range if member.map_range is not None else (0.0, 1.0)
            norms.append([float(np.mean(scores)), spread, low, high if high > low else low + 1.0])
        self.norms = torch.tensor(norms, dtype=torch.float64)

    def calibrate_and_fit(self, features: torch.Tensor, views: tuple[torch.Tensor, np.ndarray] | None) -> None:
        """The members fit and calibrate themselves on the same held-out folds (same image count,
        same seed), so their held-out scores line up image by image. Fused with the final
        normalisation, the one new images meet, they set the ensemble's threshold. (Re-fitting the
        whole ensemble per fold instead normalised each fold's scores by that fold's nested
        statistics, a scale new images never see: 30 % false alarms on DeepPCB's good scans.)"""
        self.fit_normal(features, views, np.arange(features.shape[0]))
        held_out = [member.normal_scores for member in self.fitted_members]
        if len({len(scores) for scores in held_out}) != 1:
            raise RuntimeError("ensemble: members were calibrated on different held-out images")
        fused = FUSIONS[self.fusion]([(np.asarray(scores, dtype=np.float64) - mean) / spread
                                      for scores, (mean, spread, _, _) in zip(held_out, self.norms.tolist())], axis=0)
        # Each member's map is scaled to its own normal heatmap range, so 0..1 is the fused one.
        calibration = calibrate(fused)
        self.set_calibration(Calibration(calibration.normal_scores, calibration.threshold, (0.0, 1.0)))

    def score_feature_batch(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The ``fusion`` of the members' normalised image scores and patch maps."""
        scores, maps = [], []
        for member, (mean, spread, low, high) in zip(self.fitted_members, self.norms.tolist()):
            member_scores, member_maps = member.score_feature_batch(features)
            scores.append((member_scores - mean) / spread)
            maps.append((member_maps.double() - low) / (high - low))
        fused_maps = MAP_FUSIONS[self.fusion](torch.stack(maps).numpy(), axis=0)
        return FUSIONS[self.fusion](scores, axis=0), torch.from_numpy(fused_maps).float()

    def feature_scores(self, features: torch.Tensor) -> np.ndarray:
        """``score_feature_batch``'s fused image scores from the members' ``feature_scores``,
        which may skip the patch scores an image score does not depend on."""
        return FUSIONS[self.fusion]([(member.feature_scores(features) - mean) / spread
                                     for member, (mean, spread, _, _) in zip(self.fitted_members, self.norms.tolist())],
                                    axis=0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"norms": self.norms}
        for index, member in enumerate(self.fitted_members):
            tensors.update({f"{index}.{key}": value for key, value in member.state_tensors().items()})
        return tensors

    def extra_state(self) -> dict:
        return {**super().extra_state(), "members": [member.extra_state() for member in self.fitted_members]}

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self.norms = tensors["norms"].double()
        self.fitted_members = self._new_members()
        for index, member in enumerate(self.fitted_members):
            prefix = f"{index}."
            member.load_state_tensors({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)},
                                      extra["members"][index])
            member._fitted = True
