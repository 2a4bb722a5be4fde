"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position (mean and covariance over
the normal images); the Mahalanobis distance to it is the patch score. Assumes aligned parts."""

from __future__ import annotations

import torch

from ...backbones import DEFAULT_BACKBONE
from ..base import register
from ..params import Integer, Real
from ..patch import AUGMENT_MAX_IMAGES, DEFAULT_AUGMENT, TILE_MAX_PIXELS, PatchDetector

#: Patch positions whose Gaussians are estimated (and scored) together; bounds the float64
#: working set to about blocks × images × feature_dims, whatever the tiling.
POSITIONS_PER_BLOCK = 1024


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
        total = features.shape[1]
        keep = min(self.feature_dims, total)
        generator = torch.Generator().manual_seed(self.seed)
        self.channels = torch.randperm(total, generator=generator)[:keep].sort().values
        selected = features[:, self.channels].flatten(2)  # (images, channels, positions)
        means, precisions = [], []
        # A block of positions at a time, in float64 for a stable covariance: the whole
        # (positions, images, channels) tensor of a tiled set would not fit in memory.
        for start in range(0, selected.shape[2], POSITIONS_PER_BLOCK):
            samples = selected[:, :, start : start + POSITIONS_PER_BLOCK].permute(2, 0, 1).double()
            mean = samples.mean(dim=1)
            centred = samples - mean[:, None, :]
            covariance = centred.transpose(1, 2) @ centred / max(samples.shape[1] - 1, 1)
            covariance += self.regularisation * torch.eye(keep, dtype=torch.float64)
            precision = torch.linalg.inv(covariance)
            means.append(mean.float())
            # Exactly symmetric, as a precision is: the model file keeps only its upper triangle.
            precisions.append(((precision + precision.transpose(1, 2)) / 2).float())
        self.mean, self.precision = torch.cat(means), torch.cat(precisions)

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
