"""Operator-confirmed good images out of the history, in the layout `defectlens fit` reads."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from .blobs import BlobStore
from .store import InspectionStore


def _entries(store: InspectionStore, blobs: BlobStore, model: str):
    for row in store.confirmed_good(model):
        path = blobs.path(row["image_key"])
        if path.is_file():
            yield row["image_key"], path


def export_folder(store: InspectionStore, blobs: BlobStore, model: str, folder: str | os.PathLike) -> int:
    """Copy the model's confirmed good images to ``folder/train/good/`` (content-hash names, so an
    export into a folder from an earlier export adds the new images and replaces nothing)."""
    target = Path(folder) / "train" / "good"
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for key, path in _entries(store, blobs, model):
        if not (target / key).exists():
            shutil.copyfile(path, target / key)
        count += 1
    return count


def export_zip(store: InspectionStore, blobs: BlobStore, model: str, out) -> int:
    """The same layout as :func:`export_folder`, written as a zip archive to the file object ``out``."""
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, path in _entries(store, blobs, model):
            archive.write(path, f"{model}/train/good/{key}")
            count += 1
    return count
