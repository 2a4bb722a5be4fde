"""Batch prediction that survives bad files: each input gets a result or an error message."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.io import ImageReadError, is_image_file, read_image
from ..models import Detector


@dataclass
class Result:
    path: Path
    score: float | None = None
    anomaly_map: np.ndarray | None = None
    image: np.ndarray | None = None
    error: str | None = None
    part_map: np.ndarray | None = None  # detectors that segment parts (composition)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, images only, sorted); keep files as given so that a
    non-image file named by the user gets its own error row instead of vanishing."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith(".")))
        else:
            paths.append(item)
    return paths


def predict_paths(detector: Detector, paths: Sequence[Path], keep_images: bool = False,
                  progress: bool = True) -> Iterator[Result]:
    """Yield one Result per path, in order. Images are decoded one by one so that a corrupt
    file becomes an error row; the readable ones are scored in chunks of the detector's
    ``predict_chunk`` (all together for transductive methods)."""
    chunk = detector.predict_chunk or max(1, len(paths))
    pending: list[Result] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)

    def flush():
        readable = [r for r in pending if r.error is None]
        if readable:
            prediction = detector.predict([r.image for r in readable])
            maps = prediction.maps if prediction.maps is not None else [None] * len(readable)
            part_maps = prediction.part_maps or [None] * len(readable)
            for result, score, anomaly_map, part_map in zip(readable, prediction.scores, maps, part_maps):
                result.score, result.anomaly_map, result.part_map = float(score), anomaly_map, part_map
                if not keep_images:
                    result.image = None
        yield from pending
        bar.update(len(pending))
        pending.clear()

    for path in paths:
        try:
            pending.append(Result(path=path, image=read_image(path)))
        except ImageReadError as error:
            pending.append(Result(path=path, error=str(error)))
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()
    bar.close()
