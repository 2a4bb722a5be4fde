"""What a detector learns from, and fitting it on a dataset folder.

One function, :func:`training_set`, turns a dataset and a method's ``learning_type`` into the
images, masks and labels that ``Detector.fit`` takes; ``defectlens fit``, the benchmark and the
scripts under benchmarks/ all go through it, so a method learns from the same thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.datasets import Dataset, Sample, load_dataset
from ..data.kshot import sample_shots
from ..errors import DatasetError
from .. import models
from ..models import REGISTRY, Detector, LearningType, ParameterError, create_detector, default_config


@dataclass
class TrainingSet:
    """What ``fit`` gets: image paths, one mask per image (None, or the mask file paths of an
    anomalous image) and labels (0 normal, 1 anomalous). ``from_test``: test images it took
    (real anomaly examples), which an evaluation must leave out."""

    images: list[Path] = field(default_factory=list)
    masks: list[tuple[Path, ...] | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    from_test: set[Path] = field(default_factory=set)

    @classmethod
    def of(cls, samples: list[Sample], from_test: set[Path] | None = None) -> TrainingSet:
        # A plain folder's images are unlabelled (-1): the user gives them as normal.
        return cls([s.path for s in samples], [s.mask_paths if s.label == 1 else None for s in samples],
                   [1 if s.label == 1 else 0 for s in samples], from_test or set())

    @property
    def normal_count(self) -> int:
        return self.labels.count(0)

    def fit(self, detector: Detector) -> Detector:
        return detector.fit(self.images, masks=self.masks, labels=self.labels)


def normal_training_samples(dataset: Dataset) -> list[Sample]:
    """The normal images a detector may learn from: train/good of a dataset, or every image of a
    plain folder (which the user gives as normal)."""
    if dataset.kind == "folder":
        return [s for s in dataset.test if s.label in (0, -1)]
    return [s for s in dataset.train if s.label == 0]


def training_set(dataset: Dataset, learning_type: LearningType, shots: int | None = None, seed: int = 0,
                 anomalies: int = 0, labelled: list[Dataset] | None = None) -> TrainingSet:
    """The training set of a method that learns from ``learning_type``.

    ``shots``: how many normal images (picked with ``seed``); None = all of them, 0 = none
    (zero-shot). Methods that learn from a few anomalies also get ``anomalies`` test images with
    masks (picked with ``seed``, listed in ``from_test``). Methods that learn from a labelled
    auxiliary set get every labelled image of ``labelled`` (default: of ``dataset``) when
    ``shots`` is None; given shots, they get normal images of the target, to calibrate on.
    """
    if learning_type == LearningType.AUXILIARY and shots is None:
        samples = [s for d in (labelled or [dataset]) for s in (*d.train, *d.validation, *d.test) if s.label in (0, 1)]
        return TrainingSet.of(samples)
    normal = normal_training_samples(dataset)
    if shots is not None:
        normal = sample_shots(normal, shots, seed) if shots else []
    if learning_type != LearningType.FEW_ANOMALIES or anomalies <= 0:
        return TrainingSet.of(normal)
    examples = anomaly_examples(dataset, anomalies, seed)
    return TrainingSet.of(normal + examples, {s.path for s in examples})


def anomaly_examples(dataset: Dataset, count: int, seed: int = 0) -> list[Sample]:
    """``count`` anomalous test images that have masks, picked with ``seed``."""
    candidates = [s for s in dataset.test if s.label == 1 and s.mask_paths]
    if len(candidates) < count:
        raise DatasetError(f"{dataset.root}: asked for {count} anomaly examples but only {len(candidates)} test images have masks")
    return sample_shots(candidates, count, seed)


def labelled_categories(data: str | os.PathLike) -> list[Dataset]:
    """Each category of a dataset root (folders holding train/good), or DATA itself."""
    root = Path(data)
    categories = []
    if root.is_dir() and not (root / "train").is_dir():
        categories = [folder for folder in sorted(root.iterdir()) if (folder / "train" / "good").is_dir()]
    return [load_dataset(folder) for folder in categories] or [load_dataset(root)]


def with_category(method: str, dataset: Dataset, params: dict) -> dict:
    """Prompted methods (those with an ``object_name`` parameter) get the dataset's category as
    the object when the user names none. A plain folder's name says nothing about the object."""
    accepts = "object_name" in REGISTRY[method].get_param_names()
    if accepts and params.get("object_name") is None and dataset.kind != "folder":
        return {**params, "object_name": dataset.category}
    return params


#: The default keeps native resolution in tiles while the training images' features fit in this
#: many bytes, and squashes to ``size`` beyond it, saying so. Tiled features over 1 GiB are kept in
#: a temporary file mapped into memory (models.patch.DISK_BACKED_BYTES), and the fit works through
#: them in bounded pieces: BSData's 426 training images in 18 tiles (4.4 GiB) fit tiled on a 24 GB
#: machine with a few GB of process memory besides, and scored 0.969 there against 0.956 squashed
#: (benchmarks/results/real_suite.md). Until 2026-11-30 the budget was 2 GiB, when a fit held up
#: to eight times its features in memory. The disk needs as much free space as the features.
TILED_FEATURE_BUDGET = 8 * 2**30


def default_config_for(data: str | os.PathLike | Dataset, shots: int | None = None, params: dict | None = None
                       ) -> tuple[str, dict, str]:
    """The method and parameters `fit` uses on DATA when none is named (``models.default_config``
    for that many good images, under the user's ``params``), and why, in words. The default's tiles
    give way to the square input when ``shots`` (None: all) normal images in tiles would exceed
    TILED_FEATURE_BUDGET."""
    from PIL import Image

    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    samples = normal_training_samples(dataset)
    count = len(samples) if shots is None else min(shots, len(samples))
    method, defaults = default_config(count)
    chosen = {**defaults, **(params or {})}
    regime = f"{'from' if count >= models.MANY_IMAGES else 'below'} {models.MANY_IMAGES} good images"
    reason = f"the default {regime}: the best mean over the real-data suite"
    if chosen.get("geometry") != "tiles" or not count:
        return method, defaults, reason
    with Image.open(samples[0].path) as first:
        width, height = first.size
    probe = create_detector(method, **chosen)
    probe.canvas_hw = probe.layout_for((height, width))
    feature_h, feature_w = probe.backbone_network.feature_hw
    needed = count * len(probe._tiles()) * probe.backbone_network.feature_dim * feature_h * feature_w * 4
    if needed <= TILED_FEATURE_BUDGET or "geometry" in (params or {}):
        return method, defaults, reason
    return method, {**defaults, "geometry": "square"}, (
        f"the default {regime}, squashed: {count} images in {len(probe._tiles())} tiles would hold "
        f"{needed / 2**30:.1f} GiB of features, over the {TILED_FEATURE_BUDGET / 2**30:.0f} GiB budget for tiles")


def fit_from_folder(data: str | os.PathLike, method: str | None = None, shots: int | None = None, seed: int = 0,
                    params: dict | None = None, runtime: str = "torch") -> tuple[Detector, TrainingSet]:
    """Fit ``method`` with ``params`` on what it learns from in DATA (see :func:`training_set`):
    normal images (all, or ``shots`` of them picked with ``seed``), plus, for methods that learn
    from anomalies, labelled ones. ``seed`` also seeds the method itself. Without ``method``, the
    default configuration (``models.default_config``) under ``params``. ``runtime``: where the
    backbone embeds the training images (see runtime.load_runtime); "auto" takes an exported
    runtime only when one is in the cache already, since an export costs more than it saves on
    a few hundred images."""
    if method is None:
        method, defaults, _ = default_config_for(data, shots, params)
        params = {**defaults, **(params or {})}
    if method not in REGISTRY:
        raise ParameterError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    params = {"seed": seed, **(params or {})}
    learning_type = REGISTRY[method].learning_type
    if learning_type == LearningType.AUXILIARY and shots is None:
        categories = labelled_categories(data)
        dataset = categories[0]
        detector = create_detector(method, **params)
        training = training_set(dataset, learning_type, labelled=categories)
    else:
        dataset = load_dataset(data)
        detector = create_detector(method, **with_category(method, dataset, params))
        anomalies = detector.anomalies if learning_type == LearningType.FEW_ANOMALIES else 0
        training = training_set(dataset, learning_type, shots, seed, anomalies)
    if not training.images and learning_type != LearningType.ZERO_SHOT:
        raise DatasetError(f"{data}: no normal training images found (expected train/good or a folder of images)")
    if runtime != "torch":
        from ..runtime import load_runtime

        detector = load_runtime(detector, runtime, export_missing=False, fitting=True)
    return training.fit(detector), training
