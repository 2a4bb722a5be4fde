"""Shared machinery of detectors trained on synthetic anomalies (DRAEM, DeSTSeg).

- losses: the per-pixel focal loss, and AnoGen's weak box loss for anomalies whose only label is
  a box (inside the box, pixels the model already calls normal with probability above
  ``normal_threshold`` contribute nothing; focal loss everywhere else);
- :class:`AnomalySampler`: training crops of normal images with Perlin anomalies (exact masks)
  and, when real anomaly examples are given, AnoGen-style transplanted ones (box labels by
  default), 50/50;
- :class:`TrainedDetector`: the Detector around a network trained that way: working resolution,
  the held-out normal images behind the threshold, maps at each image's own size, the model file.

Everything runs on a CPU: images are resized to a working resolution with about ``size``² pixels
(aspect ratio kept, so small defects stay round), networks train on random ``crop``-pixel crops
of it and predict on the whole working image (they are fully convolutional).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import configure_threads
from ..data.io import as_image, read_mask
from ..engine.threshold import threshold_from_normal_scores
from ..synthesis import AnoGenSynthesizer, PerlinSynthesizer, foreground_mask
from .base import Detector, Prediction

# Every working size is a multiple of this: the U-Nets halve the resolution five times.
MULTIPLE = 32
HELD_OUT_FRACTION = 0.2


# -- losses ---------------------------------------------------------------------------------------
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pixel binary focal loss, -(1 - p_t)^gamma log p_t (no reduction)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return (1.0 - p_true) ** gamma * bce


def box_weights(logits: torch.Tensor, box: torch.Tensor, normal_threshold: float) -> torch.Tensor:
    """AnoGen's weak box supervision as per-pixel weights: 0 inside the box where the model's normal
    probability is above ``normal_threshold`` (a box also holds normal pixels: the model is not
    pushed to call those anomalous), 1 everywhere else."""
    normal_probability = torch.sigmoid(-logits.detach())
    return 1.0 - ((box > 0.5) & (normal_probability > normal_threshold)).float()


def box_loss(logits: torch.Tensor, box: torch.Tensor, normal_threshold: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """The weak box loss, per pixel: focal loss against the box as target, zero inside the box
    where the model already calls a pixel normal beyond ``normal_threshold``."""
    return focal_loss(logits, box, gamma) * box_weights(logits, box, normal_threshold)


def pixel_weights(logits: torch.Tensor, target: torch.Tensor, weak: torch.Tensor, normal_threshold: float) -> torch.Tensor:
    """Per-pixel loss weights of a batch (B, 1, H, W): 1 for samples with an exact mask, the box
    weights for the samples flagged ``weak`` (whose target is a box)."""
    weights = box_weights(logits, target, normal_threshold)
    return torch.where(weak.view(-1, 1, 1, 1), weights, torch.ones_like(weights))


# -- images ---------------------------------------------------------------------------------------
def working_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with about ``size``² pixels, the image's aspect ratio, each a multiple of 32."""
    scale = size / math.sqrt(height * width)
    return (max(MULTIPLE, round(height * scale / MULTIPLE) * MULTIPLE),
            max(MULTIPLE, round(width * scale / MULTIPLE) * MULTIPLE))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    interpolation = cv2.INTER_AREA if shape[0] < image.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0


# -- synthetic training batches ---------------------------------------------------------------------
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


def train_steps(loss_of: Callable[[int], torch.Tensor], parameters, steps: int, lr: float, desc: str) -> list[float]:
    """Adam with a cosine learning-rate decay over ``steps``; ``loss_of(step)`` builds the loss.
    Returns the loss of every step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.05)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return losses


def conv_block(channels_in: int, channels_out: int, dilation: int = 1) -> torch.nn.Sequential:
    """Two 3×3 convolutions with batch norm and ReLU: the unit of every network here."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
        torch.nn.BatchNorm2d(channels_out), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
        torch.nn.BatchNorm2d(channels_out), torch.nn.ReLU(inplace=True),
    )


# -- the detector -----------------------------------------------------------------------------------
class TrainedDetector(Detector):
    """A detector whose networks learn from synthetic anomalies on the normal images.

    Subclasses implement ``build`` (create the networks from ``params``), ``networks`` (name ->
    module, the model file's content), ``train_networks(sampler, steps)``, ``anomaly_maps``
    (working-resolution batch -> per-pixel anomaly probabilities) and ``image_scores``.

    ``fit(images, masks, labels)``: images labelled 1 with a mask are real anomalies; they feed
    the AnoGen synthesizer. A fifth of the normal images (at least two, when there are three or
    more) is held out of training to set the threshold and the heatmap range.
    """

    #: Training steps per normal image when ``steps`` is not given, and the range they are kept in
    #: (a few shots need far fewer steps than a full training set).
    steps_per_image: ClassVar[int] = 8
    min_steps: ClassVar[int] = 200
    max_steps: ClassVar[int] = 800

    def __init__(self, size: int = 256, crop: int = 128, batch: int = 8, steps: int | None = None, lr: float = 1e-3,
                 anomalies: int = 0, anogen_labels: str = "box", box_threshold: float = 0.5, box_warmup: float = 0.25,
                 seed: int = 0, **params):
        """``size``: the working image has about size² pixels (aspect ratio kept). ``crop``, ``batch``:
        training crop side and crops per step. ``steps``: training steps (default: scaled with the
        number of normal images, see ``steps_per_image``). ``anomalies``: how many real anomaly images
        ``fit_from_folder``/``--param anomalies=N`` picks from the test set (fit uses whichever
        labelled anomalies it is given). ``anogen_labels``: "box" trains on the generated anomalies'
        boxes with the weak box loss (AnoGen), "mask" on their exact masks (a transplant knows them).
        ``box_threshold``: normal probability above which a pixel
        inside a weak box is ignored; ``box_warmup``: share of the training during which box pixels
        are all supervised (a fresh network calls everything normal)."""
        if anogen_labels not in ("box", "mask"):
            raise ValueError(f"anogen_labels must be 'box' or 'mask', not {anogen_labels!r}")
        super().__init__(size=size, crop=crop, batch=batch, steps=steps, lr=lr, anomalies=anomalies, anogen_labels=anogen_labels,
                         box_threshold=box_threshold, box_warmup=box_warmup, seed=seed, **params)
        self.real_anomalies = 0
        self.losses: list[float] = []
        self.build()

    # -- to implement -----------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def networks(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def train_networks(self, sampler: AnomalySampler, steps: int) -> list[float]:
        raise NotImplementedError

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, H, W) anomaly probabilities, in eval mode."""
        raise NotImplementedError

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- training helpers for subclasses ----------------------------------------------------------------
    def normal_threshold_at(self, step: int, steps: int) -> float:
        """The box loss's threshold at ``step``: above 1 (nothing ignored) during the warm-up."""
        return 2.0 if step < self.params["box_warmup"] * steps else self.params["box_threshold"]

    # -- contract -----------------------------------------------------------------------------------
    def fit(self, images: Sequence, masks=None, labels=None) -> TrainedDetector:
        configure_threads()
        images = list(images)
        labels = [0] * len(images) if labels is None else [int(label) for label in labels]
        masks = [None] * len(images) if masks is None else list(masks)
        if not len(images) == len(labels) == len(masks):
            raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(masks)} masks")
        normal_items = [image for image, label in zip(images, labels) if label == 0]
        if not normal_items:
            raise ValueError(f"{self.name} learns from normal images: give at least one")
        anomalous = [(image, mask) for image, label, mask in zip(images, labels, masks) if label == 1]
        if any(mask is None for _, mask in anomalous):
            raise ValueError("every anomalous image given to fit needs its mask (real anomalies drive the AnoGen synthesizer)")
        wanted = self.params["anomalies"]
        if wanted and len(anomalous) != wanted:
            raise ValueError(f"{self.name} was asked for anomalies={wanted} real anomaly images but fit got {len(anomalous)}; "
                             "pass them as fit(images, masks, labels) with label 1, or use `defectlens fit`, which picks them")

        normals = [self._working(as_image(item)) for item in tqdm(normal_items, desc="read images", unit="img", leave=False)]
        real = None
        if anomalous:
            real_images = [as_image(image) for image, _ in anomalous]
            real_masks = [_mask_array(mask, image.shape[:2]) for image, (_, mask) in zip(real_images, anomalous)]
            real = ([self._working(image) for image in real_images],
                    [resize_image(mask.astype(np.uint8), self._shape_of(image)) > 0 for image, mask in zip(real_images, real_masks)])
        self.real_anomalies = len(anomalous)

        order = np.random.default_rng(self.params["seed"]).permutation(len(normals))
        # A threshold needs two held-out scores; with fewer than three images all of them train.
        held_out_count = max(2, round(HELD_OUT_FRACTION * len(normals))) if len(normals) >= 3 else 0
        held_out, train = order[:held_out_count], order[held_out_count:]
        train_images = [normals[i] for i in train]
        # Crops are multiples of 32 as well, so every level of the networks halves exactly.
        crop = max(MULTIPLE, min(self.params["crop"], *(min(image.shape[:2]) for image in train_images)) // MULTIPLE * MULTIPLE)
        sampler = AnomalySampler(train_images, crop, self.params["seed"], real, boxes=self.params["anogen_labels"] == "box")
        steps = self.params["steps"] or int(np.clip(self.steps_per_image * len(train_images), self.min_steps, self.max_steps))

        torch.manual_seed(self.params["seed"])
        self.build()
        for network in self.networks().values():
            network.train()
        self.losses = self.train_networks(sampler, steps)
        for network in self.networks().values():
            network.eval()
        self._calibrate([normals[i] for i in held_out])
        return self

    def _calibrate(self, held_out: list[np.ndarray]) -> None:
        """Threshold and heatmap range from normal images the networks never saw."""
        if not held_out:
            self.normal_scores, self.threshold, self.map_range = None, None, None
            return
        scores, maps = self._score_working(held_out, progress="held-out normals")
        self.normal_scores = scores
        self.threshold = threshold_from_normal_scores(scores)
        values = np.concatenate([m.ravel() for m in maps])
        # Heatmap colours: blue at a typical normal pixel, red beyond the worst normal pixel.
        self.map_range = (float(np.median(values)), float(values.max()) * 1.25)

    def predict(self, images: Sequence) -> Prediction:
        images = [as_image(image) for image in images]
        scores, maps = self._score_working([self._working(image) for image in images])
        maps = [cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR) for m, image in zip(maps, images)]
        return Prediction(scores=scores, maps=maps)

    def _score_working(self, images: list[np.ndarray], progress: str | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores and working-resolution maps; images of one shape go through the network together."""
        scores = np.zeros(len(images))
        maps: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape[:2], []).append(index)
        size = self.params["batch"]
        chunks = [indices[start : start + size] for indices in by_shape.values() for start in range(0, len(indices), size)]
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc=progress, unit="batch", disable=progress is None, leave=False):
                batch_maps = self.anomaly_maps(to_tensor([images[i] for i in chunk]))
                batch_scores = self.image_scores(batch_maps)
                for offset, index in enumerate(chunk):
                    scores[index] = float(batch_scores[offset])
                    maps[index] = batch_maps[offset].numpy().astype(np.float32)
        return scores, maps

    def _shape_of(self, image: np.ndarray) -> tuple[int, int]:
        return working_shape(image.shape[0], image.shape[1], self.params["size"])

    def _working(self, image: np.ndarray) -> np.ndarray:
        return resize_image(image, self._shape_of(image))

    # -- state ----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, network in self.networks().items() for key, value in network.state_dict().items()}

    def load_state_tensors(self, tensors, extra) -> None:
        self.build()
        for name, network in self.networks().items():
            prefix = f"{name}."
            network.load_state_dict({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
            network.eval()
        self.real_anomalies = int(extra.get("real_anomalies", 0))

    def extra_state(self) -> dict:
        return {"real_anomalies": self.real_anomalies}


def _mask_array(mask, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        mask = mask.max(axis=2) if mask.ndim == 3 else mask
        if mask.shape != tuple(shape):
            mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return mask > 0
    return read_mask(mask, shape)
