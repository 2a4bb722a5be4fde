"""The Detector around networks trained on synthetic anomalies (DRAEM, DeSTSeg): working
resolution, the held-out normal images behind the threshold, maps at each image's own size, the
model file. Networks train on random ``crop``-pixel crops of the working image and predict on
the whole of it (they are fully convolutional)."""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ...backbones import configure_threads
from ...data.io import as_image, as_mask
from ..base import Detector, LearningType, Prediction
from ..calibration import calibrate, held_out_split
from ..params import BATCH_SIZE, INPUT_SIZE, SEED, Choice, Integer, Optional, Real, Text
from .geometry import MULTIPLE, resize_image, to_tensor, working_shape
from .sampler import FROM_EXAMPLES, SOURCES, AnomalySampler, crop_synthesizer


class TrainedDetector(Detector):
    """A detector whose networks learn from synthetic anomalies on the normal images.

    Subclasses implement ``build`` (create the networks from the parameters), ``networks`` (name ->
    module, the model file's content), ``train_networks(sampler, steps)``, ``anomaly_maps``
    (working-resolution batch -> per-pixel anomaly probabilities) and ``image_scores``.

    ``fit(images, masks, labels)``: images labelled 1 with a mask are real anomalies; they feed
    the ``anomaly_source`` synthesizer (defect transplants or AnoGen's diffusion generator). Normal images held out of training (calibration.held_out_split) set
    the threshold and the heatmap range.
    """

    learning_type = LearningType.FEW_ANOMALIES
    weight_locations = ("sd_model",)
    parameter_constraints = {"size": INPUT_SIZE, "crop": Integer(MULTIPLE, 2048), "batch_size": BATCH_SIZE,
                             "steps": Optional(Integer(1, 10**6)), "lr": Real(0.0, 1.0, open_low=True),
                             "anomalies": Integer(0, 10**4), "anomaly_source": Choice(SOURCES),
                             "sd_model": Optional(Text()), "generated": Integer(1, 10**5),
                             "diffusion_size": Integer(8, 2048), "diffusion_steps": Integer(1, 1000),
                             "embedding_steps": Integer(0, 10**6), "anogen_labels": Choice(("box", "mask")),
                             "box_threshold": Real(0.0, 1.0), "box_warmup": Real(0.0, 1.0), "seed": SEED}

    #: Training steps per normal image when ``steps`` is not given, and the range they are kept in
    #: (a few shots need far fewer steps than a full training set).
    steps_per_image: ClassVar[int] = 8
    min_steps: ClassVar[int] = 200
    max_steps: ClassVar[int] = 800

    def __init__(self, size: int = 256, crop: int = 128, batch_size: int = 8, steps: int | None = None, lr: float = 1e-3,
                 anomalies: int = 0, anomaly_source: str = "transplant", sd_model: str | None = None,
                 generated: int = 64, diffusion_size: int = 512, diffusion_steps: int = 30, embedding_steps: int = 300,
                 anogen_labels: str = "box", box_threshold: float = 0.5, box_warmup: float = 0.25, seed: int = 0):
        """``size``: the working image has about size² pixels (aspect ratio kept). ``crop``, ``batch_size``:
        training crop side and crops per step. ``steps``: training steps (default: scaled with the
        number of normal images, see ``steps_per_image``). ``anomalies``: how many real anomaly images
        (with masks) the engine picks from the test set for fit (`--param anomalies=N`; a benchmark
        leaves them out of its test set); fit itself uses the labelled anomalies it is given.
        ``anomaly_source``: where the half of the synthetic anomalies that is not Perlin comes from:
        "transplant" (the real defects cut out and blended into normal images; needs real
        anomalies), "diffusion" (AnoGen proper: a defect embedding learned from the real anomalies
        steers Stable Diffusion inside a box; ``sd_model`` a local diffusers folder or
        $DEFECTLENS_SD_MODEL, ``embedding_steps`` of textual inversion, ``generated`` anomalies made
        before training at ``diffusion_size`` px with ``diffusion_steps`` denoising steps),
        "cutpaste" (patches of the crop itself, no real anomaly needed) or "perlin" (Perlin only).
        Without real anomalies, "transplant" and "diffusion" fall back to Perlin only.
        ``anogen_labels``: "box" trains on the generated anomalies' boxes with the weak box loss
        (AnoGen), "mask" on their exact masks (a transplant knows them; a diffusion anomaly's
        mask is its box).
        ``box_threshold``: normal probability above which a pixel
        inside a weak box is ignored; ``box_warmup``: share of the training during which box pixels
        are all supervised (a fresh network calls everything normal)."""
        self.size = size
        self.crop = crop
        self.batch_size = batch_size
        self.steps = steps
        self.lr = lr
        self.anomalies = anomalies
        self.anomaly_source = anomaly_source
        self.sd_model = sd_model
        self.generated = generated
        self.diffusion_size = diffusion_size
        self.diffusion_steps = diffusion_steps
        self.embedding_steps = embedding_steps
        self.anogen_labels = anogen_labels
        self.box_threshold = box_threshold
        self.box_warmup = box_warmup
        self.seed = seed
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
        return 2.0 if step < self.box_warmup * steps else self.box_threshold

    # -- contract -----------------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        configure_threads()
        normal_items = [image for image, label in zip(images, labels) if label == 0]
        anomalous = [(image, mask) for image, label, mask in zip(images, labels, masks) if label == 1]
        if self.anomalies and len(anomalous) != self.anomalies:
            raise ValueError(f"{self.name} was asked for anomalies={self.anomalies} real anomaly images but fit got "
                             f"{len(anomalous)}; pass them as fit(images, masks, labels) with label 1, or use "
                             "`defectlens fit`, which picks them")

        normals = [self._working(as_image(item)) for item in tqdm(normal_items, desc="read images", unit="img", leave=False)]
        real = None
        if anomalous:
            real_images = [as_image(image) for image, _ in anomalous]
            real_masks = [as_mask(mask, image.shape[:2]) for image, (_, mask) in zip(real_images, anomalous)]
            real = ([self._working(image) for image in real_images],
                    [resize_image(mask.astype(np.uint8), self._shape_of(image)) > 0 for image, mask in zip(real_images, real_masks)])
        self.real_anomalies = len(anomalous)

        train, held_out = held_out_split(len(normals), self.seed)
        train_images = [normals[i] for i in train]
        # Crops are multiples of 32 as well, so every level of the networks halves exactly.
        crop = max(MULTIPLE, min(self.crop, *(min(image.shape[:2]) for image in train_images)) // MULTIPLE * MULTIPLE)
        generator = self._generator(real) if real and self.anomaly_source in FROM_EXAMPLES else None
        sampler = AnomalySampler(train_images, crop, self.seed, generator, boxes=self.anogen_labels == "box",
                                 pool=self.generated if self.anomaly_source == "diffusion" else 0,
                                 crop_source=crop_synthesizer(self.anomaly_source))
        steps = self.steps or int(np.clip(self.steps_per_image * len(train_images), self.min_steps, self.max_steps))

        torch.manual_seed(self.seed)
        self.build()
        for network in self.networks().values():
            network.train()
        self.losses = self.train_networks(sampler, steps)
        for network in self.networks().values():
            network.eval()
        if len(held_out):
            # Threshold and heatmap range from normal images the networks never saw.
            self.set_calibration(calibrate(*self._score_working([normals[i] for i in held_out], progress="held-out normals")))

    def _generator(self, real: tuple[list, list]):
        """The whole-image synthesizer of ``anomaly_source`` built on the real anomalies."""
        from ...synthesis import create_synthesizer

        if self.anomaly_source == "diffusion":
            return create_synthesizer("diffusion", anomaly_images=real[0], anomaly_masks=real[1], sd_model=self.sd_model,
                                      train_steps=self.embedding_steps, size=self.diffusion_size,
                                      steps=self.diffusion_steps, seed=self.seed)
        return create_synthesizer("anogen", anomaly_images=real[0], anomaly_masks=real[1])

    def predict_images(self, images: list) -> Prediction:
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
        size = self.batch_size
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
        return working_shape(image.shape[0], image.shape[1], self.size)

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
