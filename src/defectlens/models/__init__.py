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

# What `fit` uses without --method: the best mean image AUROC over the real-data suite's four sets
# (BSData, DeepPCB, ELPV mono and poly), full-shot and at 4 shots, leave-one-set-out checked
# (benchmarks/results/real_suite.md). Native resolution in tiles is what generalised: DeepPCB's
# defects, a few pixels across, vanish when its 640-px scans are squashed to 256 (patchknn 0.685
# square, 0.924 tiled; at 4 shots 0.588 -> 0.810) while the other sets keep or gain (ELPV's 300-px
# cells are one tile either way). Full-shot it leads the square padim + patchknn ensemble, the
# previous default, and at 4 shots every configuration measured, so one default serves any number
# of good images (squashed when its tiles would not fit engine.fit.TILED_FEATURE_BUDGET).
# PatchCore, the default until 2026-11-30, was last of the memory-bank detectors.
DEFAULT_METHOD = "patchknn"
DEFAULT_PARAMS = {"geometry": "tiles"}


def default_config() -> tuple[str, dict]:
    """The method and parameters `fit` and `benchmark` use when no method is named (explicit
    parameters override these)."""
    return DEFAULT_METHOD, dict(DEFAULT_PARAMS)


def describe_config(method: str, params: dict) -> str:
    """"patchknn with geometry=tiles": how the CLI names the configuration it took."""
    return method + (" with " + ", ".join(f"{key}={value}" for key, value in params.items()) if params else "")


def create_detector(method: str = DEFAULT_METHOD, **params) -> Detector:
    """The detector ``method`` with ``params``; a name it does not take or a value out of range
    is a :class:`ParameterError` naming what it accepts (the same message as ``--param``)."""
    if method not in REGISTRY:
        raise ParameterError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    REGISTRY[method].check_params(params)
    return REGISTRY[method](**params)


__all__ = ["DEFAULT_METHOD", "DEFAULT_PARAMS", "REGISTRY", "Detector", "LearningType", "ModelFileError", "NotFittedError", "ParameterError",
           "Prediction", "create_detector", "default_config", "describe_config"]
