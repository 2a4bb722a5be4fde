"""Training batches: random crops of normal working images with Perlin anomalies (exact masks) and,
when real anomaly examples are given, AnoGen-style transplanted ones (box labels by default), 50/50."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...synthesis import AnoGenSynthesizer, PerlinSynthesizer, foreground_mask
from .geometry import to_tensor


@dataclass
class Batch:
    clean: torch.Tensor  # (B, 3, c, c) in [0, 1]: the normal crops
    augmented: torch.Tensor  # the same crops with anomalies pasted in (or untouched)
    target: torch.Tensor  # (B, 1, c, c): anomaly mask, or the box for weak samples
    weak: torch.Tensor  # (B,) bool: the target is a box (use the box loss)


class AnomalySampler:
    """Random crops of normal working images; each crop gets an anomaly with ``anomaly_rate``:
    a Perlin one (exact mask) or, when ``real`` anomaly examples are given, with probability 1/2
    an AnoGen-style one made from them, labelled with its box (``boxes``, as AnoGen's generated
    anomalies are) or with the transplanted defect's own mask."""

    def __init__(self, normals: Sequence[np.ndarray], crop: int, seed: int, real: tuple[list, list] | None = None,
                 anomaly_rate: float = 0.5, boxes: bool = True):
        self.normals = list(normals)
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        self.anomaly_rate = anomaly_rate
        self.perlin = PerlinSynthesizer()
        self.anogen = AnoGenSynthesizer(*real) if real else None
        self.boxes = boxes
        self._foregrounds: dict[int, np.ndarray] = {}

    def _window(self, shape: tuple[int, int], around: np.ndarray | None) -> tuple[int, int]:
        """Top-left corner of a crop, random, or containing a random pixel of ``around``."""
        h, w = shape
        if around is None or not around.any():
            return int(self.rng.integers(h - self.crop + 1)), int(self.rng.integers(w - self.crop + 1))
        ys, xs = np.nonzero(around)
        pick = self.rng.integers(len(ys))
        y0 = int(np.clip(ys[pick] - self.rng.integers(self.crop), 0, h - self.crop))
        x0 = int(np.clip(xs[pick] - self.rng.integers(self.crop), 0, w - self.crop))
        return y0, x0

    def _sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        index = int(self.rng.integers(len(self.normals)))
        image = self.normals[index]
        c = self.crop
        roll = self.rng.random()
        if self.anogen is not None and roll < self.anomaly_rate / 2:
            # Transplants are sized relative to the whole image: synthesize there, then crop.
            if index not in self._foregrounds:
                self._foregrounds[index] = foreground_mask(image)
            anomaly = self.anogen(image, self.rng, foreground=self._foregrounds[index])
            target = anomaly.mask
            if self.boxes:
                target = np.zeros(image.shape[:2], bool)
                x0, y0, x1, y1 = anomaly.box
                target[y0:y1, x0:x1] = True
            top, left = self._window(image.shape[:2], anomaly.mask)
            window = (slice(top, top + c), slice(left, left + c))
            return image[window], anomaly.image[window], target[window], self.boxes
        top, left = self._window(image.shape[:2], None)
        clean = image[top : top + c, left : left + c]
        if roll < self.anomaly_rate:
            anomaly = self.perlin(clean, self.rng)
            return clean, anomaly.image, anomaly.mask, False
        return clean, clean, np.zeros((c, c), bool), False

    def batch(self, count: int) -> Batch:
        clean, augmented, target, weak = zip(*(self._sample() for _ in range(count)))
        return Batch(to_tensor(clean), to_tensor(augmented),
                     torch.from_numpy(np.stack(target)).float()[:, None], torch.tensor(weak))
