"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023) on any CLIP checkpoint that transformers loads.

Zero-shot (``fit([])``): the image score is CLIP's two-class probability that the whole image
matches the anomalous rather than the normal prompt ensemble. The map is the per-patch harmonic
mean of three scales: that image score, and the same probability for every 2×2 and 3×3 window
of patch tokens, each window's score spread over its patches by harmonic averaging.

With K normal images (WinCLIP+): their window embeddings and penultimate-layer patch tokens are
kept as a visual memory per scale. A test feature's association score is min over the memory of
(1 - cos)/2; window scores go back to patches by harmonic averaging, and the scales are averaged
into a visual map. Final map = mean of language and visual maps; image score = mean of the
language image score and the visual map's maximum (the paper's fusion). ``augment`` adds flipped,
turned or shifted copies of up to ``augment_max_images`` normal images to that memory
(models/augment.py; not measured here for want of CLIP weights, so off by default).

The two-class softmax uses the reference implementation's temperature 0.07 (scale 1/0.07 ≈ 14.3);
``softmax_scale=null`` uses the CLIP checkpoint's own logit scale instead (100 for OpenAI's). The
image-level probability ranks images the same either way (it is a sigmoid of the scaled
difference of two cosines); the scale changes how the scales' probabilities mix in the harmonic
mean and how language and visual scores weigh in WinCLIP+'s fusion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ...backbones.hf import ModelNotAvailable, load_clip, resolve_model
from ...data.io import as_image
from ..augment import AUGMENTS, augmented_set
from ..base import Detector, LearningType, Prediction, register
from ..calibration import calibrate, refit_folds
from ..params import INPUT_SIZE, SEED, Choice, Integer, ListOf, Optional, Real, Text
from .encoder import ImageFeatures, WindowEncoder, text_prototypes
from .prompts import object_name
from .windows import (
    association_scores,
    harmonic_aggregation,
    harmonic_mean,
    two_class_scores,
    window_patches,
)

PATCH_BANK = "patch"
#: The reference implementation's softmax temperature 0.07, as a scale on cosine similarities.
REFERENCE_SCALE = 1 / 0.07


def clip_fingerprint(clip) -> list[float]:
    """Sums of CLIP's two projection matrices: tells one checkpoint from another cheaply."""
    return [float(clip.visual_projection.weight.detach().double().sum()), float(clip.text_projection.weight.detach().double().sum())]


@register
class WinCLIP(Detector):
    name = "winclip"
    learning_type = LearningType.ZERO_SHOT
    weight_locations = ("clip_model",)
    parameter_constraints = {"clip_model": Optional(Text()), "object_name": Optional(Text()), "size": INPUT_SIZE,
                             "scales": ListOf(Integer(1, 64)), "softmax_scale": Optional(Real(0.0, 1000.0, open_low=True)),
                             "seed": SEED, "augment": Choice(AUGMENTS), "augment_max_images": Integer(0, 10**6)}

    def __init__(self, clip_model: str | None = None, object_name: str | None = None, size: int = 240,
                 scales: Sequence[int] = (2, 3), softmax_scale: float | None = REFERENCE_SCALE, seed: int = 0,
                 augment: str = "none", augment_max_images: int = 16):
        """``clip_model``: a folder (or Hugging Face cache id) holding a transformers CLIPModel and
        its tokenizer; default $DEFECTLENS_CLIP_MODEL. ``object_name``: the object in the prompts
        ("ball screw"); the CLI passes the dataset's category, else "object" is used. ``size``:
        CLIP input side in pixels, rounded down to whole patches (240: 15×15 patches at ViT-B/16,
        WinCLIP's reference setting). ``scales``: window sides in patches. ``softmax_scale``: what
        cosine similarities are multiplied by before the two-class softmax (1/0.07, the reference's;
        null: the CLIP's logit scale). ``seed``: which normal images
        are held out for the threshold when there are more than 10. ``augment`` /
        ``augment_max_images``: copies of a few normal images that join the visual memory (see
        models/augment.py)."""
        self.clip_model = clip_model
        self.object_name = object_name
        self.size = size
        self.scales = scales
        self.softmax_scale = softmax_scale
        self.seed = seed
        self.augment = augment
        self.augment_max_images = augment_max_images
        #: Learned at fit: the CLIP folder (absolute, so a model file does not depend on the cwd)
        #: and the object named in the prompts.
        self.clip_path_: str | None = None
        self.object_name_: str | None = None
        self.prototypes: torch.Tensor | None = None  # (2, D) unit [normal, anomalous] text embeddings
        self.temperature: float | None = None  # CLIP's logit scale
        self.fingerprint: list[float] | None = None
        self.banks: dict[str, torch.Tensor] | None = None  # WinCLIP+ memory: scale -> (M, D) unit features
        self._encoder: WindowEncoder | None = None

    @property
    def encoder(self) -> WindowEncoder:
        """CLIP, loaded on first use and checked against the one the model was fitted with."""
        if self._encoder is None:
            # The CLIP named by the parameter, else the one it was fitted with.
            path = resolve_model("clip", self.clip_model) if self.clip_model else self.clip_path_
            clip, _ = load_clip(path)
            if self.fingerprint is not None and not np.allclose(clip_fingerprint(clip), self.fingerprint, rtol=1e-5):
                raise ModelNotAvailable(f"the CLIP model at {path} is not "
                                        "the one this winclip model was fitted with; fit again or point to that CLIP")
            self._encoder = WindowEncoder(clip, self.size, sorted(set(self.scales)))
        return self._encoder

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the loaded CLIP behind (transformers' hooks do not pickle);
        the copy loads it again on first use, checked as ``encoder`` checks it."""
        return {**self.__dict__, "_encoder": None}

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        """Text prototypes for the object; with normal images, also the visual memory and the
        threshold from held-out normal images."""
        self.clip_path_ = resolve_model("clip", self.clip_model)
        if Path(self.clip_path_).expanduser().is_dir():
            self.clip_path_ = str(Path(self.clip_path_).expanduser().resolve())
        clip, tokenizer = load_clip(self.clip_path_)
        self.object_name_ = object_name(self.object_name)
        self.prototypes = text_prototypes(clip, tokenizer, self.object_name_)
        self.temperature = float(clip.logit_scale.detach().exp())
        self.fingerprint = clip_fingerprint(clip)
        self._encoder = None
        self.banks = None
        if images:
            features = self.encoder.encode(images, progress="winclip normal images")
            views = self._views(images)
            self._calibrate(features, views)
            self.banks = self._banks(features if views is None else ImageFeatures.cat([features, views[0]]))

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        scores, patch_maps = self.score_features(self.encoder.encode(images), self.banks)
        grid = math.isqrt(patch_maps.shape[1])
        maps = [cv2.resize(m.view(grid, grid).numpy(), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
                for m, image in zip(patch_maps, images)]
        return Prediction(scores=scores.numpy().astype(np.float64), maps=maps)

    # -- scoring ----------------------------------------------------------------------------
    def score_features(self, features: ImageFeatures, banks: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (N,) and patch-grid maps (N, h*w): language only without ``banks``,
        language and visual fused with them."""
        count, patches = features.patches.shape[:2]
        grid = math.isqrt(patches)
        scale = self.temperature if self.softmax_scale is None else self.softmax_scale
        language_image = two_class_scores(features.image, self.prototypes, scale)
        language = [language_image[:, None].expand(-1, patches)]
        visual = []
        if banks is not None:
            visual.append(association_scores(features.patches.flatten(0, 1), banks[PATCH_BANK]).view(count, patches))
        for k, embeddings in features.windows.items():
            windows = window_patches(grid, grid, k)
            language.append(harmonic_aggregation(two_class_scores(embeddings, self.prototypes, scale), windows, patches))
            if banks is not None:
                associated = association_scores(embeddings.flatten(0, 1), banks[f"window{k}"]).view(count, -1)
                visual.append(harmonic_aggregation(associated, windows, patches))
        language_map = harmonic_mean(torch.stack(language))
        if banks is None:
            return language_image, language_map
        visual_map = torch.stack(visual).mean(0)
        return (language_image + visual_map.amax(1)) / 2, (language_map + visual_map) / 2

    @staticmethod
    def _banks(features: ImageFeatures) -> dict[str, torch.Tensor]:
        banks = {f"window{k}": embeddings.flatten(0, 1) for k, embeddings in features.windows.items()}
        banks[PATCH_BANK] = features.patches.flatten(0, 1)
        return banks

    def _views(self, images: list) -> tuple[ImageFeatures, np.ndarray] | None:
        """Features of the augmented copies of the normal images and each copy's source index."""
        augmented = augmented_set(images, self.augment, self.augment_max_images)
        if augmented is None:
            return None
        copies, sources = augmented
        return self.encoder.encode(copies, progress="winclip augmented copies"), sources

    def _calibrate(self, features: ImageFeatures, views: tuple[ImageFeatures, np.ndarray] | None = None) -> None:
        """Scores and maps of normal images against a memory of the other normal images (and of
        their augmented copies, never the held-out image's own)."""
        scores, maps = [], []
        for held_out in refit_folds(len(features), self.seed):
            kept = np.setdiff1d(np.arange(len(features)), held_out)
            memory = features.select(torch.from_numpy(kept))
            if views is not None:
                memory = ImageFeatures.cat([memory, views[0].select(torch.from_numpy(np.isin(views[1], kept)))])
            fold_scores, fold_maps = self.score_features(features.select(torch.from_numpy(held_out)),
                                                         self._banks(memory))
            scores.append(fold_scores.numpy())
            maps.append(fold_maps.numpy())
        self.set_calibration(calibrate(np.concatenate(scores) if scores else None, maps or None))

    # -- model file -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes, **{f"bank.{name}": bank for name, bank in (self.banks or {}).items()}}

    def extra_state(self) -> dict:
        return {"temperature": self.temperature, "fingerprint": self.fingerprint, "clip_path": self.clip_path_,
                "object_name": self.object_name_}

    def load_state_tensors(self, tensors, extra) -> None:
        self.prototypes = tensors["prototypes"].float()
        banks = {name.removeprefix("bank."): t.float() for name, t in tensors.items() if name.startswith("bank.")}
        self.banks = banks or None
        self.temperature, self.fingerprint = extra["temperature"], extra["fingerprint"]
        self.clip_path_ = extra["clip_path"]
        self.object_name_ = extra["object_name"]
