"""Detectors. Importing this package registers every method under its ``--method`` name."""

from __future__ import annotations

from .base import REGISTRY, Detector, ModelFileError, Prediction
from .padim import PaDiM
from .patchcore import PatchCore
from .patchknn import PatchKNN
from .spade import SPADE

DEFAULT_METHOD = "patchcore"


def create_detector(method: str = DEFAULT_METHOD, **params) -> Detector:
    if method not in REGISTRY:
        raise ValueError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method](**params)


__all__ = ["Detector", "Prediction", "ModelFileError", "REGISTRY", "DEFAULT_METHOD", "create_detector",
           "PatchCore", "PaDiM", "SPADE", "PatchKNN"]
