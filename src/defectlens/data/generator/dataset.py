"""The generator's entry points: :func:`generate` writes a dataset, :func:`render_pair` re-renders
one test image with and without its defect. Both check their arguments here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import UsageError
from .defects import STRUCTURAL_DEFECTS
from .loco import ASSEMBLY, LOCO_CATEGORY, LOGICAL_DEFECTS, LocoScene, loco_index, loco_split
from .loco_photo import PHOTO_CATEGORY, PHOTO_CONFIG, PHOTO_STRUCTURAL_DEFECTS, RULES, render_photo_loco
from .mvtec import DEFAULT_MVTEC_CATEGORIES, MVTEC_CATEGORIES, render_mvtec
from .render import expose
from .writer import write_dataset


#: The LOCO-layout categories; the photo one is written only when real photos are given.
LOCO_CATEGORIES = (LOCO_CATEGORY, PHOTO_CATEGORY)
#: Where the photo category looks for its photos when ``photos`` is not given.
PHOTOS_ENV = "DEFECTLENS_PHOTOS"


def loco_scene(category: str, photos: str | os.PathLike | None = None) -> LocoScene:
    """The scene of a LOCO-layout category; the photo one reads its photos (UsageError when absent)."""
    if category == LOCO_CATEGORY:
        return ASSEMBLY
    from .photos import load_photos, photos_help

    root = photos if photos is not None else os.environ.get(PHOTOS_ENV)
    if root is None:
        raise UsageError(f"{PHOTO_CATEGORY} cuts its parts out of real photos: pass photos=DIR (--photos DIR, or set "
                         f"{PHOTOS_ENV}), {photos_help()}")
    pools = load_photos(str(Path(root).resolve()))
    return LocoScene(partial(render_photo_loco, photos=pools), PHOTO_STRUCTURAL_DEFECTS, PHOTO_CONFIG, RULES)


def render_pair(category: str, defect: str, seed: int = 0, index: int = 0, size: int = 256,
                photos: str | os.PathLike | None = None):
    """Render one test scene without and with ``defect`` from the same random streams.

    Returns ``(clean, defective, mask)``: two RGB uint8 images with identical sensor noise and the
    bool union of the defect's masks. ``defective`` and the mask are exactly what :func:`generate`
    writes for that category, defect and index, so the pair shows which pixels a defect changed.
    ``photos``: the real photos of the photo LOCO category (see :func:`generate`).
    """
    _check_size(size)
    if category in LOCO_CATEGORIES:
        scene = loco_scene(category, photos)
        kinds = LOGICAL_DEFECTS + scene.structural
        if defect not in kinds:
            raise UsageError(f"unknown {category} defect {defect!r}; expected one of {', '.join(kinds)}")
        rendering = scene.render(loco_split(defect), loco_index(defect, index, scene.structural), seed, size, defect)
    else:
        _check_categories([category], MVTEC_CATEGORIES)
        if defect not in STRUCTURAL_DEFECTS:
            raise UsageError(f"unknown defect {defect!r}; expected one of {', '.join(STRUCTURAL_DEFECTS)}")
        rendering = render_mvtec(category, f"test/{defect}", index, seed, size, defect)
    clean = expose(rendering.clean, rendering.light, rendering.noise)
    defective = expose(rendering.defective, rendering.light, rendering.noise)
    return clean, defective, np.any([m for _, m in rendering.masks], axis=0)


def generate(out: str | Path, kind: str = "mvtec", seed: int = 0, size: int = 256, n_train: int = 40,
             n_test_good: int = 20, n_test_defect_per_type: int = 8, categories: Sequence[str] | str | None = None,
             overwrite: bool = False, photos: str | os.PathLike | None = None) -> list[Path]:
    """Write a synthetic dataset under ``out`` and return the category folders written.

    ``kind="mvtec"``: MVTec AD layout per category with ``n_test_defect_per_type`` images of each of
    scratch, crack, hole, stain, deformation and 0/255 masks. ``categories`` is a list of names from
    ``MVTEC_CATEGORIES``, a comma-separated string, or ``"all"``; the default is fabric and washer
    (the demo's set). Each category draws from its own random streams, so one category's files do
    not depend on which others are written. ``kind="loco"``: MVTec LOCO layout for "assembly" with
    ``max(1, n_train // 4)`` validation images, five logical and three structural anomaly types,
    masks valued by ``defects_config.json``; ``categories`` may add (or be) "photo_assembly", the same
    rules with every surface cut out of real photos: ``photos`` names a folder holding BSData
    ``bsdata/ball_screw`` and DeepPCB ``deeppcb/pcb`` (default: the DEFECTLENS_PHOTOS variable), and
    the elpv-dataset package must be installed; without them naming the category is a UsageError,
    and ``"all"`` leaves it out with a warning. Same arguments give byte-identical files. A non-empty
    category folder is refused with FileExistsError unless ``overwrite`` (then it is replaced).
    """
    if kind not in ("mvtec", "loco"):
        raise UsageError(f"unknown kind {kind!r}; expected 'mvtec' or 'loco'")
    _check_size(size)
    if seed < 0 or min(n_train, n_test_good, n_test_defect_per_type) < 0:
        raise UsageError("seed and image counts must be non-negative")
    known = MVTEC_CATEGORIES if kind == "mvtec" else LOCO_CATEGORIES
    every = categories == "all"
    if categories is None:
        cats = list(DEFAULT_MVTEC_CATEGORIES if kind == "mvtec" else (LOCO_CATEGORY,))
    elif isinstance(categories, str):  # "all" or "a,b,c", as the command line gives them
        cats = list(known) if every else [c.strip() for c in categories.split(",") if c.strip()]
    else:
        cats = list(categories)
    cats = list(dict.fromkeys(cats))  # each named once, in the order given
    _check_categories(cats, known)
    scenes = None
    if kind == "loco":
        scenes = {}
        for category in cats:
            try:
                scenes[category] = loco_scene(category, photos)
            except UsageError as error:
                if not (every and category == PHOTO_CATEGORY):
                    raise
                warnings.warn(f"left out {category}: {error}", stacklevel=2)
        cats = list(scenes)
    return write_dataset(Path(out), kind, cats, seed, size, n_train, n_test_good, n_test_defect_per_type, overwrite,
                         scenes)


#: The largest side drawn: memory grows with its square (a side of 100,000 asked for 149 GiB and
#: failed after a half-written category), so a larger one is taken for a typo.
MAX_SIZE = 4096


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or not 64 <= size <= MAX_SIZE:
        raise UsageError(f"size must be a whole number of pixels from 64 to {MAX_SIZE}, got {size!r}")


def _check_categories(categories: Sequence[str], known: Sequence[str]) -> None:
    unknown = [c for c in categories if c not in known]
    if unknown or not categories:
        raise UsageError(f"unknown categories {unknown}; expected some of {', '.join(known)}")

