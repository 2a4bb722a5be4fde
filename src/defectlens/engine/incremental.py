"""Incremental (object-by-object) learning: schedules, fitting products one after another, and
the unified incremental protocol of the IUF write-up.

Protocol: the objects are split into steps by a schedule (``10-1x5``: 10 objects, then five steps
of one). Each method learns step by step; after each step it is evaluated on the test images of
every object seen so far, which fills A[b, i] = AUROC on object i after step b (image and pixel
level), and ACC / FM follow (metrics/incremental.py). Objects within a step are added one after
another (``partial_fit`` per object). Every image is embedded once and all methods share those
features.

Methods compared (``METHODS``):
- ``unified``: one PatchCore bank per product plus a router (models/unified), cannot forget;
- ``iuf``: IUF (models/iuf); ``iuf-ablation``: IUF without object-aware attention, semantic
  compression and update projection (plain sequential fine-tuning of the same network);
- ``patchcore-shared``: one PatchCore bank shared by every object, updated each step as the
  coreset of the old bank and the new step's patches (same bank size: old objects lose room);
- ``padim-shared``: one PaDiM Gaussian per patch position shared by every object, its statistics
  updated with each step's images (the running mean and covariance of every image seen);
- ``single``: each object's own PatchCore (the reference a unified model is measured against).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.io import as_mask
from ..errors import DatasetError, UsageError
from ..metrics.image import image_auroc
from ..metrics.incremental import average_accuracy, forgetting_measure
from ..metrics.pixel import pixel_auroc
from ..models import create_detector
from ..models.maps import upsample_map
from ..models.memory import greedy_coreset
from ..models.patchcore.model import flatten_patches
from .fit import labelled_categories, normal_training_samples

METHODS = ("unified", "iuf", "iuf-ablation", "patchcore-shared", "padim-shared", "single")
#: Side of the square grid that maps and masks are compared at for pixel AUROC.
EVAL_SIDE = 128
_PART = re.compile(r"^(\d+)(?:x(\d+))?$")


def parse_schedule(text: str) -> list[int]:
    """Objects per step: ``10-5`` -> [10, 5]; ``3x5`` -> [3, 3, 3, 3, 3]; ``10-1x5`` ->
    [10, 1, 1, 1, 1, 1]. Parts joined by '-', each ``N`` (N objects in one step) or ``NxM``
    (M steps of N objects)."""
    steps: list[int] = []
    for part in str(text).strip().split("-"):
        match = _PART.match(part.strip())
        if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
            raise UsageError(f"schedule {text!r}: each '-'-separated part must be N or NxM with N, M >= 1 "
                             f"(e.g. 10-5, 3x5, 10-1x5), not {part!r}")
        steps += [int(match.group(1))] * int(match.group(2) or 1)
    return steps


def split_steps(objects: list[str], schedule: list[int]) -> list[list[str]]:
    """The objects learned at each step, in order."""
    if sum(schedule) != len(objects):
        raise UsageError(f"the schedule covers {sum(schedule)} objects but the data has {len(objects)} "
                         f"({', '.join(objects)})")
    starts = np.cumsum([0] + schedule)
    return [objects[a:b] for a, b in zip(starts[:-1], starts[1:])]


# -- fitting products one after another (defectlens fit / fit --update) -------------------------
def product_datasets(data: str | Path) -> list:
    """Each category of DATA (a folder of categories) or DATA itself, one product each."""
    return labelled_categories(data)


def fit_products(detector, data: str | Path, on_product=None) -> list[tuple[str, int]]:
    """``partial_fit`` ``detector`` on each product of DATA in turn (its normal training images);
    returns (product, image count) of each product learned. Ctrl-C between or during products
    propagates only after the products already learned are intact (the caller saves them)."""
    if not hasattr(detector, "partial_fit"):
        raise UsageError(f"method '{detector.name}' cannot add products to a model; use --method unified or iuf")
    learned = []
    for dataset in product_datasets(data):
        images = [s.path for s in normal_training_samples(dataset)]
        if not images:
            raise DatasetError(f"{dataset.root}: no normal training images found (expected train/good)")
        detector.partial_fit(images, product=dataset.category)
        learned.append((dataset.category, len(images)))
        if on_product:
            on_product(dataset.category, len(images))
    return learned


# -- the protocol -----------------------------------------------------------------------------
@dataclass
class ObjectData:
    name: str
    train: torch.Tensor  # backbone features of the normal training images
    test: torch.Tensor  # backbone features of the test images
    labels: np.ndarray  # 0 normal, 1 anomalous
    masks: list  # bool EVAL_SIDE² masks (None for normal images)


def _pick(count: int, most: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.arange(count) if most is None or count <= most else np.sort(rng.choice(count, most, replace=False))


def load_objects(roots: list[str | Path], backbone, max_train: int | None = None, max_test: int | None = None,
                 seed: int = 0) -> list[ObjectData]:
    """Every category under ``roots`` (folders of categories or category folders), embedded once.
    ``max_train`` / ``max_test`` cap the images per object (test: half normal, half anomalous,
    picked with ``seed``)."""
    rng = np.random.default_rng(seed)
    objects = []
    datasets = [d for root in roots for d in labelled_categories(root)]
    names = [d.category for d in datasets]
    if len(set(names)) != len(names):
        raise DatasetError(f"two categories share a name among {', '.join(names)}")
    for dataset in tqdm(datasets, desc="objects", unit="object"):
        train = normal_training_samples(dataset)
        train = [train[i] for i in _pick(len(train), max_train, rng)]
        good = [s for s in dataset.test if s.label == 0]
        bad = [s for s in dataset.test if s.label == 1]
        half = None if max_test is None else max_test // 2
        test = [good[i] for i in _pick(len(good), half, rng)] + [bad[i] for i in _pick(len(bad), half, rng)]
        if not train or not good or not bad:
            raise DatasetError(f"{dataset.root}: needs normal training images and normal and anomalous test images")
        masks = [as_mask(s.mask_paths, (EVAL_SIDE, EVAL_SIDE)) if s.label == 1 and s.mask_paths else
                 (np.zeros((EVAL_SIDE, EVAL_SIDE), bool) if s.label == 1 else None) for s in test]
        objects.append(ObjectData(dataset.category, backbone.embed([s.path for s in train]),
                                  backbone.embed([s.path for s in test]), np.array([s.label for s in test]), masks))
    return objects


class Learner:
    """A method in the protocol: ``learn`` one step's objects, ``score`` features ->
    (image scores, (N, h, w) patch maps)."""

    def __init__(self, backbone, params: dict):
        self.backbone, self.params = backbone, params
        self.routing: list[str | None] | None = None

    def learn(self, objects: list[ObjectData]) -> None:
        raise NotImplementedError

    def score(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class UnifiedLearner(Learner):
    def __init__(self, backbone, params):
        super().__init__(backbone, params)
        self.model = create_detector("unified", **params["unified"])
        self.model.backbone_network = backbone

    def learn(self, objects):
        for item in objects:
            self.model.partial_fit_features(item.train, item.name)

    def score(self, features):
        scores, maps, self.routing = self.model.score_features(features)
        return scores, maps


class IUFLearner(Learner):
    def __init__(self, backbone, params, ablation: bool = False):
        super().__init__(backbone, params)
        settings = dict(params["iuf"])
        if ablation:
            settings.update(object_attention=False, compression_weight=0.0, projection=False, beta=0.0)
        self.model = create_detector("iuf", **settings)
        self.model.backbone_network = backbone

    def _pool(self, features):
        return torch.nn.functional.avg_pool2d(features, self.model.pool) if self.model.pool > 1 else features

    def learn(self, objects):
        for item in objects:
            self.model.partial_fit_features(self._pool(item.train), item.name)

    def score(self, features):
        scores, maps = self.model.score_features(self._pool(features))
        return scores, maps


class SharedPatchCoreLearner(Learner):
    """One bank for all objects: coreset of (old bank ∪ new patches) at the same bank size."""

    def __init__(self, backbone, params):
        super().__init__(backbone, params)
        self.model = create_detector("patchcore", **params["patchcore"])
        self.model.backbone_network = backbone
        self.bank: torch.Tensor | None = None

    def learn(self, objects):
        patches = torch.cat([flatten_patches(item.train) for item in objects]
                            + ([self.bank] if self.bank is not None else []))
        self.bank = patches[greedy_coreset(patches, self.model.bank_size, seed=self.model.seed)].contiguous()
        self.model.load_state_tensors({"bank": self.bank}, {})

    def score(self, features):
        scores, maps = self.model.score_feature_batch(features)
        return scores, maps.numpy()


class SharedPaDiMLearner(Learner):
    """One Gaussian per position for all objects, statistics over every image seen so far."""

    def __init__(self, backbone, params):
        super().__init__(backbone, params)
        self.model = create_detector("padim", **params["padim"])
        self.model.backbone_network = backbone
        self.seen: list[torch.Tensor] = []

    def learn(self, objects):
        self.seen += [item.train for item in objects]
        self.model.fit_features(torch.cat(self.seen))

    def score(self, features):
        scores, maps = self.model.score_feature_batch(features)
        return scores, maps.numpy()


class SingleLearner(Learner):
    """Each object's own PatchCore, scored on that object only (the router is a given here)."""

    def __init__(self, backbone, params):
        super().__init__(backbone, params)
        self.models: dict[str, object] = {}
        self.current: str | None = None

    def learn(self, objects):
        for item in objects:
            model = create_detector("patchcore", **self.params["patchcore"])
            model.backbone_network = self.backbone
            model.fit_features(item.train)
            self.models[item.name] = model

    def score(self, features):
        scores, maps = self.models[self.current].score_feature_batch(features)
        return scores, maps.numpy()


LEARNERS = {"unified": UnifiedLearner, "iuf": IUFLearner, "iuf-ablation": lambda b, p: IUFLearner(b, p, ablation=True),
            "patchcore-shared": SharedPatchCoreLearner, "padim-shared": SharedPaDiMLearner, "single": SingleLearner}


def default_params(size: int, bank_size: int = 1024, iuf_steps: int = 200) -> dict:
    shared = {"size": size, "blur_sigma": 4.0 * size / 256}
    return {"unified": {**shared, "bank_size": bank_size}, "patchcore": {**shared, "bank_size": bank_size},
            "padim": {**shared, "feature_dims": 100},
            "iuf": {**shared, "steps": iuf_steps, "pool": 1 if size <= 128 else 2}}


@dataclass
class IncrementalResult:
    schedule: str
    steps: list[list[str]]
    settings: dict
    methods: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _evaluate(learner: Learner, item: ObjectData, input_hw, blur: float) -> tuple[float, float]:
    if isinstance(learner, SingleLearner):
        learner.current = item.name
    scores, maps = learner.score(item.test)
    upsampled = [upsample_map(m, input_hw, (EVAL_SIDE, EVAL_SIDE), blur) for m in maps]
    return image_auroc(item.labels, scores), pixel_auroc(item.masks, upsampled)


def run_incremental(objects: list[ObjectData], schedule: str, backbone, params: dict,
                    methods: tuple[str, ...] = METHODS) -> IncrementalResult:
    """Run every method of ``methods`` through the schedule; A matrices, ACC and FM per method."""
    steps = split_steps([o.name for o in objects], parse_schedule(schedule))
    by_name = {o.name: o for o in objects}
    order = [o.name for o in objects]
    blur = params["patchcore"]["blur_sigma"]
    result = IncrementalResult(schedule, steps, {"params": params, "objects": order})
    for method in methods:
        learner = LEARNERS[method](backbone, params)
        image = np.full((len(steps), len(order)), np.nan)
        pixel = np.full_like(image, np.nan)
        seconds, seen = [], []
        for b, step in enumerate(tqdm(steps, desc=method, unit="step")):
            started = time.perf_counter()
            learner.learn([by_name[n] for n in step])
            seconds.append(time.perf_counter() - started)
            seen += step
            if method == "unified" and b == 0 and len(seen) < len(order):
                result.routing["unknown_after_step_1"] = unknown_rate(learner.model, [by_name[n] for n in order
                                                                                       if n not in seen])
            for name in seen:
                i = order.index(name)
                image[b, i], pixel[b, i] = _evaluate(learner, by_name[name], backbone.input_hw, blur)
        result.methods[method] = {
            "image": image.tolist(), "pixel": pixel.tolist(), "step_seconds": seconds,
            "acc_image": average_accuracy(image), "fm_image": forgetting_measure(image),
            "acc_pixel": average_accuracy(pixel), "fm_pixel": forgetting_measure(pixel),
        }
        if method == "unified":
            result.routing.update(routing_figures(learner.model, objects))
    return result


def routing_figures(model, objects: list[ObjectData]) -> dict:
    """Routing accuracy of the final unified model on every test image of its products (the
    nearest product is the right one), the cost of routing (global feature + nearest-neighbour
    search, backbone excluded) per image, and how often known products' normal and anomalous
    test images are beyond the routing distance (called unknown, hence scored anomalous)."""
    total = right = 0
    unknown = {0: [0, 0], 1: [0, 0]}
    started = time.perf_counter()
    for item in objects:
        index, _, known = model.route(item.test)
        total += len(index)
        right += int(sum(model.products[i] == item.name for i in index))
        for label in (0, 1):
            unknown[label][0] += int((~known[item.labels == label]).sum())
            unknown[label][1] += int((item.labels == label).sum())
    elapsed = time.perf_counter() - started
    return {"images": total, "accuracy": right / total, "ms_per_image": 1000.0 * elapsed / total,
            "normal_called_unknown": unknown[0][0] / max(unknown[0][1], 1),
            "anomalous_called_unknown": unknown[1][0] / max(unknown[1][1], 1)}


def unknown_rate(model, objects: list[ObjectData]) -> dict:
    """Share of test images of objects the model never learned that it flags as unknown."""
    flagged = total = 0
    for item in objects:
        _, _, known = model.route(item.test)
        flagged += int((~known).sum())
        total += len(known)
    return {"images": total, "flagged_unknown": flagged / total if total else float("nan")}


def markdown(result: IncrementalResult) -> str:
    """Per-step tables and the ACC/FM summary, in points (AUROC × 100)."""
    order = result.settings["objects"]
    lines = [f"# Unified incremental protocol, schedule {result.schedule}", "",
             "| method | ACC image | FM image | ACC pixel | FM pixel | learning s (all steps) |", "|---|---|---|---|---|---|"]
    for method, figures in result.methods.items():
        lines.append(f"| {method} | {100 * figures['acc_image']:.1f} | {100 * figures['fm_image']:.1f} | "
                     f"{100 * figures['acc_pixel']:.1f} | {100 * figures['fm_pixel']:.1f} | {sum(figures['step_seconds']):.1f} |")
    for method, figures in result.methods.items():
        for level in ("image", "pixel"):
            lines += ["", f"## {method}: {level} AUROC (rows: after step b; columns: objects)", "",
                      "| step | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
            for b, row in enumerate(figures[level]):
                cells = ["" if np.isnan(v) else f"{100 * v:.1f}" for v in row]
                lines.append(f"| {b + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
