"""Detectors. Importing this package registers every method under its ``--method`` name.

Each method lives in its own sub-package (its folder name is its ``--method`` name) and is
imported here automatically, so adding a method means adding a folder. Methods that need
optional packages (transformers, diffusers) import them inside their functions.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil

from .base import REGISTRY, Detector, LearningType, NotFittedError, Prediction
from .modelfile import ModelFileError
from .params import ParameterError

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

# What `fit` uses without --method, by how many good images it learns from: the best mean image
# AUROC over the real-data suite's four sets (BSData, DeepPCB, ELPV mono and poly), leave-one-set-out
# checked (benchmarks/results/real_suite.md). Native resolution in tiles is what generalised:
# DeepPCB's defects, a few pixels across, vanish when its 640-px scans are squashed to 256
# (patchknn 0.685 square, 0.924 tiled; at 4 shots 0.588 -> 0.810; ELPV's 300-px cells are one tile
# either way). With few images, tiled patchknn leads every configuration measured (4-shot mean
# 0.887 over 5 draws of the shots) but its own copy with flipped shots (0.889: two sets up, two down, the
# left-out mean not up; README, "Few shots"). From MANY_IMAGES on, the padim + patchknn ensemble in tiles, fused by a soft
# maximum of the member z-scores, with patchknn's bank at 65,536 rows searched by IVF, leads full-shot (see
# MANY_IMAGES_PARAMS): PaDiM adds what patchknn misses on the aligned sets (BSData, ELPV), the
# soft maximum keeps patchknn's lead where PaDiM is blind (DeepPCB) and, where the two agree,
# averages their noise (0.9611 against the plain maximum's 0.9599; a temperature chosen on only three
# of the sets would not have been 0.5 with DeepPCB left out: see README). Either is squashed when its tiles
# would not fit engine.fit.TILED_FEATURE_BUDGET. PatchCore, the default until 2026-11-30, was last.
DEFAULT_METHOD = "patchknn"
DEFAULT_PARAMS = {"geometry": "tiles"}
#: From this many good images the default is the ensemble below (PaDiM's per-position Gaussians
#: need images to estimate; an ensemble cannot be normalised on one). Measured on the four real sets
#: in tiles (2026-12-03; BSData and DeepPCB on 200 test images; mean image AUROC, ensemble against
#: tiled patchknn): 32 shots 0.937 / 0.943 (2-3 draws), 64 shots 0.956 / 0.956 (2 draws), 128 shots
#: 0.960 / 0.956 (3 draws, the ensemble ahead on every set), full-shot 0.961 / 0.935. Below 128 the
#: ensemble's normal-only threshold also caught far fewer defects (BSData TPR 0.00-0.08 against
#: 0.66-0.76 at 32 and 64 shots; 0.40 against 0.82 at 128). It was 32, chosen on ELPV alone.
MANY_IMAGES = 128
MANY_IMAGES_METHOD = "ensemble"
MANY_IMAGES_PARAMS = {"geometry": "tiles", "fusion": "soft_max", "members": ["padim", "patchknn"],
                      "member_params": {"patchknn": {"bank_size": 65536, "search": "ivf"}}}


def default_config(normal_images: int | None = None) -> tuple[str, dict]:
    """The method and parameters `fit` and `benchmark` use when no method is named, for
    ``normal_images`` good training images (None: many); explicit parameters override these."""
    if normal_images is None or normal_images >= MANY_IMAGES:
        return MANY_IMAGES_METHOD, copy.deepcopy(MANY_IMAGES_PARAMS)
    return DEFAULT_METHOD, dict(DEFAULT_PARAMS)


def describe_config(method: str, params: dict) -> str:
    """"patchknn with geometry=tiles": how the CLI names the configuration it took (values as
    --param takes them)."""
    return method + (" with " + ", ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                                           for key, value in params.items()) if params else "")


def create_detector(method: str = DEFAULT_METHOD, **params) -> Detector:
    """The detector ``method`` with ``params``; a name it does not take or a value out of range
    is a :class:`ParameterError` naming what it accepts (the same message as ``--param``)."""
    if method not in REGISTRY:
        raise ParameterError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    REGISTRY[method].check_params(params)
    return REGISTRY[method](**params)


__all__ = ["DEFAULT_METHOD", "DEFAULT_PARAMS", "MANY_IMAGES", "MANY_IMAGES_METHOD", "MANY_IMAGES_PARAMS", "REGISTRY", "Detector", "LearningType", "ModelFileError", "NotFittedError", "ParameterError",
           "Prediction", "create_detector", "default_config", "describe_config"]
