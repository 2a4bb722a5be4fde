"""Training batches: random crops of normal working images with Perlin anomalies (exact masks) and,
50/50 with them, anomalies from a second source: transplants of a few real defects (the
copy-paste half of AnoGen), AnoGen's diffusion generator, or CutPaste."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...synthesis import CutPasteSynthesizer, PerlinSynthesizer, SyntheticAnomaly, foreground_mask
from .geometry import to_tensor

#: Sources that learn from real anomaly examples (they need fit to be given some).
FROM_EXAMPLES = ("transplant", "diffusion")
SOURCES = ("transplant", "diffusion", "cutpaste", "perlin")


@dataclass
class Batch:
    clean: torch.Tensor  # (B, 3, c, c) in [0, 1]: the normal crops
    augmented: torch.Tensor  # the same crops with anomalies pasted in (or untouched)
    target: torch.Tensor  # (B, 1, c, c): anomaly mask, or the box for weak samples
    weak: torch.Tensor  # (B,) bool: the target is a box (use the box loss)


class AnomalySampler:
    """Random crops of normal working images; each crop gets an anomaly with ``anomaly_rate``:
    a Perlin one (exact mask) or, with probability 1/2, one from ``generator``.

    ``generator(image, rng, foreground=...)``: a synthesizer that works on whole images (real defect
    transplants, the diffusion generator: they size anomalies relative to the whole image); its
    anomalies are labelled with their box (``boxes``, as AnoGen's are) or their own mask. With
    ``pool`` > 0 it runs that many times up front and training draws from the pool (AnoGen's
    generate-then-train: a diffusion anomaly costs seconds, a training step needs several).
    ``crop_source``: a synthesizer applied to the crop itself instead (CutPaste), exact masks.
    """

    def __init__(self, normals: Sequence[np.ndarray], crop: int, seed: int,
                 generator: Callable[..., SyntheticAnomaly] | None = None, anomaly_rate: float = 0.5,
                 boxes: bool = True, pool: int = 0, crop_source: Callable[..., SyntheticAnomaly] | None = None):
        self.normals = list(normals)
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        self.anomaly_rate = anomaly_rate
        self.perlin = PerlinSynthesizer()
        self.generator = generator
        self.crop_source = crop_source
        self.boxes = boxes
        self._foregrounds: dict[int, np.ndarray] = {}
        self.pool: list[tuple[int, SyntheticAnomaly]] = []
        if generator is not None and pool:
            for _ in tqdm(range(pool), desc="generating anomalies", unit="img", leave=False):
                index = int(self.rng.integers(len(self.normals)))
                self.pool.append((index, self._generate(index)))

    def _generate(self, index: int) -> SyntheticAnomaly:
        if index not in self._foregrounds:
            self._foregrounds[index] = foreground_mask(self.normals[index])
        return self.generator(self.normals[index], self.rng, foreground=self._foregrounds[index])

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
        c = self.crop
        roll = self.rng.random()
        if self.generator is not None and roll < self.anomaly_rate / 2:
            if self.pool:
                index, anomaly = self.pool[int(self.rng.integers(len(self.pool)))]
            else:
                anomaly = self._generate(index)
            image = self.normals[index]
            target = anomaly.mask
            if self.boxes:
                target = np.zeros(image.shape[:2], bool)
                x0, y0, x1, y1 = anomaly.box
                target[y0:y1, x0:x1] = True
            top, left = self._window(image.shape[:2], anomaly.mask)
            window = (slice(top, top + c), slice(left, left + c))
            return image[window], anomaly.image[window], target[window], self.boxes
        image = self.normals[index]
        top, left = self._window(image.shape[:2], None)
        clean = image[top : top + c, left : left + c]
        if self.crop_source is not None and roll < self.anomaly_rate / 2:
            anomaly = self.crop_source(clean, self.rng)
            return clean, anomaly.image, anomaly.mask, False
        if roll < self.anomaly_rate:
            anomaly = self.perlin(clean, self.rng)
            return clean, anomaly.image, anomaly.mask, False
        return clean, clean, np.zeros((c, c), bool), False

    def batch(self, count: int) -> Batch:
        clean, augmented, target, weak = zip(*(self._sample() for _ in range(count)))
        return Batch(to_tensor(clean), to_tensor(augmented),
                     torch.from_numpy(np.stack(target)).float()[:, None], torch.tensor(weak))


def crop_synthesizer(source: str) -> Callable[..., SyntheticAnomaly] | None:
    """The synthesizer a ``source`` applies to training crops directly (none for the others)."""
    return CutPasteSynthesizer() if source == "cutpaste" else None
