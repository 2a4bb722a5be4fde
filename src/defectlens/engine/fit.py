"""Fitting a detector on a category folder or a folder of normal images."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from ..data.datasets import Dataset, Sample, load_dataset
from ..data.io import read_mask
from ..data.kshot import sample_shots
from ..errors import DatasetError
from ..models import DEFAULT_METHOD, REGISTRY, Detector, create_detector


def normal_training_samples(dataset: Dataset):
    """The images a detector may learn from: train/good of a dataset, or every image of a
    plain folder (which the user gives as normal)."""
    if dataset.kind == "folder":
        return [s for s in dataset.test if s.label in (0, -1)]
    return [s for s in dataset.train if s.label == 0]


def with_category(method: str, dataset: Dataset, params: dict) -> dict:
    """Prompted methods (those with an ``object_name`` parameter) get the dataset's category as
    the object when the user names none. A plain folder's name says nothing about the object."""
    accepts = method in REGISTRY and "object_name" in inspect.signature(REGISTRY[method].__init__).parameters
    if accepts and params.get("object_name") is None and dataset.kind != "folder":
        return {**params, "object_name": dataset.category}
    return params


def fit_from_folder(data: str | os.PathLike, method: str = DEFAULT_METHOD, shots: int | None = None, seed: int = 0,
                    size: int | None = None, **params) -> tuple[Detector, list[Path]]:
    """Fit ``method`` on DATA's normal images (all, or ``shots`` of them picked with ``seed``).
    ``size``: the input size in pixels; None keeps the method's own default.
    Methods with ``trains_on_anomalies`` learn from every labelled image of DATA instead, unless
    ``shots`` is given."""
    if size is not None:
        params["size"] = size
    if shots is None and getattr(REGISTRY.get(method), "trains_on_anomalies", False):
        samples = labelled_samples(data)
        detector = create_detector(method, seed=seed, **params)
        fitted = detector.fit([s.path for s in samples], masks=[s.mask_paths for s in samples], labels=[s.label for s in samples])
        return fitted, [s.path for s in samples]
    dataset = load_dataset(data)
    samples = normal_training_samples(dataset)
    if shots is not None:
        samples = sample_shots(samples, shots, seed)
    paths = [s.path for s in samples]
    detector = create_detector(method, seed=seed, **with_category(method, dataset, params))
    if not paths and not detector.zero_shot:
        raise DatasetError(f"{data}: no normal training images found (expected train/good or a folder of images)")
    # Methods that learn from a few real defects (parameter ``anomalies``) get that many test anomalies.
    examples = anomaly_examples(dataset, int(detector.params.get("anomalies") or 0), seed)
    if examples:
        images = paths + [s.path for s in examples]
        masks = [None] * len(paths) + [s.mask_paths[0] if len(s.mask_paths) == 1 else _union(s) for s in examples]
        return detector.fit(images, masks=masks, labels=[0] * len(paths) + [1] * len(examples)), paths
    return detector.fit(paths), paths


def labelled_samples(data: str | os.PathLike) -> list[Sample]:
    """Every labelled image (train, validation, test; anomalies with their masks) of a category
    folder, or of each category of a dataset root: an annotated auxiliary set."""
    root = Path(data)
    categories = []
    if root.is_dir() and not (root / "train").is_dir():
        categories = [folder for folder in sorted(root.iterdir()) if (folder / "train" / "good").is_dir()]
    datasets = [load_dataset(folder) for folder in categories] or [load_dataset(root)]
    return [s for d in datasets for s in (*d.train, *d.validation, *d.test) if s.label in (0, 1)]


def anomaly_examples(dataset: Dataset, count: int, seed: int = 0) -> list[Sample]:
    """``count`` anomalous test images that have masks, picked with ``seed``: the real defects a
    method may learn from (a benchmark must then leave them out of its test set)."""
    if count <= 0:
        return []
    candidates = [s for s in dataset.test if s.label == 1 and s.mask_paths]
    if len(candidates) < count:
        raise DatasetError(f"{dataset.root}: asked for {count} anomaly examples but only {len(candidates)} test images have masks")
    return sample_shots(candidates, count, seed)


def _union(sample: Sample) -> np.ndarray:
    mask = read_mask(sample.mask_paths[0])
    for path in sample.mask_paths[1:]:
        mask |= read_mask(path, mask.shape)
    return mask
