"""DRAEM-style anomalies: a thresholded Perlin-noise mask filled with a foreign texture.

DRAEM draws its textures from the DTD set; none ships with defectlens, so the texture is either
one of the images given (other parts, other categories) or a procedural noise texture, and it is
then distorted by random colour and geometry operations so it never looks like the part itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .base import SyntheticAnomaly, check_image, foreground_mask, mask_box


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``cells`` = (rows, columns) lattice cells, about in [-1, 1]."""
    h, w = shape
    cy, cx = cells
    angles = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    gradient_y, gradient_x = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    y = np.arange(h, dtype=np.float32) * np.float32(cy / h)
    x = np.arange(w, dtype=np.float32) * np.float32(cx / w)
    yi, xi = y.astype(int), x.astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # Gather rows, then columns: two cheap takes instead of one 2-D fancy index.
        gy = np.take(gradient_y[yi + dy], xi + dx, axis=1)
        gx = np.take(gradient_x[yi + dy], xi + dx, axis=1)
        return gy * (fy - dy) + gx * (fx - dx)

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
    return (np.float32(np.sqrt(2)) * (top + uy * (bottom - top))).astype(np.float32)


CELL_PX = 8  # noise is smooth inside a lattice cell: evaluate at this many px per cell, then resize


def _noise_at(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``shape``, evaluated at no more than CELL_PX px per cell and resized."""
    h, w = shape
    small = (min(h, CELL_PX * cells[0]), min(w, CELL_PX * cells[1]))
    noise = perlin_noise(small, cells, rng)
    return noise if small == (h, w) else cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)


def fractal_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    """Sum of Perlin octaves (each twice as fine, half as strong), scaled to [0, 1]."""
    total = np.zeros(shape, np.float32)
    for octave in range(octaves):
        k = cells * 2**octave
        total += _noise_at(shape, (k, k), rng) / 2**octave
    low, high = total.min(), total.max()
    return (total - low) / (high - low + 1e-6)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random foreign surface: fractal noise, stripes or speckle, coloured between two random colours."""
    h, w = shape
    style = rng.integers(3)
    if style == 0:
        field = fractal_noise(shape, int(rng.integers(2, 9)), rng)
    elif style == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        field = 0.5 + 0.35 * np.sin(phase + 3 * fractal_noise(shape, 3, rng, octaves=2)) + 0.15 * fractal_noise(shape, 16, rng, 2)
    else:
        dots = (rng.random(shape) < rng.uniform(0.01, 0.08)).astype(np.float32)
        field = cv2.GaussianBlur(dots, (0, 0), rng.uniform(0.8, 3.0))
        field = 0.7 * field / (field.max() + 1e-6) + 0.3 * fractal_noise(shape, 8, rng, 2)
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    field = np.clip(field, 0, 1)[..., None]
    return (colours[0] * (1 - field) + colours[1] * field).astype(np.uint8)


# -- DRAEM's texture distortions: three of these, in random order, on each texture --------------
def _gamma(t, rng):
    return (255 * (t / 255.0) ** rng.uniform(0.5, 2.0)).astype(np.uint8)


def _brightness(t, rng):
    return np.clip(t.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255).astype(np.uint8)


def _sharpen(t, rng):
    blurred = cv2.GaussianBlur(t, (0, 0), 1.5)
    return cv2.addWeighted(t, 1 + rng.uniform(0.5, 1.5), blurred, -rng.uniform(0.5, 1.5), 0)


def _hue(t, rng):
    hsv = cv2.cvtColor(t, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(int) + int(rng.integers(-50, 51))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _solarize(t, rng):
    level = int(rng.integers(32, 224))
    return np.where(t >= level, 255 - t, t).astype(np.uint8)


def _posterize(t, rng):
    bits = int(rng.integers(2, 5))
    return (t >> (8 - bits) << (8 - bits)).astype(np.uint8)


def _invert(t, rng):
    return 255 - t


def _autocontrast(t, rng):
    low, high = t.min(axis=(0, 1)), t.max(axis=(0, 1))
    return ((t - low) * (255.0 / np.maximum(high - low, 1))).astype(np.uint8)


def _equalize(t, rng):
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(t[..., c])) for c in range(3)], axis=-1)


def _rotate(t, rng):
    h, w = t.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-90, 90), 1.0)
    return cv2.warpAffine(t, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)


DISTORTIONS = (_gamma, _brightness, _sharpen, _hue, _solarize, _posterize, _invert, _autocontrast, _equalize, _rotate)


def distort(texture: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    for index in rng.choice(len(DISTORTIONS), size=count, replace=False):
        texture = DISTORTIONS[index](texture, rng)
    return np.ascontiguousarray(texture)


class PerlinSynthesizer:
    """Perlin-noise mask filled with a foreign texture, DRAEM-style.

    ``textures``: images to cut the foreign texture from (any sizes; resized to each input), or
    None for procedural noise textures only; with textures given, ``procedural`` is the chance a
    call uses a procedural texture anyway. The texture covers the mask with opacity 1 - beta,
    beta ~ U(0, ``max_beta``). ``scales`` bounds the noise lattice (2**k cells per side, k in
    [scales[0], scales[1])), ``threshold`` cuts the noise into blobs and ``min_area`` (a share of
    the image) rejects near-empty masks. ``on_foreground`` keeps the mask on the GrabCut
    foreground, for objects on a background.
    """

    kind = "perlin"

    def __init__(self, textures: Sequence[np.ndarray] | None = None, procedural: float = 0.5,
                 max_beta: float = 0.8, scales: tuple[int, int] = (0, 6), threshold: float = 0.5,
                 min_area: float = 0.002, on_foreground: bool = False):
        self.textures = [check_image(t) for t in textures] if textures else []
        self.procedural = 1.0 if not self.textures else float(procedural)
        self.max_beta = float(max_beta)
        self.scales = scales
        self.threshold = float(threshold)
        self.min_area = float(min_area)
        self.on_foreground = on_foreground

    def noise_mask(self, shape: tuple[int, int], rng: np.random.Generator, allowed: np.ndarray | None = None) -> np.ndarray:
        """A rotated, thresholded Perlin mask with at least ``min_area`` of the image (within ``allowed``)."""
        h, w = shape
        best = np.zeros(shape, bool)
        for _ in range(50):
            cells = 2 ** rng.integers(self.scales[0], self.scales[1], size=2)
            # Noise on the diagonal square (so rotation leaves no empty corners), built and rotated at
            # CELL_PX px per cell, then resized to the image.
            side = float(np.hypot(h, w))
            small = int(min(np.ceil(side), CELL_PX * cells.max()))
            factor = small / side
            noise = perlin_noise((small, small), (int(cells[0]), int(cells[1])), rng)
            matrix = cv2.getRotationMatrix2D((small / 2, small / 2), rng.uniform(-90, 90), 1.0)
            sw, sh = max(round(w * factor), 1), max(round(h * factor), 1)
            matrix[:, 2] -= ((small - sw) / 2, (small - sh) / 2)
            noise = cv2.warpAffine(noise, matrix, (sw, sh), flags=cv2.INTER_LINEAR)
            mask = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR) > self.threshold
            if allowed is not None:
                mask &= allowed
            if mask.mean() >= self.min_area:
                return mask
            if mask.sum() > best.sum():
                best = mask
        return best

    def texture(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        if rng.random() < self.procedural:
            texture = procedural_texture(shape, rng)
        else:
            texture = cv2.resize(self.textures[rng.integers(len(self.textures))], (w, h), interpolation=cv2.INTER_AREA)
        return distort(texture, rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None) -> SyntheticAnomaly:
        """One anomaly in ``image``; with ``on_foreground``, pass ``foreground`` (bool H×W) to skip GrabCut."""
        image = check_image(image)
        shape = image.shape[:2]
        allowed = None
        if self.on_foreground:
            allowed = foreground_mask(image) if foreground is None else np.asarray(foreground, bool)
        mask = self.noise_mask(shape, rng, allowed)
        texture = self.texture(shape, rng)
        beta = rng.uniform(0, self.max_beta)
        out = image.copy()
        out[mask] = np.round((1 - beta) * texture[mask] + beta * image[mask]).astype(np.uint8)
        return SyntheticAnomaly(out, mask, mask_box(mask), self.kind)
