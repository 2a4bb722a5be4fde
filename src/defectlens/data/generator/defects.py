"""What an MVTec-layout category draws (a :class:`Scene`) and the structural defects drawn on it.

A defect is a function ``(scene, rng, size) -> (image, support)``: it alters the scene's reflectance
only where it draws, and returns the bool support of what it drew, from which the mask is made. The
scene says where defects may start (``sites``), where a deformation may sit (``edge_sites``) and
how strong a defect must be to show on it (``contrast``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from .render import Win, circle, coords, curve, path_alpha, pick

STRUCTURAL_DEFECTS = ("scratch", "crack", "hole", "stain", "deformation")


@dataclass
class Scene:
    image: np.ndarray  # H×W×3 float32 reflectance
    light: np.ndarray
    surface: np.ndarray  # H×W coverage of the inspected surface: defects are clipped to it
    sites: np.ndarray  # H×W bool: where a surface defect may start
    edge_sites: np.ndarray  # H×W bool: where a deformation may be centred
    centre: np.ndarray | None = None  # part centre; deformations push along its radius
    contrast: float = 1.0  # defect strength: a busy texture hides what a plain surface shows


def texture_scene(image: np.ndarray, light: np.ndarray, contrast: float = 1.0) -> Scene:
    size = image.shape[0]
    margin = max(2, int(0.1 * size))
    sites = np.zeros((size, size), bool)
    sites[margin:-margin, margin:-margin] = True
    return Scene(image, light, np.ones((size, size), np.float32), sites, sites, contrast=contrast)


def object_scene(image: np.ndarray, light: np.ndarray, alpha: np.ndarray, centre, contrast: float = 1.0) -> Scene:
    """A part of coverage ``alpha`` on a background: surface defects start well inside the part,
    deformations sit on its anti-aliased outline and push along the radius from ``centre``."""
    s = alpha.shape[0] / 256
    inside = (alpha >= 1).astype(np.uint8)
    sites = cv2.erode(inside, np.ones((3, 3), np.uint8), iterations=max(1, int(3 * s))) > 0
    edge_sites = (alpha > 0.25) & (alpha < 0.75)
    return Scene(image.astype(np.float32), light, alpha, sites, edge_sites, np.asarray(centre, np.float64), contrast)


def _scratch(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin curved line, slightly lighter or darker, fading at both ends."""
    path = curve(rng, pick(rng, scene.sites), rng.uniform(0.12, 0.35) * size, rng.uniform(-0.8, 0.8), 0.04, 24)
    fade = np.sin(np.pi * np.linspace(0.04, 0.96, len(path) - 1)) ** 0.5
    alpha = path_alpha(Win.full(size), [path], int(rng.choice([1, 1, 2])), [fade]) * scene.surface
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.07, 0.15) * scene.contrast
    return scene.image + delta * alpha[..., None], alpha > 0


def _crack(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Jagged dark polyline with a few side branches."""
    s = size / 256
    length = rng.uniform(0.08, 0.2) * size
    steps = max(6, int(length / (2.5 * max(s, 0.5))))
    trunk = curve(rng, pick(rng, scene.sites), length, rng.uniform(-0.5, 0.5), 0.45, steps)
    paths = [trunk]
    for _ in range(rng.integers(1, 4)):
        start = trunk[rng.integers(len(trunk) // 4, len(trunk) - 1)]
        paths.append(curve(rng, start, rng.uniform(0.25, 0.5) * length, rng.uniform(-0.6, 0.6), 0.45, 8))
    alpha = path_alpha(Win.full(size), paths, 1) * scene.surface
    darkening = min(0.9, rng.uniform(0.35, 0.6) * scene.contrast)
    return scene.image * (1 - darkening * alpha[..., None]), alpha > 0


def _hole(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A cluster of small pits: craters lit on one wall, shadowed on the other, with a raised rim."""
    s = size / 256
    centre = pick(rng, scene.sites)
    light = rng.uniform(0, 2 * np.pi)
    win = Win.full(size)
    yy, xx = coords(size)
    rim = np.zeros(win.shape, np.uint8)
    depth = np.zeros(win.shape, np.float32)
    for k in range(rng.integers(1, 5)):
        c = centre if k == 0 else centre + rng.normal(0, 5 * s, 2)
        radius = max(1.2, (rng.uniform(5, 7) if rng.random() < 0.2 else rng.uniform(1.5, 3.8)) * s)
        circle(rim, win, c, radius + max(1.0, 1.2 * s), 255)
        core = np.zeros(win.shape, np.uint8)
        circle(core, win, c, radius, 255)
        slope = np.clip(((xx - c[0]) * np.cos(light) + (yy - c[1]) * np.sin(light)) / radius, -1, 1)
        depth = np.maximum(depth, core.astype(np.float32) / 255 * (0.7 + 0.3 * slope))
    depth *= scene.surface
    rim_a = np.clip(rim.astype(np.float32) / 255 * scene.surface - (depth > 0), 0, 1)
    darkening = min(0.9, rng.uniform(0.35, 0.6) * scene.contrast)
    image = scene.image * (1 - darkening * depth[..., None]) + 0.07 * scene.contrast * rim_a[..., None]
    return image, (depth > 0) | (rim_a > 0)


def _stain(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-contrast soft blob with a colour cast (oil, rust, dried water); zero outside its rim."""
    s = size / 256
    centre = pick(rng, scene.sites)
    radius = max(4.0, (rng.uniform(18, 32) if rng.random() < 0.25 else rng.uniform(6, 18)) * s)
    yy, xx = coords(size)
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


def _deformation(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local warp: a dent or bulge of the part boundary, or a pushed patch of texture; the tilted
    flanks also catch the light differently."""
    s = size / 256
    centre = pick(rng, scene.edge_sites)
    radius = max(4.0, rng.uniform(9, 18) * s)
    if scene.centre is None:
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
    else:  # push along the part's radius: inwards (a dent) more often than outwards
        direction = (centre - scene.centre) / np.linalg.norm(centre - scene.centre)
        direction *= -1 if rng.random() < 0.7 else 1
    amplitude = rng.uniform(0.3, 0.5) * radius  # below radius / 1.54 the warp never folds over
    light = rng.uniform(0, 2 * np.pi)
    win = Win.around(centre, radius + 1, size)
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


STRUCTURAL: dict[str, Callable] = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "deformation": _deformation}
