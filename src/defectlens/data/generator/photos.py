"""Real photographs for the generator's photo LOCO category: pools of defect-free surfaces to cut
parts and backgrounds from, and pools of real defects (with where they are) for its structural
anomalies. Nothing is downloaded: the photos come from a local datasets folder and the installed
``elpv-dataset`` package.

Sources (each an MVTec-layout set, see ../shared/datasets/*/README):
- metal: BSData ball_screw ``train/good`` (1130×460 photos of a ball screw drive); its
  ``test/pitting`` images with masks are the real pitting defects;
- PCB: DeepPCB ``pcb/train/good`` (binarised 640×640 board scans);
- cells: ELPV monocrystalline cells (300×300 electroluminescence images); the defect-probability-0
  cells are normal, the probability-1 cells the real cracked ones.

Every pool is a fixed, evenly spaced choice of ``POOL`` files from the sorted file list, read once
and downscaled, so a scene depends only on the photos and the random streams (same files, same
dataset) and memory stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ...errors import UsageError

#: Photos per pool: enough that two scenes rarely share a source, few enough to hold in memory.
POOL = 24
#: Metal photos are kept at this width (a third of BSData's 1130 px): pits stay a few pixels wide
#: after the cut-out is scaled into a scene.
METAL_WIDTH = 376
PCB_SIZE = 320
CELL_SIZE = 150
#: A real pit must cover at least this many pixels of the downscaled photo to be cut out.
MIN_PIT_PIXELS = 12
METAL_SET, PCB_SET = Path("bsdata") / "ball_screw", Path("deeppcb") / "pcb"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class PhotoPools:
    metal: tuple[np.ndarray, ...]  # H×W×3 float32 RGB 0..1
    pits: tuple[tuple[np.ndarray, np.ndarray, tuple[float, float]], ...]  # (photo, bool mask of its pits, centre of the largest)
    pcb: tuple[np.ndarray, ...]  # H×W float32 0..1 (binarised scans)
    cells: tuple[np.ndarray, ...]  # H×W float32 0..1 defect-free cells
    cracked: tuple[np.ndarray, ...]  # H×W float32 0..1 certainly defective cells


def photos_help() -> str:
    return (f"a folder holding {METAL_SET} and {PCB_SET} in MVTec layout (e.g. ../shared/datasets next to the "
            "repository), and the elpv-dataset package (pip install 'defectlens[bench]')")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"real photos: {folder} is missing; the photo LOCO category needs {photos_help()}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"real photos: {folder} holds no images")
    return files


def _spread(files: list, count: int = POOL) -> list:
    """``count`` files evenly spaced over the sorted list: the same pool on every machine."""
    return [files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))]


def _read(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise UsageError(f"real photos: cannot read {path} as an image")
    return image


def _metal(path: Path) -> np.ndarray:
    image = _read(path, cv2.IMREAD_COLOR)[..., ::-1]
    height = round(image.shape[0] * METAL_WIDTH / image.shape[1])
    return cv2.resize(image, (METAL_WIDTH, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _gray(path: Path, size: int) -> np.ndarray:
    return cv2.resize(_read(path, cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _pit(photo_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
    """The photo, its pits and the centre of the largest, or None when that is too small once
    downscaled. All pits stay in the mask: a cut-out may hold more than the one it is centred on."""
    photo = _metal(photo_path)
    mask = cv2.resize((_read(mask_path, cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8), photo.shape[1::-1],
                      interpolation=cv2.INTER_NEAREST)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < MIN_PIT_PIXELS:
        return None
    centre = stats[largest, cv2.CC_STAT_LEFT] + stats[largest, cv2.CC_STAT_WIDTH] / 2, \
        stats[largest, cv2.CC_STAT_TOP] + stats[largest, cv2.CC_STAT_HEIGHT] / 2
    return photo, mask > 0, (float(centre[0]), float(centre[1]))


def _elpv_cells() -> tuple[list[Path], list[Path]]:
    """Defect-free and certainly defective monocrystalline ELPV cells."""
    from ..elpv import elpv_labels_file, read_elpv_labels

    try:
        rows = read_elpv_labels(elpv_labels_file())
    except Exception as error:  # a missing package is a DatasetError; say what the category needs
        raise UsageError(f"real photos: ELPV cells unavailable ({error}); the photo LOCO category needs {photos_help()}") from None
    mono = [(path, p) for path, p, wafer in rows if wafer == "mono"]
    return sorted(path for path, p in mono if p == 0), sorted(path for path, p in mono if p == 1)


@lru_cache(maxsize=2)
def load_photos(root: str) -> PhotoPools:
    """The pools cut from the datasets under ``root``; a clear UsageError names what is missing."""
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"real photos: {base} is not a folder; the photo LOCO category needs {photos_help()}")
    metal = tuple(_metal(p) for p in _spread(_images(base / METAL_SET / "train" / "good")))
    pitted = _images(base / METAL_SET / "test" / "pitting")
    masks = base / METAL_SET / "ground_truth" / "pitting"
    pits = []
    for photo in _spread(pitted, 2 * POOL):  # some pits are too small: look at more photos
        mask = masks / f"{photo.stem}_mask.png"
        found = _pit(photo, mask) if mask.is_file() else None
        if found is not None:
            pits.append(found)
    if not pits:
        raise UsageError(f"real photos: no pit of at least {MIN_PIT_PIXELS} px among {masks}")
    pcb = tuple(_gray(p, PCB_SIZE) for p in _spread(_images(base / PCB_SET / "train" / "good")))
    good_cells, bad_cells = _elpv_cells()
    if not good_cells or not bad_cells:
        raise UsageError("real photos: the ELPV labels list no defect-free or no defective mono cells")
    return PhotoPools(metal, tuple(pits[:POOL]), pcb, tuple(_gray(p, CELL_SIZE) for p in _spread(good_cells)),
                      tuple(_gray(p, CELL_SIZE) for p in _spread(bad_cells)))
