"""Patch kNN in the style of AnomalyDINO (Damm et al., 2024): every normal patch is kept,
cosine distance to the nearest one is the patch score, the image score is the mean of the
top 1 % patch scores, and optional foreground masking ignores the background.

Tiled images: the top 1 % of *one tile's* patches. A defect's size in patches does not grow with
the number of tiles an image is cut into, and 1 % of all its tiles' patches together drowned small
defects in normal patches: DeepPCB's 9 tiles gave 92 patches, where a track break covers a handful (the
default ensemble there: 0.943 with 1 % of the whole image's patches, 0.981 per tile; BSData's 18
tiles 0.969 either way; benchmarks/results/real_suite.md).

On an approximate index (``search="ivf"``, the default ensemble's), the patches an image score
averages get their exact distances, found by an exact search of those few
(``NearestNeighbours.exact_nearest``: through the IVF lists that could hold a nearer row, or all
rows where those lists are most of the bank); the index still searches every other patch (the map). The approximate distances of the top
patches cost the default ensemble on DeepPCB: 0.974 / 0.981 / 0.983 / 0.986 with 8 of 512 / 16 /
32 / 64 of 1,024 lists visited, 0.988 exact. Model files written before keep their index's
distances (``exact_top`` in their state is absent)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ..bank import SearchedBank
from ..base import register
from ..calibration import refit_folds
from ..memory import SEARCHES, greedy_coreset, per_image_picks
from ..params import Boolean, Choice, Integer, Optional, Real
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector
from ..patchcore.model import flatten_patches, patch_groups, patches_at


#: Patch distances (the ``metric`` parameter). Tiled patchknn at 4 shots, image AUROC over 5 draws,
#: cosine / L2 (benchmarks/results/real_suite.md): BSData 0.925 / 0.940 (L2: 3 draws, 200 test
#: images), DeepPCB 0.864 / 0.655, ELPV mono 0.899 / 0.838, poly 0.863 / 0.796, mean 0.887 / 0.808;
#: the generator's fabric 0.786 / 0.729 and washer 0.662 / 0.930 (faint changes of contrast).
#: Measured in between and not kept (same draws): cosine plus a term for the ratio of lengths,
#: (1 - cos) + w² / 2 · log(|q| / |b|)², at w = 4 fabric 0.817, washer 0.747, but DeepPCB 0.795, ELPV
#: mono 0.899, poly 0.855 (w = 0.5-8: washer 0.66-0.77); cosine of x / max(|x|, t), t a quantile
#: of the bank's lengths (L2 below t), washer 0.688 / 0.765 / 0.924 and fabric 0.766 / 0.759 / 0.744
#: at the 25th / 50th / 90th percentile: the L2 trade-off again. Nor one model per metric on the
#: same shots, fused as the ensemble fuses members (each image score's z against its own held-out
#: normal scores, soft maximum): washer 0.864, fabric 0.777, but DeepPCB 0.789, ELPV mono 0.856,
#: poly 0.862 (spreads floored at 15-30 % of the held-out mean: washer 0.83, DeepPCB 0.81-0.82).
METRICS = ("cosine", "l2")
#: The default image score: the mean of this share of one tile's patches (module doc).
TILE_TOP_FRACTION = 0.01
#: Held-out images per calibration fold whose whole patch maps are searched on an approximate
#: index (``held_out_scores``): five folds' 40 maps at 256 px hold 41k patch distances, plenty
#: for the heatmap range's median.
MAPPED_PER_FOLD = 8


def pca_foreground(features: torch.Tensor, axis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Boolean (N, h, w) foreground from the sign of the first principal component, closed
    morphologically so thin gaps inside a part do not become background."""
    projection = (flatten_patches(features) - mean) @ axis
    masks = (projection > 0).reshape(features.shape[0], *features.shape[2:]).numpy().astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    closed = [cv2.dilate(cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel), kernel) > 0 for m in masks]
    return torch.from_numpy(np.stack(closed))


def _mean_of_rows(top: np.ndarray) -> np.ndarray:
    """Image scores from (N, top count) patch distances, summed in float32 as ``image_scores`` does."""
    return torch.from_numpy(top).mean(dim=1).numpy().astype(np.float64)


@register
class PatchKNN(SearchedBank, PatchDetector):
    name = "patchknn"
    parameter_constraints = {"metric": Choice(METRICS), "foreground": Boolean(),
                             "top_fraction": Optional(Real(0.0, 1.0)), "bank_size": Optional(Integer(1, 10**7)),
                             "search": Choice(SEARCHES)}

    def __init__(self, metric: str = "cosine", foreground: bool = False, top_fraction: float | None = None,
                 bank_size: int | None = 16384, search: str = "flat",
                 backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0,
                 geometry: str = "square", tile_size: int | None = None, tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``metric``: the patch distance, "cosine" (AnomalyDINO's; blind to a feature's length) or
        "l2": cosine won the real sets' mean by 0.08, L2 BSData and the generator's washer (``METRICS``).
        ``foreground``: mask the background (for objects on a plain background; leave off
        for textures, whose whole image is foreground). ``top_fraction``: the share of an image's
        patches whose mean is its score; None: 1 % of one tile's patches (of the image's, untiled;
        module doc). ``bank_size``: above this many normal
        patches (16 images at 256 px), keep each image's most distinct patches (per-image
        greedy coreset) so search time stays bounded; None keeps every patch.
        ``search``: the bank's nearest-neighbour index, "flat" (exact) or "ivf" / "hnsw"
        (approximate: a patch's distance is never below the exact one, sometimes above), or
        "auto" (IVF from 65,536 bank rows up); see benchmarks/results/real_suite.md for the cost."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_max_pixels=tile_max_pixels, augment=augment,
                         augment_max_images=augment_max_images)
        self.metric = metric
        self.foreground = foreground
        self.top_fraction = top_fraction
        self.bank_size = bank_size
        self.search = search
        self.pca_axis: torch.Tensor | None = None
        self.pca_mean: torch.Tensor | None = None
        self._picks: list[torch.Tensor] | None = None  # per-image greedy picks shared by one fit's folds
        #: Image scores from the top patches' exact distances on an approximate index (module doc);
        #: learned state, False for model files written before it.
        self.exact_top = True

    def fit_features(self, features: torch.Tensor) -> None:
        patches = flatten_patches(features)
        if self.foreground:
            self._fit_foreground(features)
            patches = patches[pca_foreground(features, self.pca_axis, self.pca_mean).flatten()]
        if self.bank_size is not None:
            patches = patches[greedy_coreset(patches, self.bank_size, seed=self.seed,
                                             groups=features.shape[0], pool_factor=1)]
        self._set_bank(patches.contiguous())

    def calibrate_and_fit(self, features: torch.Tensor, views) -> None:
        """As every patch detector, except that without foreground masking or augmented copies
        each image's greedy picks are made once, for the largest share any of the fits (held-out
        folds and final) gives an image, and every fit takes each of its images' first picks
        (``per_image_picks``): the final bank is the one ``fit_features`` builds, and the
        per-image greedy is not run five more times for the folds."""
        count, positions = features.shape[0], features.shape[2] * features.shape[3]
        self._picks = None
        if views is None and not self.foreground and self.bank_size is not None:
            fewest = min([count] + [count - len(fold) for fold in refit_folds(count, self.seed)])
            largest_share = -(-self.bank_size // fewest)
            # Only while every fit leaves a choice in every image: where some fit would keep an
            # image whole, fit_features' own path (all patches, or a greedy with its own start) holds.
            if largest_share < positions:
                self._picks = per_image_picks(features, largest_share, seed=self.seed)
        try:
            super().calibrate_and_fit(features, views)
        finally:
            self._picks = None

    def fit_normal(self, features: torch.Tensor, views, keep: np.ndarray) -> None:
        if self._picks is None:
            return super().fit_normal(features, views, keep)
        positions = features.shape[2] * features.shape[3]
        quota, extra = divmod(self.bank_size, len(keep))
        if quota >= positions:  # every patch of these images fits in the bank
            rows = torch.cat([int(image) * positions + torch.arange(positions) for image in keep])
        else:
            rows = torch.cat([int(image) * positions + self._picks[image][: quota + (rank < extra)]
                              for rank, image in enumerate(keep)])
        self._set_bank(patches_at(features, rows).contiguous(), patches=(rows, features.shape[0] * positions))

    def _fit_foreground(self, features: torch.Tensor) -> None:
        """First principal component of the normal patches, signed so that the image centre
        (where a part usually sits) is foreground."""
        patches = flatten_patches(features)
        self.pca_mean = patches.mean(dim=0)
        _, _, vectors = torch.pca_lowrank(patches - self.pca_mean, q=1, center=False)
        axis = vectors[:, 0]
        height, width = features.shape[2:]
        centre = features[:, :, height // 4 : height - height // 4, width // 4 : width - width // 4]
        if float(((flatten_patches(centre) - self.pca_mean) @ axis).mean()) < 0:
            axis = -axis
        self.pca_axis = axis

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        count, _, height, width = features.shape
        distances, _ = self._index.search(flatten_patches(features).numpy(), k=1)
        scores = torch.from_numpy(distances[:, 0]).reshape(count, height, width)
        if self.foreground:
            scores = scores * pca_foreground(features, self.pca_axis, self.pca_mean)
        return scores

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        flat = patch_scores.flatten(1)
        count = self._top_count(flat.shape[1])
        if self.exact_top and not self.foreground and self._index.kind != "flat":
            # The map's distances bound the exact ones from above: few patches need an exact search.
            top, _, _ = self._index.largest_nearest(patch_groups(features).numpy(), count, bounds=flat.numpy(), exact=True)
            return torch.from_numpy(top).mean(dim=1)
        return flat.topk(count, dim=1).values.mean(dim=1)

    def feature_scores(self, features: torch.Tensor) -> np.ndarray:
        """The image scores of ``score_feature_batch`` without a patch map: without foreground
        masking, only the patches that may be among the top fraction are searched in full
        (``largest_nearest``; on an IVF index the others get one list's scan), and on an
        approximate index the top ones' distances are then made exact (``exact_top``)."""
        if self.foreground:
            return super().feature_scores(features)
        return _mean_of_rows(self._top_distances(features))

    def _top_distances(self, features: torch.Tensor) -> np.ndarray:
        """(N, top count) the largest patch distances of each image, largest first, without a map."""
        groups = patch_groups(features).numpy()
        top, _, _ = self._index.largest_nearest(groups, self._top_count(groups.shape[1]), exact=self.exact_top)
        return top

    def held_out_scores(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """On an approximate index, only ``MAPPED_PER_FOLD`` held-out images, spread over the fold, get whole
        maps; the others get ``feature_scores``' image scores and their largest patch distance
        (exact, as the image scores' top patches are), where a full search of every patch was
        most of the default's calibration."""
        if self.foreground or self._index.kind == "flat" or len(features) <= MAPPED_PER_FOLD:
            return super().held_out_scores(features)
        # Spread over the fold (images often come in capture order): every k-th is mapped.
        mapped = np.zeros(len(features), dtype=bool)
        mapped[np.linspace(0, len(features) - 1, MAPPED_PER_FOLD).round().astype(int)] = True
        scores = np.empty(len(features))
        scores[mapped], maps = self.score_feature_batch(features[torch.from_numpy(mapped)])
        top = self._top_distances(features[torch.from_numpy(~mapped)])
        scores[~mapped] = _mean_of_rows(top)
        return scores, maps.numpy(), top[:, 0]

    def _top_count(self, positions: int) -> int:
        """Patches whose mean is the image score, at least one: ``top_fraction`` of an image's
        ``positions``, or by default ``TILE_TOP_FRACTION`` of one tile's."""
        if self.top_fraction is None:
            return max(1, int(round(TILE_TOP_FRACTION * positions / self.tiles_per_image)))
        return max(1, int(round(self.top_fraction * positions)))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.bank_tensors()
        if self.foreground:
            tensors.update(pca_axis=self.pca_axis, pca_mean=self.pca_mean)
        return tensors

    def extra_state(self) -> dict:
        return {**super().extra_state(), "exact_top": self.exact_top}

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self.exact_top = bool(extra.get("exact_top", False))
        self.pca_axis = tensors.get("pca_axis")
        self.pca_mean = tensors.get("pca_mean")
        self.load_bank(tensors)
