"""Deterministic synthetic anomaly-detection datasets in MVTec AD and MVTec LOCO layouts.

Tests, the demo and benchmarks need labelled data without a download. The scenes carry real
normal variation (stochastic texture, pose jitter, lighting, sensor noise) and the defects are
small and low-contrast, so a pixel-difference detector is not enough; every mask is computed
from the very geometry that altered the pixels.

Each image draws from its own random streams, derived from (seed, category, split, index): files
are byte-identical across runs, and the clean twin of any defect image can be re-rendered with
:func:`render_pair`.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np

from ..errors import OutputError, OutputExistsError, UsageError

MVTEC_CATEGORIES = ("fabric", "washer", "brushed_metal")
DEFAULT_MVTEC_CATEGORIES = ("fabric", "washer")
STRUCTURAL_DEFECTS = ("scratch", "crack", "hole", "stain", "deformation")
LOCO_CATEGORY = "assembly"
LOGICAL_DEFECTS = ("missing_part", "extra_part", "swapped_parts", "misplaced_part", "wrong_color")
LOCO_STRUCTURAL_DEFECTS = ("scratch", "broken_part", "contamination")

# Sensor noise leaves little for LZ matching: Huffman-only coding is as small and faster.
_PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
_SUBPIXEL_BITS = 4  # cv2 draws with 1/16 px precision, so shapes are not snapped to the grid
_SENSOR_NOISE = 0.010  # std of additive sensor noise, in 0..1 intensity units


# ---- random streams, pixels and drawing ------------------------------------------------------


def _streams(seed: int, category: str, split: str, index: int) -> list[np.random.SeedSequence]:
    """Scene, defect and sensor-noise streams of one image; independent, so adding a defect
    never changes the scene or the noise it is drawn on."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
    return np.random.SeedSequence(key).spawn(3)


@lru_cache(maxsize=4)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@dataclass(frozen=True)
class _Win:
    """A rectangle of the image (rows y0:y1, columns x0:x1). Parts are rendered inside theirs
    only, which keeps the assembly scenes fast; all coordinates stay image pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @staticmethod
    def full(size: int) -> _Win:
        return _Win(0, size, 0, size)

    @staticmethod
    def around(centre, radius: float, size: int) -> _Win:
        x0, y0 = (max(0, int(np.floor(c - radius))) for c in centre)
        x1, y1 = (min(size, int(np.ceil(c + radius)) + 1) for c in centre)
        return _Win(y0, y1, x0, x1)

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
        return np.round(local * (1 << _SUBPIXEL_BITS)).astype(np.int32).reshape(-1, 1, 2)


def _polygon_alpha(win: _Win, *polygons) -> np.ndarray:
    """Anti-aliased coverage (0..1) of the union of filled polygons given in pixel coordinates."""
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(p) for p in polygons], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def _circle(canvas: np.ndarray, win: _Win, centre, radius: float, value: int) -> None:
    c = win.fixed(centre).reshape(2)
    cv2.circle(canvas, (int(c[0]), int(c[1])), int(round(radius * (1 << _SUBPIXEL_BITS))), value, -1,
               cv2.LINE_AA, _SUBPIXEL_BITS)


def _path_alpha(win: _Win, paths, thickness: int, strengths=None) -> np.ndarray:
    """Anti-aliased coverage of open polylines; ``strengths`` (0..1 per segment) fades them."""
    canvas = np.zeros(win.shape, np.uint8)
    for k, path in enumerate(paths):
        fixed = win.fixed(path).reshape(-1, 2)
        for i in range(len(fixed) - 1):
            value = 255 if strengths is None else int(round(255 * strengths[k][i]))
            cv2.line(canvas, tuple(map(int, fixed[i])), tuple(map(int, fixed[i + 1])), value, thickness,
                     cv2.LINE_AA, _SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _fine_noise(rng: np.random.Generator, size: int, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise; unequal sigmas give fibres or grain."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0),
                             max(sigma_x, 0.3), sigmaY=max(sigma_y, 0.3))
    return noise / max(float(noise.std()), 1e-6)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency unit-scale noise: a few random values per side, bicubically upsampled."""
    return cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)


def _drop_shadow(alpha: np.ndarray, dx: float, dy: float, blur: float) -> np.ndarray:
    """Shifted, box-blurred coverage: a soft shadow with compact support, so masks can contain it."""
    shifted = cv2.warpAffine(alpha, np.float32([[1, 0, dx], [0, 1, dy]]), alpha.shape[::-1],
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    k = max(1, int(round(blur))) | 1
    shadow = cv2.blur(shifted, (k, k))
    shadow[shadow < 1e-5] = 0.0  # running box sums leave float dust outside the support
    return shadow


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-image exposure and a mild linear illumination gradient (H×W×1 multiplier)."""
    yy, xx = _coords(size)
    angle = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.04, 0.12) / size
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) * slope
    return (rng.uniform(0.94, 1.06) * (1.0 + ramp))[..., None].astype(np.float32)


def _expose(image: np.ndarray, light: np.ndarray, noise_stream: np.random.SeedSequence) -> np.ndarray:
    noise = np.random.default_rng(noise_stream).standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(_SENSOR_NOISE)
    return np.clip(np.rint((image * light + noise) * 255.0), 0, 255).astype(np.uint8)


def _dilate(support: np.ndarray) -> np.ndarray:
    """Grow a defect's support by 1 px so the mask also covers anti-aliased fringes."""
    return cv2.dilate(support.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def _pick(rng: np.random.Generator, sites: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(sites)
    i = rng.integers(len(ys))
    return np.array([xs[i], ys[i]], np.float64) + rng.uniform(-0.5, 0.5, 2)


def _curve(rng: np.random.Generator, start, length: float, bend: float, wobble: float, steps: int) -> np.ndarray:
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
class _Rendering:
    clean: np.ndarray  # H×W×3 float32 reflectance, before lighting and noise
    defective: np.ndarray  # the same scene with the defect (equal to clean for good images)
    light: np.ndarray
    noise: np.random.SeedSequence
    masks: list[tuple[str, np.ndarray]]  # (defect name, bool H×W) per annotated region


# ---- MVTec AD scenes ------------------------------------------------------------------------


@dataclass
class _Scene:
    image: np.ndarray  # H×W×3 float32 reflectance
    light: np.ndarray
    surface: np.ndarray  # H×W coverage of the inspected surface: defects are clipped to it
    sites: np.ndarray  # H×W bool: where a surface defect may start
    edge_sites: np.ndarray  # H×W bool: where a deformation may be centred
    centre: np.ndarray | None = None  # part centre; deformations push along its radius
    contrast: float = 1.0  # defect strength: a busy texture hides what a plain surface shows


def _fabric(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave canvas: warp and weft threads alternate over/under, with per-thread yarn
    variation, fibre noise, a random phase and a slight skew."""
    s = size / 256
    yy, xx = _coords(size)
    pitch = max(9.0 * s, 3.0) * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch + rng.uniform(0, 2)
    v = (yy * np.cos(angle) - xx * np.sin(angle)) / pitch + rng.uniform(0, 2)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    # A thread is brightest along its crown and dips where it passes under the crossing one.
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    warp = np.sqrt(su) * (0.7 + 0.3 * sv)
    weft = np.sqrt(sv) * (0.7 + 0.3 * su)
    warp *= rng.normal(1.0, 0.06, 64)[iu.astype(np.int64) % 64] * (1 + 0.12 * _fine_noise(rng, size, 0.6 * s, 3 * s))
    weft *= rng.normal(1.0, 0.06, 64)[iv.astype(np.int64) % 64] * (1 + 0.12 * _fine_noise(rng, size, 3 * s, 0.6 * s))
    tint = rng.normal(1.0, 0.015, 3)
    warp_colour, weft_colour = np.float32([0.56, 0.50, 0.41]) * tint, np.float32([0.66, 0.61, 0.52]) * tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    mottle = 1.0 + 0.03 * _smooth_noise(rng, size, 5)
    image = ((0.3 + 0.7 * np.where(warp_on_top, warp, weft)) * mottle)[..., None] * colour
    return _texture_scene(image.astype(np.float32), _lighting(rng, size), contrast=1.5)


def _brushed_metal(rng: np.random.Generator, size: int) -> _Scene:
    """Brushed steel: long parallel grain, a broad sheen across it, a slight random tilt."""
    s = size / 256
    pad = size // 8
    n = size + 2 * pad
    # Noise stretched 16× along x reads as brushing marks; a fine layer adds short scratches.
    grain = rng.standard_normal((n, max(n // 16, 4))).astype(np.float32)
    grain = cv2.resize(grain, (n, n), interpolation=cv2.INTER_CUBIC)
    grain = 0.7 * grain / grain.std() + 0.3 * _fine_noise(rng, n, 5 * s, 0.5 * s)
    tilt = cv2.getRotationMatrix2D((n / 2, n / 2), rng.normal(0.0, 1.5), 1.0)
    tilt[:, 2] -= pad
    grain = cv2.warpAffine(grain, tilt, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    yy, xx = _coords(size)
    sheen = np.exp(-(((xx - rng.uniform(0.2, 0.8) * size) / (0.35 * size)) ** 2))
    shade = 0.50 + 0.045 * grain + 0.10 * sheen
    image = shade[..., None] * (np.float32([0.97, 1.0, 1.05]) * rng.normal(1.0, 0.01, 3).astype(np.float32))
    return _texture_scene(image.astype(np.float32), _lighting(rng, size))


def _texture_scene(image: np.ndarray, light: np.ndarray, contrast: float = 1.0) -> _Scene:
    size = image.shape[0]
    margin = max(2, int(0.1 * size))
    sites = np.zeros((size, size), bool)
    sites[margin:-margin, margin:-margin] = True
    return _Scene(image, light, np.ones((size, size), np.float32), sites, sites, contrast=contrast)


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    """A keyed, turned steel washer on a dark belt: centre and key angle jitter per image."""
    s = size / 256
    yy, xx = _coords(size)
    centre = np.full(2, (size - 1) / 2) + rng.normal(0.0, 2.5 * s, 2)
    rotation = np.deg2rad(np.clip(rng.normal(0.0, 5.0), -12, 12))
    r_out, r_in = 84 * s * rng.uniform(0.99, 1.01), 36 * s
    win = _Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    _circle(canvas, win, centre, r_out, 255)
    _circle(canvas, win, centre, r_in, 0)
    # The key tab pointing into the bore makes the rotation visible.
    key = np.array([np.cos(rotation - np.pi / 2), np.sin(rotation - np.pi / 2)])
    side = np.array([-key[1], key[0]]) * 5 * s
    near, far = centre + key * (r_in - 9 * s), centre + key * (r_in + 2 * s)
    tab = win.fixed([near - side, near + side, far + side, far - side])
    cv2.fillPoly(canvas, [tab], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    alpha = canvas.astype(np.float32) / 255.0

    dx, dy = xx - centre[0], yy - centre[1]
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    light_angle = rng.uniform(0, 2 * np.pi)
    # Turning leaves fine concentric rings with random depth; they reflect as a bow-tie.
    ring_depth = np.convolve(rng.normal(0, 1, int(r_out) + 8), np.ones(3) / 3, mode="same")
    rings = 0.03 * np.sin(2 * np.pi * r / max(2.2 * s, 1.5) + rng.uniform(0, 2 * np.pi))
    rings += 0.02 * np.interp(r, np.arange(len(ring_depth)), ring_depth)
    bowtie = 0.09 * np.cos(2 * (theta - light_angle)) + 0.04 * np.cos(theta - light_angle)
    chamfer = 0.12 * np.clip(1 - (r_out - r) / (3 * s), 0, 1) - 0.10 * np.clip(1 - (r - r_in) / (2.5 * s), 0, 1)
    metal = (0.56 + rings + bowtie + chamfer)[..., None] * np.float32([0.96, 0.98, 1.02])

    belt = 0.17 + 0.012 * _smooth_noise(rng, size, 6) + 0.012 * _fine_noise(rng, size, 0.8, 0.8)
    belt = belt[..., None] * np.float32([0.95, 1.0, 1.08])
    away = light_angle + np.pi
    shadow = _drop_shadow(alpha, 2.5 * s * np.cos(away), 2.5 * s * np.sin(away) + 1.5 * s, 7 * s)
    a = alpha[..., None]
    image = belt * (1 - 0.6 * shadow[..., None]) * (1 - a) + metal * a
    sites = cv2.erode((alpha >= 1).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(3 * s))) > 0
    edge_sites = (np.abs(r - r_out) < 0.75) & (alpha > 0)
    return _Scene(image.astype(np.float32), _lighting(rng, size), alpha, sites, edge_sites, centre)


# ---- structural defects: (scene, rng, size) -> (image, support) --------------------------------


def _scratch(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin curved line, slightly lighter or darker, fading at both ends."""
    path = _curve(rng, _pick(rng, scene.sites), rng.uniform(0.12, 0.35) * size, rng.uniform(-0.8, 0.8), 0.04, 24)
    fade = np.sin(np.pi * np.linspace(0.04, 0.96, len(path) - 1)) ** 0.5
    alpha = _path_alpha(_Win.full(size), [path], int(rng.choice([1, 1, 2])), [fade]) * scene.surface
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.07, 0.15) * scene.contrast
    return scene.image + delta * alpha[..., None], alpha > 0


def _crack(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Jagged dark polyline with a few side branches."""
    s = size / 256
    length = rng.uniform(0.08, 0.2) * size
    steps = max(6, int(length / (2.5 * max(s, 0.5))))
    trunk = _curve(rng, _pick(rng, scene.sites), length, rng.uniform(-0.5, 0.5), 0.45, steps)
    paths = [trunk]
    for _ in range(rng.integers(1, 4)):
        start = trunk[rng.integers(len(trunk) // 4, len(trunk) - 1)]
        paths.append(_curve(rng, start, rng.uniform(0.25, 0.5) * length, rng.uniform(-0.6, 0.6), 0.45, 8))
    alpha = _path_alpha(_Win.full(size), paths, 1) * scene.surface
    darkening = min(0.9, rng.uniform(0.35, 0.6) * scene.contrast)
    return scene.image * (1 - darkening * alpha[..., None]), alpha > 0


def _hole(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A cluster of small pits: craters lit on one wall, shadowed on the other, with a raised rim."""
    s = size / 256
    centre = _pick(rng, scene.sites)
    light = rng.uniform(0, 2 * np.pi)
    win = _Win.full(size)
    yy, xx = _coords(size)
    rim = np.zeros(win.shape, np.uint8)
    depth = np.zeros(win.shape, np.float32)
    for k in range(rng.integers(1, 5)):
        c = centre if k == 0 else centre + rng.normal(0, 5 * s, 2)
        radius = max(1.2, (rng.uniform(5, 7) if rng.random() < 0.2 else rng.uniform(1.5, 3.8)) * s)
        _circle(rim, win, c, radius + max(1.0, 1.2 * s), 255)
        core = np.zeros(win.shape, np.uint8)
        _circle(core, win, c, radius, 255)
        slope = np.clip(((xx - c[0]) * np.cos(light) + (yy - c[1]) * np.sin(light)) / radius, -1, 1)
        depth = np.maximum(depth, core.astype(np.float32) / 255 * (0.7 + 0.3 * slope))
    depth *= scene.surface
    rim_a = np.clip(rim.astype(np.float32) / 255 * scene.surface - (depth > 0), 0, 1)
    darkening = min(0.9, rng.uniform(0.35, 0.6) * scene.contrast)
    image = scene.image * (1 - darkening * depth[..., None]) + 0.07 * scene.contrast * rim_a[..., None]
    return image, (depth > 0) | (rim_a > 0)


def _stain(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-contrast soft blob with a colour cast (oil, rust, dried water); zero outside its rim."""
    s = size / 256
    centre = _pick(rng, scene.sites)
    radius = max(4.0, (rng.uniform(18, 32) if rng.random() < 0.25 else rng.uniform(6, 18)) * s)
    yy, xx = _coords(size)
    dx, dy = xx - centre[0], yy - centre[1]
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in (2, 3, 4):  # a wobbly outline, not a perfect circle
        outline += rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    d2 = (dx * dx + dy * dy) / (radius * outline) ** 2
    strength = min(0.9, rng.uniform(0.3, 0.5) * scene.contrast)
    alpha = np.where(d2 < 1, (1 - d2) ** 2, 0).astype(np.float32) * strength * scene.surface
    tint = np.float32([[0.85, 0.58, 0.38], [0.55, 0.50, 0.44], [0.88, 0.92, 1.0]][rng.integers(3)])  # rust, oil, water
    return scene.image * (1 - alpha[..., None] * (1 - tint)), alpha > 0


def _deformation(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local warp: a dent or bulge of the part boundary, or a pushed patch of texture; the tilted
    flanks also catch the light differently."""
    s = size / 256
    centre = _pick(rng, scene.edge_sites)
    radius = max(4.0, rng.uniform(9, 18) * s)
    if scene.centre is None:
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
    else:  # push along the part's radius: inwards (a dent) more often than outwards
        direction = (centre - scene.centre) / np.linalg.norm(centre - scene.centre)
        direction *= -1 if rng.random() < 0.7 else 1
    amplitude = rng.uniform(0.3, 0.5) * radius  # below radius / 1.54 the warp never folds over
    light = rng.uniform(0, 2 * np.pi)
    win = _Win.around(centre, radius + 1, size)
    yy, xx = win.coords()
    dx, dy = xx - centre[0], yy - centre[1]
    inside = dx * dx + dy * dy < radius * radius
    falloff = np.where(inside, 1 - (dx * dx + dy * dy) / radius**2, 0).astype(np.float32)
    bump = amplitude * falloff**2
    # derivative of the bump along the light direction; zero at the rim like the bump itself
    tilt = -4 * amplitude * falloff * (dx * np.cos(light) + dy * np.sin(light)) / radius**2
    map_x = (xx - bump * np.float32(direction[0])).astype(np.float32)
    map_y = (yy - bump * np.float32(direction[1])).astype(np.float32)
    warped = cv2.remap(scene.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    warped *= (1 + 0.15 * scene.contrast * tilt)[..., None]
    image = scene.image.copy()
    image[win.slices] = np.where(inside[..., None], warped, image[win.slices])
    support = np.zeros((size, size), bool)
    support[win.slices] = inside
    return image, support


_MVTEC_SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "fabric": _fabric, "washer": _washer, "brushed_metal": _brushed_metal}
_STRUCTURAL: dict[str, Callable] = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "deformation": _deformation}


def _render_mvtec(category: str, split: str, index: int, seed: int, size: int, defect: str | None) -> _Rendering:
    scene_stream, defect_stream, noise_stream = _streams(seed, category, split, index)
    scene = _MVTEC_SCENES[category](np.random.default_rng(scene_stream), size)
    if defect is None:
        return _Rendering(scene.image, scene.image, scene.light, noise_stream, [])
    image, support = _STRUCTURAL[defect](scene, np.random.default_rng(defect_stream), size)
    return _Rendering(scene.image, image.astype(np.float32), scene.light, noise_stream, [(defect, _dilate(support))])


# ---- MVTec LOCO "assembly" scene -------------------------------------------------------------
# A tray with 2×3 compartments (tray units: the tray spans 0..1 on both axes). The rules:
# slot 0 two silver screws, slot 1 one steel nut, slot 2 one orange disc, slot 3 one blue and
# slot 4 one yellow disc (blue left of yellow), slot 5 one green cable; nothing else anywhere.

_WALL = 0.03
_SLOT_W, _SLOT_H = (1 - 4 * _WALL) / 3, (1 - 3 * _WALL) / 2
_SLOTS = [(_WALL + c * (_SLOT_W + _WALL), _WALL + r * (_SLOT_H + _WALL)) for r in range(2) for c in range(3)]
_SCREW_LENGTH, _SCREW_HEAD, _SCREW_HEAD_W, _SCREW_SHAFT_W = 0.17, 0.035, 0.055, 0.028
_NUT_R, _NUT_HOLE_R, _DISC_R, _CABLE_W = 0.058, 0.027, 0.062, 0.026
_COLOURS = {
    "silver": (0.78, 0.79, 0.82), "brass": (0.80, 0.62, 0.30), "steel": (0.66, 0.67, 0.70),
    "orange": (0.95, 0.50, 0.12), "blue": (0.15, 0.36, 0.80), "yellow": (0.96, 0.83, 0.18),
    "purple": (0.52, 0.26, 0.66), "green": (0.16, 0.60, 0.28), "red": (0.82, 0.16, 0.14),
}
# indices of the parts in a normal tray's part list (see _normal_parts)
_SCREW_A, _SCREW_B, _NUT, _ORANGE, _BLUE, _YELLOW, _CABLE = range(7)
_LOCO_CONFIG = (  # name, pixel value, saturation threshold, relative?
    ("missing_part", 255, 0.15, True), ("extra_part", 254, 1.0, True), ("swapped_parts", 253, 1.0, True),
    ("misplaced_part", 252, 1.0, True), ("wrong_color", 251, 1.0, True), ("scratch", 250, 100, False),
    ("broken_part", 249, 1.0, True), ("contamination", 248, 60, False),
)


@dataclass(frozen=True)
class _Part:
    kind: str  # screw | nut | disc | cable
    colour: str
    slot: int
    pos: tuple[float, float]  # tray units: the centre, or for a cable the origin of its path
    angle: float = 0.0  # radians, tray frame
    path: tuple = ()  # cable: Bézier control points relative to ``pos``
    damage: float | None = None  # broken: screw bend angle, disc chip angle, cable cut position


@dataclass
class _Pose:
    """Where the tray lies in the image: tray units to pixels."""
    centre: np.ndarray
    angle: float
    scale: float

    def px(self, points) -> np.ndarray:
        p = (np.asarray(points, np.float64) - 0.5) * self.scale
        c, s = np.cos(self.angle), np.sin(self.angle)
        return p @ np.array([[c, s], [-s, c]]) + self.centre


def _slot_polygon(slot: int) -> np.ndarray:
    x0, y0 = _SLOTS[slot]
    return _rect(x0, y0, x0 + _SLOT_W, y0 + _SLOT_H)


def _screw_at(rng: np.random.Generator, row: int, colour: str = "silver") -> _Part:
    """Screws lie roughly horizontal in one of three rows of slot 0, head left or right."""
    x0, y0 = _SLOTS[0]
    pos = (x0 + _SLOT_W / 2 + rng.uniform(-0.03, 0.03), y0 + (row + 0.5) * _SLOT_H / 3 + rng.uniform(-0.015, 0.015))
    angle = np.clip(rng.normal(0, 0.06), -0.12, 0.12) + (np.pi if rng.random() < 0.5 else 0.0)
    return _Part("screw", colour, 0, pos, float(angle))


def _round_part_in(rng: np.random.Generator, kind: str, colour: str, slot: int) -> _Part:
    """A nut or disc anywhere in its slot, clear of the walls and their shadows."""
    margin = (_NUT_R if kind == "nut" else _DISC_R) + 0.03
    x0, y0 = _SLOTS[slot]
    pos = (rng.uniform(x0 + margin, x0 + _SLOT_W - margin), rng.uniform(y0 + margin, y0 + _SLOT_H - margin))
    return _Part(kind, colour, slot, pos, float(rng.uniform(0, np.pi / 3)))


def _cable_in(rng: np.random.Generator, slot: int = 5) -> _Part:
    """A cable from the left to the right wall along a random cubic Bézier."""
    ends_x = (0.04, _SLOT_W - 0.04)
    control = [(ends_x[0], rng.uniform(0.08, _SLOT_H - 0.08)),
               (rng.uniform(0.05, _SLOT_W - 0.05), rng.uniform(0.05, _SLOT_H - 0.05)),
               (rng.uniform(0.05, _SLOT_W - 0.05), rng.uniform(0.05, _SLOT_H - 0.05)),
               (ends_x[1], rng.uniform(0.08, _SLOT_H - 0.08))]
    return _Part("cable", "green", slot, _SLOTS[slot], 0.0, tuple(control))


def _normal_parts(rng: np.random.Generator) -> list[_Part]:
    rows = sorted(rng.choice(3, size=2, replace=False))
    return [_screw_at(rng, int(r)) for r in rows] + [
        _round_part_in(rng, "nut", "steel", 1), _round_part_in(rng, "disc", "orange", 2),
        _round_part_in(rng, "disc", "blue", 3), _round_part_in(rng, "disc", "yellow", 4), _cable_in(rng)]


def _rod(pose: _Pose, win: _Win, start, axis, stations, half_widths, along0: float, colour, threaded_from: float):
    """A cylinder piece (screw head or shaft) seen from the side: outline through ``stations``
    (distance along ``axis`` from ``start``) with ``half_widths``, cylindrical shading and threads."""
    normal = np.array([-axis[1], axis[0]])
    upper = [start + axis * a + normal * w for a, w in zip(stations, half_widths)]
    lower = [start + axis * a - normal * w for a, w in zip(stations, half_widths)]
    alpha = _polygon_alpha(win, pose.px(np.array(upper + lower[::-1])))
    yy, xx = win.coords()
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    axis_px = np.array([axis[0] * c - axis[1] * s, axis[0] * s + axis[1] * c])
    origin = pose.px(start[None])[0]
    along = ((xx - origin[0]) * axis_px[0] + (yy - origin[1]) * axis_px[1]) / pose.scale + along0
    across = ((xx - origin[0]) * -axis_px[1] + (yy - origin[1]) * axis_px[0]) / pose.scale
    half = np.interp(along - along0, stations, half_widths).astype(np.float32)
    shade = 0.45 + 0.55 * np.sqrt(np.clip(1 - (across / np.maximum(half, 1e-4)) ** 2, 0, 1))
    shade *= np.where(along > threaded_from, 1 + 0.2 * np.sin(2 * np.pi * along / 0.009), 1.0)
    return alpha, shade[..., None] * np.float32(_COLOURS[colour])


def _render_screw(part: _Part, pose: _Pose, win: _Win):
    """Head plus shaft, in two pieces joined at the bend point so a bent screw shares all
    pixels of the straight one up to the bend."""
    axis = np.array([np.cos(part.angle), np.sin(part.angle)])
    tail = np.asarray(part.pos) - axis * _SCREW_LENGTH / 2
    hw, sw, head = _SCREW_HEAD_W / 2, _SCREW_SHAFT_W / 2, _SCREW_HEAD
    bend_at = _SCREW_HEAD + 0.55 * (_SCREW_LENGTH - _SCREW_HEAD)
    a1, rgb1 = _rod(pose, win, tail, axis, [0, head, head, bend_at], [hw, hw, sw, sw], 0.0, part.colour, head)
    bend = part.damage or 0.0
    axis2 = np.array([np.cos(part.angle + bend), np.sin(part.angle + bend)])
    rest = _SCREW_LENGTH - bend_at
    overlap = 0.004  # the distal piece starts inside the first so no seam shows at the joint
    stations = [0, overlap + rest - 0.012, overlap + rest]  # shaft, then a short taper to the tip
    a2, rgb2 = _rod(pose, win, tail + axis * bend_at - axis2 * overlap, axis2, stations, [sw, sw, sw * 0.4],
                    bend_at - overlap, part.colour, head)
    return np.maximum(a1, a2), np.where((a2 > 0)[..., None], rgb2, rgb1)


def _render_nut(part: _Part, pose: _Pose, win: _Win):
    """Hex nut with flat-shaded facets and a dark threaded bore."""
    angles = part.angle + np.arange(6) * np.pi / 3
    hexagon = np.asarray(part.pos) + _NUT_R * np.stack([np.cos(angles), np.sin(angles)], 1)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(pose.px(hexagon))], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    centre = pose.px(np.asarray(part.pos)[None])[0]
    _circle(canvas, win, centre, _NUT_HOLE_R * pose.scale, 0)
    yy, xx = win.coords()
    theta = np.arctan2(yy - centre[1], xx - centre[0]) - (part.angle + pose.angle)
    facet = np.round((theta - np.pi / 6) / (np.pi / 3)) * (np.pi / 3) + np.pi / 6
    r = np.hypot(xx - centre[0], yy - centre[1]) / pose.scale
    shade = 0.74 + 0.14 * np.cos(facet + part.angle + pose.angle - 0.8)
    shade *= np.where(r < _NUT_HOLE_R + 0.01, 0.8, 1.0)
    return canvas.astype(np.float32) / 255, shade[..., None] * np.float32(_COLOURS[part.colour])


def _render_disc(part: _Part, pose: _Pose, win: _Win):
    """Domed plastic disc with a darker rim and a soft highlight; a broken one has a chip bitten out."""
    centre = pose.px(np.asarray(part.pos)[None])[0]
    radius = _DISC_R * pose.scale
    canvas = np.zeros(win.shape, np.uint8)
    _circle(canvas, win, centre, radius, 255)
    if part.damage is not None:
        bite = centre + radius * np.array([np.cos(part.damage), np.sin(part.damage)])
        _circle(canvas, win, bite, 0.4 * radius, 0)
    yy, xx = win.coords()
    d2 = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / radius**2
    highlight = centre - 0.3 * radius
    spot = np.exp(-((xx - highlight[0]) ** 2 + (yy - highlight[1]) ** 2) / (0.3 * radius) ** 2)
    shade = (0.84 + 0.16 * (1 - d2)) * np.where(d2 > 0.8, 0.88, 1.0)
    rgb = shade[..., None] * np.float32(_COLOURS[part.colour]) + 0.18 * spot[..., None]
    return canvas.astype(np.float32) / 255, rgb


def _cable_curve(part: _Part) -> np.ndarray:
    t = np.linspace(0, 1, 40)[:, None]
    p = np.asarray(part.path) + np.asarray(part.pos)
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _render_cable(part: _Part, pose: _Pose, win: _Win):
    """Insulated cable along a Bézier with a highlight stripe; a cut one shows copper ends."""
    curve = _cable_curve(part)
    pieces = [curve]
    if part.damage is not None:
        cut = int(part.damage * len(curve))
        pieces = [curve[: cut - 4], curve[cut + 4:]]
    width = max(2, int(round(_CABLE_W * pose.scale)))
    px_pieces = [pose.px(c) for c in pieces]
    alpha = _path_alpha(win, px_pieces, width)
    shine = _path_alpha(win, [c + np.array([-0.2, -0.25]) * width for c in px_pieces], max(1, width // 3))
    rgb = (0.78 + 0.35 * shine)[..., None] * np.float32(_COLOURS[part.colour])
    if part.damage is not None:
        copper = np.zeros(win.shape, np.uint8)
        for end in (px_pieces[0][-1], px_pieces[1][0]):
            _circle(copper, win, end, 0.3 * width, 255)
        c = (copper.astype(np.float32) / 255)[..., None]
        rgb = rgb * (1 - c) + c * np.float32([0.85, 0.52, 0.25])
    return alpha, rgb


_PART_RENDERERS = {"screw": _render_screw, "nut": _render_nut, "disc": _render_disc, "cable": _render_cable}


def _part_window(part: _Part, pose: _Pose, size: int) -> _Win:
    """The part's bounding circle plus room for its contact shadow."""
    if part.kind == "cable":
        curve = _cable_curve(part)
        lo, hi = curve.min(0), curve.max(0)
        centre, reach = (lo + hi) / 2, np.hypot(*(hi - lo)) / 2 + _CABLE_W
    else:
        reach = {"screw": _SCREW_LENGTH / 2, "nut": _NUT_R, "disc": _DISC_R}[part.kind]
        centre = np.asarray(part.pos)
    return _Win.around(pose.px(centre[None])[0], reach * pose.scale + 8 * size / 256 + 3, size)


@dataclass
class _Tray:
    image: np.ndarray
    light: np.ndarray
    pose: _Pose
    tray: np.ndarray  # coverage of the tray


def _tray(rng: np.random.Generator, size: int) -> _Tray:
    """Grey plastic tray with compartments on a dark bench; its pose jitters per image."""
    s = size / 256
    margin = 10 * s
    centre = np.full(2, (size - 1) / 2) + rng.normal(0, 1.5 * s, 2)
    pose = _Pose(centre, float(np.clip(rng.normal(0, 0.012), -0.025, 0.025)), size - 2 * margin)
    bench = (0.23 + 0.012 * _smooth_noise(rng, size, 6) + 0.008 * _fine_noise(rng, size, 1, 1))[..., None]
    bench = bench * np.float32([1.0, 0.93, 0.86])
    tray = _polygon_alpha(_Win.full(size), pose.px(_rect(0, 0, 1, 1)))
    floor = _polygon_alpha(_Win.full(size), *[pose.px(_slot_polygon(k)) for k in range(6)])
    walls = np.clip(tray - floor, 0, 1)
    wall_shadow = _drop_shadow(walls, 2 * s, 3 * s, 5 * s) * floor
    floor_shade = (1 + 0.015 * _fine_noise(rng, size, 1.0, 1.0)) * (1 - 0.3 * wall_shadow)
    floor_rgb = floor_shade[..., None] * np.float32([0.64, 0.67, 0.70])
    surface = np.float32([0.80, 0.82, 0.84]) * (1 - floor[..., None]) + floor_rgb * floor[..., None]
    tray_shadow = _drop_shadow(tray, 3 * s, 4 * s, 9 * s)
    image = bench * (1 - 0.5 * tray_shadow[..., None]) * (1 - tray[..., None]) + surface * tray[..., None]
    return _Tray(image.astype(np.float32), _lighting(rng, size), pose, tray)


def _draw_parts(tray: _Tray, parts: Sequence[_Part], size: int):
    """Composite parts (with contact shadows) over the tray; returns the image, each part's
    footprint (part or its shadow, bool H×W) and the union part coverage."""
    image = tray.image.copy()
    footprints, cover = [], np.zeros((size, size), np.float32)
    s = size / 256
    for part in parts:
        win = _part_window(part, tray.pose, size)
        alpha, rgb = _PART_RENDERERS[part.kind](part, tray.pose, win)
        shadow = _drop_shadow(alpha, 1.5 * s, 2.5 * s, 3 * s)
        patch = image[win.slices] * (1 - 0.35 * shadow[..., None])
        image[win.slices] = patch * (1 - alpha[..., None]) + rgb * alpha[..., None]
        footprint = np.zeros((size, size), bool)
        footprint[win.slices] = (alpha > 0) | (shadow > 0)
        footprints.append(_dilate(footprint))
        cover[win.slices] = np.maximum(cover[win.slices], alpha)
    return image, footprints, cover


def _slot_mask(tray: _Tray, slot: int, size: int) -> np.ndarray:
    return _dilate(_polygon_alpha(_Win.full(size), tray.pose.px(_slot_polygon(slot))) > 0)


# ---- LOCO anomalies -------------------------------------------------------------------------
# A logical anomaly returns the new part list and its mask specs: ("slot", k) marks a whole
# compartment (where something should have been), ("part", new_i, clean_i) the footprint of
# part new_i, joined with clean part clean_i's footprint when it replaced that one.


def _placed_free(tray: _Tray, parts: list[_Part], candidate: Callable[[int], _Part], slots, size: int) -> _Part:
    """Sample ``candidate(slot)`` until its footprint touches no other part, trying slots in order;
    on a crowded small image settle for the candidate that touches least."""
    _, footprints, _ = _draw_parts(tray, parts, size)
    taken = np.any(footprints, axis=0)
    best, best_overlap = None, np.inf
    for slot in slots:
        for _ in range(30):
            part = candidate(slot)
            _, (footprint,), _ = _draw_parts(tray, [part], size)
            overlap = int((footprint & taken).sum())
            if overlap == 0:
                return part
            if overlap < best_overlap:
                best, best_overlap = part, overlap
    return best


def _missing_part(parts, rng, tray, size):
    """A part is gone; its compartment is marked. A missing screw leaves one: a count violation."""
    victim = int(rng.integers(len(parts)))
    return parts[:victim] + parts[victim + 1:], [("missing_part", "slot", parts[victim].slot)]


def _extra_part(parts, rng, tray, size):
    """One part too many in its own compartment; it is the part that is marked."""
    if rng.random() < 1 / 3:  # a third screw in the free row: a count violation that looks normal locally
        used = {int(round((p.pos[1] - _SLOTS[0][1]) / (_SLOT_H / 3) - 0.5)) for p in parts[:_NUT]}
        extra = _screw_at(rng, ({0, 1, 2} - used).pop())
    else:
        twin = parts[int(rng.choice([_NUT, _ORANGE, _BLUE, _YELLOW]))]
        extra = _placed_free(tray, parts, lambda k: _round_part_in(rng, twin.kind, twin.colour, k), [twin.slot], size)
    return parts + [extra], [("extra_part", "part", len(parts), None)]


def _swapped_parts(parts, rng, tray, size):
    """Two parts trade places: the blue and yellow discs (their left-right order is violated), or
    the nut and the orange disc. Each takes the other's exact spot, so both spots are marked."""
    a, b = (_BLUE, _YELLOW) if rng.random() < 0.5 else (_NUT, _ORANGE)
    new = list(parts)
    new[a] = replace(parts[b], slot=parts[a].slot, pos=parts[a].pos)
    new[b] = replace(parts[a], slot=parts[b].slot, pos=parts[b].pos)
    return new, [("swapped_parts", "part", a, a), ("swapped_parts", "part", b, b)]


def _misplaced_part(parts, rng, tray, size):
    """A part lies in another compartment (marked), and its own compartment is short (marked)."""
    victim = int(rng.choice([_SCREW_A, _NUT, _ORANGE, _BLUE, _YELLOW]))
    rest = parts[:victim] + parts[victim + 1:]
    moved = parts[victim]
    targets = [int(k) for k in rng.permutation([k for k in (1, 2, 3, 4) if k != moved.slot])]

    def candidate(slot: int) -> _Part:
        x0, y0 = _SLOTS[slot]
        reach = _SCREW_LENGTH / 2 + 0.02 if moved.kind == "screw" else _DISC_R + 0.03
        reach_y = _SCREW_HEAD_W / 2 + 0.03 if moved.kind == "screw" else reach
        pos = (rng.uniform(x0 + reach, x0 + _SLOT_W - reach), rng.uniform(y0 + reach_y, y0 + _SLOT_H - reach_y))
        return replace(moved, slot=slot, pos=pos)

    placed = _placed_free(tray, rest, candidate, targets, size)
    return rest + [placed], [("misplaced_part", "part", len(rest), None), ("missing_part", "slot", moved.slot)]


def _wrong_color(parts, rng, tray, size):
    """One part in an off-rule colour; a disc may wear a colour that is normal in another slot."""
    victim = int(rng.choice([_SCREW_A, _NUT, _ORANGE, _BLUE, _YELLOW, _CABLE]))
    discs = [c for c in ("orange", "blue", "yellow", "purple") if c != parts[victim].colour]
    options = {"screw": ["brass"], "nut": ["brass"], "cable": ["red"], "disc": discs}[parts[victim].kind]
    new = list(parts)
    new[victim] = replace(parts[victim], colour=options[rng.integers(len(options))])
    return new, [("wrong_color", "part", victim, victim)]


_LOGICAL = {"missing_part": _missing_part, "extra_part": _extra_part, "swapped_parts": _swapped_parts,
            "misplaced_part": _misplaced_part, "wrong_color": _wrong_color}


def _broken_part(parts, rng):
    """A bent screw, a chipped disc or a cut cable (the nut has no broken form)."""
    victim = int(rng.choice([_SCREW_A, _SCREW_B, _ORANGE, _BLUE, _YELLOW, _CABLE]))
    part = parts[victim]
    if part.kind == "screw":
        damage = rng.choice([-1, 1]) * rng.uniform(0.3, 0.55)
    elif part.kind == "cable":
        damage = rng.uniform(0.35, 0.65)
    else:
        damage = rng.uniform(0, 2 * np.pi)
    new = list(parts)
    new[victim] = replace(part, damage=float(damage))
    return new


def _tray_scratch(image, cover, footprints, tray: _Tray, rng, size):
    """Whitish scratch on the tray plastic, never over a part."""
    free = (tray.tray >= 1) & ~np.any(footprints, axis=0)
    sites = cv2.erode(free.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    path = _curve(rng, _pick(rng, sites), rng.uniform(0.1, 0.25) * size, rng.uniform(-0.8, 0.8), 0.04, 20)
    fade = np.sin(np.pi * np.linspace(0.04, 0.96, len(path) - 1)) ** 0.5
    alpha = _path_alpha(_Win.full(size), [path], 1, [fade]) * tray.tray * (1 - cover)
    return image + rng.uniform(0.06, 0.12) * alpha[..., None], alpha > 0


def _contamination(image, tray: _Tray, rng, size):
    """A dark crumb or a fibre lying anywhere on the tray, parts included."""
    s = size / 256
    sites = cv2.erode((tray.tray >= 1).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    start = _pick(rng, sites)
    if rng.random() < 0.35:
        fibre = _curve(rng, start, rng.uniform(0.06, 0.12) * size, rng.uniform(-2, 2), 0.1, 16)
        alpha = _path_alpha(_Win.full(size), [fibre], 1)
    else:
        angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        radii = max(2.0, rng.uniform(3, 7) * s) * rng.uniform(0.6, 1.2, len(angles))
        alpha = _polygon_alpha(_Win.full(size), start + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None])
    alpha *= rng.uniform(0.75, 0.95) * tray.tray
    dirt = np.float32([0.26, 0.19, 0.13]) * rng.uniform(0.7, 1.2)
    return image * (1 - alpha[..., None]) + dirt * alpha[..., None], alpha > 0


def _render_loco(split: str, index: int, seed: int, size: int, defect: str | None) -> _Rendering:
    scene_stream, defect_stream, noise_stream = _streams(seed, LOCO_CATEGORY, split, index)
    rng = np.random.default_rng(scene_stream)
    tray = _tray(rng, size)
    parts = _normal_parts(rng)
    clean, footprints, cover = _draw_parts(tray, parts, size)
    if defect is None:
        return _Rendering(clean, clean, tray.light, noise_stream, [])
    drng = np.random.default_rng(defect_stream)
    if defect in _LOGICAL:
        new_parts, specs = _LOGICAL[defect](parts, drng, tray, size)
        image, new_footprints, _ = _draw_parts(tray, new_parts, size)
        masks = []
        for name, what, *ids in specs:
            if what == "slot":
                masks.append((name, _slot_mask(tray, ids[0], size)))
            else:
                mask = new_footprints[ids[0]] | (footprints[ids[1]] if ids[1] is not None else False)
                masks.append((name, mask))
    elif defect == "broken_part":
        image, _, _ = _draw_parts(tray, _broken_part(parts, drng), size)
        masks = [(defect, _dilate(np.any(image != clean, axis=2)))]
    elif defect == "scratch":
        image, support = _tray_scratch(clean, cover, footprints, tray, drng, size)
        masks = [(defect, _dilate(support))]
    else:
        image, support = _contamination(clean, tray, drng, size)
        masks = [(defect, _dilate(support))]
    return _Rendering(clean, image.astype(np.float32), tray.light, noise_stream, masks)


# ---- public API -----------------------------------------------------------------------------


def render_pair(category: str, defect: str, seed: int = 0, index: int = 0, size: int = 256):
    """Render one test scene without and with ``defect`` from the same random streams.

    Returns ``(clean, defective, mask)``: two RGB uint8 images with identical sensor noise and the
    bool union of the defect's masks. ``defective`` and the mask are exactly what :func:`generate`
    writes for that category, defect and index, so the pair shows which pixels a defect changed.
    """
    _check_size(size)
    if category == LOCO_CATEGORY:
        kinds = LOGICAL_DEFECTS + LOCO_STRUCTURAL_DEFECTS
        if defect not in kinds:
            raise ValueError(f"unknown {category} defect {defect!r}; expected one of {', '.join(kinds)}")
        rendering = _render_loco(_loco_split(defect), _loco_index(defect, index), seed, size, defect)
    else:
        _check_categories([category], MVTEC_CATEGORIES)
        if defect not in STRUCTURAL_DEFECTS:
            raise ValueError(f"unknown defect {defect!r}; expected one of {', '.join(STRUCTURAL_DEFECTS)}")
        rendering = _render_mvtec(category, f"test/{defect}", index, seed, size, defect)
    clean = _expose(rendering.clean, rendering.light, rendering.noise)
    defective = _expose(rendering.defective, rendering.light, rendering.noise)
    return clean, defective, np.any([m for _, m in rendering.masks], axis=0)


def generate(out: str | Path, kind: str = "mvtec", seed: int = 0, size: int = 256, n_train: int = 40,
             n_test_good: int = 20, n_test_defect_per_type: int = 8, categories: Sequence[str] | None = None,
             overwrite: bool = False) -> list[Path]:
    """Write a synthetic dataset under ``out`` and return the category folders written.

    ``kind="mvtec"``: MVTec AD layout per category (default fabric and washer; brushed_metal is
    also available) with ``n_test_defect_per_type`` images of each of scratch, crack, hole, stain,
    deformation and 0/255 masks. ``kind="loco"``: MVTec LOCO layout for "assembly" with
    ``max(1, n_train // 4)`` validation images, five logical and three structural anomaly types,
    masks valued by ``defects_config.json``. Same arguments give byte-identical files. A non-empty
    category folder is refused with FileExistsError unless ``overwrite`` (then it is replaced).
    """
    if kind not in ("mvtec", "loco"):
        raise UsageError(f"unknown kind {kind!r}; expected 'mvtec' or 'loco'")
    _check_size(size)
    if seed < 0 or min(n_train, n_test_good, n_test_defect_per_type) < 0:
        raise UsageError("seed and image counts must be non-negative")
    known = MVTEC_CATEGORIES if kind == "mvtec" else (LOCO_CATEGORY,)
    cats = list(categories) if categories is not None else list(DEFAULT_MVTEC_CATEGORIES if kind == "mvtec" else known)
    _check_categories(cats, known)
    out = Path(out)
    folders = [out / c for c in cats]
    for folder in folders:
        if folder.is_dir() and any(folder.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"{folder} already exists and is not empty; pass overwrite=True (--overwrite on the command line) to replace it")
        elif folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} exists and is not a folder")
    for folder in folders:
        if folder.is_dir():
            shutil.rmtree(folder)
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_defect_per_type=n_test_defect_per_type)
    make_jobs = _mvtec_jobs if kind == "mvtec" else _loco_jobs
    _run([job for folder in folders for job in make_jobs(folder, seed, size, **counts)])
    (out / "README.txt").write_text(_readme(kind, cats, seed, size, **counts), encoding="utf-8")
    return folders


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise UsageError(f"size must be an integer of at least 64 pixels, got {size!r}")


def _check_categories(categories: Sequence[str], known: Sequence[str]) -> None:
    unknown = [c for c in categories if c not in known]
    if unknown or not categories:
        raise UsageError(f"unknown categories {unknown}; expected some of {', '.join(known)}")


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image[..., ::-1] if image.ndim == 3 else image  # cv2 writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels), _PNG_OPTIONS):
        raise OutputError(f"could not write {path}")


def _run(jobs: Sequence[Callable[[], None]]) -> None:
    # Images are independent and numpy/cv2 release the GIL, so threads use every core; output stays
    # identical because each image has its own random streams and its own files.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda job: job(), jobs):
            pass


def _mvtec_jobs(folder: Path, seed: int, size: int, n_train: int, n_test_good: int,
                n_test_defect_per_type: int) -> list[Callable[[], None]]:
    splits = [("train/good", n_train, None), ("test/good", n_test_good, None)]
    splits += [(f"test/{d}", n_test_defect_per_type, d) for d in STRUCTURAL_DEFECTS]
    jobs = []
    for split, count, defect in splits:
        (folder / split).mkdir(parents=True, exist_ok=True)
        if defect is not None:
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        jobs += [partial(_write_mvtec_image, folder, split, i, seed, size, defect) for i in range(count)]
    return jobs


def _write_mvtec_image(folder: Path, split: str, i: int, seed: int, size: int, defect: str | None) -> None:
    r = _render_mvtec(folder.name, split, i, seed, size, defect)
    _write_png(folder / split / f"{i:03d}.png", _expose(r.defective, r.light, r.noise))
    if defect is not None:
        _write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", r.masks[0][1].astype(np.uint8) * 255)


def _loco_split(defect: str | None) -> str:
    if defect is None:
        return "good"
    return "logical_anomalies" if defect in LOGICAL_DEFECTS else "structural_anomalies"


def _loco_index(defect: str, i: int) -> int:
    """Stream index of the i-th image of a type: types share one numbering per test folder."""
    kinds = LOGICAL_DEFECTS if defect in LOGICAL_DEFECTS else LOCO_STRUCTURAL_DEFECTS
    return kinds.index(defect) * 100_000 + i


def _loco_jobs(folder: Path, seed: int, size: int, n_train: int, n_test_good: int,
               n_test_defect_per_type: int) -> list[Callable[[], None]]:
    folder.mkdir(parents=True, exist_ok=True)
    config = [{"defect_name": name, "pixel_value": value,
               "saturation_threshold": threshold if relative else max(1, int(round(threshold * (size / 256) ** 2))),
               "relative_saturation": relative} for name, value, threshold, relative in _LOCO_CONFIG]
    (folder / "defects_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    jobs = []
    goods = (("train/good", n_train), ("validation/good", max(1, n_train // 4)), ("test/good", n_test_good))
    for split, count in goods:
        (folder / split).mkdir(parents=True)
        jobs += [partial(_write_loco_image, folder, split, f"{i:03d}", split, i, seed, size, None)
                 for i in range(count)]
    for kinds in (LOGICAL_DEFECTS, LOCO_STRUCTURAL_DEFECTS):
        split = _loco_split(kinds[0])
        (folder / "test" / split).mkdir(parents=True)
        for k, defect in enumerate(kinds):
            jobs += [partial(_write_loco_image, folder, f"test/{split}", f"{k * n_test_defect_per_type + i:03d}", split,
                             _loco_index(defect, i), seed, size, defect) for i in range(n_test_defect_per_type)]
    return jobs


def _write_loco_image(folder: Path, subfolder: str, stem: str, split: str, index: int, seed: int, size: int,
                      defect: str | None) -> None:
    r = _render_loco(split, index, seed, size, defect)
    _write_png(folder / subfolder / f"{stem}.png", _expose(r.defective, r.light, r.noise))
    values = {name: value for name, value, _, _ in _LOCO_CONFIG}
    for m, (name, mask) in enumerate(r.masks):
        _write_png(folder / "ground_truth" / split / stem / f"{m:03d}.png", mask.astype(np.uint8) * values[name])


def _readme(kind: str, categories: Sequence[str], seed: int, size: int, n_train: int, n_test_good: int,
            n_test_defect_per_type: int) -> str:
    head = (f"Synthetic {'MVTec AD' if kind == 'mvtec' else 'MVTec LOCO'}-layout dataset written by "
            f"defectlens.data.synthetic.generate(kind={kind!r}, seed={seed}, size={size}).\n"
            f"Images are {size}x{size} RGB PNG; the same arguments reproduce every file byte for byte.\n"
            f"Categories: {', '.join(categories)}.\n\n")
    if kind == "mvtec":
        return head + (
            f"<category>/train/good: {n_train} normal images\n"
            f"<category>/test/good: {n_test_good} normal images\n"
            f"<category>/test/<defect>: {n_test_defect_per_type} images each of {', '.join(STRUCTURAL_DEFECTS)}\n"
            "<category>/ground_truth/<defect>/<stem>_mask.png: 0/255 masks of the altered pixels (dilated 1 px)\n\n"
            "fabric: plain-weave canvas; brushed_metal: brushed steel sheet; washer: keyed turned-steel washer\n"
            "on a belt. Normal images vary in texture phase, pose, lighting and sensor noise. Defects are\n"
            "small and low-contrast on purpose.\n")
    return head + (
        f"assembly/train/good: {n_train}, assembly/validation/good: {max(1, n_train // 4)}, "
        f"assembly/test/good: {n_test_good} normal images\n"
        f"assembly/test/logical_anomalies: {n_test_defect_per_type} each of "
        f"{', '.join(LOGICAL_DEFECTS)}, in that order\n"
        f"assembly/test/structural_anomalies: {n_test_defect_per_type} each of "
        f"{', '.join(LOCO_STRUCTURAL_DEFECTS)}, in that order\n"
        "assembly/ground_truth/<type>/<stem>/000.png, 001.png, ...: one mask per annotated region, valued\n"
        "by the defect's pixel_value in assembly/defects_config.json (0 elsewhere).\n\n"
        "Rules of a normal tray (2x3 compartments, read left to right, top row first): two silver screws;\n"
        "one steel hex nut; one orange disc; one blue disc; one yellow disc (blue left of yellow); one green\n"
        "cable. Positions within a compartment, small rotations, tray pose and lighting vary.\n"
        "Logical anomalies break a rule (a missing part is marked by its whole compartment, one screw too\n"
        "few or too many is a count violation that looks normal locally); structural ones are a scratch on\n"
        "the tray, a bent screw / chipped disc / cut cable, or a contamination.\n")
