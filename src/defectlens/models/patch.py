"""Shared machinery of detectors that score backbone patch features against normal ones.

A subclass implements three things on feature tensors (N, C, h, w): ``fit_features`` builds
its memory from normal features, ``score_features`` returns per-patch anomaly scores (N, h, w),
and ``image_scores`` reduces those to one score per image. This class does the rest: the
backbone, the input geometry, held-out normal scores and the threshold, and maps at each
image's own size.

Input geometry (the ``geometry`` parameter):

- ``square``: every image is resized to ``size`` × ``size`` (a wide part is squashed).
- ``keep_aspect``: about ``size``² pixels at the aspect ratio of the training images, each side
  a multiple of the backbone's coarsest stride, so round defects stay round.
- ``tiles``: the image at its native resolution is cut into overlapping ``tile_size`` squares
  (an image above ``tile_max_pixels`` is shrunk to that many pixels first; a short side within
  ``TILE_SLACK`` of one tile, or under it, is then scaled to one tile)
  (each fed to the backbone at ``size``); the tiles' feature grids sit side by side in one
  feature map (N, C, h, tiles·w), so every detector scores all tiles together, the image score
  reduces over all of them, and the map is stitched back by averaging overlaps.

The first training image fixes the layout (``canvas_hw``, stored in the model file); every
image is brought to it, so all images share one feature grid (PaDiM needs that).

Few shots (the ``augment`` parameter, models/augment.py): with at most ``augment_max_images``
normal images, transformed copies of each join the training features; calibration holds each
image out together with its copies.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import DEFAULT_BACKBONE, get_backbone
from ..data.io import as_image
from ..errors import UsageError
from ..heap import release_free_memory
from .base import BackboneDetector, Prediction
from .augment import AUGMENTS, augmented_set
from .calibration import calibrate, refit_folds
from .maps import upsample_map
from .params import BACKBONE, BLUR_SIGMA, INPUT_SIZE, SEED, Choice, Integer, Optional, Real

GEOMETRIES = ("square", "keep_aspect", "tiles")
#: Few-shot augmentation by default: none until an option wins the mean over the real sets of the
#: suite with a leave-one-set-out check. Flips on the few-shot default (tiled patchknn, 4 shots,
#: benchmarks/results/real_suite.md): mean 0.887 -> 0.889, DeepPCB +0.010, BSData -0.002, ELPV
#: mono -0.005, poly +0.003, left-out mean 0.874 -> 0.873: not taken.
DEFAULT_AUGMENT = "none"
#: Up to this many normal images are augmented; more are left as they are.
AUGMENT_MAX_IMAGES = 16
#: geometry=tiles: a short side up to this factor longer than a tile is shrunk to one tile.
TILE_SLACK = 1.25
#: geometry=tiles: larger images are first shrunk to this many pixels (aspect kept), so the tile
#: count stays bounded: a 5-megapixel camera frame would be 130 tiles of 256 at native size.
#: Half a megapixel keeps every real set of the suite native (BSData 1130×460 is 0.52 MP).
TILE_MAX_PIXELS = 2**19
#: Tiled features of more bytes than this are kept in a temporary file mapped into memory (gone
#: with the tensor; in DEFECTLENS_SCRATCH, else the system's temporary folder): under memory
#: pressure the kernel writes them out and reads them back instead of the process running out of
#: memory. A benchmark of BSData in 18 tiles (4.4 GB of training and 6.3 GB of test features, and
#: the fit's working sets) used up 24 GB.
DISK_BACKED_BYTES = 2**30


def aspect_shape(height: int, width: int, size: int, multiple: int) -> tuple[int, int]:
    """(h, w) with about ``size``² pixels at the aspect ratio of (height, width), each side a
    multiple of ``multiple`` (the backbone's coarsest stride, so no level loses a border)."""
    scale = size / math.sqrt(height * width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` pixels, neighbours sharing
    at least ``overlap`` of a tile, spread evenly so the last tile ends at the border."""
    if length <= tile:
        return [0]
    step = max(1.0, tile * (1.0 - overlap))
    count = math.ceil((length - tile) / step) + 1
    return [int(round(x)) for x in np.linspace(0, length - tile, count)]


class PatchDetector(BackboneDetector):
    """Parameters every patch detector shares: ``backbone`` (name), ``size`` (side of the square
    backbone input, pixels), ``blur_sigma`` (map smoothing in input pixels, 0 = none), ``seed``
    (which normal images are held out for calibration, and any random choice of the method),
    ``geometry`` (square, keep_aspect or tiles; see the module doc), ``tile_size`` (tile side in
    image pixels; None = ``size``, i.e. native resolution), ``tile_overlap`` (share of a tile
    its neighbour overlaps) and ``tile_max_pixels`` (larger images are shrunk to this many pixels
    before tiling; None: always native), ``augment`` (copies of the normal images that join the training
    features, see models/augment.py) and ``augment_max_images`` (augment only fits on at most
    this many normal images, so full-shot fits are unchanged)."""

    # The scoring only reads what fit and load set (the kNN index builds its lazy parts under a lock).
    predict_in_flight = 2
    parameter_constraints = {"backbone": BACKBONE, "size": INPUT_SIZE, "blur_sigma": BLUR_SIGMA, "seed": SEED,
                             "geometry": Choice(GEOMETRIES), "tile_size": Optional(Integer(32, 4096)),
                             "tile_overlap": Real(0.0, 0.75), "tile_max_pixels": Optional(Integer(1024, 10**9)),
                             "augment": Choice(AUGMENTS),
                             "augment_max_images": Integer(0, 10**6)}

    #: (height, width) all images are brought to before the backbone: the keep_aspect input or
    #: the native size that tiles cover; None for square. Set by the first training image.
    canvas_hw: tuple[int, int] | None = None

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0,
                 geometry: str = "square", tile_size: int | None = None, tile_overlap: float = 0.25,
                 tile_max_pixels: int | None = TILE_MAX_PIXELS,
                 augment: str = DEFAULT_AUGMENT, augment_max_images: int = AUGMENT_MAX_IMAGES):
        self.backbone = backbone
        self.size = size
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.geometry = geometry
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_max_pixels = tile_max_pixels
        self.augment = augment
        self.augment_max_images = augment_max_images

    # -- to implement -----------------------------------------------------------------------
    def fit_features(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Default: the most anomalous patch decides (defects are local)."""
        return patch_scores.flatten(1).amax(dim=1)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def tile_side(self) -> int:
        return self.tile_size or self.size

    def layout_for(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        """The canvas (height, width) for training images of ``shape``."""
        if self.geometry == "keep_aspect":
            multiple = max(stride for _, stride in self.backbone_network.levels)
            return aspect_shape(shape[0], shape[1], self.size, multiple)
        if self.geometry == "tiles":
            # Above tile_max_pixels the image is shrunk to it; then the short side becomes one
            # tile when it is shorter or at most TILE_SLACK longer (aspect kept): a second row of tiles overlapping the first almost entirely would
            # double the cost for a few more pixels (a 300-px solar cell: 4 tiles of 256 or 1).
            pixels = shape[0] * shape[1]
            scale = 1.0 if self.tile_max_pixels is None else min(1.0, math.sqrt(self.tile_max_pixels / pixels))
            short = min(shape) * scale
            if short <= TILE_SLACK * self.tile_side:
                scale *= self.tile_side / short
            return (max(self.tile_side, round(shape[0] * scale)), max(self.tile_side, round(shape[1] * scale)))
        return None

    def embed_images(self, images: Iterable, fit: bool = False, progress: str | None = None,
                     total: int | None = None) -> torch.Tensor:
        """Backbone features (N, C, h, w') of ``images`` (paths or arrays) in this detector's
        geometry. ``fit=True`` lets the first image set the layout (``canvas_hw``)."""
        if self.geometry == "square":
            return self.backbone_network.embed(images, progress=progress, total=total)
        if fit:
            self.canvas_hw = None

        def on_canvas():
            for item in images:
                image = as_image(item)
                if self.canvas_hw is None:
                    self.canvas_hw = self.layout_for(image.shape[:2])
                height, width = self.canvas_hw
                if image.shape[:2] != (height, width):
                    shrink = height < image.shape[0]
                    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                yield image

        if self.canvas_hw is None and not fit:
            raise UsageError(f"{self.name}: geometry={self.geometry} needs the layout of the training images: fit first")
        if self.geometry == "keep_aspect":
            stream = on_canvas()
            first = next(stream, None)
            if first is None:
                return torch.empty(0)
            backbone = get_backbone(self.backbone, self.canvas_hw)
            return backbone.embed(_chain(first, stream), progress=progress, total=total)
        stream = tqdm(on_canvas(), desc=progress, total=total, unit="img", disable=progress is None, leave=False)
        return _stacked((self._embed_tiles(image) for image in stream), total)

    @property
    def tiles_per_image(self) -> int:
        """How many tiles each image is cut into (1 unless ``geometry="tiles"``)."""
        return len(self._tiles()) if self.geometry == "tiles" else 1

    def _tiles(self) -> list[tuple[int, int]]:
        height, width = self.canvas_hw
        return [(top, left) for top in tile_origins(height, self.tile_side, self.tile_overlap)
                for left in tile_origins(width, self.tile_side, self.tile_overlap)]

    def _embed_tiles(self, image: np.ndarray) -> torch.Tensor:
        """(C, h, tiles·w): the tiles' feature grids side by side, in ``_tiles`` order."""
        side = self.tile_side
        crops = (image[top : top + side, left : left + side] for top, left in self._tiles())
        return torch.cat(list(self.backbone_network.embed(crops)), dim=-1)

    def _stitch(self, patch_map: np.ndarray) -> np.ndarray:
        """A (h, tiles·w) patch map -> one map on the canvas, overlaps averaged, smoothed."""
        height, width = self.canvas_hw
        side = self.tile_side
        total = np.zeros((height, width), np.float32)
        count = np.zeros((height, width), np.float32)
        for grid, (top, left) in zip(np.split(patch_map, len(self._tiles()), axis=1), self._tiles()):
            total[top : top + side, left : left + side] += cv2.resize(grid.astype(np.float32), (side, side),
                                                                      interpolation=cv2.INTER_LINEAR)
            count[top : top + side, left : left + side] += 1.0
        canvas = total / np.maximum(count, 1.0)
        sigma = self.blur_sigma * side / self.size  # blur_sigma is in backbone-input pixels
        if sigma > 0:
            canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        return canvas

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        features = self.embed_images(images, fit=True, progress="features", total=len(images))
        views = self.embed_views(images)
        release_free_memory()  # the backbone's activations
        self.fit_from_features(features, views=views)

    def embed_views(self, images: list) -> tuple[torch.Tensor, np.ndarray] | None:
        """Features of the augmented copies of ``images`` (the normal training images, after the
        layout is set) and, for each copy, the index of the image it was made from; None when
        ``augment`` adds nothing for this many images."""
        augmented = augmented_set(images, self.augment, self.augment_max_images)
        if augmented is None:
            return None
        copies, sources = augmented
        return self.embed_images(copies, progress="augmented copies", total=len(copies)), sources

    def fit_from_features(self, features: torch.Tensor, canvas_hw: tuple[int, int] | None = None,
                          views: tuple[torch.Tensor, np.ndarray] | None = None) -> PatchDetector:
        """Calibrate on held-out folds, then fit on all ``features`` (used by benchmarks that
        embed once for several detectors). Features from ``embed_images`` of a detector with
        another geometry than square come with that detector's ``canvas_hw``. ``views``: from
        ``embed_views``; a held-out image's copies stay out of its fold's training features."""
        if self.geometry != "square":
            self.canvas_hw = canvas_hw or self.canvas_hw
            if self.canvas_hw is None:
                raise UsageError(f"{self.name}: geometry={self.geometry}: pass the canvas_hw of the detector "
                                 "whose embed_images made these features")
        self.calibrate_and_fit(features, views)
        release_free_memory()  # an ensemble's other member fits on in the memory this one freed
        self._fitted = True
        return self

    def calibrate_and_fit(self, features: torch.Tensor, views: tuple[torch.Tensor, np.ndarray] | None) -> None:
        """The held-out folds' scores and maps set the calibration, then the fit on all features."""
        scores, maps, peaks = [], [], []
        for held_out in refit_folds(features.shape[0], self.seed):
            self.fit_normal(features, views, np.setdiff1d(np.arange(features.shape[0]), held_out))
            release_free_memory()  # the fit's temporaries (an index's k-means, the fit before's bank)
            fold_scores, fold_maps, fold_peaks = self.held_out_scores(features[held_out])
            scores.append(fold_scores)
            maps.append(fold_maps)
            peaks.append(fold_peaks)
            release_free_memory()  # the fold's fit and scoring temporaries
        self.set_calibration(calibrate(np.concatenate(scores) if scores else None, maps or None,
                                       map_peaks=np.concatenate(peaks) if peaks else None))
        self.fit_normal(features, views, np.arange(features.shape[0]))

    def held_out_scores(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For held-out normal images: their image scores, the patch maps the heatmap range's
        median is taken from, and the largest patch score of each image whose map is not among
        them (``calibration.heatmap_range``). Here every image's whole map, and no peaks; a
        method overrides it where the scores cost less than the maps."""
        scores, maps = self.score_feature_batch(features)
        return scores, maps.numpy(), np.zeros(0)

    def fit_normal(self, features: torch.Tensor, views: tuple[torch.Tensor, np.ndarray] | None,
                   keep: np.ndarray) -> None:
        """Fit on the images ``keep`` indexes and on their augmented copies only."""
        views = subset_views(views, keep)
        # All images in order: the features as they are (an index copy of a tiled set is gigabytes).
        kept = features if np.array_equal(keep, np.arange(features.shape[0])) else features[keep]
        self.fit_features(kept if views is None else torch.cat([kept, views[0]]))

    def staged_prediction(self, images: list, maps: bool) -> Callable[[], Prediction]:
        """The backbone forward now; the scoring (without maps, ``feature_scores``, which may
        skip the patch scores the image scores do not depend on) and the maps' upsampling later."""
        images = [as_image(image) for image in images]
        features = self.embed_images(images)
        if not maps:
            return lambda: Prediction(scores=self.feature_scores(features))
        shapes = [image.shape[:2] for image in images]

        def scored() -> Prediction:
            scores, patch_scores = self.score_feature_batch(features)
            return Prediction(scores=scores, maps=[self.upsample_map(patch_map.numpy(), shape)
                                                   for patch_map, shape in zip(patch_scores, shapes)])

        return scored

    def feature_scores(self, features: torch.Tensor) -> np.ndarray:
        """The image scores of ``score_feature_batch`` alone; a method overrides it when it can
        get them for less than every patch score."""
        return self.score_feature_batch(features)[0]

    def score_feature_batch(self, features: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores and patch maps for precomputed features (used by calibration and benchmarks)."""
        patch_scores = self.score_features(features)
        return self.image_scores(patch_scores, features).numpy().astype(np.float64), patch_scores

    def upsample_map(self, patch_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A patch map at the image's (height, width), smoothed by ``blur_sigma``."""
        if self.geometry == "tiles":
            canvas = self._stitch(patch_map)
            return cv2.resize(canvas, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        input_hw = self.canvas_hw if self.geometry == "keep_aspect" else self.backbone_network.input_hw
        return upsample_map(patch_map, input_hw, shape, self.blur_sigma)

    # -- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {} if self.canvas_hw is None else {"canvas_hw": list(self.canvas_hw)}

    def load_state_tensors(self, tensors, extra) -> None:
        """The layout; subclasses load their tensors after calling this."""
        canvas = extra.get("canvas_hw")
        self.canvas_hw = None if canvas is None else tuple(int(v) for v in canvas)
        if self.geometry != "square" and self.canvas_hw is None:
            raise ValueError(f"geometry={self.geometry} but no canvas_hw stored")


def subset_views(views: tuple[torch.Tensor, np.ndarray] | None,
                 keep: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """The augmented copies of the images ``keep`` indexes, their sources renumbered to
    positions in ``keep`` (as if ``embed_views`` had been given just those images)."""
    if views is None:
        return None
    view_features, sources = views
    chosen = np.isin(sources, keep)
    position = {int(index): i for i, index in enumerate(keep)}
    return view_features[torch.from_numpy(chosen)], np.asarray([position[int(s)] for s in sources[chosen]], dtype=np.int64)


def samples_with_owners(features: torch.Tensor,
                        views: tuple[torch.Tensor, np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training sample (the images, then their augmented copies) and, for each, the index
    of the image it is or was made from: what a held-out fold must leave out together."""
    count = features.shape[0]
    if views is None:
        return features, torch.arange(count)
    return torch.cat([features, views[0]]), torch.cat([torch.arange(count), torch.as_tensor(views[1])])


def _stacked(tensors: Iterator[torch.Tensor], total: int | None) -> torch.Tensor:
    """``torch.stack`` of ``tensors``, filled into one tensor allocated for ``total`` of them when
    that is known: stacking a list holds every tensor twice at the end, and 200 BSData images in
    18 tiles are 2.2 GB of features."""
    first = next(tensors, None)
    if first is None:
        return torch.empty(0)
    if total is None:
        return torch.stack([first, *tensors])
    stacked = _feature_buffer((max(total, 1), *first.shape), first.dtype)
    stacked[0] = first
    count = 1
    for tensor in tensors:
        if count == len(stacked):  # more than ``total`` came: grow (not in defectlens's own calls)
            stacked = torch.cat([stacked, tensor[None]])
        else:
            stacked[count] = tensor
        count += 1
    return stacked[:count]


def _feature_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, file-backed above ``DISK_BACKED_BYTES`` (float32 only)."""
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if size <= DISK_BACKED_BYTES or dtype != torch.float32:
        return torch.empty(shape, dtype=dtype)
    # Unlinked at once: the mapping keeps the space until the tensor is freed, then it is gone.
    folder = os.environ.get("DEFECTLENS_SCRATCH") or tempfile.gettempdir()
    with tempfile.TemporaryFile(dir=folder) as handle:
        try:  # reserved now: a full disk met later, through the mapping, would kill the process
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            raise OSError(f"cannot keep {size / 2**30:.1f} GiB of tile features in {folder} ({error.strerror}): "
                          "free disk space there or set DEFECTLENS_SCRATCH to a folder with room") from None
        return torch.from_numpy(np.memmap(handle, dtype=np.float32, mode="r+", shape=shape))


def _chain(first, rest):
    yield first
    yield from rest
