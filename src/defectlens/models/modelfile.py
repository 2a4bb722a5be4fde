"""The model file as read from disk: a safetensors file whose ``defectlens`` metadata entry is
the JSON config, and the checks on that config, field by field, before anything is built from it.

A model file may come from another version, another tool or a careless edit: each wrong field
gets a one-line :class:`ModelFileError` naming the file, the field and what was found, instead
of a traceback from deep inside a detector.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import DefectlensError
from .calibration import DEFAULT_FPR, threshold_from_normal_scores

FORMAT = "defectlens-model"
#: 2: PaDiM keeps its precisions' upper triangles, patchknn / patchcore an IVF index's centroids
#: (version 1 files still load; version 1 readers refuse version 2 files by name instead of failing).
FORMAT_VERSION = 2
#: The tensor of held-out normal scores a model file keeps beside its method's own.
NORMAL_SCORES = "__normal_scores__"


class ModelFileError(DefectlensError, ValueError):
    """A model file is missing, corrupt, or from a format version this defectlens cannot read."""


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors of the model file at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file (a .dlmodel file that `fit -o` wrote)")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a defectlens model file ({error})") from None
    if "defectlens" not in metadata:
        raise ModelFileError(f"{path}: a safetensors file, but not a defectlens model (no 'defectlens' metadata)")
    try:
        config = json.loads(metadata["defectlens"])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: corrupt model config ({error})") from None
    validate_model_config(config, path)
    # A fitted model never holds NaN or infinity; one that does (damaged, or edited by hand) would
    # score every image the same without a word, so it is refused here.
    damaged = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not _finite(tensor)]
    if damaged:
        raise ModelFileError(f"{path}: damaged model file: {', '.join(sorted(damaged))} holds NaN or infinite values "
                             "(fit the model again)")
    return config, tensors


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: numpy's check, about 8 ms for the default model's 13 million
    values where torch.isfinite took 56 (every predict process loads a model)."""
    values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    return bool(np.isfinite(values.numpy()).all())


#: False-alarm rates ``describe_model_file`` gives the threshold of.
OPERATING_FPRS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


def describe_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """What the model file at ``path`` holds, read without building its detector: method,
    parameters, threshold and the false-alarm rate it was set for, the held-out normal scores'
    count and range, the threshold each of ``OPERATING_FPRS`` would take (the calibration rule
    on those scores, as ``--target-fpr`` sets it; None with fewer than three), the heatmap range,
    the products of a multi-product model (None for others), and each stored tensor's shape and type."""
    config, tensors = read_model_file(path)
    normal = tensors.pop(NORMAL_SCORES, None)
    scores = np.zeros(0) if normal is None else normal.numpy().astype(np.float64)
    scores = scores[np.isfinite(scores)]
    return {
        "path": os.fspath(path),
        "bytes": os.path.getsize(path),
        "method": config["method"],
        "format_version": config["format_version"],
        "params": config["params"],
        "threshold": config.get("threshold"),
        "operating_fpr": config.get("operating_fpr", DEFAULT_FPR),
        "normal_scores": {"count": int(scores.size),
                          **({"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())}
                             if scores.size else {})},
        "operating_points": [{"fpr": fpr, "threshold": threshold_from_normal_scores(scores, fpr)} for fpr in OPERATING_FPRS],
        "map_range": config.get("map_range"),
        "products": config.get("extra", {}).get("products"),
        "tensors": {name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                    for name, tensor in tensors.items()},
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_model_config(config: Any, path: str | os.PathLike) -> None:
    """Raise :class:`ModelFileError` unless ``config`` is a well-formed model config:
    ``format`` the defectlens format name, ``format_version`` an integer this version reads,
    ``method`` a non-empty string, ``params`` an object with string keys, ``threshold`` a finite
    number or null, ``operating_fpr`` a number between 0 and 1, ``map_range`` two finite numbers
    (low <= high) or null, ``extra`` an object. ``threshold``, ``operating_fpr``, ``map_range`` and
    ``extra`` may be absent (no threshold, the default rate, no range, nothing)."""

    def wrong(field: str, expected: str, value: Any) -> ModelFileError:
        return ModelFileError(f"{os.fspath(path)}: model file field '{field}' must be {expected}, not {_shown(value)}")

    if not isinstance(config, dict):
        raise ModelFileError(f"{os.fspath(path)}: model config must be a JSON object, not {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ModelFileError(f"{os.fspath(path)}: not a defectlens model file (format {config.get('format')!r}, "
                             f"expected {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise wrong("format_version", "a positive integer", version)
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{os.fspath(path)}: model file format version {version} is newer than this defectlens "
                             f"reads (version {FORMAT_VERSION}); upgrade defectlens to load it")
    method = config.get("method")
    if not isinstance(method, str) or not method:
        raise wrong("method", "a method name", method)
    params = config.get("params")
    if not isinstance(params, dict):
        raise wrong("params", "an object of parameter names to values", params)
    threshold = config.get("threshold")
    if threshold is not None and not (_is_number(threshold) and math.isfinite(threshold)):
        raise wrong("threshold", "a finite number or null", threshold)
    fpr = config.get("operating_fpr", DEFAULT_FPR)
    if not (_is_number(fpr) and 0.0 < fpr < 1.0):
        raise wrong("operating_fpr", "a number between 0 and 1", fpr)
    map_range = config.get("map_range")
    if map_range is not None:
        if not (isinstance(map_range, list) and len(map_range) == 2
                and all(_is_number(v) and math.isfinite(v) for v in map_range)):
            raise wrong("map_range", "two finite numbers [low, high] or null", map_range)
        if not map_range[0] <= map_range[1]:
            raise wrong("map_range", "[low, high] with low <= high", map_range)
    extra = config.get("extra", {})
    if not isinstance(extra, dict):
        raise wrong("extra", "an object", extra)
