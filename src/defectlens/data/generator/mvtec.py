"""The MVTec AD-layout categories: the scene each one draws, and one image rendered from its streams.

A category's name also keys its random streams, so adding a category never changes another's files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .defects import STRUCTURAL, Scene
from .objects import washer
from .render import Rendering, dilate, streams
from .textures import brushed_metal, fabric

# name -> (scene drawer, one line for the dataset README)
_CATEGORIES: dict[str, tuple[Callable[[np.random.Generator, int], Scene], str]] = {
    "fabric": (fabric, "plain-weave canvas"),
    "washer": (washer, "keyed turned-steel washer on a belt"),
    "brushed_metal": (brushed_metal, "brushed steel sheet"),
}
MVTEC_CATEGORIES = tuple(_CATEGORIES)
DEFAULT_MVTEC_CATEGORIES = ("fabric", "washer")
DESCRIPTIONS = {name: description for name, (_, description) in _CATEGORIES.items()}


def render_mvtec(category: str, split: str, index: int, seed: int, size: int, defect: str | None) -> Rendering:
    scene_stream, defect_stream, noise_stream = streams(seed, category, split, index)
    scene = _CATEGORIES[category][0](np.random.default_rng(scene_stream), size)
    if defect is None:
        return Rendering(scene.image, scene.image, scene.light, noise_stream, [])
    image, support = STRUCTURAL[defect](scene, np.random.default_rng(defect_stream), size)
    return Rendering(scene.image, image.astype(np.float32), scene.light, noise_stream, [(defect, dilate(support))])
