"""What every synthesizer returns, and the pixel helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]


@dataclass
class SyntheticAnomaly:
    image: np.ndarray  # H×W×3 uint8: the normal image with the anomaly blended in
    mask: np.ndarray  # H×W bool: pixels that changed as an anomaly
    box: Box | None  # (x0, y0, x1, y1), x1/y1 exclusive: weak label; None if only the mask is meaningful
    kind: str  # "perlin" | "cutpaste" | "anogen" | "diffusion"


def mask_box(mask: np.ndarray) -> Box | None:
    """Tightest (x0, y0, x1, y1) box around the True pixels (x1, y1 exclusive); None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    x0, y0, x1, y1 = box
    mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def foreground_overlap(box: Box, foreground: np.ndarray) -> float:
    """Share of the box's pixels that lie on the foreground (the paper's box/foreground overlap)."""
    x0, y0, x1, y1 = box
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    return float(foreground[y0:y1, x0:x1].sum()) / area if area else 0.0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def foreground_mask(image: np.ndarray, max_side: int = 160, margin: float = 0.05, iterations: int = 4) -> np.ndarray:
    """GrabCut foreground of an object photo as a bool H×W mask.

    GrabCut starts from a rectangle ``margin`` inside the border (the border is taken as
    background) and runs on a copy at most ``max_side`` pixels wide, which keeps it near 20 ms.
    When it finds almost nothing (a texture, an object filling the frame) the whole image is
    foreground: there is no background to avoid.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(image, (max(round(w * scale), 8), max(round(h * scale), 8)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    mx, my = max(int(sw * margin), 1), max(int(sh * margin), 1)
    labels = np.zeros((sh, sw), np.uint8)
    background, foreground = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models with k-means: keep results repeatable
    try:
        cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), labels, (mx, my, sw - 2 * mx, sh - 2 * my),
                    background, foreground, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # flat images give GrabCut no colour model to fit
        return np.ones((h, w), bool)
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if fg.mean() < 0.05:
        return np.ones((h, w), bool)
    return cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST) > 0


def check_image(image) -> np.ndarray:
    """A synthesizer input as a contiguous H×W×3 uint8 array (paths are read)."""
    from defectlens.data.io import as_image

    return np.ascontiguousarray(as_image(image))
