"""CutPaste anomalies: a patch of the image itself, colour-jittered, pasted elsewhere.

Two shapes as in the CutPaste paper: a rectangle of 2-15 % of the image ("patch") and a thin
rotated strip ("scar"). The mask is exactly the pasted pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import UsageError
from .base import SyntheticAnomaly, check_image, mask_box

VARIANTS = ("patch", "scar", "both")


def colour_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, each within ±``strength``."""
    if strength <= 0:  # the HSV round trip is lossy in uint8: skip it when there is nothing to do
        return patch.copy()
    out = patch.astype(np.float32) * rng.uniform(1 - strength, 1 + strength)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    grey = out.mean(axis=2, keepdims=True)
    out = (out - grey) * rng.uniform(1 - strength, 1 + strength) + grey
    hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(int) + round(rng.uniform(-strength, strength) * 180)) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


class CutPasteSynthesizer:
    """CutPaste: ``variant`` "patch" (area ``area`` of the image, aspect ratio in ``aspect``),
    "scar" (a strip ``scar_width`` × ``scar_length`` pixels at 256 px, scaled with the image,
    rotated ±45°) or "both" (either, at random). ``jitter`` is the colour-jitter strength."""

    kind = "cutpaste"

    def __init__(self, variant: str = "both", area: tuple[float, float] = (0.02, 0.15),
                 aspect: tuple[float, float] = (0.3, 3.3), scar_width: tuple[float, float] = (2, 16),
                 scar_length: tuple[float, float] = (10, 25), jitter: float = 0.1):
        if variant not in VARIANTS:
            raise UsageError(f"unknown CutPaste variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.area, self.aspect = area, aspect
        self.scar_width, self.scar_length = scar_width, scar_length
        self.jitter = jitter

    def _patch_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        area = rng.uniform(*self.area) * h * w
        ratio = np.exp(rng.uniform(np.log(self.aspect[0]), np.log(self.aspect[1])))
        ph = int(np.clip(round(np.sqrt(area * ratio)), 2, h - 1))
        pw = int(np.clip(round(np.sqrt(area / ratio)), 2, w - 1))
        return ph, pw

    def _scar_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        unit = min(h, w) / 256
        ph = int(np.clip(round(rng.uniform(*self.scar_length) * unit), 2, h - 1))
        pw = int(np.clip(round(rng.uniform(*self.scar_width) * unit), 1, w - 1))
        return ph, pw

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> SyntheticAnomaly:
        image = check_image(image)
        h, w = image.shape[:2]
        scar = self.variant == "scar" or (self.variant == "both" and rng.random() < 0.5)
        ph, pw = self._scar_size(h, w, rng) if scar else self._patch_size(h, w, rng)
        y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        patch = colour_jitter(image[y:y + ph, x:x + pw], rng, self.jitter)
        shape = np.full((ph, pw), 255, np.uint8)
        if scar:
            # Rotate the strip inside a square that holds it at any angle; its rotated mask is the paste shape.
            side = int(np.ceil(np.hypot(ph, pw))) | 1
            matrix = cv2.getRotationMatrix2D((pw / 2, ph / 2), rng.uniform(-45, 45), 1.0)
            matrix[:, 2] += ((side - pw) / 2, (side - ph) / 2)
            patch = cv2.warpAffine(patch, matrix, (side, side), flags=cv2.INTER_LINEAR)
            shape = cv2.warpAffine(shape, matrix, (side, side), flags=cv2.INTER_NEAREST)
            ph, pw = min(side, h), min(side, w)
            patch, shape = patch[:ph, :pw], shape[:ph, :pw]
        ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        mask = np.zeros((h, w), bool)
        mask[ty:ty + ph, tx:tx + pw] = shape > 0
        out = image.copy()
        out[mask] = patch[shape > 0]
        return SyntheticAnomaly(out, mask, mask_box(mask), self.kind)
