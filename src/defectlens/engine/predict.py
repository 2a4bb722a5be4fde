"""Batch prediction that survives bad files: each input gets a result or an error message, and
with :func:`predict_to_outputs` a CSV row, map and overlay written as soon as it is scored."""

from __future__ import annotations


import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..backbones.base import configure_threads
from ..data import io as image_io
from ..data.ahead import mapped_ahead
from ..data.io import ImageReadError, printable, read_image
from ..errors import OutputError, UsageError
from ..models import Detector, Prediction
from ..models.products import UNKNOWN_PRODUCT
from ..report.overlay import heatmap_overlay, save_png
from .outputs import PredictionCsv, PredictionOutputs

if TYPE_CHECKING:
    from ..report.html import ImageRecord


@dataclass
class Result:
    path: Path
    score: float | None = None
    anomaly_map: np.ndarray | None = None
    image: np.ndarray | None = None
    error: str | None = None
    part_map: np.ndarray | None = None  # detectors that segment parts (composition)
    product: str = ""  # multi-product models: the routed product, or UNKNOWN_PRODUCT


def predict_paths(detector: Detector, paths: Sequence[Path], keep_images: bool = False,
                  progress: bool = True, max_pixels: int | None = None, maps: bool = True) -> Iterator[Result]:
    """Yield one Result per path, in order. Each image is decoded on its own, so that a corrupt
    file becomes an error row; the readable ones are scored in chunks of the detector's
    ``predict_chunk`` (all together for transductive methods). Images are decoded in threads
    up to two chunks ahead of the chunk being scored. With ``predict_in_flight`` 2 (and two
    cores or more) a chunk's scoring runs in a thread of its own while the next chunk's forward
    runs here (``Detector.start_predict``). Images above
    ``max_pixels`` (default :data:`defectlens.data.io.MAX_IMAGE_PIXELS`) are refused; those with a
    side above :data:`defectlens.data.io.MAX_SCORING_SIDE` are decoded reduced, so their maps are
    too. ``maps=False``: scores only (``anomaly_map`` None), skipping what only maps need."""
    chunk = detector.predict_chunk or max(1, len(paths))
    in_flight = min(detector.predict_in_flight, configure_threads()) if detector.predict_chunk else 1
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)

    def chunks() -> Iterator[list[Result]]:
        pending: list[Result] = []
        for path, image in decoded_ahead(paths, max_pixels, ahead=2 * chunk if detector.predict_chunk else len(paths)):
            if isinstance(image, ImageReadError):
                pending.append(Result(path=path, error=str(image)))
            else:
                pending.append(Result(path=path, image=image))
            if len(pending) >= chunk:
                yield pending
                pending = []
        if pending:
            yield pending

    def started(pending: list[Result]) -> Callable[[], Prediction]:
        readable = [r for r in pending if r.error is None]
        return detector.start_predict([r.image for r in readable], maps=maps)

    def finished(pending: list[Result], prediction: Prediction) -> list[Result]:
        readable = [r for r in pending if r.error is None]
        scored_maps = prediction.maps if prediction.maps is not None else [None] * len(readable)
        part_maps = prediction.part_maps or [None] * len(readable)
        products = prediction.products or [""] * len(readable)
        for result, score, anomaly_map, part_map, product in zip(readable, prediction.scores, scored_maps,
                                                                 part_maps, products):
            result.score, result.anomaly_map, result.part_map = float(score), anomaly_map, part_map
            result.product = UNKNOWN_PRODUCT if product is None else product
            if not keep_images:
                result.image = None
        bar.update(len(pending))
        return pending

    if in_flight <= 1:
        for pending in chunks():
            yield from finished(pending, started(pending)())
    else:
        # One thread scores, in order, while this one runs the next chunk's forward (the
        # default's 300-image predict: ONNX Runtime A/B 0.94, PyTorch 0.86, docs/scale.md). Each
        # stage stays in one thread, so each thread's freed memory is reused by the same stage
        # (two threads each doing both made each one's malloc arena hold both: +100 MiB).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="defectlens-score") as scorer:
            waiting: deque = deque()  # (chunk, its scoring's future), in input order
            upcoming = chunks()

            def oldest() -> list[Result]:
                pending, future = waiting.popleft()
                return finished(pending, future.result())

            while True:
                try:
                    pending = next(upcoming, None)
                    finish = None if pending is None else started(pending)
                except BaseException:
                    # The chunks started before a failure still get their rows, as they would
                    # one at a time: work done is not lost to a later error.
                    while waiting:
                        yield from oldest()
                    raise
                if finish is None:
                    break
                waiting.append((pending, scorer.submit(finish)))
                if len(waiting) >= in_flight:
                    yield from oldest()
            while waiting:
                yield from oldest()
    bar.close()


def decoded_ahead(paths: Sequence[Path], max_pixels: int | None, ahead: int) -> Iterator[tuple[Path, np.ndarray | ImageReadError]]:
    """(path, image or its ImageReadError) for each path in order, decoded in threads at most
    ``ahead`` images before the one the caller takes (data.ahead)."""
    return zip(paths, mapped_ahead(partial(_read_or_error, max_pixels=max_pixels), paths, ahead))


def _read_or_error(path: Path, max_pixels: int | None) -> np.ndarray | ImageReadError:
    try:
        return read_image(path, max_side=image_io.MAX_SCORING_SIDE, max_pixels=max_pixels)
    except ImageReadError as error:
        return error


@dataclass
class PredictSummary:
    """What a :func:`predict_to_outputs` run did; ``rows`` as written to the CSV (resumed ones first)."""

    rows: list[dict] = field(default_factory=list)
    resumed: int = 0
    threshold: float | None = None

    @property
    def failed(self) -> int:
        return sum(bool(row["error"]) for row in self.rows)

    @property
    def anomalous(self) -> int:
        return sum(row["label"] == "anomalous" for row in self.rows)


def predict_to_outputs(detector: Detector, paths: Sequence[Path], outputs: PredictionOutputs, *,
                       threshold: float | None = None, max_pixels: int | None = None,
                       report_title: str = "defectlens predictions", report_notes: Sequence[str] = (),
                       on_row: Callable[[dict], None] | None = None, progress: bool = True,
                       score_paths: Callable[..., Iterator[Result]] | None = None) -> PredictSummary:
    """Score ``paths`` and write every output of ``outputs`` as each image finishes.

    All targets are checked before the first image is decoded (see
    :meth:`PredictionOutputs.check`). ``threshold`` overrides the model's own; it must be
    finite. ``on_row`` sees each row dict (CSV columns) as it is written. ``score_paths`` scores
    elsewhere (a Dask cluster, engine/dask.py): called like :func:`predict_paths` without the
    detector, it must yield the same Results in input order. The HTML report, which
    needs every score, is written at the end, from maps shrunk to thumbnail size as they come."""
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"threshold must be a finite number, not {threshold}")
    outputs.check(paths)
    if outputs.report is not None:
        from ..report.html import prediction_record, write_report  # matplotlib: imported only for a report
    outputs.prepare()
    summary, records = PredictSummary(), []
    table = PredictionCsv(outputs.csv, resume=outputs.resume) if outputs.csv is not None else None
    try:
        todo = []
        for path in paths:
            earlier = table.done(path) if table is not None else None
            if earlier is None:
                todo.append(path)
                continue
            summary.rows.append(earlier)
            summary.resumed += 1
            if outputs.report is not None:
                records.append(_resumed_record(earlier))
        if summary.resumed and todo:
            _check_same_scores(detector, summary.rows[-1], max_pixels)
        score = score_paths or partial(predict_paths, detector)
        # Maps cost time of their own (upsampling, and every patch's distance): only when written.
        maps = outputs.maps is not None or outputs.overlays is not None or outputs.report is not None
        for result in score(todo, keep_images=outputs.overlays is not None, progress=progress, max_pixels=max_pixels,
                            maps=maps):
            # Read after each batch: zero-shot musc sets both from the batch it has just scored.
            summary.threshold = threshold if threshold is not None else detector.threshold
            row = _write_files(result, outputs, detector.map_range, summary.threshold)
            if table is not None:
                _guarded(table.path, table.write, row)
            summary.rows.append(row)
            if on_row is not None:
                on_row(row)
            if outputs.report is not None and result.error is None:
                records.append(prediction_record(str(result.path), result.score, result.anomaly_map, result.part_map))
    finally:
        if table is not None:
            table.close()
    if summary.threshold is None:
        summary.threshold = threshold if threshold is not None else detector.threshold
    if outputs.report is not None:
        notes = [*report_notes, f"{len(summary.rows)} inputs, {summary.failed} failed"]
        _guarded(outputs.report, write_report, outputs.report, title=report_title, records=records,
                 threshold=summary.threshold, notes=notes, map_range=detector.map_range)
    return summary


def _write_files(result: Result, outputs: PredictionOutputs, map_range, threshold: float | None) -> dict:
    """Write the map and overlay of one scored image; return its CSV row."""
    row = {"path": str(result.path), "score": "", "label": "", "error": result.error or "", "map": "", "overlay": "",
           "product": result.product}
    if result.error is not None:
        return row
    row["score"] = f"{result.score:.6g}"
    if threshold is not None:
        row["label"] = "anomalous" if result.score > threshold else "normal"
    if result.anomaly_map is None:
        return row
    anomaly_map = np.asarray(result.anomaly_map, dtype=np.float32)
    target = outputs.map_path(result.path)
    if target is not None:
        _guarded(target, np.save, target, anomaly_map)
        row["map"] = str(target)
    target = outputs.overlay_path(result.path)
    if target is not None:
        low, high = map_range or (float(anomaly_map.min()), float(anomaly_map.max()) + 1e-6)
        _guarded(target, save_png, target, heatmap_overlay(result.image, anomaly_map, low, high))
        row["overlay"] = str(target)
    return row


def _check_same_scores(detector: Detector, earlier: dict, max_pixels: int | None) -> None:
    """--resume appends to an earlier CSV: refuse one whose last score this detector does not
    give again (another model, or other settings), instead of one file mixing two models' scores.
    Equal up to the exported runtimes' differences (1e-5 relative) and the CSV's six digits; not
    checked for transductive methods (a score depends on its batch) nor for an input now unreadable."""
    if not detector.predict_chunk:
        return
    result = next(predict_paths(detector, [Path(earlier["path"])], progress=False, max_pixels=max_pixels, maps=False))
    if result.score is None or math.isclose(float(earlier["score"]), result.score, rel_tol=1e-3, abs_tol=1e-4):
        return
    raise UsageError(f"--resume: the earlier CSV scored {printable(earlier['path'])} {earlier['score']}, this model "
                     f"{result.score:.6g}: it was written by another model or with other settings; give a new --csv, "
                     "or --overwrite to start again")


def _resumed_record(row: dict) -> ImageRecord:
    """An earlier run's row for the report: its score, and its map when the file is still there."""
    from ..report.html import prediction_record

    anomaly_map = None
    if row.get("map") and os.path.isfile(row["map"]):
        anomaly_map = np.load(row["map"], mmap_mode="r")
    return prediction_record(row["path"], float(row["score"]), anomaly_map)


def _guarded(target: Path, write: Callable, *args, **kwargs):
    """Run one write; a full disk or a vanished folder becomes an error naming the file."""
    try:
        return write(*args, **kwargs)
    except OSError as error:
        raise OutputError(f"cannot write {printable(target)}: {error.strerror or error}") from None
