"""Few-shot anomaly-driven synthesis in the spirit of AnoGen (ECCV 2024), without a diffusion model.

AnoGen learns what the few real anomalies of a category look like and generates new ones inside
a box placed on the object. Here the real anomalies themselves are transplanted: each connected
defect region of the examples (with a margin of its surroundings) is flipped, rescaled, placed in
a random box that lies mostly on the GrabCut foreground (box/foreground overlap ≥ 0.5, as in the
paper) and blended in seamlessly (Poisson cloning, or colour-matched feathered alpha). The box is
kept as the weak label. :mod:`defectlens.synthesis.diffusion` is the generative version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import DatasetError, UsageError
from .base import (
    Box,
    SyntheticAnomaly,
    check_image,
    dilate,
    foreground_mask,
    foreground_overlap,
)

BLENDS = ("poisson", "alpha")


@dataclass
class DefectExample:
    """One real defect region cut from an anomaly image: its surroundings and its mask."""

    patch: np.ndarray  # h×w×3 uint8 crop around the defect
    mask: np.ndarray  # h×w bool, the defect's pixels within the crop
    source: int  # index of the anomaly image it came from
    resolution: float  # sqrt(pixel count) of that image, to rescale between image sizes


def _as_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, (str, os.PathLike)):
        from defectlens.data.io import read_mask

        return read_mask(mask, shape)
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    mask = mask > 0
    if mask.shape != shape:
        mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return mask


def extract_defects(images: Sequence, masks: Sequence, context: float = 0.5, min_pixels: int = 4,
                    merge: int = 3) -> list[DefectExample]:
    """Every connected defect region (regions closer than ``merge`` px count as one) of at least
    ``min_pixels`` pixels, cropped with a margin of ``context`` × its size (at least 4 px)."""
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} anomaly images but {len(masks)} masks")
    examples = []
    for index, (item, mask_item) in enumerate(zip(images, masks)):
        image = check_image(item)
        h, w = image.shape[:2]
        mask = _as_mask(mask_item, (h, w))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(dilate(mask, merge).astype(np.uint8), connectivity=8)
        for label in range(1, count):
            x, y, bw, bh, _ = stats[label]
            region = mask & (labels == label)
            if region.sum() < min_pixels:
                continue
            pad = max(4, round(context * max(bw, bh)))
            x0, y0, x1, y1 = max(x - pad, 0), max(y - pad, 0), min(x + bw + pad, w), min(y + bh + pad, h)
            examples.append(DefectExample(image[y0:y1, x0:x1].copy(), region[y0:y1, x0:x1].copy(), index,
                                          float(np.sqrt(h * w))))
    return examples


def _resize(patch: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a patch and its mask to (height, width); the mask keeps at least its peak pixel."""
    h, w = size
    patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA if h < patch.shape[0] else cv2.INTER_LINEAR)
    soft = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return patch, soft >= min(0.5, soft.max())


def _match_colours(patch: np.ndarray, context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Shift and scale each channel so the patch's surroundings match the target's statistics."""
    source = patch[context].astype(np.float32) if context.any() else patch.reshape(-1, 3).astype(np.float32)
    target = target.reshape(-1, 3).astype(np.float32)
    gain = np.clip((target.std(0) + 1) / (source.std(0) + 1), 0.5, 2.0)
    out = (patch.astype(np.float32) - source.mean(0)) * gain + target.mean(0)
    return np.clip(out, 0, 255).astype(np.uint8)


def poisson_blend(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Poisson image editing: inside ``region`` keep ``source``'s gradients, meet ``target`` at its edge.

    Solved as source + h with h harmonic in the region and h = target − source around it (the
    same solution as the gradient form), a sparse system of one unknown per region pixel. The
    region must not touch the patch border. Pixels outside the region are ``target``'s.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    if not region.any():
        return target.copy()
    h, w = region.shape
    index = -np.ones((h, w), np.int64)
    ys, xs = np.nonzero(region)
    index[ys, xs] = np.arange(len(ys))
    difference = target.astype(np.float64) - source.astype(np.float64)
    rows, cols, rhs = [np.arange(len(ys))], [np.arange(len(ys))], np.zeros((len(ys), 3))
    values = [np.full(len(ys), 4.0)]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        neighbour = index[ny, nx]
        known = neighbour < 0
        rhs[known] += difference[ny[known], nx[known]]  # boundary: the correction is fixed there
        rows.append(np.nonzero(~known)[0])
        cols.append(neighbour[~known])
        values.append(np.full(int((~known).sum()), -1.0))
    system = coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(len(ys),) * 2)
    correction = splu(system.tocsc()).solve(rhs)
    out = target.copy()
    out[ys, xs] = np.clip(np.round(source[ys, xs] + correction), 0, 255).astype(np.uint8)
    return out


def place_box(size: tuple[int, int], foreground: np.ndarray, rng: np.random.Generator, min_overlap: float = 0.5) -> Box:
    """A box of ``size`` = (h, w), 2 px inside the image, centred on random foreground pixels until
    at least ``min_overlap`` of it lies on the foreground (after 50 tries: the best one seen)."""
    ph, pw = size
    h, w = foreground.shape
    ys, xs = np.nonzero(foreground)
    best, best_overlap = None, -1.0
    for _ in range(50):
        if len(xs):
            i = rng.integers(len(xs))
            cy, cx = ys[i], xs[i]
        else:
            cy, cx = rng.integers(h), rng.integers(w)
        y0 = int(np.clip(cy - ph // 2, 2, h - ph - 2))
        x0 = int(np.clip(cx - pw // 2, 2, w - pw - 2))
        box = (x0, y0, x0 + pw, y0 + ph)
        overlap = foreground_overlap(box, foreground)
        if overlap >= min_overlap:
            return box
        if overlap > best_overlap:
            best, best_overlap = box, overlap
    return best


def defect_size(example: DefectExample, shape: tuple[int, int], scale: tuple[float, float],
                rng: np.random.Generator) -> tuple[int, int]:
    """Random (h, w) for ``example``'s patch in an image of ``shape``: its own size times U(scale),
    corrected for the resolution difference, and small enough to fit 2 px inside the image."""
    h, w = shape
    factor = rng.uniform(*scale) * np.sqrt(h * w) / example.resolution
    factor = min(factor, (h - 4) / example.patch.shape[0], (w - 4) / example.patch.shape[1])
    return max(round(example.patch.shape[0] * factor), 3), max(round(example.patch.shape[1] * factor), 3)


class AnoGenSynthesizer:
    """Place real defects from a few anomaly examples into normal images, inside a weak-label box.

    ``anomaly_images`` / ``anomaly_masks``: arrays or paths (masks may differ in size; any non-zero
    pixel is defect). ``scale``: range of the random size factor relative to the defect's own size
    (images of other resolutions are rescaled first). ``context``: margin around the defect carried
    along, as a share of its size; the box is that patch. ``min_overlap``: least share of the box
    on the GrabCut foreground. ``blend``: "poisson" (:func:`poisson_blend`) or "alpha" (colour-matched,
    feathered). ``feather``: px around the defect that blending may touch.
    """

    kind = "anogen"

    def __init__(self, anomaly_images: Sequence, anomaly_masks: Sequence, scale: tuple[float, float] = (0.75, 1.5),
                 context: float = 0.5, min_overlap: float = 0.5, blend: str = "poisson", feather: int = 3,
                 min_pixels: int = 4):
        if blend not in BLENDS:
            raise UsageError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
        self.examples = extract_defects(anomaly_images, anomaly_masks, context=context, min_pixels=min_pixels)
        if not self.examples:
            raise DatasetError(f"no defect region of at least {min_pixels} pixels in the {len(anomaly_masks)} anomaly masks given")
        self.scale = scale
        self.min_overlap = float(min_overlap)
        self.blend = blend
        self.feather = int(feather)

    def __call__(self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None) -> SyntheticAnomaly:
        """One anomaly in ``image``; pass ``foreground`` (bool H×W) to skip GrabCut for repeated images."""
        image = check_image(image)
        h, w = image.shape[:2]
        if h < 8 or w < 8:
            raise DatasetError(f"image of {w}×{h} px is too small to place a defect in")
        foreground = foreground_mask(image) if foreground is None else np.asarray(foreground, bool)
        example = self.examples[rng.integers(len(self.examples))]
        patch, mask = example.patch, example.mask
        if rng.random() < 0.5:
            patch, mask = patch[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            patch, mask = patch[::-1], mask[::-1]
        size = defect_size(example, (h, w), self.scale, rng)
        patch, mask = _resize(np.ascontiguousarray(patch), np.ascontiguousarray(mask), size)

        x0, y0, x1, y1 = box = place_box(size, foreground, rng, self.min_overlap)
        reach = dilate(mask, self.feather)  # blending may change these pixels, no others
        reach[[0, -1]] = reach[:, [0, -1]] = False  # Poisson needs a frame of fixed pixels
        mask = mask & reach
        target = image[y0:y1, x0:x1]
        if self.blend == "poisson":
            placed = poisson_blend(patch, target, reach)
        else:
            matched = _match_colours(patch, ~reach, target[~reach] if (~reach).any() else target)
            alpha = cv2.GaussianBlur(dilate(mask, self.feather // 2).astype(np.float32), (0, 0), max(self.feather / 2, 0.5))
            alpha = np.where(reach, np.maximum(alpha, mask), 0)[..., None]
            placed = np.round(matched * alpha + target * (1 - alpha)).astype(np.uint8)
        out = image.copy()
        out[y0:y1, x0:x1] = placed
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = mask
        return SyntheticAnomaly(out, full, box, self.kind)
