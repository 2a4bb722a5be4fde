"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position (mean and covariance over
the normal images); the Mahalanobis distance to it is the patch score. Assumes aligned parts."""

from __future__ import annotations

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ...heap import release_free_memory
from ..base import register
from ..calibration import calibrate, refit_folds
from ..params import Integer, ParameterError, Real
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector, samples_with_owners

#: Patch positions whose Gaussians are estimated (and scored) together; bounds the float64
#: working set to about blocks × images × feature_dims, whatever the tiling. Small enough that a
#: block's tensors (10-20 MB for 200 images) stay under glibc's mmap threshold and reuse freed
#: heap memory: at 1,024 positions each one was a fresh mapping, zeroed page by page by the
#: kernel, and the default's PaDiM fitted 200 images in 2.0 s instead of 1.0 (same result).
POSITIONS_PER_BLOCK = 128


@register
class PaDiM(PatchDetector):
    name = "padim"
    parameter_constraints = {"feature_dims": Integer(1, 4096), "regularisation": Real(0.0, open_low=True)}

    def __init__(self, feature_dims: int = 100, regularisation: float = 0.01, backbone: str = DEFAULT_BACKBONE,
                 size: int = 256, blur_sigma: float = 4.0, seed: int = 0, geometry: str = "square",
                 tile_size: int | None = None, tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        """``feature_dims``: random channels kept (the paper's dimensionality reduction, which
        keeps the per-position covariances small). ``regularisation``: εI added to each
        covariance so it stays invertible with few images (with one image it is εI alone)."""
        super().__init__(backbone=backbone, size=size, blur_sigma=blur_sigma, seed=seed, geometry=geometry,
                         tile_size=tile_size, tile_overlap=tile_overlap, tile_max_pixels=tile_max_pixels, augment=augment,
                         augment_max_images=augment_max_images)
        self.feature_dims = feature_dims
        self.regularisation = regularisation

    def fit_features(self, features: torch.Tensor) -> None:
        self._fit_scoring_folds(features, torch.arange(features.shape[0]), [])

    def calibrate_and_fit(self, features: torch.Tensor, views: tuple[torch.Tensor, np.ndarray] | None) -> None:
        """What the generic loop (re-fit without each held-out fold, score the fold, fit on
        all) computes, in one pass over the positions: a fold's Gaussian comes from the sums over
        all training samples less its own images' (and their augmented copies'), so the sums are
        taken about twice instead of six times, and a fold's held-out images are scored through a
        Cholesky factor instead of an inverse. Only the final Gaussians are inverted (the model
        keeps precisions). The default's PaDiM on 200 BSData images at 256 px: 1.8 s, where six
        fits took 5.6 s."""
        count = features.shape[0]
        samples, owners = samples_with_owners(features, views)
        folds = [torch.as_tensor(fold) for fold in refit_folds(count, self.seed)]
        squared = self._fit_scoring_folds(samples, owners, folds)
        scores, maps = [], []
        for fold, fold_squared in zip(folds, squared):
            patch_scores = fold_squared.clamp_min(0).sqrt().float().reshape(len(fold), *features.shape[2:])
            scores.append(self.image_scores(patch_scores, features[fold]).numpy().astype(np.float64))
            maps.append(patch_scores.numpy())
        self.set_calibration(calibrate(np.concatenate(scores) if scores else None, maps or None))

    def _fit_scoring_folds(self, samples: torch.Tensor, owners: torch.Tensor, folds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fit the Gaussians on all ``samples`` (images first, then augmented copies; ``owners``:
        the image each sample is or was made from) and return, per fold of image indices, the
        squared Mahalanobis distances (fold images, positions) of its images to the Gaussians
        of the samples that images outside the fold own."""
        self._choose_channels(samples.shape[1])
        flat = samples.flatten(2)  # (samples, all channels, positions), a view
        held = [torch.isin(owners, fold) for fold in folds]
        squared = [torch.empty(len(fold), flat.shape[2], dtype=torch.float64) for fold in folds]
        means, precisions = [], []
        # A block of positions at a time: the whole (positions, samples, channels) float64
        # tensor of a tiled set would not fit in memory.
        for start in range(0, flat.shape[2], POSITIONS_PER_BLOCK):
            block = _block_samples(flat, self.channels, start)  # (positions, samples, kept channels)
            sums, outer = block.sum(dim=1), block.transpose(1, 2) @ block
            for fold, fold_squared, mask in zip(folds, squared, held):
                own = block[:, mask]
                rest = torch.baddbmm(outer, own.transpose(1, 2), own, alpha=-1.0)  # outer less ownᵀ own
                mean, factor = self._gaussian(sums - own.sum(dim=1), rest, block.shape[1] - own.shape[1], invert=False)
                offsets = (block[:, fold] - mean[:, None, :]).transpose(1, 2)
                solved = torch.linalg.solve_triangular(factor, offsets, upper=False)
                fold_squared[:, start : start + block.shape[0]] = (solved * solved).sum(dim=1).T
            mean, precision = self._gaussian(sums, outer, block.shape[1], invert=True)
            means.append(mean.float())
            precisions.append(precision.float())
            release_free_memory()  # the block's float64 tensors (see defectlens/heap.py)
        self.mean, self.precision = torch.cat(means), torch.cat(precisions)
        return squared

    def _choose_channels(self, total: int) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.channels = torch.randperm(total, generator=generator)[: min(self.feature_dims, total)].sort().values

    def _gaussian(self, sums: torch.Tensor, outer: torch.Tensor, count: int,
                  invert: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position the mean and, from the sums of the samples and of their outer products,
        the regularised covariance's precision (``invert``) or its lower Cholesky factor."""
        mean = sums / count
        # (outer - count · mean meanᵀ) / (count - 1) + εI, in place on one new tensor (80 MB a block)
        covariance = torch.baddbmm(outer, mean[:, :, None], mean[:, None, :], alpha=-float(count))
        covariance.div_(max(count - 1, 1)).diagonal(dim1=1, dim2=2).add_(self.regularisation)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if bool((info != 0).any()):
            raise ParameterError(f"{self.name}: a covariance is not positive definite at regularisation="
                                 f"{self.regularisation}; raise regularisation")
        if not invert:
            return mean, factor
        precision = torch.cholesky_inverse(factor)
        # Exactly symmetric, as a precision is: the model file keeps only its upper triangle.
        return mean, (precision + precision.transpose(1, 2)) / 2

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        count, _, height, width = features.shape
        selected = features[:, self.channels].flatten(2)
        squared = []
        for start in range(0, selected.shape[2], POSITIONS_PER_BLOCK):
            block = slice(start, start + POSITIONS_PER_BLOCK)
            centred = (selected[:, :, block].permute(2, 0, 1) - self.mean[block, None, :]).contiguous()
            # One batched product per block: einsum on the permuted view took 2.4 times as long.
            squared.append((torch.bmm(centred, self.precision[block]) * centred).sum(dim=2).clamp_min(0))
        return torch.cat(squared).sqrt().T.reshape(count, height, width)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The precisions' upper triangles only: half the file (a tiled PaDiM holds one 100 × 100
        matrix per position of every tile, hundreds of megabytes)."""
        rows, columns = torch.triu_indices(*self.precision.shape[1:])
        return {"channels": self.channels, "mean": self.mean, "precision_upper": self.precision[:, rows, columns]}

    def load_state_tensors(self, tensors, extra) -> None:
        super().load_state_tensors(tensors, extra)
        self.channels, self.mean = tensors["channels"], tensors["mean"]
        if "precision" in tensors:  # files before the upper triangles
            self.precision = tensors["precision"]
            return
        dims = len(self.channels)
        rows, columns = torch.triu_indices(dims, dims)
        upper = tensors["precision_upper"]
        self.precision = torch.empty(upper.shape[0], dims, dims, dtype=upper.dtype)
        self.precision[:, rows, columns] = upper
        self.precision[:, columns, rows] = upper


def _block_samples(flat: torch.Tensor, channels: torch.Tensor, start: int) -> torch.Tensor:
    """(positions, samples, channels) float64, contiguous, of the kept ``channels`` for the block
    of positions from ``start``: only the block is copied (the kept channels of a whole tiled set
    were gigabytes), and the batched products on a permuted view took 3.5 times as long."""
    return flat[:, channels, start : start + POSITIONS_PER_BLOCK].permute(2, 0, 1).double().contiguous()

