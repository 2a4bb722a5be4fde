"""Dataset loaders: MVTec AD, MVTec LOCO, VisA and plain folders become one plain `Dataset`.

Loaders only list files (and read small text files such as split CSVs); images and masks are
decoded later by `defectlens.data.io`. Every list is sorted, so runs are reproducible.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from defectlens.data.io import IMAGE_SUFFIXES, is_image_file
from defectlens.errors import DatasetError

KINDS = ("mvtec", "loco", "visa", "folder")
GOOD = "good"
LOCO_TYPES = {"good": None, "logical_anomalies": True, "structural_anomalies": False}
LOCO_CONFIG = "defects_config.json"
VISA_COLUMNS = {"object", "split", "label", "image"}
VISA_LABELS = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "anomalous": 1, "abnormal": 1, "1": 1}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous, -1 unknown (plain folder of unlabeled images)
    defect_type: str  # "good" for normal samples
    mask_paths: tuple[Path, ...] = ()  # ground-truth masks; LOCO has several per image
    logical: bool | None = None  # LOCO: True logical, False structural, None otherwise


@dataclass
class Dataset:
    kind: str  # "mvtec" | "loco" | "visa" | "folder"
    root: Path
    category: str
    train: list[Sample]  # training images (normal, except anomalies that a VisA CSV puts in train)
    validation: list[Sample]  # LOCO validation/good; empty otherwise
    test: list[Sample]
    defects_config: list[dict] | None = None  # LOCO defects_config.json content


def load_dataset(root: str | os.PathLike, kind: str = "auto", category: str | None = None) -> Dataset:
    """Load a category of MVTec AD, MVTec LOCO or VisA, or a plain folder of images.

    ``root`` is a category folder, or a dataset root together with ``category``; for VisA it
    may also be the split CSV itself. ``kind="auto"`` detects the layout (see `detect_kind`).
    A plain folder has no train split: all its images are test samples.
    """
    root = Path(root)
    if kind not in ("auto", *KINDS):
        raise DatasetError(f"unknown dataset kind {kind!r}; expected 'auto' or one of {', '.join(KINDS)}")
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; expected a dataset folder")
    if kind == "visa" or (kind == "auto" and _find_visa_csv(root) is not None):
        return _load_visa(root, category)
    if category is not None:
        root = _category_folder(root, category)
    elif kind == "auto":
        _reject_dataset_root(root)
    if kind == "auto":
        kind = detect_kind(root)
    loaders = {"mvtec": _load_mvtec, "loco": _load_loco, "folder": _load_folder}
    return loaders[kind](root)


def detect_kind(root: str | os.PathLike) -> str:
    """Name the layout of ``root``: "loco", "mvtec", "visa", or "folder" for anything else.

    LOCO is recognised by test/logical_anomalies or a defects_config.json, MVTec by
    train/good, VisA by a split CSV (the file itself, split_csv/ beside or above the folder).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; expected a dataset folder")
    if root.is_dir() and ((root / "test" / "logical_anomalies").is_dir() or (root / LOCO_CONFIG).is_file()):
        return "loco"
    if (root / "train" / GOOD).is_dir():
        return "mvtec"
    if _find_visa_csv(root) is not None:
        return "visa"
    if root.is_dir():
        return "folder"
    raise DatasetError(f"{root}: is a file; expected a dataset folder or a VisA split CSV")


# ---- shared helpers -------------------------------------------------------------------------


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    # Skip hidden files: archives unpacked on macOS leave "._name.png" metadata next to images.
    pattern = "**/*" if recursive else "*"
    return sorted(
        path
        for path in folder.glob(pattern)
        if path.is_file() and is_image_file(path) and not _is_hidden(path.relative_to(folder))
    )


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _require_folder(root: Path, relative: str, expected: str) -> None:
    if not (root / relative).is_dir():
        raise DatasetError(f"{root}: no {relative} folder; expected {expected}")


def _category_folder(root: Path, category: str) -> Path:
    folder = root / category
    if not folder.is_dir():
        available = ", ".join(path.name for path in _subfolders(root)) if root.is_dir() else "none"
        raise DatasetError(f"{root}: no category folder {category!r} (found: {available})")
    return folder


def _reject_dataset_root(root: Path) -> None:
    """A whole MVTec/LOCO download is a folder of categories; loading it as images would mislead."""
    if not root.is_dir() or (root / "train").is_dir():
        return
    categories = [path.name for path in _subfolders(root) if (path / "train" / GOOD).is_dir()]
    if categories:
        raise DatasetError(
            f"{root}: holds several dataset categories ({', '.join(categories)}); "
            "give the category folder itself (or category=NAME in Python)"
        )


# ---- MVTec AD -------------------------------------------------------------------------------


def _load_mvtec(root: Path) -> Dataset:
    _require_folder(root, "train/good", "an MVTec-style category folder (train/good, test/<type>)")
    train = [Sample(path, 0, GOOD) for path in _images_in(root / "train" / GOOD)]
    test = []
    if (root / "test").is_dir():
        for folder in _subfolders(root / "test"):
            for path in _images_in(folder):
                if folder.name == GOOD:
                    test.append(Sample(path, 0, GOOD))
                else:
                    mask = _mvtec_mask(root, folder.name, path)
                    test.append(Sample(path, 1, folder.name, (mask,)))
    return Dataset("mvtec", root, root.name, train, [], test)


def _mvtec_mask(root: Path, defect_type: str, image: Path) -> Path:
    folder = root / "ground_truth" / defect_type
    # MVTec names masks <stem>_mask.png; BTAD-like sets drop the suffix.
    for candidate in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{image}: no ground-truth mask; expected {folder / (image.stem + '_mask.png')}")


# ---- MVTec LOCO -----------------------------------------------------------------------------


def _load_loco(root: Path) -> Dataset:
    expected = "an MVTec LOCO category folder (train/good, validation/good, test/logical_anomalies, ...)"
    _require_folder(root, "train/good", expected)
    train = [Sample(path, 0, GOOD) for path in _images_in(root / "train" / GOOD)]
    validation_folder = root / "validation" / GOOD
    validation = [Sample(path, 0, GOOD) for path in _images_in(validation_folder)] if validation_folder.is_dir() else []
    test = []
    if (root / "test").is_dir():
        for folder in _subfolders(root / "test"):
            if folder.name not in LOCO_TYPES:
                raise DatasetError(f"{folder}: unexpected test folder; expected one of {', '.join(LOCO_TYPES)}")
            for path in _images_in(folder):
                if folder.name == GOOD:
                    test.append(Sample(path, 0, GOOD))
                else:
                    masks = _loco_masks(root, folder.name, path)
                    test.append(Sample(path, 1, folder.name, masks, LOCO_TYPES[folder.name]))
    return Dataset("loco", root, root.name, train, validation, test, _read_defects_config(root / LOCO_CONFIG))


def _loco_masks(root: Path, defect_type: str, image: Path) -> tuple[Path, ...]:
    # One mask per annotated defect region: ground_truth/<type>/<stem>/000.png, 001.png, ...
    folder = root / "ground_truth" / defect_type / image.stem
    masks = tuple(_images_in(folder)) if folder.is_dir() else ()
    if not masks:
        raise DatasetError(f"{image}: no ground-truth masks; expected {folder}/000.png")
    return masks


def _read_defects_config(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: cannot read defects config: {error}") from None
    if not isinstance(config, list) or not all(isinstance(entry, dict) for entry in config):
        raise DatasetError(f"{path}: expected a JSON list of defect objects (defect_name, pixel_value, ...)")
    return config


# ---- VisA -----------------------------------------------------------------------------------


def _find_visa_csv(root: Path) -> Path | None:
    """The split CSV for a VisA root, a VisA category folder, or the CSV given directly."""
    if root.is_file():
        return root if root.suffix.lower() == ".csv" else None
    candidates = [root / "split_csv" / "1cls.csv", *sorted((root / "split_csv").glob("*.csv"))]
    candidates += sorted(root.glob("*.csv"))
    if (root / "Data" / "Images").is_dir():  # a category folder inside the VisA root
        candidates += [root.parent / "split_csv" / "1cls.csv", *sorted((root.parent / "split_csv").glob("*.csv"))]
    return next((path for path in candidates if path.is_file() and _is_visa_csv(path)), None)


def _is_visa_csv(path: Path) -> bool:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return False
    return VISA_COLUMNS <= {name.strip() for name in header}


def _load_visa(root: Path, category: str | None) -> Dataset:
    csv_path = _find_visa_csv(root)
    if csv_path is None:
        raise DatasetError(
            f"{root}: no VisA split CSV; expected split_csv/1cls.csv with columns object,split,label,image,mask"
        )
    if category is None and root.is_dir() and (root / "Data" / "Images").is_dir():
        category = root.name
    rows = _read_visa_rows(csv_path)
    category = _pick_visa_category(csv_path, rows, category)
    base = _visa_base(csv_path, rows)
    splits: dict[str, list[Sample]] = {"train": [], "validation": [], "test": []}
    for line, row in rows:
        if row["object"] == category:
            split, sample = _visa_sample(csv_path, line, row, base)
            splits[split].append(sample)
    for samples in splits.values():
        samples.sort(key=lambda sample: sample.path)
    return Dataset("visa", base, category, splits["train"], splits["validation"], splits["test"])


def _read_visa_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        # Line numbers count the header as line 1, matching what an editor shows.
        # Short rows give None values, overlong rows a None key holding the extra cells.
        return [
            (number, {key: (value or "").strip() for key, value in row.items() if key is not None})
            for number, row in enumerate(reader, 2)
        ]


def _pick_visa_category(csv_path: Path, rows: list[tuple[int, dict[str, str]]], category: str | None) -> str:
    objects = sorted({row["object"] for _, row in rows})
    if category is None:
        if len(objects) != 1:
            raise DatasetError(f"{csv_path}: holds several objects ({', '.join(objects)}); pass category=NAME")
        return objects[0]
    if category not in objects:
        raise DatasetError(f"{csv_path}: no rows for category {category!r} (found: {', '.join(objects) or 'none'})")
    return category


def _visa_base(csv_path: Path, rows: list[tuple[int, dict[str, str]]]) -> Path:
    # Official paths are relative to the VisA root, the parent of split_csv/; a CSV kept
    # beside the images uses its own folder. The first listed image decides.
    candidates = [csv_path.parent.parent, csv_path.parent]
    first = rows[0][1]["image"] if rows else ""
    return next((base for base in candidates if (base / first).is_file()), candidates[0])


def _visa_sample(csv_path: Path, line: int, row: dict[str, str], base: Path) -> tuple[str, Sample]:
    where = f"{csv_path}, line {line}"
    label = VISA_LABELS.get(row["label"].lower())
    if label is None:
        raise DatasetError(f"{where}: label {row['label']!r}; expected normal or anomaly")
    split = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}.get(row["split"].lower())
    if split is None:
        raise DatasetError(f"{where}: split {row['split']!r}; expected train or test")
    image = base / row["image"]
    if not image.is_file():
        raise DatasetError(f"{where}: image {image} does not exist")
    masks: tuple[Path, ...] = ()
    if label == 1 and row.get("mask"):
        mask = base / row["mask"]
        if not mask.is_file():
            raise DatasetError(f"{where}: mask {mask} does not exist")
        masks = (mask,)
    return split, Sample(image, label, "anomaly" if label else GOOD, masks)


# ---- plain folder ---------------------------------------------------------------------------


def _load_folder(root: Path) -> Dataset:
    """All images below ``root``; a good/ subfolder makes the top-level folders labels."""
    if not root.is_dir():
        raise DatasetError(f"{root}: is not a folder; expected a folder of images")
    images = _images_in(root, recursive=True)
    if not images:
        raise DatasetError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    labelled = (root / GOOD).is_dir()
    test = [_folder_sample(root, path, labelled) for path in images]
    return Dataset("folder", root, root.name, [], [], test)


def _folder_sample(root: Path, path: Path, labelled: bool) -> Sample:
    parts = path.relative_to(root).parts
    if not labelled or len(parts) == 1:  # loose files beside labelled folders stay unknown
        return Sample(path, -1, "unknown")
    return Sample(path, 0, GOOD) if parts[0] == GOOD else Sample(path, 1, parts[0])

