"""Object categories: one part on a background, with pose, lighting and background varying per image;
defects land on the part only, deformations on its outline."""

from __future__ import annotations

import cv2
import numpy as np

from .defects import Scene
from .render import SUBPIXEL_BITS, Win, circle, coords, drop_shadow, fine_noise, lighting, smooth_noise


def washer(rng: np.random.Generator, size: int) -> Scene:
    """A keyed, turned steel washer on a dark belt: centre and key angle jitter per image."""
    s = size / 256
    yy, xx = coords(size)
    centre = np.full(2, (size - 1) / 2) + rng.normal(0.0, 2.5 * s, 2)
    rotation = np.deg2rad(np.clip(rng.normal(0.0, 5.0), -12, 12))
    r_out, r_in = 84 * s * rng.uniform(0.99, 1.01), 36 * s
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    circle(canvas, win, centre, r_out, 255)
    circle(canvas, win, centre, r_in, 0)
    # The key tab pointing into the bore makes the rotation visible.
    key = np.array([np.cos(rotation - np.pi / 2), np.sin(rotation - np.pi / 2)])
    side = np.array([-key[1], key[0]]) * 5 * s
    near, far = centre + key * (r_in - 9 * s), centre + key * (r_in + 2 * s)
    tab = win.fixed([near - side, near + side, far + side, far - side])
    cv2.fillPoly(canvas, [tab], 255, cv2.LINE_AA, SUBPIXEL_BITS)
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

    belt = 0.17 + 0.012 * smooth_noise(rng, size, 6) + 0.012 * fine_noise(rng, size, 0.8, 0.8)
    belt = belt[..., None] * np.float32([0.95, 1.0, 1.08])
    away = light_angle + np.pi
    shadow = drop_shadow(alpha, 2.5 * s * np.cos(away), 2.5 * s * np.sin(away) + 1.5 * s, 7 * s)
    a = alpha[..., None]
    image = belt * (1 - 0.6 * shadow[..., None]) * (1 - a) + metal * a
    sites = cv2.erode((alpha >= 1).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(3 * s))) > 0
    edge_sites = (np.abs(r - r_out) < 0.75) & (alpha > 0)
    return Scene(image.astype(np.float32), lighting(rng, size), alpha, sites, edge_sites, centre)

