"""Drawing primitives shared by every generated scene: per-image random streams, anti-aliased
shapes at sub-pixel precision, noise fields, lighting and the sensor model.

Each image draws from its own random streams, derived from (seed, category, split, index), so files
are byte-identical across runs and adding a defect never changes the scene or the noise under it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

SUBPIXEL_BITS = 4  # cv2 draws with 1/16 px precision, so shapes are not snapped to the grid
_SENSOR_NOISE = 0.010  # std of additive sensor noise, in 0..1 intensity units


def streams(seed: int, category: str, split: str, index: int) -> list[np.random.SeedSequence]:
    """Scene, defect and sensor-noise streams of one image; independent, so adding a defect
    never changes the scene or the noise it is drawn on."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
    return np.random.SeedSequence(key).spawn(3)


@lru_cache(maxsize=4)
def coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@dataclass(frozen=True)
class Win:
    """A rectangle of the image (rows y0:y1, columns x0:x1). Parts are rendered inside theirs
    only, which keeps the assembly scenes fast; all coordinates stay image pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @staticmethod
    def full(size: int) -> Win:
        return Win(0, size, 0, size)

    @staticmethod
    def around(centre, radius: float, size: int) -> Win:
        x0, y0 = (max(0, int(np.floor(c - radius))) for c in centre)
        x1, y1 = (min(size, int(np.ceil(c + radius)) + 1) for c in centre)
        return Win(y0, y1, x0, x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[self.y0:self.y1, self.x0:self.x1]
        return yy.astype(np.float32), xx.astype(np.float32)

    def fixed(self, points) -> np.ndarray:
        """Points in image pixels as cv2 fixed-point coordinates inside this window."""
        local = np.asarray(points, np.float64).reshape(-1, 2) - (self.x0, self.y0)
        return np.round(local * (1 << SUBPIXEL_BITS)).astype(np.int32).reshape(-1, 1, 2)


def polygon_alpha(win: Win, *polygons) -> np.ndarray:
    """Anti-aliased coverage (0..1) of the union of filled polygons given in pixel coordinates."""
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(p) for p in polygons], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def circle(canvas: np.ndarray, win: Win, centre, radius: float, value: int) -> None:
    c = win.fixed(centre).reshape(2)
    cv2.circle(canvas, (int(c[0]), int(c[1])), int(round(radius * (1 << SUBPIXEL_BITS))), value, -1,
               cv2.LINE_AA, SUBPIXEL_BITS)


def path_alpha(win: Win, paths, thickness: int, strengths=None) -> np.ndarray:
    """Anti-aliased coverage of open polylines; ``strengths`` (0..1 per segment) fades them."""
    canvas = np.zeros(win.shape, np.uint8)
    for k, path in enumerate(paths):
        fixed = win.fixed(path).reshape(-1, 2)
        for i in range(len(fixed) - 1):
            value = 255 if strengths is None else int(round(255 * strengths[k][i]))
            cv2.line(canvas, tuple(map(int, fixed[i])), tuple(map(int, fixed[i + 1])), value, thickness,
                     cv2.LINE_AA, SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def fine_noise(rng: np.random.Generator, size: int, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise; unequal sigmas give fibres or grain."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0),
                             max(sigma_x, 0.3), sigmaY=max(sigma_y, 0.3))
    return noise / max(float(noise.std()), 1e-6)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency unit-scale noise: a few random values per side, bicubically upsampled."""
    return cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)


def drop_shadow(alpha: np.ndarray, dx: float, dy: float, blur: float) -> np.ndarray:
    """Shifted, box-blurred coverage: a soft shadow with compact support, so masks can contain it."""
    shifted = cv2.warpAffine(alpha, np.float32([[1, 0, dx], [0, 1, dy]]), alpha.shape[::-1],
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    k = max(1, int(round(blur))) | 1
    shadow = cv2.blur(shifted, (k, k))
    shadow[shadow < 1e-5] = 0.0  # running box sums leave float dust outside the support
    return shadow


def lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-image exposure and a mild linear illumination gradient (H×W×1 multiplier)."""
    yy, xx = coords(size)
    angle = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.04, 0.12) / size
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) * slope
    return (rng.uniform(0.94, 1.06) * (1.0 + ramp))[..., None].astype(np.float32)


def expose(image: np.ndarray, light: np.ndarray, noise_stream: np.random.SeedSequence) -> np.ndarray:
    noise = np.random.default_rng(noise_stream).standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(_SENSOR_NOISE)
    return np.clip(np.rint((image * light + noise) * 255.0), 0, 255).astype(np.uint8)


def dilate(support: np.ndarray) -> np.ndarray:
    """Grow a defect's support by 1 px so the mask also covers anti-aliased fringes."""
    return cv2.dilate(support.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def pick(rng: np.random.Generator, sites: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(sites)
    i = rng.integers(len(ys))
    return np.array([xs[i], ys[i]], np.float64) + rng.uniform(-0.5, 0.5, 2)


def curve(rng: np.random.Generator, start, length: float, bend: float, wobble: float, steps: int) -> np.ndarray:
    """Polyline from ``start`` whose heading turns by ``bend`` overall, plus a damped random walk."""
    heading = rng.uniform(0, 2 * np.pi)
    drift = 0.0
    points = [np.asarray(start, np.float64)]
    for t in np.linspace(0, 1, steps):
        drift = 0.6 * drift + rng.normal(0, wobble)
        angle = heading + bend * t + drift
        points.append(points[-1] + length / steps * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(points)


@dataclass
class Rendering:
    clean: np.ndarray  # H×W×3 float32 reflectance, before lighting and noise
    defective: np.ndarray  # the same scene with the defect (equal to clean for good images)
    light: np.ndarray
    noise: np.random.SeedSequence
    masks: list[tuple[str, np.ndarray]]  # (defect name, bool H×W) per annotated region

