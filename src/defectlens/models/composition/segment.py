"""Part maps: every pixel gets a part class, and the same part gets the same class in every image.

The embedded segmenter needs no extra weights. Each pixel is described by the backbone's patch
features (reduced by PCA) and its CIELAB colour; k-means over the pixels of the reference images
gives the part classes, and any image is labelled by the nearest centroid, then smoothed by a 3×3
majority vote. The features tell apart parts of one colour (a screw on a tray of the same grey),
the colour puts the boundaries where the coarse (stride 8) feature grid cannot: features reach the
pixels by joint bilateral upsampling, each pixel averaging the nearby feature cells whose mean
colour is close to its own, so a coloured part does not leave a blurred halo class around itself.

Alignment is nearest-centroid, not Hungarian matching: the classes are one clustering of all
references, so a class means the same thing in every image by construction. A one-to-one matching
of each test segment to a reference segment would have to pair an extra part with something and
would leave a missing one unmatched without saying so, which are exactly the anomalies to detect.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: Reduced feature dimensions per pixel; more add noise, not parts.
FEATURE_DIMS = 16
#: Colour difference (CIELAB units) that counts as much as the typical spread of the features.
COLOUR_UNIT = 13.0
#: Lightness counts half as much as hue: lighting gradients must not split a part.
LIGHTNESS_DAMPING = 0.5
#: Colour difference (CIELAB units) at which a feature cell's weight in upsampling falls to e^-1/2.
GUIDE_COLOUR = 20.0
#: Pixels sampled from the references for k-means (enough for parts of ~0.1 % of an image).
KMEANS_SAMPLES = 40_000
#: A border is touched by a part when the part covers this share of it.
BORDER_TOUCH = 0.05
#: Border-touching classes larger than this share of the image are the part itself (a close-up).
MAX_BACKGROUND = 0.5


def lab_colour(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) CIELAB of an RGB uint8 image: L in 0..100, a and b about -100..100."""
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def guided_upsample(cells: torch.Tensor, lab: np.ndarray, radius: int = 2) -> torch.Tensor:
    """Joint bilateral upsampling of (d, h, w) feature cells to the (S, S) grid of ``lab``: each
    pixel averages the cells within ``radius``, weighted by a unit Gaussian of the distance (in
    cells) and by a Gaussian of the difference between its colour and the cell's mean colour."""
    dims, height, width = cells.shape
    size = lab.shape[0]
    guide = torch.from_numpy(np.ascontiguousarray(lab.transpose(2, 0, 1)))
    cell_colour = F.adaptive_avg_pool2d(guide[None], (height, width))[0]
    ys = (torch.arange(size) + 0.5) * height / size - 0.5  # pixel centres in cell coordinates
    xs = (torch.arange(size) + 0.5) * width / size - 0.5
    # Features and mean colours of the cells, gathered for every pixel by one flat index per offset.
    per_cell = torch.cat([cells, cell_colour]).reshape(dims + 3, height * width)
    total, weight_sum = torch.zeros(dims, size, size), torch.zeros(size, size)
    for dy in range(-radius, radius + 1):
        row = (ys.round().long() + dy).clamp(0, height - 1)
        near_y = torch.exp(-0.5 * (row - ys) ** 2)
        for dx in range(-radius, radius + 1):
            col = (xs.round().long() + dx).clamp(0, width - 1)
            near = near_y[:, None] * torch.exp(-0.5 * (col - xs) ** 2)[None, :]
            at = (row[:, None] * width + col[None, :]).reshape(-1)
            gathered = per_cell.index_select(1, at).reshape(dims + 3, size, size)
            alike = torch.exp(-0.5 * ((guide - gathered[dims:]) ** 2).sum(0) / GUIDE_COLOUR**2)
            weight = near * alike
            total += weight * gathered[:dims]
            weight_sum += weight
    return total / weight_sum.clamp_min(1e-12)


class PartSegmenter:
    """k-means part classes over pixel descriptors of the reference images."""

    def __init__(self, parts: int = 12, size: int = 128, seed: int = 0):
        self.parts, self.size, self.seed = parts, size, seed
        self.mean: torch.Tensor | None = None  # (C,) feature mean
        self.projection: torch.Tensor | None = None  # (C, FEATURE_DIMS), scaled to unit total variance
        self.centroids: torch.Tensor | None = None  # (parts, FEATURE_DIMS + 3)

    def descriptors(self, image: np.ndarray, features: torch.Tensor) -> np.ndarray:
        """(size², FEATURE_DIMS + 3) descriptors of one RGB image and its (C, h, w) features."""
        reduced = torch.einsum("chw,cd->dhw", features.float() - self.mean[:, None, None], self.projection)
        lab = lab_colour(image, self.size)
        reduced = guided_upsample(reduced, lab)
        colour = lab.reshape(-1, 3) / COLOUR_UNIT
        colour[:, 0] *= LIGHTNESS_DAMPING
        return np.concatenate([reduced.reshape(FEATURE_DIMS, -1).T.numpy(), colour], axis=1)

    def fit(self, images: list[np.ndarray], features: torch.Tensor) -> PartSegmenter:
        patches = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        self.mean = patches.mean(dim=0)
        centred = patches - self.mean
        _, singular, vectors = torch.linalg.svd(centred, full_matrices=False)
        dims = min(FEATURE_DIMS, vectors.shape[0])
        # Unit total variance: the features weigh the same against colour whatever the backbone.
        spread = torch.sqrt((singular[:dims] ** 2).sum() / max(1, centred.shape[0])).clamp_min(1e-8)
        self.projection = torch.zeros(features.shape[1], FEATURE_DIMS)
        self.projection[:, :dims] = vectors[:dims].T / spread
        pixels = np.concatenate([self.descriptors(image, f) for image, f in zip(images, features)])
        if len(pixels) > KMEANS_SAMPLES:
            pixels = pixels[np.random.default_rng(self.seed).choice(len(pixels), KMEANS_SAMPLES, replace=False)]
        from sklearn.cluster import KMeans  # here: scikit-learn costs ~0.5 s of every CLI start

        kmeans = KMeans(self.parts, n_init=3, random_state=self.seed).fit(pixels)
        self.centroids = torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))
        return self

    def __call__(self, image: np.ndarray, features: torch.Tensor) -> np.ndarray:
        """(size, size) int64 part map."""
        pixels = torch.from_numpy(self.descriptors(image, features))
        # Squared distances less the pixel's own norm, which does not change the nearest centroid.
        distances = (self.centroids**2).sum(dim=1) - 2 * pixels @ self.centroids.T
        return majority_filter(distances.argmin(dim=1).reshape(self.size, self.size).numpy(), self.parts)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}mean": self.mean, f"{prefix}projection": self.projection, f"{prefix}centroids": self.centroids}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.mean = tensors[f"{prefix}mean"].float()
        self.projection = tensors[f"{prefix}projection"].float()
        self.centroids = tensors[f"{prefix}centroids"].float()
        self.parts = len(self.centroids)


def majority_filter(labels: np.ndarray, classes: int) -> np.ndarray:
    """Each pixel takes the most frequent class of its 3×3 neighbourhood (removes speckle)."""
    votes = np.stack([cv2.boxFilter((labels == k).astype(np.float32), -1, (3, 3)) for k in range(classes)])
    # Ties keep the pixel's own class: it gets a small head start.
    votes += 0.01 * (labels[None] == np.arange(classes)[:, None, None])
    return votes.argmax(axis=0)


def border_classes(part_map: np.ndarray, classes: int) -> np.ndarray:
    """(classes,) bool: the class has a connected region that touches at least two image borders."""
    touching = np.zeros(classes, bool)
    for k in range(classes):
        count, regions = cv2.connectedComponents((part_map == k).astype(np.uint8), connectivity=8)
        if count < 2:
            continue
        touches = np.zeros(count, int)
        for border in (regions[0], regions[-1], regions[:, 0], regions[:, -1]):
            touches += np.bincount(border, minlength=count) / border.size >= BORDER_TOUCH
        touching[k] = (touches[1:] >= 2).any()
    return touching


def background_classes(part_maps: list[np.ndarray], classes: int) -> np.ndarray:
    """Classes that touch two borders in most reference images, as in the write-up; none when
    they would cover most of the image (the part fills the frame, as on a close-up surface)."""
    background = np.mean([border_classes(m, classes) for m in part_maps], axis=0) > 0.5
    covered = np.median([np.isin(m, np.flatnonzero(background)).mean() for m in part_maps])
    return background if covered <= MAX_BACKGROUND else np.zeros(classes, bool)
