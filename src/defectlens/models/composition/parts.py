"""What one image is made of: per-patch features and classes, per-class area, part count,
colour, location and mean feature, its patch-word histogram and word map — the inputs of the nine
scores.

Class-wise quantities of a class are compared only where the class is really there: a class
covering under a quarter of its typical area has no meaningful colour, location or embedding
(a few stray pixels), and its absence is the histogram's business.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch

from .segment import lab_colour
from .words import PatchWords

#: A class is present when it covers at least this share of its typical (median reference) area.
PRESENT = 0.25
#: A connected region counts as a part when it is at least this share of the class's typical part.
PART_SHARE = 0.3
#: Regions smaller than this many pixels of the part map never count as parts.
MIN_PART_PIXELS = 4


@dataclass
class ImageParts:
    patches: torch.Tensor  # (P, D) unit-length patch features
    patch_class: torch.Tensor  # (P,) int64, the class covering most of the patch
    foreground: torch.Tensor  # (P,) bool
    area: np.ndarray  # (K,) share of the image
    count: np.ndarray  # (K,) connected regions of at least the class's part size
    colour: np.ndarray  # (K, 2) mean CIELAB a, b
    location: np.ndarray  # (K, 2) mean x, y as shares of the width and height
    embedding: np.ndarray  # (K, D) unit-length mean feature
    words: np.ndarray  # (W,) patches nearest to each patch word
    word_map: np.ndarray  # (h, w) int64, the word nearest to each patch

    @staticmethod
    def stack(items: list[ImageParts]) -> ImageParts:
        """Many images in one: class-wise arrays get a leading image axis, patches concatenate."""
        joined = {}
        for field in fields(ImageParts):
            values = [getattr(item, field.name) for item in items]
            if isinstance(values[0], torch.Tensor):
                joined[field.name] = torch.cat(values)
            else:
                joined[field.name] = np.stack(values)
        return ImageParts(**joined)


def largest_regions(part_map: np.ndarray, classes: int) -> np.ndarray:
    """(classes,) pixel count of each class's largest connected region."""
    sizes = np.zeros(classes)
    for k in range(classes):
        count, _, stats, _ = cv2.connectedComponentsWithStats((part_map == k).astype(np.uint8), connectivity=8)
        if count > 1:
            sizes[k] = stats[1:, cv2.CC_STAT_AREA].max()
    return sizes


def part_sizes(part_maps: list[np.ndarray], classes: int) -> np.ndarray:
    """The smallest region that counts as a part, per class: a share of the typical largest region."""
    typical = np.median([largest_regions(m, classes) for m in part_maps], axis=0)
    return np.maximum(PART_SHARE * typical, MIN_PART_PIXELS)


def unit_patches(features: torch.Tensor) -> torch.Tensor:
    """(h * w, C) unit-length patch features of one image's (C, h, w) features."""
    patches = features.float().reshape(features.shape[0], -1).T
    return patches / patches.norm(dim=1, keepdim=True).clamp_min(1e-12)


def describe(image: np.ndarray, features: torch.Tensor, part_map: np.ndarray, background: np.ndarray,
             min_part: np.ndarray, words: PatchWords) -> ImageParts:
    """The composition of one image from its (C, h, w) features, its part map and the patch words."""
    classes = len(background)
    _, height, width = features.shape
    patches = unit_patches(features)
    one_hot = np.stack([(part_map == k).astype(np.float64) for k in range(classes)])
    # Share of each patch cell covered by each class: patch classes and class embeddings.
    cover = np.stack([cv2.resize(plane, (width, height), interpolation=cv2.INTER_AREA) for plane in one_hot])
    cover = torch.from_numpy(cover.reshape(classes, -1)).float()
    patch_class = cover.argmax(dim=0)
    weighted = cover @ patches
    embedding = (weighted / weighted.norm(dim=1, keepdim=True).clamp_min(1e-12)).double().numpy()

    pixels = one_hot.reshape(classes, -1)
    area = pixels.mean(axis=1)
    mass = np.maximum(pixels.sum(axis=1, keepdims=True), 1.0)
    size = part_map.shape[0]
    lab = lab_colour(image, size).reshape(-1, 3).astype(np.float64)
    colour = pixels @ lab[:, 1:] / mass
    grid = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    location = pixels @ np.stack([xs.ravel(), ys.ravel()], axis=1) / mass
    count = np.zeros(classes)
    for k in range(classes):
        _, _, stats, _ = cv2.connectedComponentsWithStats(one_hot[k].astype(np.uint8), connectivity=8)
        count[k] = (stats[1:, cv2.CC_STAT_AREA] >= min_part[k]).sum()
    nearest = words.nearest(patches)
    return ImageParts(patches=patches, patch_class=patch_class, foreground=torch.from_numpy(~background)[patch_class],
                       area=area, count=count, colour=colour, location=location, embedding=embedding,
                       words=words.counts(nearest), word_map=nearest.reshape(height, width))


def class_distances(test: ImageParts, refs: ImageParts, typical_area: np.ndarray) -> dict[str, np.ndarray]:
    """Per class, the distance of ``test`` to its nearest reference (``refs`` stacked): (K,) arrays;
    and per patch word, (W,) "words", the patches it has more or fewer than the nearest reference.
    Colour, location and embedding are nan where the class is absent from the test image or from
    every reference (area and count say that it is)."""
    present_test = test.area >= PRESENT * typical_area
    present_refs = refs.area >= PRESENT * typical_area  # (R, K)
    comparable = present_refs & present_test

    def nearest(distances: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if mask is not None:
            distances = np.where(mask, distances, np.inf)
        best = distances.min(axis=0)
        return np.where(np.isfinite(best), best, np.nan)

    return {
        "area": nearest(np.abs(np.sqrt(test.area) - np.sqrt(refs.area))),
        "count": nearest(np.abs(test.count - refs.count)),
        "colour": nearest(np.linalg.norm(test.colour - refs.colour, axis=2), comparable),
        "location": nearest(np.linalg.norm(test.location - refs.location, axis=2), comparable),
        "embedding": nearest(1.0 - np.einsum("kd,rkd->rk", test.embedding, refs.embedding), comparable),
        "words": nearest(np.abs(test.words - refs.words)),
    }


def image_vectors(parts: ImageParts, foreground: np.ndarray, pixels: int) -> dict[str, np.ndarray]:
    """The write-up's image-level vectors over the foreground classes (one image, or stacked
    images with a leading axis): class embeddings concatenated, pixel counts per class (the
    histogram), mean CIELAB a and b per class, and each class centroid's distance from the image
    origin (top left, in shares of the side). Absent classes give zeros."""
    def flat(values: np.ndarray) -> np.ndarray:
        return values.reshape(*values.shape[: values.ndim - 2], -1)

    return {"embedding": flat(parts.embedding[..., foreground, :]),
            "histogram": parts.area[..., foreground] * pixels,
            "colour": flat(parts.colour[..., foreground, :]),
            "location": np.linalg.norm(parts.location[..., foreground, :], axis=-1)}
