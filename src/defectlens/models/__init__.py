"""Detectors. Importing this package registers every method under its ``--method`` name.

Each method lives in its own sub-package (its folder name is its ``--method`` name) and is
imported here automatically, so adding a method means adding a folder. Methods that need
optional packages (transformers, diffusers) import them inside their functions.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Detector, LearningType, ModelFileError, NotFittedError, Prediction
from .params import ParameterError

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

# What `fit` uses without --method, by how many normal images it learns from: the best mean image
# AUROC over the real-data suite's four sets (BSData, DeepPCB, ELPV mono and poly), leave-one-set-out
# checked (benchmarks/results/real_suite.md). At 4 shots patchknn leads on every set (mean 0.821;
# the padim+patchknn ensemble 0.798); full-shot the ensemble leads (0.881; patchknn 0.867). The suite
# measured 4 shots and full sets (200-900 images); MANY_IMAGES sits between them, where PaDiM's
# per-position covariances have enough images to be estimated. PatchCore, the default until
# 2026-11-30, was last of the memory-bank detectors on the mean at both.
DEFAULT_METHOD = "patchknn"
MANY_IMAGES_METHOD = "ensemble"
MANY_IMAGES = 32


def default_method(normal_images: int) -> str:
    """The method `fit` uses when none is named, for ``normal_images`` good training images."""
    return MANY_IMAGES_METHOD if normal_images >= MANY_IMAGES else DEFAULT_METHOD


def create_detector(method: str = DEFAULT_METHOD, **params) -> Detector:
    """The detector ``method`` with ``params``; a name it does not take or a value out of range
    is a :class:`ParameterError` naming what it accepts (the same message as ``--param``)."""
    if method not in REGISTRY:
        raise ParameterError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    REGISTRY[method].check_params(params)
    return REGISTRY[method](**params)


__all__ = ["DEFAULT_METHOD", "MANY_IMAGES", "MANY_IMAGES_METHOD", "REGISTRY", "Detector", "LearningType", "ModelFileError", "NotFittedError", "ParameterError",
           "Prediction", "create_detector", "default_method"]
