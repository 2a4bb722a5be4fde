"""IUF as a Detector: one feature-reconstruction network for every object, taught one object at a
time (``partial_fit(images, product=NAME)``) without a memory bank. The network and its losses
are in networks.py; here: the backbone features, training with a progress bar (Ctrl-C stops it
and keeps what was learned), calibration, maps and the model file.

Anomaly map: the squared error of the reconstructed backbone features at each patch; image
score: the map's maximum (defects are local). No object label is needed at test time.

Calibration: each object's held-out normal images are scored right after the object is learned
and those scores are kept; later objects move the network, so the threshold rests on scores
taken when each object was learned (the forgetting the projection is there to prevent).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...backbones import DEFAULT_BACKBONE
from ...data.io import as_image
from ..base import BackboneDetector, Prediction, register
from ..calibration import calibrate, held_out_split
from ..maps import upsample_map
from ..params import BACKBONE, BATCH_SIZE, BLUR_SIGMA, INPUT_SIZE, SEED, Boolean, Integer, Optional, Real, Text
from ..products import LearnsProducts
from .networks import IUFNetwork, ProjectedUpdates, compression_loss, default_k

MAP_QUANTILES = np.linspace(0.0, 1.0, 101)


@register
class IUF(LearnsProducts, BackboneDetector):
    """``dims``/``heads``/``layers``: the reconstruction transformer; ``pool``: backbone cells
    averaged into one token per side (2: a 256 px input gives 16×16 tokens); ``steps`` and
    ``batch_size``/``learning_rate``: training per added object; ``class_weight`` (λ1) and
    ``compression_weight`` (λ2, 0 = no semantic compression) weigh the losses, ``kept`` the
    singular values not compressed; ``object_attention``: OASA on/off; ``projection``: project
    updates on later objects by Ω(``omega_k``, c) (None: k = 1/log(dims), so Ω reaches 1 at
    c = dims) and merge old weights with ``beta``. The ablation without IUF's three parts is
    object_attention=False, compression_weight=0, projection=False."""

    name = "iuf"
    parameter_constraints = {
        "dims": Integer(4, 1024), "heads": Integer(1, 32), "layers": Integer(1, 8), "pool": Integer(1, 8),
        "steps": Integer(1, 10**6), "batch_size": BATCH_SIZE, "learning_rate": Real(0.0, 1.0, open_low=True),
        "class_weight": Real(0.0, 100.0), "compression_weight": Real(0.0, 100.0), "kept": Integer(1, 1024),
        "object_attention": Boolean(), "projection": Boolean(), "omega_k": Optional(Real(0.0, 100.0, open_low=True)),
        "beta": Real(0.0, 10.0), "product": Text(), "backbone": BACKBONE, "size": INPUT_SIZE,
        "blur_sigma": BLUR_SIGMA, "seed": SEED,
    }

    def __init__(self, dims: int = 64, heads: int = 4, layers: int = 2, pool: int = 2, steps: int = 300,
                 batch_size: int = 8, learning_rate: float = 2e-3, class_weight: float = 0.1,
                 compression_weight: float = 0.01, kept: int = 16, object_attention: bool = True,
                 projection: bool = True, omega_k: float | None = None, beta: float = 0.1, product: str = "product",
                 backbone: str = DEFAULT_BACKBONE, size: int = 256, blur_sigma: float = 4.0, seed: int = 0):
        self.dims, self.heads, self.layers, self.pool = dims, heads, layers, pool
        self.steps, self.batch_size, self.learning_rate = steps, batch_size, learning_rate
        self.class_weight, self.compression_weight, self.kept = class_weight, compression_weight, kept
        self.object_attention, self.projection, self.omega_k, self.beta = object_attention, projection, omega_k, beta
        self.product = product
        self.backbone, self.size, self.blur_sigma, self.seed = backbone, size, blur_sigma, seed
        self._reset()

    def _reset(self) -> None:
        self.products: list[str] = []
        self.network: IUFNetwork | None = None
        self.updates: ProjectedUpdates | None = None
        self._normal_scores: list[np.ndarray] = []
        self._map_quantiles: list[np.ndarray] = []
        #: True when the last object's training was stopped early (Ctrl-C)
        self.interrupted = False

    # -- features ---------------------------------------------------------------------------
    def product_features(self, images: list, progress: str | None = None) -> torch.Tensor:
        features = self.backbone_network.embed(images, progress=progress, total=len(images))
        return F.avg_pool2d(features, self.pool) if self.pool > 1 else features

    # -- learning ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        self._reset()
        self.add_product(self.product_features(images, progress="features"), self.product)

    def _new_network(self, channels: int, grid: tuple[int, int], objects: int = 1) -> IUFNetwork:
        torch.manual_seed(self.seed)
        return IUFNetwork(channels, self.dims, self.heads, self.layers, objects, self.object_attention, grid)

    def add_product(self, features: torch.Tensor, product: str) -> None:
        train, held = held_out_split(features.shape[0], self.seed)
        first = self.network is None
        if first:
            self.network = self._new_network(features.shape[1], tuple(features.shape[2:]))
            self.updates = ProjectedUpdates(self.network)
        else:
            self.network.add_object()
        self.train_object(features[train], len(self.products))
        self.updates.record(features[train].split(self.batch_size))
        self.products.append(product)
        scores, maps = self.score_features(features[held]) if len(held) else (np.zeros(0), np.zeros(0))
        self._normal_scores.append(scores)
        self._map_quantiles.append(np.quantile(maps, MAP_QUANTILES) if maps.size else np.zeros(0))
        normal = np.concatenate(self._normal_scores)
        self.set_calibration(calibrate(normal if normal.size else None,
                                       [q for q in self._map_quantiles if q.size] or None))

    def loss(self, batch: torch.Tensor, label: int) -> torch.Tensor:
        """λ0·reconstruction + λ1·object cross-entropy + λ2·semantic compression (λ0 = 1)."""
        output, latent, logits = self.network(batch)
        loss = F.mse_loss(output, batch)
        if self.class_weight > 0 and logits.shape[1] > 1:
            loss = loss + self.class_weight * F.cross_entropy(logits, torch.full((len(batch),), label))
        if self.compression_weight > 0:
            loss = loss + self.compression_weight * compression_loss(latent, self.kept)
        return loss

    def train_object(self, features: torch.Tensor, label: int) -> None:
        """``steps`` optimiser steps on one object's features; updates projected when earlier
        objects exist. Ctrl-C ends training early, keeping the weights of the last full step."""
        self.network.train()
        constrained = self.projection and bool(self.updates.covariances)
        # The position embedding is added to every token of every object, each position as much
        # as any other: no direction of it is free of the earlier objects, so it stays as they left it.
        trained = [p for n, p in self.network.named_parameters() if not (constrained and n == "position")]
        optimiser = torch.optim.Adam(trained, lr=self.learning_rate)
        generator = torch.Generator().manual_seed(self.seed + label)
        old = self.updates.weights() if constrained else None
        k = self.omega_k if self.omega_k is not None else default_k(self.dims)
        self.interrupted = False
        progress = tqdm(range(self.steps), desc=f"iuf object {label + 1}", leave=False, mininterval=1.0)
        try:
            for _ in progress:
                batch = features[torch.randint(len(features), (min(self.batch_size, len(features)),), generator=generator)]
                before = self.updates.weights() if constrained else None
                loss = self.loss(batch, label)
                self.network.zero_grad()
                loss.backward()
                optimiser.step()
                if constrained:
                    self.updates.project(before, k, old, self.beta)
                progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        except KeyboardInterrupt:
            self.interrupted = True
            warnings.warn(f"{self.name}: training of object {label + 1} stopped early (Ctrl-C); keeping what was learned")
        finally:
            progress.close()
        self.network.eval()

    # -- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores and (N, h, w) patch maps: squared reconstruction error per patch."""
        self.network.eval()
        output, _, _ = self.network(features)
        maps = (output - features).pow(2).mean(dim=1).numpy()
        return maps.reshape(len(maps), -1).max(axis=1).astype(np.float64), maps

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        scores, maps = self.score_features(self.product_features(images))
        hw = self.backbone_network.input_hw
        return Prediction(scores=scores, maps=[upsample_map(m, hw, image.shape[:2], self.blur_sigma)
                                               for m, image in zip(maps, images)])

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"network.{k}": v for k, v in self.network.state_dict().items()}
        tensors.update({f"covariance.{k}": v for k, v in self.updates.covariances.items()})
        for i, (scores, quantiles) in enumerate(zip(self._normal_scores, self._map_quantiles)):
            tensors[f"object{i}.normal_scores"] = torch.from_numpy(scores.astype(np.float64))
            tensors[f"object{i}.map_quantiles"] = torch.from_numpy(quantiles.astype(np.float64))
        return tensors

    def extra_state(self) -> dict:
        return {"products": self.products, "channels": self.network.encode.in_features,
                "grid": list(self.network.grid), "interrupted": self.interrupted}

    def load_state_tensors(self, tensors, extra) -> None:
        self._reset()
        self.products = list(extra["products"])
        self.network = self._new_network(extra["channels"], tuple(extra["grid"]), len(self.products))
        self.network.load_state_dict({k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")})
        self.network.eval()
        self.updates = ProjectedUpdates(self.network, {k[len("covariance."):]: v for k, v in tensors.items()
                                                       if k.startswith("covariance.")})
        for i in range(len(self.products)):
            self._normal_scores.append(tensors[f"object{i}.normal_scores"].numpy())
            self._map_quantiles.append(tensors[f"object{i}.map_quantiles"].numpy())
        self.interrupted = bool(extra.get("interrupted", False))
