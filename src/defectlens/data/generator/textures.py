"""Texture categories: a surface that fills the whole image, with defects anywhere inside a margin."""

from __future__ import annotations

import cv2
import numpy as np

from .defects import Scene, texture_scene
from .render import coords, fine_noise, lighting, smooth_noise


def fabric(rng: np.random.Generator, size: int) -> Scene:
    """Plain-weave canvas: warp and weft threads alternate over/under, with per-thread yarn
    variation, fibre noise, a random phase and a slight skew."""
    s = size / 256
    yy, xx = coords(size)
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
    warp *= rng.normal(1.0, 0.06, 64)[iu.astype(np.int64) % 64] * (1 + 0.12 * fine_noise(rng, size, 0.6 * s, 3 * s))
    weft *= rng.normal(1.0, 0.06, 64)[iv.astype(np.int64) % 64] * (1 + 0.12 * fine_noise(rng, size, 3 * s, 0.6 * s))
    tint = rng.normal(1.0, 0.015, 3)
    warp_colour, weft_colour = np.float32([0.56, 0.50, 0.41]) * tint, np.float32([0.66, 0.61, 0.52]) * tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    mottle = 1.0 + 0.03 * smooth_noise(rng, size, 5)
    image = ((0.3 + 0.7 * np.where(warp_on_top, warp, weft)) * mottle)[..., None] * colour
    return texture_scene(image.astype(np.float32), lighting(rng, size), contrast=1.5)


def brushed_metal(rng: np.random.Generator, size: int) -> Scene:
    """Brushed steel: long parallel grain, a broad sheen across it, a slight random tilt."""
    s = size / 256
    pad = size // 8
    n = size + 2 * pad
    # Noise stretched 16× along x reads as brushing marks; a fine layer adds short scratches.
    grain = rng.standard_normal((n, max(n // 16, 4))).astype(np.float32)
    grain = cv2.resize(grain, (n, n), interpolation=cv2.INTER_CUBIC)
    grain = 0.7 * grain / grain.std() + 0.3 * fine_noise(rng, n, 5 * s, 0.5 * s)
    tilt = cv2.getRotationMatrix2D((n / 2, n / 2), rng.normal(0.0, 1.5), 1.0)
    tilt[:, 2] -= pad
    grain = cv2.warpAffine(grain, tilt, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    yy, xx = coords(size)
    sheen = np.exp(-(((xx - rng.uniform(0.2, 0.8) * size) / (0.35 * size)) ** 2))
    shade = 0.50 + 0.045 * grain + 0.10 * sheen
    image = shade[..., None] * (np.float32([0.97, 1.0, 1.05]) * rng.normal(1.0, 0.01, 3).astype(np.float32))
    return texture_scene(image.astype(np.float32), lighting(rng, size))


