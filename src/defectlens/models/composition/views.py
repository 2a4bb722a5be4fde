"""Jittered views of the normal shots: more references and more held-out scores from few shots.

A view is the shot as a slightly moved camera or tray would show it: a small rotation, scale and
shift, and an exposure change. Never a flip or a large rotation: the rules of an assembly are
chiral (a blue part left of a yellow one), so a mirrored shot would be a logical anomaly.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Largest jitter of a view: degrees, relative scale, share of the side, relative exposure; about
#: what tray pose and lighting vary between normal images of a fixed inspection station.
MAX_ROTATION, MAX_SCALE, MAX_SHIFT, MAX_GAIN = 2.0, 0.02, 0.02, 0.06


def jittered(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One view of an RGB uint8 image; borders are mirrored so no black wedge enters the view."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-MAX_ROTATION, MAX_ROTATION),
                                     1 + rng.uniform(-MAX_SCALE, MAX_SCALE))
    matrix[:, 2] += rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * (width, height)
    view = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(view.astype(np.float32) * (1 + rng.uniform(-MAX_GAIN, MAX_GAIN)), 0, 255).astype(np.uint8)


def shot_views(images: list[np.ndarray], count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The shots followed by ``count`` views of each, and the source shot of every image."""
    rng = np.random.default_rng(seed)
    views = [jittered(image, rng) for image in images for _ in range(count)]
    sources = np.concatenate([np.arange(len(images)), np.repeat(np.arange(len(images)), count)])
    return list(images) + views, sources
