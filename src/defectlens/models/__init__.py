"""Detectors. Importing this package registers every method under its ``--method`` name.

Each method lives in its own sub-package (its folder name is its ``--method`` name) and is
imported here automatically, so adding a method means adding a folder. Methods that need
optional packages (transformers, diffusers) import them inside their functions.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Detector, ModelFileError, Prediction

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_METHOD = "patchcore"


def create_detector(method: str = DEFAULT_METHOD, **params) -> Detector:
    if method not in REGISTRY:
        raise ValueError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method](**params)


__all__ = ["DEFAULT_METHOD", "REGISTRY", "Detector", "ModelFileError", "Prediction", "create_detector"]
