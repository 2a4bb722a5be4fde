"""Augmented copies of the few normal training images ("few shots"), for detectors that keep a
memory of normal features: with k = 1, 2, 4 images the memory misses poses and positions a
good part can take; flipped, rotated and slightly shifted copies fill some of that in.

Options (the ``augment`` parameter of the patch detectors):

- ``none``: the images as given.
- ``flips``: + the left-right and the up-down mirror image.
- ``rot90``: + the image turned by 90°, 180° and 270°.
- ``flips+rot90``: + all seven other symmetries of the square (the two mirrors, the three
  turns, the two diagonal mirrors).
- ``shifts``: + four copies moved by 1/32 of the side (left, right, up, down; borders mirrored):
  half a feature cell of a stride-16 level at 256 px, so the memory also holds features from
  between the grid points a test image's patches can fall on.
- ``all``: ``flips+rot90`` and ``shifts``.

A turn by 90° or a diagonal mirror would change the shape of an image that is not (about)
square; every image is then brought to one training layout and would come out squashed, a
distortion no test image has, so those copies are left out for such images (the mirrors and the
180° turn keep the shape and stay).

Copies are for training only: predict never augments, and calibration holds out an image
together with its copies (see ``PatchDetector.fit_from_features``), so no held-out normal image
has a copy of itself in the memory it is scored against.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..data.io import as_image

AUGMENTS = ("none", "flips", "rot90", "flips+rot90", "shifts", "all")
#: Longer over shorter side up to which an image counts as square (its 90° turns keep the layout).
SQUARE_TOLERANCE = 1.05
#: Shift of the ``shifts`` copies, as a share of the image's side.
SHIFT_FRACTION = 1 / 32


def _is_square(image: np.ndarray) -> bool:
    height, width = image.shape[:2]
    return max(height, width) <= SQUARE_TOLERANCE * min(height, width)


def _mirrors(image: np.ndarray) -> list[np.ndarray]:
    return [image[:, ::-1], image[::-1, :]]


def _turns(image: np.ndarray) -> list[np.ndarray]:
    if not _is_square(image):
        return [np.rot90(image, 2)]
    return [np.rot90(image, 1), np.rot90(image, 2), np.rot90(image, 3)]


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The seven non-identity symmetries of the square (three for a non-square image)."""
    copies = _mirrors(image) + _turns(image)
    if _is_square(image):
        copies += [np.swapaxes(image, 0, 1), np.rot90(image, 2).swapaxes(0, 1)]
    return copies


def _shifts(image: np.ndarray) -> list[np.ndarray]:
    height, width = image.shape[:2]
    dy, dx = max(1, round(height * SHIFT_FRACTION)), max(1, round(width * SHIFT_FRACTION))
    copies = []
    for x, y in ((dx, 0), (-dx, 0), (0, dy), (0, -dy)):
        matrix = np.float32([[1, 0, x], [0, 1, y]])
        copies.append(cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_REFLECT_101))
    return copies


def augmented_copies(image: np.ndarray, augment: str) -> list[np.ndarray]:
    """The transformed copies of ``image`` (H, W[, C]) that ``augment`` adds, without the image
    itself, in a fixed order; contiguous arrays."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {augment!r}")
    copies = {"none": lambda: [], "flips": lambda: _mirrors(image), "rot90": lambda: _turns(image),
              "flips+rot90": lambda: _symmetries(image), "shifts": lambda: _shifts(image),
              "all": lambda: _symmetries(image) + _shifts(image)}[augment]()
    return [np.ascontiguousarray(copy) for copy in copies]


def augments(augment: str, max_images: int, count: int) -> bool:
    """Whether ``count`` normal training images get copies: ``augment`` is not none and there
    are at most ``max_images`` of them (with many images the copies add little and cost a
    feature pass each)."""
    return augment != "none" and 0 < count <= max_images


def augmented_set(images: list, augment: str, max_images: int) -> tuple[list[np.ndarray], np.ndarray] | None:
    """The copies of the normal training ``images`` (paths or arrays) and, for each copy, the
    index of the image it was made from; None when ``augment`` adds nothing for this many."""
    if not augments(augment, max_images, len(images)):
        return None
    copies, sources = [], []
    for index, image in enumerate(images):
        made = augmented_copies(as_image(image), augment)
        copies += made
        sources += [index] * len(made)
    return (copies, np.asarray(sources)) if copies else None
