"""The Detector contract, its Prediction, and the model file.

Model file: a safetensors file whose metadata holds the JSON config (method, parameters,
threshold, format version). No pickle anywhere, so a model file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..backbones import get_backbone

FORMAT = "defectlens-model"
FORMAT_VERSION = 1

REGISTRY: dict[str, type[Detector]] = {}


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or from a format version this defectlens cannot read."""


@dataclass
class Prediction:
    """Scores (higher = more anomalous) and anomaly maps at each input image's own resolution.

    ``maps`` is a float32 N×H×W array when all inputs share one size, otherwise a list of
    H_i×W_i arrays; ``None`` for methods without localisation. ``part_maps``: methods that
    segment images into parts (composition) give each image's H_i×W_i integer part classes.
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray] | None = None
    part_maps: list[np.ndarray] | None = None

    def __post_init__(self):
        # Detectors hand over one map per image; maps of one shape become one N×H×W array.
        if isinstance(self.maps, list) and self.maps and len({np.shape(m) for m in self.maps}) == 1:
            self.maps = np.stack(self.maps)

    def labels(self, threshold: float) -> np.ndarray:
        """True where a score is above the threshold (anomalous)."""
        return self.scores > threshold


def register(cls: type[Detector]) -> type[Detector]:
    REGISTRY[cls.name] = cls
    return cls


class Detector:
    """Base of every method. Subclasses define ``name``, ``__init__`` keyword parameters,
    ``fit``, ``predict``, and the tensors that make up their learned state."""

    name: ClassVar[str] = "detector"
    #: Zero-shot methods accept ``fit([])``.
    zero_shot: ClassVar[bool] = False
    #: How many images one ``predict`` call should get in batch loops; ``None`` = all at once,
    #: for transductive methods that score the images of a batch against each other.
    predict_chunk: ClassVar[int | None] = 8

    def __init__(self, **params: Any):
        self.params = params
        #: Decision threshold on scores, estimated from normal images only (see engine.threshold).
        self.threshold: float | None = None
        #: Scores of normal images the model did not see while fitting (held-out folds).
        self.normal_scores: np.ndarray | None = None
        #: (low, high) anomaly-map values for colouring heatmaps: typical and most anomalous
        #: values seen on held-out normal images.
        self.map_range: tuple[float, float] | None = None

    # -- contract -------------------------------------------------------------------------
    def fit(self, images: Sequence, masks=None, labels=None) -> Detector:
        raise NotImplementedError

    def predict(self, images: Sequence) -> Prediction:
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors to store in the model file."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Small JSON-serialisable learned values (beyond params) to store in the model file."""
        return {}

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True)")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "params": self.params,
            "threshold": self.threshold,
            "map_range": self.map_range,
            "extra": self.extra_state(),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        if self.normal_scores is not None:
            tensors["__normal_scores__"] = torch.as_tensor(np.asarray(self.normal_scores, np.float32))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write next to the target, then rename: an interrupted save never leaves half a file.
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"defectlens": json.dumps(config)})
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        config, tensors = read_model_file(path)
        method = config["method"]
        if method not in REGISTRY:
            raise ModelFileError(f"{path}: unknown method '{method}' (known: {', '.join(sorted(REGISTRY))})")
        detector_cls = REGISTRY[method]
        if cls is not Detector and not issubclass(detector_cls, cls):
            raise ModelFileError(f"{path}: holds a '{method}' model, not a {cls.name} model")
        detector = detector_cls(**config["params"])
        normal = tensors.pop("__normal_scores__", None)
        detector.normal_scores = None if normal is None else normal.numpy().astype(np.float64)
        detector.threshold = config.get("threshold")
        detector.map_range = tuple(config["map_range"]) if config.get("map_range") else None
        detector.load_state_tensors(tensors, config.get("extra", {}))
        return detector


class BackboneDetector(Detector):
    """A detector on the backbone named by ``params["backbone"]`` at ``params["size"]``, built on
    first use: a loaded model that never predicts does not pay for the weights."""

    _backbone = None

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = get_backbone(self.params["backbone"], self.params["size"])
        return self._backbone

    @backbone.setter
    def backbone(self, backbone) -> None:
        self._backbone = backbone


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
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
    version = config.get("format_version")
    if config.get("format") != FORMAT or not isinstance(version, int):
        raise ModelFileError(f"{path}: not a defectlens model file (format {config.get('format')!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version} is newer than this defectlens reads "
            f"(version {FORMAT_VERSION}); upgrade defectlens to load it"
        )
    return config, tensors
