"""The k-shot benchmark: shots × seeds runs of one method on one category, mean ± std.

Backbone features of every image are computed once and shared by all runs (the backbone is
frozen, so this changes no result, only the time). Pixel metrics are computed on maps and
masks at the image's own aspect ratio, scaled so the longer side is at most ``eval_side``.
On MVTec LOCO layouts with a defects_config.json, each mask file is a defect region with its
saturation area, and the runs also report AUC-sPRO up to FPR 0.05 and 0.3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import Dataset, Sample, load_dataset
from ..data.io import as_mask, read_image
from ..data.kshot import shot_plan
from ..errors import DatasetError, UsageError
from ..metrics import evaluate
from ..metrics.spro import DefectRegion, au_spro, defect_regions
from ..models import DEFAULT_METHOD, REGISTRY, LearningType, ParameterError, create_detector
from ..models.patch import PatchDetector
from .fit import normal_training_samples, training_set, with_category
from ..report import ImageRecord, colorize_parts

SUMMARY_METRICS = ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro", "fpr_at_threshold", "tpr_at_threshold")
SPRO_LIMITS = (0.05, 0.3)
SPRO_METRICS = tuple(f"au_spro_{limit}" for limit in SPRO_LIMITS)


def parse_shots(text: str) -> list[int | str]:
    """"0,1,2,4,8,full" -> [0, 1, 2, 4, 8, "full"]."""
    shots: list[int | str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token in ("full", "all"):
            shots.append("full")
        elif token.isdigit():
            shots.append(int(token))
        else:
            raise UsageError(f"--shots: {token!r} is neither a number nor 'full'")
    if not shots:
        raise UsageError(f"--shots {text!r} names no number of shots; e.g. --shots 1,4,full")
    return shots


@dataclass
class TestSet:
    samples: list[Sample]
    labels: np.ndarray
    defect_types: list[str]
    masks: list[np.ndarray] = field(default_factory=list)  # at evaluation size
    eval_shapes: list[tuple[int, int]] = field(default_factory=list)
    defects_config: list[dict] | None = None  # LOCO: regions (and sPRO) only with a config
    regions: list[list[DefectRegion]] = field(default_factory=list)  # at evaluation size

    def subset(self, keep: np.ndarray) -> TestSet:
        """The test set without the images where ``keep`` is False (ground truth loaded)."""
        pick = [i for i in range(len(self.samples)) if keep[i]]
        return TestSet([self.samples[i] for i in pick], self.labels[pick], [self.defect_types[i] for i in pick],
                       [self.masks[i] for i in pick], [self.eval_shapes[i] for i in pick], self.defects_config,
                       [self.regions[i] for i in pick] if self.regions else [])

    def add_ground_truth(self, sample: Sample, shape: tuple[int, int], eval_side: int) -> None:
        """Eval shape, union mask and (LOCO) defect regions of the next sample, ``shape`` its size."""
        eval_shape = _eval_shape(shape, eval_side)
        self.eval_shapes.append(eval_shape)
        self.masks.append(_load_mask(sample, shape, eval_shape))
        if self.defects_config is not None:
            self.regions.append(_load_regions(sample, shape, eval_shape, self.defects_config))


def _eval_shape(shape: tuple[int, int], eval_side: int) -> tuple[int, int]:
    scale = min(1.0, eval_side / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _load_mask(sample: Sample, shape: tuple[int, int], eval_shape: tuple[int, int]) -> np.ndarray:
    union = as_mask(list(sample.mask_paths), shape)
    if union is None:
        union = np.zeros(shape, dtype=bool)
    return cv2.resize(union.astype(np.uint8), (eval_shape[1], eval_shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def _load_regions(sample: Sample, shape: tuple[int, int], eval_shape: tuple[int, int],
                  defects_config: list[dict]) -> list[DefectRegion]:
    """One region per LOCO mask file, its pixel value naming its defects_config entry. Absolute
    saturation areas shrink with the pixel count when evaluated below the image's size."""
    scale = eval_shape[0] * eval_shape[1] / (shape[0] * shape[1])
    regions = []
    for mask_path in sample.mask_paths:
        with Image.open(mask_path) as mask_image:
            values = np.asarray(mask_image)
        values = values.max(axis=2) if values.ndim == 3 else values
        values = cv2.resize(values.astype(np.uint8), (eval_shape[1], eval_shape[0]), interpolation=cv2.INTER_NEAREST)
        regions += defect_regions(values, defects_config, scale)
    return regions


def _spro_blocks(test_set: TestSet, maps: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """AUC-sPRO of all images and of the logical and structural groups (each with the good ones)."""
    blocks = {"all": [True] * len(maps)}
    for group, logical in (("logical", True), ("structural", False)):
        blocks[group] = [s.label == 0 or s.logical is logical for s in test_set.samples]
    result = {}
    for name, chosen in blocks.items():
        regions = [r for r, keep in zip(test_set.regions, chosen) if keep]
        if any(regions):
            chosen_maps = [m for m, keep in zip(maps, chosen) if keep]
            result[name] = {f"au_spro_{limit}": au_spro(regions, chosen_maps, limit) for limit in SPRO_LIMITS}
    return result


def _embed_test(detector: PatchDetector, test: TestSet, eval_side: int) -> torch.Tensor:
    """Backbone features of the test images in the detector's geometry; fills the test set's
    masks and eval shapes."""

    def images():
        for sample in test.samples:
            image = read_image(sample.path)
            test.add_ground_truth(sample, image.shape[:2], eval_side)
            yield image

    return detector.embed_images(images(), progress="test features", total=len(test.samples))


#: Test images scored together in a benchmark: a search's working copies of a whole tiled test
#: set (BSData at native resolution: 609 images × 18 tiles × 1024 patches) exhausted 24 GB.
SCORE_BLOCK_IMAGES = 32


def _score_in_blocks(detector: PatchDetector, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """``score_feature_batch`` a block of images at a time; every image is scored on its own, so
    the result is the same as one call on all of them."""
    blocks = [detector.score_feature_batch(features[start : start + SCORE_BLOCK_IMAGES])
              for start in range(0, features.shape[0], SCORE_BLOCK_IMAGES)]
    return np.concatenate([scores for scores, _ in blocks]), torch.cat([maps for _, maps in blocks])


def _threshold_rates(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> tuple[float, float]:
    if threshold is None:
        return math.nan, math.nan
    flagged = scores > threshold
    normal, anomalous = labels == 0, labels == 1
    fpr = float(flagged[normal].mean()) if normal.any() else math.nan
    tpr = float(flagged[anomalous].mean()) if anomalous.any() else math.nan
    return fpr, tpr


def _group_blocks(test: TestSet, scores: np.ndarray) -> dict:
    """LOCO: image metrics of logical and of structural anomalies (each against all good images)."""
    groups = ["logical" if s.logical else "structural" if s.label == 1 else "good" for s in test.samples]
    if not {"logical", "structural"} & set(groups):
        return {}
    blocks = evaluate(test.labels, scores, groups)
    return {name: block for name, block in blocks.items() if name in ("logical", "structural")}


def _score_run(detector, test_set: TestSet, scores: np.ndarray, maps: list[np.ndarray] | None) -> dict:
    metrics = evaluate(test_set.labels, scores, test_set.defect_types,
                       test_set.masks if maps is not None else None, maps)
    for name, block in _group_blocks(test_set, scores).items():
        metrics.setdefault(name, block)
    if test_set.regions and maps is not None:
        for name, block in _spro_blocks(test_set, maps).items():
            metrics.setdefault(name, {}).update(block)
    fpr, tpr = _threshold_rates(scores, test_set.labels, detector.threshold)
    return {"threshold": detector.threshold, "fpr_at_threshold": fpr, "tpr_at_threshold": tpr, "metrics": metrics}


def _predict_generic(detector, samples: list[Sample], test_set: TestSet,
                     eval_side: int) -> tuple[np.ndarray, list | None, list | None]:
    """Scores, eval-size maps and eval-size part maps (of detectors that segment parts) of any
    detector, through its own ``predict`` on file paths, in the detector's chunks. Fills the test
    set's ground truth on first use."""
    chunk = detector.predict_chunk or len(samples)
    scores, maps, part_maps = [], [], []
    first_pass = not test_set.eval_shapes
    for start in tqdm(range(0, len(samples), chunk), desc=f"{detector.name} predict", unit="chunk", leave=False):
        batch = samples[start : start + chunk]
        prediction = detector.predict([s.path for s in batch])
        scores.append(np.asarray(prediction.scores, dtype=np.float64))
        for offset, sample in enumerate(batch):
            if prediction.maps is None:
                maps = None
                shape = read_image(sample.path).shape[:2] if first_pass else None
            else:
                shape = prediction.maps[offset].shape[:2]
            if first_pass:
                test_set.add_ground_truth(sample, shape, eval_side)
            eval_shape = test_set.eval_shapes[start + offset]
            if maps is not None:
                maps.append(cv2.resize(np.asarray(prediction.maps[offset], np.float32), (eval_shape[1], eval_shape[0]),
                                       interpolation=cv2.INTER_LINEAR))
            if prediction.part_maps is None:
                part_maps = None
            elif part_maps is not None:
                part_maps.append(cv2.resize(np.asarray(prediction.part_maps[offset]).astype(np.int32),
                                            (eval_shape[1], eval_shape[0]), interpolation=cv2.INTER_NEAREST))
    return np.concatenate(scores), maps, part_maps


@dataclass
class BenchmarkResult:
    """Every run of a benchmark and their summary; ``records`` (the last run's per-image results,
    for the report) and ``threshold`` (its threshold) stay out of the JSON form."""

    defectlens_version: str
    dataset: str
    kind: str
    category: str
    method: str
    params: dict
    n_train: int
    n_test: int
    seeds: int
    runs: list[dict]
    summary: list[dict]
    records: list[ImageRecord] | None = field(default=None, repr=False)
    threshold: float | None = None

    def to_json(self) -> dict:
        """The JSON-serialisable content: everything but the per-image records."""
        return {k: v for k, v in asdict(self).items() if k not in ("records", "threshold")}


def run_benchmark(data, kind: str = "auto", method: str = DEFAULT_METHOD, shots: Sequence[int | str] = (1, 2, 4, 8, "full"),
                  seeds: int = 5, eval_side: int = 512, params: dict | None = None,
                  dataset: Dataset | None = None) -> BenchmarkResult:
    """Run the k-shot protocol of ``method`` with ``params`` (its ``seed`` is each run's seed).

    Each run fits on the training set (engine.fit.training_set) of ``shots`` normal images picked
    with the run's seed; methods that learn from a few anomalies take their real examples from the
    test set, which that run then evaluates without. Patch detectors (frozen backbone) share one
    feature pass over all images; every other detector is fitted on image files and predicts the
    test files itself. Shots 0 runs zero-shot methods only. On LOCO-layout sets the metrics also
    hold "logical" and "structural" blocks.
    """
    if method not in REGISTRY:
        raise ParameterError(f"unknown method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    params = dict(params or {})
    params.pop("seed", None)  # each run has its own
    dataset = dataset or load_dataset(data, kind=kind)
    params = with_category(method, dataset, params)
    learning_type = REGISTRY[method].learning_type
    train = normal_training_samples(dataset)
    test = [s for s in dataset.test if s.label in (0, 1)]
    if not test:
        raise DatasetError(f"{dataset.root}: no labelled test images to benchmark on")
    probe = create_detector(method, **params)
    # Methods that learn on an auxiliary set apply zero-shot to this one.
    if 0 in shots and learning_type not in (LearningType.ZERO_SHOT, LearningType.AUXILIARY):
        raise UsageError(f"--shots 0 means zero-shot, which '{method}' is not; it needs normal images")
    anomalies = probe.anomalies if learning_type == LearningType.FEW_ANOMALIES else 0
    patch_path = isinstance(probe, PatchDetector)
    test_set = TestSet(samples=test, labels=np.array([s.label for s in test]), defect_types=[s.defect_type for s in test],
                       defects_config=dataset.defects_config if dataset.kind == "loco" else None)
    if patch_path:
        # Training images first: in a non-square geometry they fix the layout (canvas_hw).
        train_features = probe.embed_images([s.path for s in train], fit=True, progress="train features",
                                            total=len(train)) if train else None
        test_features = _embed_test(probe, test_set, eval_side)
        index_of = {s.path: i for i, s in enumerate(train)}

    shot_counts = [len(train) if s == "full" else int(s) for s in shots]
    runs, records = [], None
    plan = shot_plan(len(train), shot_counts, seeds)
    for run_shots, seed in tqdm(plan, desc=f"{method} runs", unit="run"):
        training = training_set(dataset, learning_type, run_shots, seed, anomalies)
        detector = create_detector(method, seed=seed, **params)
        started = time.perf_counter()
        if patch_path:
            detector.canvas_hw = probe.canvas_hw  # the layout the augmented copies are brought to
            rows = [index_of[path] for path in training.images]
            # All training images in order (full shot): their features as they are, not an index copy.
            run_features = train_features if rows == list(range(len(train))) else train_features[rows]
            detector.fit_from_features(run_features, canvas_hw=probe.canvas_hw, views=detector.embed_views(training.images))
        else:
            training.fit(detector)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        part_maps = None
        if patch_path:
            scores, patch_maps = _score_in_blocks(detector, test_features)
            maps = [detector.upsample_map(m.numpy(), shape) for m, shape in zip(patch_maps, test_set.eval_shapes)]
        else:
            scores, maps, part_maps = _predict_generic(detector, test, test_set, eval_side)
        score_ms = (time.perf_counter() - started) / len(test) * 1000
        keep = np.array([s.path not in training.from_test for s in test])
        evaluated = test_set if keep.all() else test_set.subset(keep)
        runs.append({"shots": run_shots, "seed": seed, "fit_seconds": fit_seconds, "score_ms_per_image": score_ms,
                     "from_test": sorted(str(path) for path in training.from_test),
                     **_score_run(detector, evaluated, scores[keep], None if maps is None else [m for m, k in zip(maps, keep) if k])})
        records = [ImageRecord(path=str(s.path), score=float(score), label=int(s.label), defect_type=s.defect_type,
                               anomaly_map=None if maps is None else m, mask=mask,
                               extra_panels={} if parts is None else {"parts": colorize_parts(parts)})
                   for s, score, m, mask, parts in zip(test, scores, maps or [None] * len(test), test_set.masks,
                                                       part_maps or [None] * len(test))]
    return BenchmarkResult(
        defectlens_version=__version__, dataset=str(dataset.root), kind=dataset.kind, category=dataset.category,
        method=method, params=probe.get_params(), n_train=len(train), n_test=len(test), seeds=seeds,
        runs=runs, summary=summarise(runs), records=records, threshold=runs[-1]["threshold"] if runs else None)


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def summarise(runs: list[dict]) -> list[dict]:
    """One row per shot count: mean and std over seeds of each metric ("all" block), plus
    image AUROC per defect type."""
    rows = []
    for shots in sorted({r["shots"] for r in runs}):
        group = [r for r in runs if r["shots"] == shots]
        row: dict = {"shots": shots, "n_seeds": len(group)}
        for name in SUMMARY_METRICS:
            values = [r[name] if name in r else r["metrics"]["all"].get(name, math.nan) for r in group]
            row[name] = _mean_std(values)
        for defect_type in group[0]["metrics"]:
            if defect_type != "all":
                row[f"image_auroc[{defect_type}]"] = _mean_std([r["metrics"][defect_type]["image_auroc"] for r in group])
        for block in ("all", "logical", "structural"):
            for name in SPRO_METRICS:
                if name in group[0]["metrics"].get(block, {}):
                    key = name if block == "all" else f"{name}[{block}]"
                    row[key] = _mean_std([r["metrics"][block].get(name, math.nan) for r in group])
        row["fit_seconds"] = _mean_std([r["fit_seconds"] for r in group])
        row["score_ms_per_image"] = _mean_std([r["score_ms_per_image"] for r in group])
        rows.append(row)
    return rows


def format_table(summary: list[dict], n_train: int | None = None) -> list[dict[str, str]]:
    """Summary rows as strings 'mean ± std' for printing and for the HTML report."""
    table = []
    for row in summary:
        shots = "full" if n_train is not None and row["shots"] == n_train else str(row["shots"])
        cells = {"shots": f"{shots} ({row['shots']} img)" if shots == "full" else shots, "seeds": str(row["n_seeds"])}
        for key, value in row.items():
            if isinstance(value, tuple):
                mean, std = value
                digits = 1 if key in ("fit_seconds", "score_ms_per_image") else 3
                cells[key] = "–" if math.isnan(mean) else (f"{mean:.{digits}f} ± {std:.{digits}f}" if row["n_seeds"] > 1 else f"{mean:.{digits}f}")
        table.append(cells)
    return table


def markdown_table(table: list[dict[str, str]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "–") for c in columns) + " |" for row in table]
    return "\n".join(lines)
