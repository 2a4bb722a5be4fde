"""Generated datasets on disk: the MVTec AD and MVTec LOCO folder layouts, PNG images and masks,
``defects_config.json``, a README, and the refusal to overwrite a category folder unasked."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from ...errors import OutputError, OutputExistsError
from .defects import STRUCTURAL_DEFECTS
from .loco import LOGICAL_DEFECTS, LocoScene, loco_index, loco_split
from .mvtec import DESCRIPTIONS, render_mvtec
from .render import expose


# Sensor noise leaves little for LZ matching: Huffman-only coding is as small and faster.
_PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]


def write_dataset(out: Path, kind: str, categories: Sequence[str], seed: int, size: int, n_train: int,
                  n_test_good: int, n_test_defect_per_type: int, overwrite: bool,
                  scenes: dict[str, LocoScene] | None = None) -> list[Path]:
    """Write every category folder of ``kind`` under ``out`` and a README; checks all folders
    before writing any, so a refused run leaves everything as it was. ``scenes``: the LOCO
    categories' scenes by name (kind "loco")."""
    folders = [out / c for c in categories]
    readme = out / "README.txt"
    if readme.exists() and not overwrite and not _ours(readme):
        raise OutputExistsError(f"{readme} exists and was not written by the generator; pass --overwrite (overwrite=True from Python) to replace it")
    for folder in folders:
        if folder.is_dir() and any(folder.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"{folder} already exists and is not empty; pass --overwrite (overwrite=True from Python) to replace it")
        elif folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} exists and is not a folder")
    for folder in folders:
        if folder.is_dir():
            shutil.rmtree(folder)
    counts = dict(n_train=n_train, n_test_good=n_test_good, n_test_defect_per_type=n_test_defect_per_type)
    if kind == "mvtec":
        jobs = [job for folder in folders for job in _mvtec_jobs(folder, seed, size, **counts)]
    else:
        jobs = [job for folder in folders for job in _loco_jobs(folder, seed, size, scene=scenes[folder.name], **counts)]
    _run(jobs)
    readme.write_text(_readme(kind, categories, seed, size, scenes=scenes, **counts), encoding="utf-8")
    return folders


def _ours(readme: Path) -> bool:
    """Whether a README.txt is one this generator wrote (then rewriting it loses nothing)."""
    try:
        with readme.open(encoding="utf-8") as file:
            first = file.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith("Synthetic MVTec") and ".generate(kind=" in first


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image[..., ::-1] if image.ndim == 3 else image  # cv2 writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels), _PNG_OPTIONS):
        raise OutputError(f"could not write {path}")


def _run(jobs: Sequence[Callable[[], None]]) -> None:
    # Images are independent and numpy/cv2 release the GIL, so threads use every core; output stays
    # identical because each image has its own random streams and its own files.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda job: job(), jobs):
            pass


def _mvtec_jobs(folder: Path, seed: int, size: int, n_train: int, n_test_good: int,
                 n_test_defect_per_type: int) -> list[Callable[[], None]]:
    splits = [("train/good", n_train, None), ("test/good", n_test_good, None)]
    splits += [(f"test/{d}", n_test_defect_per_type, d) for d in STRUCTURAL_DEFECTS]
    jobs = []
    for split, count, defect in splits:
        (folder / split).mkdir(parents=True, exist_ok=True)
        if defect is not None:
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        jobs += [partial(_write_mvtec_image, folder, split, i, seed, size, defect) for i in range(count)]
    return jobs


def _write_mvtec_image(folder: Path, split: str, i: int, seed: int, size: int, defect: str | None) -> None:
    r = render_mvtec(folder.name, split, i, seed, size, defect)
    _write_png(folder / split / f"{i:03d}.png", expose(r.defective, r.light, r.noise))
    if defect is not None:
        _write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", r.masks[0][1].astype(np.uint8) * 255)


def _loco_jobs(folder: Path, seed: int, size: int, n_train: int, n_test_good: int,
                n_test_defect_per_type: int, scene: LocoScene) -> list[Callable[[], None]]:
    folder.mkdir(parents=True, exist_ok=True)
    config = [{"defect_name": name, "pixel_value": value,
               "saturation_threshold": threshold if relative else max(1, int(round(threshold * (size / 256) ** 2))),
               "relative_saturation": relative} for name, value, threshold, relative in scene.config]
    (folder / "defects_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    jobs = []
    goods = (("train/good", n_train), ("validation/good", max(1, n_train // 4)), ("test/good", n_test_good))
    for split, count in goods:
        (folder / split).mkdir(parents=True)
        jobs += [partial(_write_loco_image, scene, folder, split, f"{i:03d}", split, i, seed, size, None)
                 for i in range(count)]
    for kinds in (LOGICAL_DEFECTS, scene.structural):
        split = loco_split(kinds[0])
        (folder / "test" / split).mkdir(parents=True)
        for k, defect in enumerate(kinds):
            jobs += [partial(_write_loco_image, scene, folder, f"test/{split}", f"{k * n_test_defect_per_type + i:03d}",
                             split, loco_index(defect, i, scene.structural), seed, size, defect)
                     for i in range(n_test_defect_per_type)]
    return jobs


def _write_loco_image(scene: LocoScene, folder: Path, subfolder: str, stem: str, split: str, index: int, seed: int,
                      size: int, defect: str | None) -> None:
    r = scene.render(split, index, seed, size, defect)
    _write_png(folder / subfolder / f"{stem}.png", expose(r.defective, r.light, r.noise))
    values = {name: value for name, value, _, _ in scene.config}
    for m, (name, mask) in enumerate(r.masks):
        _write_png(folder / "ground_truth" / split / stem / f"{m:03d}.png", mask.astype(np.uint8) * values[name])


def _readme(kind: str, categories: Sequence[str], seed: int, size: int, n_train: int, n_test_good: int,
             n_test_defect_per_type: int, scenes: dict[str, LocoScene] | None = None) -> str:
    head = (f"Synthetic {'MVTec AD' if kind == 'mvtec' else 'MVTec LOCO'}-layout dataset written by "
            f"defectlens.data.generator.generate(kind={kind!r}, seed={seed}, size={size}).\n"
            f"Images are {size}x{size} RGB PNG; the same arguments reproduce every file byte for byte.\n"
            f"Categories: {', '.join(categories)}.\n\n")
    if kind == "mvtec":
        return head + (
            f"<category>/train/good: {n_train} normal images\n"
            f"<category>/test/good: {n_test_good} normal images\n"
            f"<category>/test/<defect>: {n_test_defect_per_type} images each of {', '.join(STRUCTURAL_DEFECTS)}\n"
            "<category>/ground_truth/<defect>/<stem>_mask.png: 0/255 masks of the altered pixels (dilated 1 px)\n\n"
            + "".join(f"{name}: {DESCRIPTIONS[name]}\n" for name in categories)
            + "Normal images vary in texture phase, pose, lighting and sensor noise. Defects are small and\n"
            "low-contrast on purpose.\n")
    parts = []
    for name in categories:
        scene = scenes[name]
        parts.append(
            f"{name}/train/good: {n_train}, {name}/validation/good: {max(1, n_train // 4)}, "
            f"{name}/test/good: {n_test_good} normal images\n"
            f"{name}/test/logical_anomalies: {n_test_defect_per_type} each of {', '.join(LOGICAL_DEFECTS)}, in that order\n"
            f"{name}/test/structural_anomalies: {n_test_defect_per_type} each of {', '.join(scene.structural)}, "
            "in that order\n"
            f"{name}/ground_truth/<type>/<stem>/000.png, 001.png, ...: one mask per annotated region, valued\n"
            f"by the defect's pixel_value in {name}/defects_config.json (0 elsewhere).\n\n{scene.rules}")
    return head + "\n".join(parts)
