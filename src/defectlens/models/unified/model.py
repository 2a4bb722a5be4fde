"""One model for many products that cannot forget: a memory-bank detector per product and a
router that picks the product of each test image from its global backbone feature.

Adding a product (``partial_fit(images, product=NAME)``) fits a new per-product detector (a
PatchCore or patch-kNN bank, the existing machinery) and stores the training images' global
features; the other products' banks are never touched, so nothing learned is forgotten. The
router sends a test image to the product of its nearest stored global feature (the mean of its
patch features). If that distance is beyond what the product's own training images show
(leave-one-out nearest distances, through the calibration module's threshold rule), the image is
of an unknown product: it is scored as anomalous (at least the threshold + 1) and reported as
``None`` in ``Prediction.products``.

Products score on different scales, so each product's scores and maps are standardised by its own
held-out normal scores (z = (s - mean) / std): one threshold then serves every product, and each
product's AUROC is exactly its own detector's AUROC when routing is right.
"""

from __future__ import annotations

import numpy as np
import torch

from ...backbones import DEFAULT_BACKBONE
from ...data.io import as_image
from ..base import BackboneDetector, Prediction, register
from ..calibration import calibrate, refit_folds, threshold_from_normal_scores
from ..memory import NearestNeighbours
from ..params import BACKBONE, BLUR_SIGMA, INPUT_SIZE, SEED, Choice, Integer, Text
from ..patchcore.model import PatchCore
from ..products import LearnsProducts
from ..patchknn.model import PatchKNN

PRODUCT_METHODS = {"patchcore": PatchCore, "patchknn": PatchKNN}
#: Normalised map values kept per product for the unified heatmap range (quantiles).
MAP_QUANTILES = np.linspace(0.0, 1.0, 101)
#: Standard deviation floor when standardising a product's scores (identical held-out scores).
MIN_STD = 1e-6


def global_features(features: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) patch features -> (N, C) image descriptors for routing (mean over the grid)."""
    return features.float().mean(dim=(2, 3)).numpy()


@register
class UnifiedBank(LearnsProducts, BackboneDetector):
    """``product_method``: the per-product detector (patchcore or patchknn); ``bank_size``: its
    memory size per product; ``product``: the name ``fit`` gives its single product (use
    ``partial_fit`` to name and add more)."""

    name = "unified"
    parameter_constraints = {"product_method": Choice(tuple(PRODUCT_METHODS)), "bank_size": Integer(1, 10**7),
                             "product": Text(), "backbone": BACKBONE, "size": INPUT_SIZE,
                             "blur_sigma": BLUR_SIGMA, "seed": SEED}

    def __init__(self, product_method: str = "patchcore", bank_size: int = 4096, product: str = "product",
                 backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0):
        self.product_method = product_method
        self.bank_size = bank_size
        self.product = product
        self.backbone = backbone
        self.size = size
        self.blur_sigma = blur_sigma
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self.products: list[str] = []
        self._detectors: list = []
        self._globals: list[np.ndarray] = []
        #: per product: mean, std of held-out normal scores; routing-distance threshold (or None)
        self._stats: list[dict] = []
        self._normal_z: list[np.ndarray] = []
        self._map_quantiles: list[np.ndarray] = []
        self._router: NearestNeighbours | None = None
        self._owner = np.zeros(0, dtype=np.int64)

    # -- learning ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        self._reset()
        self.add_product(self.product_features(images, progress="features"), self.product)

    def product_features(self, images: list, progress: str | None = None) -> torch.Tensor:
        return self.backbone_network.embed(images, progress=progress, total=len(images))

    def _new_detector(self):
        detector = PRODUCT_METHODS[self.product_method](bank_size=self.bank_size, backbone=self.backbone, size=self.size,
                                                        blur_sigma=self.blur_sigma, seed=self.seed)
        detector.backbone_network = self.backbone_network
        return detector

    def add_product(self, features: torch.Tensor, product: str) -> None:
        detector = self._new_detector()
        scores, maps = [], []
        for held_out in refit_folds(features.shape[0], self.seed):
            detector.fit_features(features[np.setdiff1d(np.arange(features.shape[0]), held_out)])
            fold_scores, fold_maps = detector.score_feature_batch(features[held_out])
            scores.append(fold_scores)
            maps.append(fold_maps.numpy().ravel())
        detector.fit_features(features)
        detector._fitted = True
        scores = np.concatenate(scores) if scores else np.zeros(0)
        mean = float(scores.mean()) if scores.size else 0.0
        std = max(float(scores.std(ddof=1)), MIN_STD) if scores.size > 1 else 1.0
        descriptors = global_features(features)
        self.products.append(product)
        self._detectors.append(detector)
        self._globals.append(descriptors)
        self._stats.append({"mean": mean, "std": std, "route_threshold": self._route_threshold(descriptors)})
        self._normal_z.append((scores - mean) / std)
        values = (np.concatenate(maps) - mean) / std if maps else np.zeros(0)
        self._map_quantiles.append(np.quantile(values, MAP_QUANTILES) if values.size else np.zeros(0))
        self._rebuild()

    @staticmethod
    def _route_threshold(descriptors: np.ndarray) -> float | None:
        """The routing distance a new image of this product exceeds with about 1 % probability,
        from each training image's distance to its nearest other training image."""
        if len(descriptors) < 2:
            return None
        distances, _ = NearestNeighbours(descriptors).search(descriptors, k=2)
        return threshold_from_normal_scores(distances[:, 1])

    def _rebuild(self) -> None:
        """Router over every product's stored global features, and the unified calibration."""
        self._router = NearestNeighbours(np.concatenate(self._globals))
        self._owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(self._globals)])
        normal = np.concatenate(self._normal_z)
        self.set_calibration(calibrate(normal if normal.size else None,
                                       [q for q in self._map_quantiles if q.size] or None))

    # -- prediction -------------------------------------------------------------------------
    def route(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(product index, routing distance, known?) of each image's features."""
        distances, nearest = self._router.search(global_features(features), k=1)
        index = self._owner[nearest[:, 0]]
        limits = np.array([self._stats[i]["route_threshold"] for i in index], dtype=object)
        known = np.array([limit is None or d <= limit for d, limit in zip(distances[:, 0], limits)])
        return index, distances[:, 0], known

    def score_features(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Standardised image scores, standardised (N, h, w) patch maps and the product of each
        image (None: unknown product, scored at least ``threshold + 1``)."""
        index, _, known = self.route(features)
        scores = np.zeros(len(features))
        maps = np.zeros((len(features), *features.shape[2:]), dtype=np.float32)
        for product in np.unique(index):
            rows = np.flatnonzero(index == product)
            stats = self._stats[product]
            product_scores, patch_maps = self._detectors[product].score_feature_batch(features[rows])
            scores[rows] = (product_scores - stats["mean"]) / stats["std"]
            maps[rows] = (patch_maps.numpy() - stats["mean"]) / stats["std"]
        scores[~known] = np.maximum(scores[~known], self._unknown_floor())
        return scores, maps, [self.products[i] if ok else None for i, ok in zip(index, known)]

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        scores, maps, products = self.score_features(self.backbone_network.embed(images))
        # upsampling and blurring are linear: standardising before them equals standardising after
        return Prediction(scores=scores, maps=[self._detectors[0].upsample_map(m, image.shape[:2])
                                               for m, image in zip(maps, images)], products=products)

    def _unknown_floor(self) -> float:
        """The lowest score an image of an unknown product gets: above the threshold (or, without
        one, above every held-out normal score)."""
        if self.threshold is not None:
            return self.threshold + 1.0
        normal = np.concatenate(self._normal_z)
        return (float(normal.max()) if normal.size else 0.0) + 1.0

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, detector in enumerate(self._detectors):
            for key, value in detector.state_tensors().items():
                tensors[f"product{i}.{key}"] = value
            tensors[f"product{i}.__globals__"] = torch.from_numpy(self._globals[i])
            tensors[f"product{i}.__normal_z__"] = torch.from_numpy(self._normal_z[i].astype(np.float64))
            tensors[f"product{i}.__map_quantiles__"] = torch.from_numpy(self._map_quantiles[i].astype(np.float64))
        return tensors

    def extra_state(self) -> dict:
        return {"products": self.products, "product_stats": self._stats}

    def load_state_tensors(self, tensors, extra) -> None:
        self._reset()
        for i, (product, stats) in enumerate(zip(extra["products"], extra["product_stats"])):
            prefix = f"product{i}."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            detector = self._new_detector()
            detector.load_state_tensors({k: v for k, v in own.items() if not k.startswith("__")}, {})
            detector._fitted = True
            self.products.append(product)
            self._detectors.append(detector)
            self._globals.append(own["__globals__"].float().numpy())
            self._normal_z.append(own["__normal_z__"].numpy())
            self._map_quantiles.append(own["__map_quantiles__"].numpy())
            self._stats.append(dict(stats))
        if not self.products:
            raise ValueError("no product stored")
        self._router = NearestNeighbours(np.concatenate(self._globals))
        self._owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(self._globals)])
