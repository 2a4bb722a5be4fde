"""Heatmap overlays: an anomaly map coloured on a fixed scale and blended over its image.

The colour scale is fixed by the caller (``vmin``/``vmax``), never stretched per image, so the
same colour means the same anomaly level on every overlay of a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from defectlens.data.io import as_image

#: Turbo is jet's perceptually smoother successor: blue = normal, red = strongly anomalous.
COLORMAP = cv2.COLORMAP_TURBO
CONTOUR_RGB = (0, 255, 0)


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float H×W map to ``shape`` (height, width) as float32."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected an H×W map, got shape {values.shape}")
    if values.shape == tuple(shape):
        return values
    # Area averaging when shrinking avoids aliasing; bilinear when enlarging a coarse patch map.
    shrinking = values.shape[0] * values.shape[1] > shape[0] * shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(values, (shape[1], shape[0]), interpolation=interpolation)


def colorize(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Colour an H×W map as RGB uint8: values ≤ ``vmin`` get the lowest colour, ≥ ``vmax`` the highest."""
    if not vmax > vmin:
        raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=vmin, posinf=vmax, neginf=vmin)
    scaled = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    bgr = cv2.applyColorMap(np.round(scaled * 255.0).astype(np.uint8), COLORMAP)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask
    if mask.shape[0] * mask.shape[1] > shape[0] * shape[1]:
        # Any coverage counts, so defects of a few pixels survive downscaling to a thumbnail.
        return resize_map(mask, shape) > 1e-6
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def draw_mask_contour(image: np.ndarray, mask: np.ndarray, color=CONTOUR_RGB, thickness: int = 1) -> np.ndarray:
    """Return a copy of ``image`` with the outline of a bool ground-truth mask drawn on it."""
    out = np.ascontiguousarray(as_image(image)).copy()
    binary = _resize_mask(np.asarray(mask, dtype=bool), out.shape[:2]).astype(np.uint8)
    # RETR_LIST also outlines holes, e.g. a ring-shaped defect.
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out


def heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend the coloured anomaly map over an RGB image; outline the ground-truth ``mask`` in green.

    The map is resized to the image when sizes differ. ``alpha`` is the heatmap's weight
    (0 returns the image itself, 1 the heatmap alone). Returns H×W×3 uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    image = as_image(image)
    colours = colorize(resize_map(anomaly_map, image.shape[:2]), vmin, vmax)
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    if mask is not None:
        blended = draw_mask_contour(blended, mask)
    return blended


#: Distinct colours for part classes 0..19 (a class keeps its colour in every image of a model).
PART_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)


def colorize_parts(part_map: np.ndarray) -> np.ndarray:
    """Integer part classes (H×W) -> RGB uint8; classes past the table get golden-ratio hues."""
    part_map = np.asarray(part_map)
    if part_map.ndim != 2:
        raise ValueError(f"expected an H×W part map, got shape {part_map.shape}")
    classes = int(part_map.max(initial=0)) + 1
    palette = PART_COLOURS
    if classes > len(palette):
        hues = (np.arange(len(palette), classes) * 0.618034 % 1.0 * 180).astype(np.uint8)
        hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 230)], axis=1)[None]
        palette = np.concatenate([palette, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]])
    return palette[np.clip(part_map, 0, None)]


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (or grayscale) array as a PNG file, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(as_image(rgb)).save(path, format="PNG")
    return path
