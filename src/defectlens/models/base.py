"""The Detector contract, its Prediction, and the model file.

Model file: a safetensors file whose metadata holds the JSON config (method, parameters,
threshold, format version). No pickle anywhere, so a model file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from ..backbones import get_backbone
from ..data.io import image_list
from ..errors import DefectlensError, UsageError
from .calibration import DEFAULT_FPR, MIN_SCORES, NONE, Calibration, threshold_from_normal_scores
from .modelfile import FORMAT, FORMAT_VERSION, NORMAL_SCORES, ModelFileError, read_model_file
from .params import Constraint, ParameterError, check_names, check_values, get_param_names

REGISTRY: dict[str, type[Detector]] = {}


class NotFittedError(DefectlensError, RuntimeError):
    """``predict`` on a detector that has not been fitted (or loaded)."""


class LearningType(str, Enum):
    """What a method learns from; the engine builds the matching training set."""

    #: Nothing: ``fit([])`` works. Normal images, when given, are used as references (WinCLIP+)
    #: or ignored (musc scores each predict batch against itself).
    ZERO_SHOT = "zero-shot"
    #: Normal images only.
    NORMAL = "normal"
    #: Normal images plus a few real anomalies with masks (the ``anomalies`` parameter says how many).
    FEW_ANOMALIES = "few-anomalies"
    #: Labelled images, normal and anomalous with masks, of other categories (an auxiliary set).
    AUXILIARY = "auxiliary"


@dataclass
class Prediction:
    """Scores (higher = more anomalous) and anomaly maps at each input image's own resolution.

    ``maps`` is a float32 N×H×W array when all inputs share one size, otherwise a list of
    H_i×W_i arrays; ``None`` for methods without localisation. ``part_maps``: methods that
    segment images into parts (composition) give each image's H_i×W_i integer part classes.
    ``products``: models of several products that route each image (unified) give the product
    each image was scored as, None for an image of no known product; None for other methods.
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray] | None = None
    part_maps: list[np.ndarray] | None = None
    products: list[str | None] | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        # Detectors hand over one map per image; maps of one shape become one N×H×W array.
        if isinstance(self.maps, list) and self.maps and len({np.shape(m) for m in self.maps}) == 1:
            self.maps = np.stack(self.maps)

    def labels(self, threshold: float) -> np.ndarray:
        """True where a score is above the threshold (anomalous)."""
        return self.scores > threshold


def register(cls: type[Detector]) -> type[Detector]:
    REGISTRY[cls.name] = cls
    return cls


def checked_method(method: str, params: dict, path: str | os.PathLike) -> type[Detector]:
    """The detector class a model file's ``method`` names, its ``params`` checked against that
    class's constraints; ModelFileError naming ``path`` otherwise (``Detector.load``, ``info``)."""
    if method not in REGISTRY:
        raise ModelFileError(f"{path}: unknown method '{method}' (known: {', '.join(sorted(REGISTRY))})")
    try:
        REGISTRY[method].check_params(params)
    except ParameterError as error:
        raise ModelFileError(f"{path}: {error}") from None
    return REGISTRY[method]


class Detector:
    """Base of every method, in the manner of scikit-learn's estimators.

    A subclass defines ``name``, ``learning_type``, an ``__init__`` whose keyword parameters are
    all named (shared ones included) and stored unchanged as attributes of the same name, their
    ``parameter_constraints``, and ``fit_images`` / ``predict_images`` plus the tensors of its
    learned state. ``fit`` and ``predict`` here do what every method shares: parameter checks,
    the shape of the training set, empty input, and output checks. ``fit`` never changes a
    parameter; learned values live in other attributes.
    """

    name: ClassVar[str] = "detector"
    learning_type: ClassVar[LearningType] = LearningType.NORMAL
    #: How many images one ``predict`` call should get in batch loops; ``None`` = all at once,
    #: for transductive methods that score the images of a batch against each other (they also
    #: set their threshold from each batch).
    predict_chunk: ClassVar[int | None] = 8
    #: Chunks a batch loop (engine.predict) may have in flight: 2 where one chunk's second
    #: stage (``start_predict``: the search) fills the cores the next one's first stage (the
    #: forward) leaves idle; 1 (one chunk at a time) elsewhere.
    predict_in_flight: ClassVar[int] = 1
    #: Parameter name -> accepted values; merged along the class hierarchy.
    parameter_constraints: ClassVar[dict[str, Constraint]] = {}

    #: Decision threshold on scores, from held-out normal images only (models/calibration.py).
    threshold: float | None = None
    #: Scores of normal images the model did not see while fitting.
    normal_scores: np.ndarray | None = None
    #: (low, high) anomaly-map values for colouring heatmaps (see calibration.heatmap_range).
    map_range: tuple[float, float] | None = None
    #: The false-alarm rate the threshold was set for (``set_operating_point``).
    operating_fpr: float = DEFAULT_FPR
    _fitted: bool = False
    #: Parameters that say where weights are found (a local folder), not what was learned: moving
    #: the weights and setting the new place keeps a fitted detector fitted (``set_params``).
    weight_locations: tuple[str, ...] = ()

    # -- parameters -----------------------------------------------------------------------
    @classmethod
    def get_param_names(cls) -> list[str]:
        return get_param_names(cls)

    @classmethod
    def constraints(cls) -> dict[str, Constraint]:
        merged: dict[str, Constraint] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("parameter_constraints", {}))
        return {name: merged[name] for name in cls.get_param_names() if name in merged}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Raise :class:`ParameterError` for an unknown name or a value out of its constraint."""
        check_names(cls.name, params, cls.get_param_names())
        check_values(cls.name, params, cls.constraints())

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.get_param_names()}

    def set_params(self, **params: Any) -> Detector:
        """Set parameters; on a fitted detector a changed one (but ``weight_locations``) makes it
        unfitted, as its learned state (bank, threshold, held-out scores) came from the parameters
        it was fitted with: predicting or saving it would mix the two."""
        self.check_params(params)
        current = self.get_params()
        if self._fitted and any(current.get(key) != value for key, value in params.items() if key not in self.weight_locations):
            self._fitted = False
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def validate_params(self) -> None:
        self.check_params(self.get_params())

    def set_calibration(self, calibration: Calibration) -> None:
        self.normal_scores, self.threshold, self.map_range = calibration.normal_scores, calibration.threshold, calibration.map_range
        self.operating_fpr = DEFAULT_FPR

    def set_operating_point(self, fpr: float) -> float:
        """Move the threshold to where about ``fpr`` of good parts are flagged (0.01: one in a
        hundred), recomputed from the stored held-out normal scores by the calibration rule; the
        model file keeps it. Returns the threshold."""
        fpr = float(fpr) if isinstance(fpr, np.floating) else fpr  # a numpy rate is a rate
        if not (isinstance(fpr, (int, float)) and 0.0 < fpr < 1.0):
            raise UsageError(f"{self.name}: a target false-alarm rate must be between 0 and 1 (exclusive), not {fpr!r}")
        count = 0 if self.normal_scores is None else int(np.isfinite(self.normal_scores).sum())
        threshold = threshold_from_normal_scores(self.normal_scores, fpr) if count else None
        if threshold is None:
            raise UsageError(f"{self.name}: this model holds {count} held-out normal scores; an operating point needs at "
                             f"least {MIN_SCORES} (fit on more good images, or pass a threshold yourself)")
        self.threshold, self.operating_fpr = threshold, float(fpr)
        return threshold

    # -- contract -------------------------------------------------------------------------
    def fit(self, images: Sequence = (), masks: Sequence | None = None, labels: Sequence | None = None) -> Detector:
        """Learn from ``images`` (paths or arrays). ``labels`` (0 normal, 1 anomalous) and
        ``masks`` (one per image: None, an array, a path or a list of paths, see data.io.as_mask)
        matter to methods that learn from anomalies."""
        self.validate_params()
        images = image_list(images, f"{self.name}.fit")
        labels = [0] * len(images) if labels is None else [int(label) for label in labels]
        masks = [None] * len(images) if masks is None else list(masks)
        if not len(images) == len(labels) == len(masks):
            raise ValueError(f"{self.name}: {len(images)} images, {len(labels)} labels and {len(masks)} masks")
        if set(labels) - {0, 1}:
            raise ValueError(f"{self.name}: labels must be 0 (normal) or 1 (anomalous), got {sorted(set(labels) - {0, 1})}")
        normal = labels.count(0)
        if self.learning_type in (LearningType.NORMAL, LearningType.FEW_ANOMALIES) and not normal:
            raise ValueError(f"{self.name} learns from normal images: give at least one")
        if self.learning_type in (LearningType.NORMAL, LearningType.ZERO_SHOT) and normal < len(labels):
            raise ValueError(f"{self.name} learns from normal images only; fit got {len(labels) - normal} labelled anomalous")
        if self.learning_type in (LearningType.FEW_ANOMALIES, LearningType.AUXILIARY):
            unmasked = [i for i, (label, mask) in enumerate(zip(labels, masks)) if label == 1 and mask is None]
            if unmasked:
                raise ValueError(f"{self.name}: every anomalous image given to fit needs its mask (image {unmasked[0]} has none)")
        self.set_calibration(NONE)
        self.fit_images(images, masks, labels)
        self._fitted = True
        return self

    def predict(self, images: Sequence, maps: bool = True) -> Prediction:
        """Scores and maps of ``images`` (paths or arrays: RGB, gray, RGBA, float in [0, 1] or
        integer); maps at each image's own size. An empty input gives an empty prediction.
        ``maps=False``: the same scores without maps (``maps`` is None), for callers that write
        none; methods whose maps cost time of their own skip that work (``score_images``)."""
        return self.start_predict(images, maps)()

    def start_predict(self, images: Sequence, maps: bool = True) -> Callable[[], Prediction]:
        """``predict`` in two stages: the first (``staged_prediction``; patch detectors: the
        backbone forward) runs now, the rest is returned as a function that gives the
        Prediction, to call once, in any thread. A batch loop scores one chunk in another thread
        while the next chunk's first stage runs (engine.predict)."""
        images = image_list(images, f"{self.name}.predict")
        if not images:
            return lambda: Prediction(scores=np.zeros(0), maps=[] if maps else None)
        if not self._fitted:
            raise NotFittedError(f"{self.name}: call fit (or Detector.load) before predict")
        finish = self.staged_prediction(images, maps)

        def checked() -> Prediction:
            prediction = finish()
            if len(prediction.scores) != len(images):
                raise RuntimeError(f"{self.name} returned {len(prediction.scores)} scores for {len(images)} images")
            return prediction

        return checked

    def staged_prediction(self, images: list, maps: bool) -> Callable[[], Prediction]:
        """Do the first stage of predicting a non-empty list of ``images`` and return the rest.
        Here nothing is done before: ``predict_images`` (or ``score_images`` without maps) runs
        whole when the function is called. A method whose first stage is a forward on hardware it
        holds overrides it; its second stage must then be safe to run in another thread."""
        return partial(self.predict_images if maps else self.score_images, images)

    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        """Learn from checked inputs and set the calibration (``set_calibration``)."""
        raise NotImplementedError

    def predict_images(self, images: list) -> Prediction:
        """Score a non-empty list of images."""
        raise NotImplementedError

    def score_images(self, images: list) -> Prediction:
        """The scores of ``predict_images`` without maps. Override where the maps (or what only
        they need) cost time the scores do not; the scores must stay those of ``predict_images``."""
        return replace(self.predict_images(images), maps=None)

    # -- state ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors to store in the model file."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Small JSON-serialisable learned values (beyond parameters) to store in the model file."""
        return {}

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True)")
        if not self._fitted:
            raise NotFittedError(f"{self.name}: fit before saving (set_params after a fit needs a fit again)")
        self.validate_params()  # a dict given as a parameter may have changed since: no file load refuses
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give the model file's name")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "params": self.get_params(),
            "threshold": self.threshold,
            "operating_fpr": self.operating_fpr,
            "map_range": None if self.map_range is None else list(self.map_range),
            "extra": self.extra_state(),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        if self.normal_scores is not None:
            tensors[NORMAL_SCORES] = torch.as_tensor(np.asarray(self.normal_scores, np.float32))
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
        detector_cls = checked_method(method, config["params"], path)
        if cls is not Detector and not issubclass(detector_cls, cls):
            raise ModelFileError(f"{path}: holds a '{method}' model, not a {cls.name} model")
        detector = detector_cls(**config["params"])
        normal = tensors.pop(NORMAL_SCORES, None)
        detector.normal_scores = None if normal is None else normal.numpy().astype(np.float64)
        detector.threshold = config["threshold"]
        detector.operating_fpr = float(config.get("operating_fpr", DEFAULT_FPR))
        detector.map_range = None if config["map_range"] is None else tuple(config["map_range"])
        try:
            detector.load_state_tensors(tensors, config["extra"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise ModelFileError(f"{path}: the stored {method} state does not fit its parameters ({error})") from None
        detector._fitted = True
        return detector


class BackboneDetector(Detector):
    """A detector on the backbone named by its ``backbone`` parameter at its ``size``, built on
    first use: a loaded model that never predicts does not pay for the weights. Assigning
    ``backbone_network`` swaps in another implementation of the same features (an exported
    runtime)."""

    _backbone = None

    @property
    def backbone_network(self):
        if self._backbone is None:
            self._backbone = get_backbone(self.backbone, self.size)
        return self._backbone

    @backbone_network.setter
    def backbone_network(self, network) -> None:
        self._backbone = network
