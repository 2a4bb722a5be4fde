"""The few-shot composition detector: segment, align, nine scores, self-calibrated norm.

A training-free pipeline after the write-up "few-shot logical and structural anomaly detection
with SAM and DINOv2", on the embedded backbone:

1. part maps from :mod:`.segment` (k-means part classes shared by all images, optionally made
   whole by SAM masks, see :mod:`.sam`);
2. nine scores, each the distance to the nearest normal shot: class-agnostic, class-aware (worst
   class) and foreground patch kNN (mean of the top 2 % cosine distances), per class the mean
   feature (embedding), pixel share and part count (histogram), CIELAB colour without lightness,
   and mean location (the write-up's seven), per patch word (:mod:`.words`) the number of
   patches (words): the count of parts too small or too plain for the part maps, and the patches
   whose word lies where no shot shows it (placement): a part in the wrong compartment;
3. self-calibration by leave-one-out over the shots. A patch score is divided by the largest
   value it takes on a shot left out of the others. The class-wise scores are calibrated per class
   instead, because a screw's area and a tray's area do not vary alike: each class's distance is
   divided by the largest leave-one-out distance of that class (at least a floor, the smallest
   difference that matters), and the score is the worst class. The words are calibrated per word
   the same way, and their worst-word score is then divided by its held-out value like a patch
   score (``HELD_OUT_NORMALISED``), as is the placement count. The image score is the Euclidean
   norm of the calibrated scores (the words weighing 1.5, placement 0.5 where the held-out values
   divide them: ``HELD_OUT_WEIGHTS``): like the write-up's weighted sum it adds evidence, but one score
   far outside its normal range counts more than several slightly raised ones (on four generated
   LOCO sets it raised logical AUROC by 0.003-0.04 over the plain sum at 1-8 shots). With a single
   shot nothing can be left out, and two give one distance: below three shots naive weights
   (typical values on good images) stand in.

``scoring="published"`` computes the four class-wise scores and the combination as the write-up
has them: the image-level vectors of :func:`.parts.image_vectors` (pixel counts per class, mean a
and b per class, centroid distances from the origin, class embeddings), each scored by the
Euclidean distance to the nearest normal image over the whole vector; every score divided by its
largest leave-one-out value over the shots (from two shots on; one shot: the naive weights for
the patch scores) and the seven summed (the words and placement are not the write-up's: left out). docs/fidelity.md
compares the two.

The anomaly map is the class-agnostic patch distance (the picturable part), overlaid with the
evidence of the class-wise scores: a part class far outside its normal range (calibrated score
above ``PAINT_ABOVE``) lights up where it is in the image and where the references have it but
the image does not, so a misplaced part shows at both places and a missing one where it should be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ...backbones import DEFAULT_BACKBONE
from ...data.io import as_image
from ...errors import UsageError
from ..base import REGISTRY, BackboneDetector, Prediction, register
from ..calibration import calibrate, refit_folds
from ..maps import upsample_map
from ..params import BACKBONE, BLUR_SIGMA, INPUT_SIZE, SEED, Choice, Integer, ListOf, Optional, ParameterError, Params, Real, Text
from .parts import ImageParts, class_distances, describe, image_vectors, part_sizes, unit_patches
from .segment import PartSegmenter, background_classes
from .views import shot_views
from .words import PatchWords, out_of_place, word_places

#: The write-up's seven scores, then the patch words and their placement (see the module doc).
SCORES = ("agnostic", "aware", "foreground", "embedding", "histogram", "colour", "location", "words", "placement")
PATCH_SCORES = SCORES[:3]
WRITE_UP_SCORES = SCORES[:7]
#: Scores divided by their held-out values on the shots (from three shots on). The class-wise
#: ones are not: a class's spread is its own. The words are per word too, but their score is the
#: worst of 16 words, which on a good image is several spreads (on generated trays it drowned the
#: other scores in the norm: logical AUROC 0.85 against 0.92 with this second division).
HELD_OUT_NORMALISED = (*PATCH_SCORES, "words", "placement")
#: How much each held-out-normalised score counts in the norm (the others 1). A count of patches
#: out of place swings on good trays when four shots cover few places (one draw's good trays held 5
#: to 11 such patches against a held-out mean under one), and the worst of 16 words stands out
#: less than it should after its division. Chosen among placement 0.25-1 and words 1-3 by
#: benchmarks/composition_weights.py on generated LOCO trays (4 shots, 5 draws on each of assembly
#: sets 0-2, 3-5 and photo_assembly 0-2; ranked by the groups' mean less std of the logical AUROC;
#: chosen on two groups, the third gained +0.013, +0.000 and +0.019); at 8 shots +0.010, at 3 and
#: 12 within +-0.005, at 1 and 2 shots (naive weights, where these are not used) -0.009 and -0.006.
#: docs/logical.md, 2026-12-03.
HELD_OUT_WEIGHTS = {"words": 1.5, "placement": 0.5}
#: The least a held-out normaliser may be: a count of patches out of place is at least one patch
#: (four shots often place every held-out patch, and a mean of 0 would make any patch infinite).
MIN_NORMALISER = {"placement": 1.0}
#: The class-wise quantities behind each class-wise score.
QUANTITIES = {"embedding": ("embedding",), "histogram": ("area", "count"), "colour": ("colour",),
              "location": ("location",)}
#: The smallest difference that matters per quantity, the floor of its per-class normalisers:
#: square-root share of the image, parts, CIELAB ΔE (about what an inspector notices), share of the
#: image side, cosine distance, patches. They keep shots that happen to agree from making any
#: deviation huge. Location: 4 % of the side, about what a tray's pose alone moves a class's mean
#: between normal images; at 2 % the location score of good images reached 3 (90th percentile, 4
#: shots), adding noise to every image's norm (generated LOCO trays: logical AUROC +0.008 on the
#: sets where it was chosen, +0.016 and +0.002 on two held-out kinds of sets; docs/logical.md).
FLOORS = {"area": 0.01, "count": 1.0, "colour": 5.0, "location": 0.04, "embedding": 0.02, "words": 1.0}
#: One shot leaves nothing out: naive weights divide the scores instead, the 90th percentile of
#: each score on good images over 1-shot runs (EfficientNet-Lite0 at 256 px, generated LOCO sets
#: of seeds 2 and 3, not those of the benchmark; class-wise scores are then in units of the floors;
#: the words measured so on 2026-12-01, in patches). Location and words re-measured on 2026-12-02
#: for the 4 % location floor and 16 words (5.9 and 43.4 on the few-shot sets of seeds 2 and 3,
#: 1 shot, 5 draws each; the other scores there: within 25 % of their values here), placement
#: measured so the same day (104 patches of 1,024: one shot leaves most places unseen).
NAIVE_WEIGHTS = {"agnostic": 0.3, "aware": 0.4, "foreground": 0.3, "embedding": 12.0, "histogram": 5.0,
                 "colour": 1.3, "location": 6.0, "words": 43.0, "placement": 104.0}
#: Class evidence paints the map above this: a part three times further from the references than
#: any held-out shot was. Lower bounds paint most good images too (at 1, 85 % of them, a fifth of
#: the image each), which costs structural sPRO more than it gains logical (generated sets 2, 3).
PAINT_ABOVE = 3.0
#: A pixel belongs to a class's usual place when at least this share of the references has it there.
USUAL_PLACE = 0.5
#: Per-image arrays of ImageParts (per class, and the word histogram), stored in the model file.
IMAGE_ARRAYS = ("area", "count", "colour", "location", "embedding", "words")
#: Fewer shots than this keep the naive weights: with two, leaving one out measures a single
#: distance (the same both ways), which misweighs the scores (2-shot logical AUROC 0.80 with it,
#: 0.89 with the naive weights on generated LOCO sets of seeds 2 and 3; from 3 shots on it helps).
SHOTS_TO_CALIBRATE = 3
#: ``views=None`` (the default): refined scoring from ``SHOTS_TO_CALIBRATE`` to ``VIEWS_UP_TO``
#: shots adds this many views per shot, and ``normalise=None`` pools the spreads wherever there are
#: views. Generated LOCO trays, 3 sets × 5 draws, logical AUROC at 4 shots 0.916/0.943/0.880 →
#: 0.96/0.967/0.911 on three groups (std over draws halved), BSData pits 0.924 → 0.936, at twice the
#: predict time; at 3 shots 0.863 → 0.891, at 8 0.975 → 0.982. Not at 1 or 2 shots, where the naive
#: weights stand in (0.790 → 0.781, 0.841 → 0.825); above 8 unmeasured, the cost growing with shots.
AUTO_VIEWS, VIEWS_UP_TO = 2, 8
#: At most this many references are left out when estimating per-class spreads (cost grows as R²).
CLASS_LOO_MAX = 32
#: Patch detectors that can be fused in for structural defects (``structural``).
STRUCTURAL_METHODS = ("patchknn", "patchcore", "padim", "spade")
#: Parameters the structural member takes from the composition.
STRUCTURAL_SHARED = ("backbone", "blur_sigma", "seed")
#: The spread of held-out normal scores that fusion divides by is at least this share of their
#: mean: a few held-out shots that happen to agree must not make every small rise a large one. The
#: patch member's held-out spread from four shots is often far below its spread over good test
#: trays (3 % to 23 % of its mean, median 11 %), and a good tray's member z-score then outran a
#: logical anomaly's. Chosen among 2, 10, 15 and 20 % (5 % gave what 2 % did, 30 % less than 15)
#: on the mean image AUROC of all anomalies over three groups of generated LOCO trays (4 shots, 5
#: draws each, the fusion's recorded inputs; benchmarks/composition_fusion.py): 15 %, chosen on two
#: groups, gained on the third +0.012, +0.005 and +0.003 (logical up, structural slightly down).
#: docs/logical.md, 2026-12-03.
FUSION_MIN_SPREAD = 0.15


def finer_maximum(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The pixel-wise larger of two patch grids over the same view, on the finer of the two."""
    if first.size < second.size:
        first = cv2.resize(first.astype(np.float32), second.shape[::-1], interpolation=cv2.INTER_LINEAR)
    elif second.size < first.size:
        second = cv2.resize(second.astype(np.float32), first.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return np.maximum(first, second)


def paint_level(evidence: float) -> float:
    """The map value of evidence above ``PAINT_ABOVE`` (a part class's or the placement score):
    shifted so that evidence just above the bound ranks with the worst normal patches (near 1)."""
    return evidence - (PAINT_ABOVE - 1.0)


def spread(values: np.ndarray, floor: float = FUSION_MIN_SPREAD) -> float:
    """Standard deviation of held-out normal scores, at least ``floor`` times their mean (see
    ``FUSION_MIN_SPREAD``)."""
    deviation = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return max(deviation, floor * abs(float(np.mean(values))), 1e-9)


def pooled_spread(values: np.ndarray, pooled: bool) -> np.ndarray:
    """Per column of (held-out, K) distances (nan: not comparable): their mean when ``pooled``,
    else their largest; nan where a column has no value."""
    finite = np.isfinite(values)
    if not pooled:
        return np.fmax.reduce(values, axis=0) if len(values) else np.full(values.shape[1:], np.nan)
    counts = finite.sum(axis=0)
    return np.where(counts > 0, np.where(finite, values, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)


def top_mean(distances: torch.Tensor, fraction: float) -> float:
    if distances.numel() == 0:
        return 0.0
    return float(distances.topk(max(1, round(fraction * distances.numel()))).values.mean())


def combine(calibrated: dict[str, float], chosen: Sequence[str] = SCORES, weights: dict[str, float] | None = None) -> float:
    """The image score: the Euclidean norm of the chosen calibrated scores, each times its weight
    (1 where ``weights`` has none)."""
    weights = weights or {}
    return float(np.sqrt(sum((weights.get(s, 1.0) * calibrated[s]) ** 2 for s in chosen)))


class ClassSortedPatches(NamedTuple):
    """The references' patches ordered by class, the foreground classes first: each class and the
    foreground are then column ranges of a similarity matrix, read as views. Masks over the whole
    matrix (the mask, the filled copy, their maxima) cost more than the matrix product itself: a
    predict process of 48 trays at 4 shots took 371 ms per image with them, 245 without."""

    patches: torch.Tensor  # (R, D) unit-length features, grouped by class
    class_start: np.ndarray  # (K,) first column of each class (empty range: start == end)
    class_end: np.ndarray  # (K,)
    foreground_end: int  # columns before it are the foreground

    @classmethod
    def of(cls, bank: ImageParts) -> ClassSortedPatches:
        """From stacked references, whose foreground is a property of the class (``describe``)."""
        classes = bank.patch_class.numpy()
        foreground = bank.foreground.numpy()
        count = int(classes.max()) + 1 if len(classes) else 0
        in_foreground = np.zeros(count, bool)
        in_foreground[classes[foreground]] = True
        if (in_foreground[classes] != foreground).any():
            raise ValueError("a class is partly foreground: the foreground must follow the part classes")
        key = classes + count * ~in_foreground[classes]  # foreground classes first
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        places = np.arange(count) + count * ~in_foreground
        start = np.searchsorted(sorted_key, places, side="left")
        end = np.searchsorted(sorted_key, places, side="right")
        return cls(bank.patches[torch.from_numpy(order)], start, end, int(foreground.sum()))


def nearest_patches(test: ImageParts, bank: ClassSortedPatches, chunk: int = 8192) -> tuple[torch.Tensor, ...]:
    """Cosine distance of each test patch to its nearest bank patch: any patch, one of the same
    class, a foreground one. One similarity pass serves all three; a class or a foreground that
    the bank lacks gives distance 1 (orthogonal features)."""
    best = [torch.full((len(test.patches),), -torch.inf) for _ in range(3)]
    classes = test.patch_class.numpy()
    rows = {k: torch.from_numpy(np.flatnonzero(classes == k)) for k in np.unique(classes) if k < len(bank.class_start)}
    for start in range(0, len(bank.patches), chunk):
        stop = min(start + chunk, len(bank.patches))
        similarity = test.patches @ bank.patches[start:stop].T
        best[0] = torch.maximum(best[0], similarity.amax(dim=1))
        for k, mine in rows.items():
            low, high = max(int(bank.class_start[k]), start), min(int(bank.class_end[k]), stop)
            if high > low:
                best[1][mine] = torch.maximum(best[1][mine], similarity[mine, low - start : high - start].amax(dim=1))
        if bank.foreground_end > start:
            best[2] = torch.maximum(best[2], similarity[:, : min(bank.foreground_end, stop) - start].amax(dim=1))
    return tuple(torch.where(torch.isfinite(b), 1.0 - b, torch.ones(())) for b in best)


class Memory:
    """The normal shots, ready for scoring: their stacked parts and per-class normalisers."""

    def __init__(self, refs: list[ImageParts], typical_area: np.ndarray, background: np.ndarray,
                 usual_place: np.ndarray | None = None, pixels: int | None = None, sources: np.ndarray | None = None,
                 pooled: bool = False, floors: dict[str, float] = FLOORS):
        """``usual_place``: (K, S, S) bool, where each class lies in most references (for maps).
        ``pixels``: pixels of a part map; given, the class-wise scores are the write-up's
        image-level vector distances instead of the per-class ones. ``sources``: the shot each
        reference shows (views of one shot share it; default: each its own). ``pooled``: per-class
        spreads are the mean over left-out references instead of the largest. ``floors``: the per-quantity
        floors of the normalisers (``FLOORS``)."""
        self.refs, self.typical_area, self.background, self.usual_place = refs, typical_area, background, usual_place
        self.floors = dict(floors)
        self.pixels = pixels
        self.sources = np.arange(len(refs)) if sources is None else np.asarray(sources)
        self.pooled = pooled
        self.stacked = ImageParts.stack(refs)
        self.patch_bank = ClassSortedPatches.of(self.stacked)
        self.class_norms = self._class_normalisers()
        self.word_places = word_places(self.stacked.word_map, self.stacked.words.shape[1])

    def _class_normalisers(self) -> dict[str, np.ndarray]:
        """Per quantity and class (per word for the words): the nearest-reference distances of
        left-out shots (a shot and its views are left out together, and all of them measured),
        their largest or, pooled, their mean; at least the quantity's floor."""
        words = self.stacked.words.shape[1]
        norms = {q: np.full(words if q == "words" else len(self.typical_area), floor) for q, floor in self.floors.items()}
        shots = np.unique(self.sources)
        if len(shots) < SHOTS_TO_CALIBRATE:
            return norms
        distances = {q: [] for q in self.floors}
        for j in shots[np.unique(np.linspace(0, len(shots) - 1, min(len(shots), CLASS_LOO_MAX)).round().astype(int))]:
            others = ImageParts.stack([r for r, source in zip(self.refs, self.sources) if source != j])
            for i in np.flatnonzero(self.sources == j):
                for q, values in class_distances(self.refs[i], others, self.typical_area).items():
                    distances[q].append(values)
        for q, values in distances.items():
            norms[q] = np.fmax(norms[q], pooled_spread(np.array(values), self.pooled))
        return norms

    def out_of_place(self, test: ImageParts) -> np.ndarray:
        """(h, w) bool: the patches whose word no reference shows near there."""
        return out_of_place(test.word_map, self.word_places)

    def scores(self, test: ImageParts, top_fraction: float) -> tuple[dict[str, float], torch.Tensor, dict[str, np.ndarray]]:
        """The nine raw scores of one image, its class-agnostic patch distances (P,) and the
        class-wise scores per class ((K,) each, nan for the background and absent classes)."""
        agnostic, aware, foreground = nearest_patches(test, self.patch_bank)
        scores = {"agnostic": top_mean(agnostic, top_fraction),
                  "aware": max(top_mean(aware[test.patch_class == k], top_fraction) for k in torch.unique(test.patch_class)),
                  "foreground": top_mean(foreground[test.foreground], top_fraction)}
        ratios = {q: d / self.class_norms[q] for q, d in class_distances(test, self.stacked, self.typical_area).items()}
        per_class = {}
        for name, quantities in QUANTITIES.items():
            values = np.fmax.reduce([ratios[q] for q in quantities])
            # The write-up ignores the background: anomalies there are not what is inspected.
            values[self.background] = np.nan
            per_class[name] = values
            scores[name] = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        scores["words"] = float(ratios["words"].max())
        scores["placement"] = float(self.out_of_place(test).sum())
        if self.pixels is not None:
            test_vectors = image_vectors(test, ~self.background, self.pixels)
            for name, refs in image_vectors(self.stacked, ~self.background, self.pixels).items():
                scores[name] = float(np.linalg.norm(refs - test_vectors[name], axis=1).min())
        return scores, agnostic, per_class


@register
class Composition(BackboneDetector):
    """Segment, align, score nine features against the few normal shots, combine them calibrated."""

    name = "composition"
    weight_locations = ("sam_model",)
    parameter_constraints = {"backbone": BACKBONE, "size": INPUT_SIZE, "seed": SEED, "parts": Integer(2, 64),
                             "part_size": Integer(16, 1024), "scores": ListOf(Choice(SCORES)),
                             "top_fraction": Real(0.0, 1.0, open_low=True), "blur_sigma": BLUR_SIGMA,
                             "segmenter": Choice(("clusters", "sam")), "sam_model": Optional(Text()),
                             "scoring": Choice(("refined", "published")), "views": Optional(Integer(0, 16)),
                             "normalise": Optional(Choice(("max", "pooled"))),
                             "structural": Optional(Choice(STRUCTURAL_METHODS)),
                             "structural_params": Optional(Params())}

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int = 256, seed: int = 0, parts: int = 12,
                 part_size: int = 128, scores: tuple[str, ...] = SCORES, top_fraction: float = 0.02,
                 blur_sigma: float = 4.0, segmenter: str = "clusters", sam_model: str | None = None,
                 scoring: str = "refined", views: int | None = None, normalise: str | None = None,
                 structural: str | None = None, structural_params: dict | None = None):
        """``parts``: number of part classes. ``part_size``: side of the part maps in pixels.
        ``scores``: which of the nine scores to combine (all by default; one alone for an ablation).
        ``segmenter``: "clusters" (embedded, no weights) or "sam" (cluster classes voted inside
        SAM masks; needs ``sam_model``, a local SAM folder, or DEFECTLENS_SAM_MODEL).
        ``scoring``: "refined" (per-class matching and calibration, norm of the scores) or
        "published" (the write-up's image-level vectors, leave-one-out weights, weighted sum).
        ``views``: jittered views per shot (small pose and exposure changes, see :mod:`.views`)
        added to the references and to the held-out images of the calibration; None: ``AUTO_VIEWS``
        with refined scoring from 3 to ``VIEWS_UP_TO`` shots, else none. ``normalise``:
        each score's spread from the held-out shots, their largest value ("max", the write-up)
        or their mean ("pooled": every held-out shot and view counts, not only the most
        extreme); None: pooled where there are views, else max. ``structural``: a patch detector
        fused in for structural defects (fit on the same shots and features); the image score is
        then the larger of the two detectors' scores, each standardised by its own held-out normal
        scores. ``structural_params``: the member's own parameters (backbone, seed and blur_sigma
        are the composition's, and its view is the composition's square one); a ``size`` other
        than the composition's makes the member embed the images itself: structural defects are
        often a few pixels wide while parts and their layout are not."""
        self.backbone = backbone
        self.size = size
        self.seed = seed
        self.parts = parts
        self.part_size = part_size
        self.scores = scores
        self.top_fraction = top_fraction
        self.blur_sigma = blur_sigma
        self.segmenter = segmenter
        self.sam_model = sam_model
        self.scoring = scoring
        self.views = views
        self.normalise = normalise
        self.structural = structural
        self.structural_params = structural_params
        self._sam = None
        self.structural_member = None
        self.fusion: list[float] | None = None  # composition mean, spread; member mean, spread
        self.part_segmenter = PartSegmenter(parts, part_size, seed)
        self.patch_words = PatchWords(seed=seed)
        self.memory: Memory | None = None
        self.background: np.ndarray | None = None
        self.min_part: np.ndarray | None = None
        self.normalisers: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # ``HELD_OUT_WEIGHTS`` where the held-out normalisers are used
        self.views_used: int | None = None  # ``views`` and ``normalise`` as the fit resolved them
        self.normalise_used: str | None = None

    def resolve_views(self, shots: int) -> tuple[int, str]:
        """(views per shot, normalise) for ``shots`` normal images: the parameters where set,
        else the rule of ``AUTO_VIEWS``."""
        views = self.views
        if views is None:
            wanted = self.scoring == "refined" and SHOTS_TO_CALIBRATE <= shots <= VIEWS_UP_TO
            views = AUTO_VIEWS if wanted else 0
        return views, self.normalise or ("pooled" if views else "max")

    def part_map(self, image: np.ndarray, features: torch.Tensor) -> np.ndarray:
        """(part_size, part_size) part classes of one RGB image and its (C, h, w) features."""
        part_map = self.part_segmenter(image, features)
        if self.segmenter == "sam":
            from .sam import SamRegions, vote_in_regions

            if self._sam is None:
                self._sam = SamRegions(self.sam_model)
            part_map = vote_in_regions(part_map, self._sam(image, self.part_size), self.parts)
        return part_map

    def compose(self, images: list[np.ndarray], features: torch.Tensor) -> tuple[list[ImageParts], list[np.ndarray]]:
        """What each image is made of, and its part map."""
        maps = [self.part_map(image, f) for image, f in zip(images, features)]
        return [describe(image, f, m, self.background, self.min_part, self.patch_words)
                for image, f, m in zip(images, features, maps)], maps

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        images = [as_image(image) for image in images]
        if self.structural is not None and len(images) < 2:
            raise UsageError(f"composition: structural={self.structural} is standardised by held-out normal scores; "
                             "fit on at least 2 normal images")
        self.views_used, self.normalise_used = self.resolve_views(len(images))
        images, sources = shot_views(images, self.views_used, self.seed)
        features = self.backbone_network.embed(images, progress="features", total=len(images))
        self.part_segmenter = PartSegmenter(self.parts, self.part_size, self.seed)
        self.part_segmenter.fit(images, features)
        maps = [self.part_map(image, f) for image, f in tqdm(zip(images, features), total=len(images), desc="parts",
                                                              unit="img", leave=False, disable=len(images) < 16)]
        self.background = background_classes(maps, self.parts)
        self.min_part = part_sizes(maps, self.parts)
        self.patch_words = PatchWords(seed=self.seed).fit(torch.cat([unit_patches(f) for f in features]))
        refs = [describe(image, f, m, self.background, self.min_part, self.patch_words)
                for image, f, m in zip(images, features, maps)]
        typical_area = np.median([r.area for r in refs], axis=0)
        self._calibrate(refs, typical_area, sources, features, images)
        usual_place = np.mean([m[None] == np.arange(self.parts)[:, None, None] for m in maps], axis=0) >= USUAL_PLACE
        self.memory = Memory(refs, typical_area, self.background, usual_place, pixels=self._published_pixels(),
                             sources=sources, pooled=self.normalise_used == "pooled")

    @classmethod
    def check_params(cls, params) -> None:
        super().check_params(params)
        own = params.get("structural_params")
        if own is None:
            return
        if params.get("structural") is None:
            raise ParameterError("composition: structural_params needs structural (the member method) set")
        set_here = sorted(set(own) & set(STRUCTURAL_SHARED))
        if set_here:
            raise ParameterError(f"composition: structural_params sets {', '.join(set_here)}: set those on the composition")
        if own.get("geometry", "square") != "square":
            raise ParameterError("composition: the structural member sees the composition's square view; "
                                 "structural_params may set its size, not its geometry")
        REGISTRY[params["structural"]].check_params(own)

    def _new_member(self):
        shared = {name: getattr(self, name) for name in STRUCTURAL_SHARED}
        return REGISTRY[self.structural](**{"size": self.size, **shared, **(self.structural_params or {})})

    def _member_features(self, member, images: list[np.ndarray], features: torch.Tensor) -> torch.Tensor:
        """The composition's features, or the member's own backbone pass at its own size."""
        return features if member.size == self.size else member.embed_images(images)

    def _calibrate(self, refs: list[ImageParts], typical_area: np.ndarray, sources: np.ndarray,
                   features: torch.Tensor, images: list[np.ndarray]) -> None:
        """Held-out shots (with their views): the patch scores' normalisers, the fusion's
        standardisation, the threshold and the map range."""
        count = len(np.unique(sources))
        self.fusion = None
        self.weights = {}
        if count < 2:
            self.normalisers = dict(NAIVE_WEIGHTS)
            return
        held_out, patch_maps, member_scores, member_maps = [], [], [], []
        if self.structural is not None:
            self.structural_member = self._new_member()
            member_features = self._member_features(self.structural_member, images, features)
            # The member's own augmented copies (its ``augment``) of the shots and their views.
            member_views = self.structural_member.embed_views(images)
        for fold in refit_folds(count, self.seed):  # the map range (and threshold) need these even when the naive weights stay
            kept, left_out = np.flatnonzero(~np.isin(sources, fold)), np.flatnonzero(np.isin(sources, fold))
            memory = Memory([refs[i] for i in kept], typical_area, self.background, pixels=self._published_pixels(),
                            sources=sources[kept], pooled=self.normalise_used == "pooled")
            for i in left_out:
                scores, distances, _ = memory.scores(refs[i], self.top_fraction)
                held_out.append(scores)
                patch_maps.append(distances)
            if self.structural is not None:
                member = self._new_member()
                member.fit_normal(member_features, member_views, kept)
                fold_scores, fold_maps = member.score_feature_batch(member_features[left_out])
                member_scores.extend(fold_scores)
                member_maps.extend(fold_maps.numpy())
        statistic = np.mean if self.normalise_used == "pooled" else np.max
        held = {s: max(float(statistic([h[s] for h in held_out])), MIN_NORMALISER.get(s, 1e-6)) for s in SCORES}
        if self.scoring == "published":  # the largest leave-one-out score is each score's weight
            self.normalisers = held
        elif count < SHOTS_TO_CALIBRATE:
            self.normalisers = dict(NAIVE_WEIGHTS)
        else:  # class-wise scores are already divided by their per-class leave-one-out spreads
            self.normalisers = {s: held[s] if s in HELD_OUT_NORMALISED else 1.0 for s in SCORES}
            self.weights = dict(HELD_OUT_WEIGHTS)
        # The held-out shots were scored without their own per-class spreads: an honest, slightly
        # high estimate of what good images score, which keeps false alarms rare.
        normal_maps = [(patches / self.normalisers["agnostic"]).numpy() for patches in patch_maps]
        normal_scores = np.array([self._total(h) for h in held_out])
        if self.structural is not None:
            member_scores = np.asarray(member_scores, np.float64)
            self.fusion = [float(np.mean(normal_scores)), spread(normal_scores), float(np.mean(member_scores)),
                           spread(member_scores)]
            self.structural_member.fit_normal(member_features, member_views, np.arange(len(images)))
            grid = features.shape[2:]
            normal_maps = [finer_maximum(own.reshape(grid), member / self._member_map_scale())
                           for own, member in zip(normal_maps, member_maps)]
            normal_scores = self._fuse(normal_scores, member_scores)
        self.set_calibration(calibrate(normal_scores, normal_maps))

    def _fuse(self, scores: np.ndarray, member_scores: np.ndarray) -> np.ndarray:
        """The larger standardised score: an image is as anomalous as the detector that finds it
        most so (logical and structural defects rarely raise both)."""
        mean, deviation, member_mean, member_deviation = self.fusion
        return np.maximum((np.asarray(scores) - mean) / deviation, (np.asarray(member_scores) - member_mean) / member_deviation)

    def _member_map_scale(self) -> float:
        """The member's patch distances are divided by its mean held-out normal image score, so
        that, like the calibrated class-agnostic distances, a normal image's worst patches are near 1."""
        return max(self.fusion[2], 1e-9)

    def _published_pixels(self) -> int | None:
        return self.part_size**2 if self.scoring == "published" else None

    def _total(self, scores: dict[str, float]) -> float:
        return self._combine_calibrated({s: scores[s] / self.normalisers[s] for s in SCORES})

    def _combine_calibrated(self, calibrated: dict[str, float]) -> float:
        """The image score: the write-up's sum of the chosen calibrated scores, or their norm."""
        if self.scoring == "published":
            return float(sum(calibrated[s] for s in self.scores if s in WRITE_UP_SCORES))
        return combine(calibrated, self.scores, self.weights)

    def score_parts(self, parts: ImageParts) -> tuple[dict[str, float], torch.Tensor, np.ndarray]:
        """The nine calibrated scores of one image (the image score is ``combine`` of the chosen
        ones), its calibrated class-agnostic patch distances and each class's calibrated evidence
        (K,): the largest of its chosen class-wise scores, 0 where there is none."""
        raw, distances, per_class = self.memory.scores(parts, self.top_fraction)
        # Class evidence for the map stays per class, in units of each class's spread.
        scale = {s: 1.0 if self.scoring == "published" else self.normalisers[s] for s in QUANTITIES}
        chosen = [per_class[s] / scale[s] for s in QUANTITIES if s in self.scores]
        evidence = np.nan_to_num(np.fmax.reduce(chosen), nan=0.0) if chosen else np.zeros(len(self.background))
        return {s: raw[s] / self.normalisers[s] for s in SCORES}, distances / self.normalisers["agnostic"], evidence

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        features = self.backbone_network.embed(images)
        compositions, part_maps = self.compose(images, features)
        scores, maps, parts = [], [], []
        height, width = features.shape[2:]
        member_scores, member_maps = (None, None) if self.fusion is None else self.structural_member.score_feature_batch(
            self._member_features(self.structural_member, images, features))
        for index, (image, composition, part_map) in enumerate(zip(images, compositions, part_maps)):
            calibrated, distances, evidence = self.score_parts(composition)
            scores.append(self._combine_calibrated(calibrated))
            grid = np.maximum(distances.reshape(height, width).numpy(), self.placement_map(composition, calibrated))
            if member_maps is not None:
                grid = finer_maximum(grid, member_maps[index].numpy() / self._member_map_scale())
            patch_map = upsample_map(grid, self.backbone_network.input_hw, image.shape[:2], self.blur_sigma)
            parts_map = cv2.resize(self.evidence_map(part_map, evidence), (image.shape[1], image.shape[0]),
                                   interpolation=cv2.INTER_NEAREST)
            maps.append(np.maximum(patch_map, parts_map))
            parts.append(cv2.resize(part_map.astype(np.uint8), (image.shape[1], image.shape[0]),
                                    interpolation=cv2.INTER_NEAREST).astype(np.int64))
        scores = np.array(scores, dtype=np.float64)
        if member_scores is not None:
            scores = self._fuse(scores, member_scores)
        return Prediction(scores=scores, maps=maps, part_maps=parts)

    def placement_map(self, composition: ImageParts, calibrated: dict[str, float]) -> np.ndarray:
        """(h, w) float32 over the patch grid: when the placement score is far outside the normal
        range (above ``PAINT_ABOVE``), the patches out of place, painted as the part classes are."""
        painted = np.zeros(composition.word_map.shape, np.float32)
        if "placement" in self.scores and calibrated["placement"] > PAINT_ABOVE:
            painted[self.memory.out_of_place(composition)] = paint_level(calibrated["placement"])
        return painted

    def evidence_map(self, part_map: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """(S, S) float32: each class whose evidence is far outside the normal range (above
        ``PAINT_ABOVE``), painted where the class is and where it usually is but is not."""
        painted = np.zeros(part_map.shape, np.float32)
        for k in np.flatnonzero(evidence > PAINT_ABOVE):
            here = part_map == k
            where = here | (self.memory.usual_place[k] & ~here)
            painted[where] = np.maximum(painted[where], paint_level(evidence[k]))
        return painted

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        refs = self.memory.stacked
        owner = torch.cat([torch.full((len(r.patches),), i) for i, r in enumerate(self.memory.refs)])
        tensors = self.part_segmenter.state_tensors("segmenter.")
        tensors.update(self.patch_words.state_tensors("words."))
        tensors.update({
            "background": torch.from_numpy(self.background.astype(np.uint8)),
            "min_part": torch.from_numpy(self.min_part.astype(np.float64)),
            "typical_area": torch.from_numpy(self.memory.typical_area.astype(np.float64)),
            "usual_place": torch.from_numpy(self.memory.usual_place.astype(np.uint8)),
            "refs.patches": refs.patches, "refs.patch_class": refs.patch_class,
            "refs.foreground": refs.foreground.to(torch.uint8), "refs.owner": owner,
            "refs.source": torch.from_numpy(self.memory.sources.astype(np.int64)),
            "refs.word_map": torch.from_numpy(refs.word_map.astype(np.int64)),
        })
        if self.structural_member is not None:
            tensors.update({f"structural.{k}": v for k, v in self.structural_member.state_tensors().items()})
        for name in IMAGE_ARRAYS:
            tensors[f"refs.{name}"] = torch.from_numpy(np.ascontiguousarray(getattr(refs, name), dtype=np.float64))
        return tensors

    def extra_state(self) -> dict:
        extra = {"normalisers": self.normalisers, "weights": self.weights, "fusion": self.fusion, "floors": self.memory.floors,
                 "views": self.views_used, "normalise": self.normalise_used}
        if self.structural_member is not None:
            extra["structural"] = self.structural_member.extra_state()
        return extra

    def load_state_tensors(self, tensors, extra) -> None:
        self.part_segmenter.load_state_tensors(tensors, "segmenter.")
        self.patch_words.load_state_tensors(tensors, "words.")
        if "refs.word_map" not in tensors:
            raise ValueError("no word maps: the model was saved by a defectlens without the placement score; fit it again")
        self.background = tensors["background"].numpy().astype(bool)
        self.min_part = tensors["min_part"].double().numpy()
        owner = tensors["refs.owner"]
        refs = []
        for i in range(int(owner.max()) + 1):
            mine = owner == i
            refs.append(ImageParts(
                patches=tensors["refs.patches"][mine].float(), patch_class=tensors["refs.patch_class"][mine].long(),
                foreground=tensors["refs.foreground"][mine].bool(), word_map=tensors["refs.word_map"][i].long().numpy(),
                **{name: tensors[f"refs.{name}"][i].double().numpy() for name in IMAGE_ARRAYS}))
        sources = tensors["refs.source"].numpy() if "refs.source" in tensors else None  # older files: no views
        # Files from before views=None hold both parameters as set, the resolved values in neither.
        self.views_used, self.normalise_used = extra.get("views", self.views), extra.get("normalise", self.normalise)
        self.memory = Memory(refs, tensors["typical_area"].double().numpy(), self.background,
                             tensors["usual_place"].numpy().astype(bool), pixels=self._published_pixels(),
                             sources=sources, pooled=self.normalise_used == "pooled",
                             floors=extra["floors"])
        self.normalisers = {s: float(v) for s, v in extra["normalisers"].items()}
        self.weights = {s: float(v) for s, v in extra.get("weights", {}).items()}  # older files: all 1
        self.fusion = extra.get("fusion")
        self.structural_member = None
        if self.fusion is not None:
            self.structural_member = self._new_member()
            prefix = "structural."
            self.structural_member.load_state_tensors(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, extra["structural"])
            self.structural_member._fitted = True

