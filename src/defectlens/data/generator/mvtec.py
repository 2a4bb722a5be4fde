"""The MVTec AD-layout categories: the scene each one draws, and one image rendered from its streams.

A category's name also keys its random streams, so adding a category never changes another's files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .defects import STRUCTURAL, Scene
from .objects import capsule, connector, gear, hex_nut, screw, washer
from .render import Rendering, dilate, streams
from .textures import brushed_metal, fabric, leaf, leather, perforated_metal, tiles, wood

# name -> (scene drawer, one line for the dataset README)
_CATEGORIES: dict[str, tuple[Callable[[np.random.Generator, int], Scene], str]] = {
    "fabric": (fabric, "plain-weave canvas"),
    "washer": (washer, "keyed turned-steel washer on a belt"),
    "brushed_metal": (brushed_metal, "brushed steel sheet"),
    "wood": (wood, "planed wood with growth rings and pores"),
    "tiles": (tiles, "glazed pale-blue square tiles in a grout grid"),
    "leaf": (leaf, "close-up of a leaf blade with midrib and veins"),
    "leather": (leather, "pebbled oxblood leather"),
    "screw": (screw, "slotted steel machine screw on white paper, at any angle"),
    "capsule": (capsule, "red-and-ivory capsule on a dark slate tray, at any angle"),
    "hex_nut": (hex_nut, "brass hex nut on a blue rubber mat"),
    "connector": (connector, "cream 2x6 pin header on a green circuit board"),
    "perforated_metal": (perforated_metal, "perforated steel sheet, holes on a staggered grid"),
    "gear": (gear, "blued-steel spur gear on kraft card"),
}
MVTEC_CATEGORIES = tuple(_CATEGORIES)
DEFAULT_MVTEC_CATEGORIES = ("fabric", "washer")
DESCRIPTIONS = {name: description for name, (_, description) in _CATEGORIES.items()}


def render_mvtec(category: str, split: str, index: int, seed: int, size: int, defect: str | None) -> Rendering:
    """One scene of ``category`` from the streams of (seed, category, split, index), with ``defect``
    (or none) drawn on it and its mask."""
    scene_stream, defect_stream, noise_stream = streams(seed, category, split, index)
    scene = _CATEGORIES[category][0](np.random.default_rng(scene_stream), size)
    if defect is None:
        return Rendering(scene.image, scene.image, scene.light, noise_stream, [])
    image, support = STRUCTURAL[defect](scene, np.random.default_rng(defect_stream), size)
    return Rendering(scene.image, image.astype(np.float32), scene.light, noise_stream, [(defect, dilate(support))])
