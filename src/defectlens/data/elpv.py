"""ELPV solar cells (electroluminescence images, PyPI ``elpv-dataset``) as two anomaly-detection
categories, ``mono`` and ``poly``, in the same `Dataset` form as an MVTec folder.

Each cell carries an expert's defect probability (0, 1/3, 2/3, 1) and its wafer type. Per wafer
type, a fixed-seed 60 % of the probability-0 cells are the normal training images; the test set
holds the other probability-0 cells, the certain defects (probability 1) and, as their own
defect types, the uncertain ones (1/3, 2/3), so a benchmark can score "good against certainly
defective" (the ``DEFECT_TYPES[1.0]`` block) and report the uncertain cells separately. Labels
are per image only: the set has no masks. The images stay where the package installed them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .datasets import GOOD, Dataset, Sample

CATEGORIES = ("mono", "poly")
TRAIN_FRACTION = 0.6
SPLIT_SEED = 0
# Defect probability -> defect type name; probability 0 is GOOD.
DEFECT_TYPES = {1.0: "defect_p1.00", 2 / 3: "defect_p0.67", 1 / 3: "defect_p0.33"}
CERTAIN_DEFECT = DEFECT_TYPES[1.0]


def elpv_labels_file() -> Path:
    """The labels.csv of the installed ``elpv-dataset`` package (found without importing it)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("ELPV needs the elpv-dataset package: pip install 'defectlens[bench]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "labels.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: missing; the elpv-dataset package installation is incomplete")
    return path


def read_elpv_labels(labels_file: str | os.PathLike) -> list[tuple[Path, float, str]]:
    """(image path, defect probability, wafer type) per line of an ELPV labels file, whose lines
    are "images/cellNNNN.png  <probability>  <mono|poly>" with paths relative to the file."""
    labels_file = Path(labels_file)
    rows = []
    for number, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{labels_file}, line {number}"
        if len(fields) != 3:
            raise DatasetError(f"{where}: expected 'path probability type', got {line.strip()!r}")
        path, probability, wafer = fields
        try:
            probability = float(probability)
        except ValueError:
            raise ValueError(f"{where}: defect probability {probability!r} is not a number") from None
        if probability != 0 and _defect_type(probability) is None:
            raise ValueError(f"{where}: defect probability {probability}; expected 0, 1/3, 2/3 or 1")
        if wafer not in CATEGORIES:
            raise ValueError(f"{where}: wafer type {wafer!r}; expected one of {', '.join(CATEGORIES)}")
        rows.append((labels_file.parent / path, probability, wafer))
    return rows


def _defect_type(probability: float) -> str | None:
    return next((name for value, name in DEFECT_TYPES.items() if abs(probability - value) < 1e-3), None)


def load_elpv(category: str, labels_file: str | os.PathLike | None = None, seed: int = SPLIT_SEED,
              train_fraction: float = TRAIN_FRACTION, uncertain: bool = True) -> Dataset:
    """One wafer type of ELPV as a `Dataset` (kind "mvtec", no masks).

    ``labels_file``: an ELPV labels.csv (default: the installed package's). ``seed`` and
    ``train_fraction`` fix which probability-0 cells train; the split depends only on the set of
    normal cells, not on the file's order. ``uncertain``: keep the 1/3 and 2/3 cells in the test
    set as their own defect types (they count as anomalous in the "all" metrics block).
    """
    if category not in CATEGORIES:
        raise ValueError(f"ELPV category {category!r}; expected one of {', '.join(CATEGORIES)}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), not {train_fraction}")
    labels_file = Path(labels_file) if labels_file is not None else elpv_labels_file()
    rows = [(path, probability) for path, probability, wafer in read_elpv_labels(labels_file) if wafer == category]
    normal = sorted(path for path, probability in rows if probability == 0)
    if len(normal) < 2:
        raise ValueError(f"{labels_file}: {len(normal)} defect-free {category} cells; need at least 2 to split")
    order = np.random.default_rng(seed).permutation(len(normal))
    n_train = min(len(normal) - 1, max(1, round(train_fraction * len(normal))))
    train_paths = sorted(normal[i] for i in order[:n_train])
    test = [Sample(normal[i], 0, GOOD) for i in order[n_train:]]
    for path, probability in rows:
        defect_type = _defect_type(probability)
        if defect_type == CERTAIN_DEFECT or (defect_type is not None and uncertain):
            test.append(Sample(path, 1, defect_type))
    test.sort(key=lambda sample: sample.path)
    return Dataset("mvtec", labels_file.parent, category, [Sample(p, 0, GOOD) for p in train_paths], [], test)
