"""Fitting a detector on a category folder or a folder of normal images."""

from __future__ import annotations

import os
from pathlib import Path

from ..data.datasets import Dataset, load_dataset
from ..data.kshot import sample_shots
from ..models import DEFAULT_METHOD, Detector, create_detector


def normal_training_samples(dataset: Dataset):
    """The images a detector may learn from: train/good of a dataset, or every image of a
    plain folder (which the user gives as normal)."""
    if dataset.kind == "folder":
        return [s for s in dataset.test if s.label in (0, -1)]
    return [s for s in dataset.train if s.label == 0]


def fit_from_folder(data: str | os.PathLike, method: str = DEFAULT_METHOD, shots: int | None = None, seed: int = 0,
                    size: int = 256, **params) -> tuple[Detector, list[Path]]:
    """Fit ``method`` on DATA's normal images (all, or ``shots`` of them picked with ``seed``)."""
    dataset = load_dataset(data)
    samples = normal_training_samples(dataset)
    if shots is not None:
        samples = sample_shots(samples, shots, seed)
    paths = [s.path for s in samples]
    detector = create_detector(method, size=size, seed=seed, **params)
    if not paths and not detector.zero_shot:
        raise ValueError(f"{data}: no normal training images found (expected train/good or a folder of images)")
    return detector.fit(paths), paths
