"""FAPrompt (Zhu et al., "Fine-grained Abnormality Prompt Learning for Zero-shot Anomaly
Detection", arXiv 2410.10289) as a defectlens detector.

Prompts are learned once on an annotated auxiliary set (normal and anomalous images with masks,
e.g. another category or a generated set), CLIP stays frozen, and the learned prompts then
score images of categories never seen in training. Only the learned parts go in the model
file; the CLIP they belong to is a parameter (``clip_model``).

Three ways to fit, by what is given:
  fit(images, masks, labels)  trains (starting from ``prompt_file`` if one is set: resuming);
  fit([])                     takes the learned prompts of ``prompt_file`` as they are (zero-shot);
  fit(normal_images)          takes them from ``prompt_file`` and sets the threshold from these
                              normal images of the target category (nothing is learned from them).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...backbones.base import configure_threads
from ...backbones.hf import load_clip, resolve_model
from ...data.io import as_image, as_mask
from ..base import Detector, LearningType, Prediction, register
from ..calibration import calibrate, held_out_split
from ..maps import upsample_map
from ..modelfile import ModelFileError
from . import losses
from .clip import default_layers, encode_images, input_side, preprocess
from ..params import BLUR_SIGMA, INPUT_SIZE, SEED, Choice, Integer, ListOf, Optional, Real, Text
from .prompts import FinePrompts

# Parameters that shape the learned tensors: taken from a prompt file together with them.
STRUCTURE = ("normal_tokens", "abnormal_tokens", "prompts", "top_patches", "text_depth", "deep_tokens", "layers")
EMBED_BATCH = 4
ORTHOGONALITY_WEIGHT = 0.1
NEEDS_PROMPTS = ("faprompt needs learned prompts: train them on an annotated set (`defectlens fit AUX_DATA --method "
                 "faprompt -o prompts.dlmodel`, AUX_DATA with test/<defect> images and ground_truth masks), then pass "
                 "--param prompt_file=prompts.dlmodel")


def mask_target(mask, side: int) -> np.ndarray:
    """A mask (any form data.io.as_mask takes) -> float32 side×side, the fraction of each cell
    that is defective."""
    union = as_mask(mask)
    if union is None:
        return np.zeros((side, side), np.float32)
    return cv2.resize(union.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)


def training_loss(net: FinePrompts, image: torch.Tensor, patches: torch.Tensor, masks: torch.Tensor,
                  labels: torch.Tensor, image_loss: str = "focal") -> torch.Tensor:
    """FAPrompt's loss on one batch: local (static and data-dependent maps, at the mask
    resolution), global, prior (normal images), orthogonality. Global: ``image_loss`` "focal" is
    the paper's focal loss on s(x); "cross_entropy" the authors' code's cross-entropy on the
    image-level abnormality probability s_a(x) alone."""
    scores = net(image, patches)
    grid, side = round(scores.static.shape[1] ** 0.5), masks.shape[-1]

    def upsample(maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(maps.reshape(-1, 1, grid, grid), size=(side, side), mode="bilinear", align_corners=False)[:, 0]

    if image_loss == "cross_entropy":
        image_term = losses.cross_entropy(scores.image, labels.float())
    else:
        image_term = losses.focal(scores.image_score(), labels.float())
    return (losses.local(upsample(scores.static), masks) + losses.local(upsample(scores.dynamic), masks)
            + image_term + losses.prior(scores.omega, labels)
            + ORTHOGONALITY_WEIGHT * losses.orthogonality(scores.abnormal))


@register
class FAPrompt(Detector):
    name = "faprompt"
    #: The engine gives this method every labelled image of DATA (train and test, with masks).
    learning_type = LearningType.AUXILIARY
    weight_locations = ("clip_model",)
    parameter_constraints = {
        "clip_model": Optional(Text()), "prompt_file": Optional(Text()), "size": INPUT_SIZE,
        "normal_tokens": Integer(1, 64), "abnormal_tokens": Integer(1, 64), "prompts": Integer(1, 256),
        "top_patches": Integer(1, 4096), "text_depth": Integer(1, 64), "deep_tokens": Integer(0, 64),
        "layers": Optional(ListOf(Integer(1, 256))), "steps": Integer(0, 10**6), "batch_size": Integer(1, 1024),
        "lr": Real(0.0, 1.0, open_low=True), "image_loss": Choice(("focal", "cross_entropy")), "max_images": Integer(1, 10**6), "blur_sigma": BLUR_SIGMA, "seed": SEED,
    }

    def __init__(self, clip_model: str | None = None, prompt_file: str | None = None, size: int = 256,
                 normal_tokens: int = 5, abnormal_tokens: int = 2, prompts: int = 10, top_patches: int = 10,
                 text_depth: int = 9, deep_tokens: int = 4, layers: list[int] | None = None, steps: int = 300,
                 batch_size: int = 8, lr: float = 1e-3, image_loss: str = "focal", max_images: int = 512, blur_sigma: float = 4.0, seed: int = 0):
        """``clip_model``: CLIP folder or cached hub id (default: $DEFECTLENS_CLIP_MODEL).
        ``prompt_file``: a trained faprompt model file to start from or to use zero-shot.
        ``size``: input side in pixels (rounded down to whole CLIP patches).
        E = ``normal_tokens``, E' = ``abnormal_tokens``, K = ``prompts``, M = ``top_patches``
        as in the paper; ``text_depth``/``deep_tokens``: text layers that get ``deep_tokens``
        learned tokens of their own (AnomalyCLIP's deep prompts; 1 = none); ``layers``: 1-based
        vision layers tapped for patch tokens (default: quarter points of the depth).
        ``image_loss``: the image-level training loss, "focal" on s(x) as the paper writes or
        "cross_entropy" on s_a(x) as the authors' code does.
        ``steps`` × ``batch_size`` images: the training budget; ``max_images``: at most this
        many auxiliary images are embedded (their CLIP features are kept in memory).
        With a ``prompt_file`` the prompt structure (E, E', K, M, depths, layers) and, unless
        ``clip_model`` is given, the CLIP are the file's: they belong to its learned tensors."""
        self.clip_model = clip_model
        self.prompt_file = prompt_file
        self.size = size
        self.normal_tokens = normal_tokens
        self.abnormal_tokens = abnormal_tokens
        self.prompts = prompts
        self.top_patches = top_patches
        self.text_depth = text_depth
        self.deep_tokens = deep_tokens
        self.layers = layers
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.image_loss = image_loss
        self.max_images = max_images
        self.blur_sigma = blur_sigma
        self.seed = seed
        self._learned: dict[str, torch.Tensor] | None = None
        self._net: FinePrompts | None = None
        self.steps_done = 0
        #: Learned at fit: the prompt structure and the CLIP (resolved path) the prompts belong to.
        self.structure_: dict | None = None
        self.clip_path_: str | None = None

    # -- CLIP and the learned module --------------------------------------------------------
    def _clip(self):
        if self.clip_path_ is None:
            self.clip_path_ = resolve_model("clip", self.clip_model)
        configure_threads()
        return load_clip(self.clip_path_)

    def _structure(self) -> dict:
        if self.structure_ is None:
            self.structure_ = {key: getattr(self, key) for key in STRUCTURE}
        return self.structure_

    def _network(self) -> FinePrompts:
        if self._net is None:
            clip, tokenizer = self._clip()
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                net = FinePrompts(clip, tokenizer, **{k: v for k, v in self._structure().items() if k != "layers"})
            if self._learned is not None:
                try:
                    net.load_state_dict(self._learned)
                except RuntimeError as error:
                    raise ModelFileError(f"the learned prompts do not fit CLIP '{self.clip_path_}' "
                                         f"({str(error).splitlines()[-1].strip()}); use the CLIP they were trained with") from None
            self._net = net
        return self._net

    def _geometry(self) -> tuple[int, int, list[int]]:
        """(input side, patch grid side, tapped vision layers)."""
        config = self._network().clip[0].config.vision_config
        layers = self._structure()["layers"] or default_layers(config.num_hidden_layers)
        if not all(1 <= layer <= config.num_hidden_layers for layer in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers {layers}: expected increasing vision layers between 1 and {config.num_hidden_layers}")
        side = input_side(self.size, config.patch_size)
        return side, side // config.patch_size, list(layers)

    def _embed(self, images: Sequence, progress: str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        side, _, layers = self._geometry()
        clip = self._network().clip[0]
        embeddings, patches = [], []
        for start in tqdm(range(0, len(images), EMBED_BATCH), desc=progress, disable=progress is None, unit="batch", leave=False):
            image, patch = encode_images(clip, preprocess(images[start : start + EMBED_BATCH], side), layers)
            embeddings.append(image)
            patches.append(patch.to(dtype))
        return torch.cat(embeddings), torch.cat(patches)

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        """With labelled anomalies: train (from ``prompt_file`` if set: resuming). Otherwise take
        the prompts of ``prompt_file``, calibrated on the normal images when some are given."""
        self._learned, self._net, self.structure_, self.clip_path_, self.steps_done = None, None, None, None, 0
        if self.prompt_file:
            self._adopt(self.prompt_file)
        elif 1 not in labels:
            raise ValueError(NEEDS_PROMPTS)
        if 1 in labels:
            self._train(images, masks, labels)
        elif images:
            self._fitted = True  # the adopted prompts score the normal images
            self._calibrate(images)

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        net = self._network()
        side, grid, _ = self._geometry()
        with torch.no_grad():
            scores = net(*self._embed(images))
        maps = [upsample_map(patch_map.reshape(grid, grid).numpy(), (side, side), image.shape[:2], self.blur_sigma)
                for patch_map, image in zip(scores.fused_map(), images)]
        return Prediction(scores=scores.image_score().numpy().astype(np.float64), maps=maps)

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        learned = self._net.state_dict() if self._net is not None else self._learned
        if learned is None:
            raise ValueError("faprompt has learned nothing yet: fit it before saving")
        return {f"prompts.{key}": value for key, value in learned.items()}

    def load_state_tensors(self, tensors, extra) -> None:
        self._learned = {key.removeprefix("prompts."): value for key, value in tensors.items()}
        self._net = None
        self.steps_done = int(extra.get("steps_done", 0))
        self.structure_ = extra.get("structure")
        self.clip_path_ = self.clip_model or extra.get("clip_path")

    def extra_state(self) -> dict:
        return {"steps_done": self.steps_done, "structure": self._structure(), "clip_path": self.clip_path_}

    # -- internals --------------------------------------------------------------------------
    def _adopt(self, path) -> None:
        """Take learned prompts, their structure, threshold and CLIP path from a model file."""
        trained = FAPrompt.load(path)
        self.structure_ = dict(trained._structure())
        self.clip_path_ = resolve_model("clip", self.clip_model or trained.clip_path_)
        self._learned, self._net = trained.learned_tensors(), None
        self.threshold, self.normal_scores, self.map_range = trained.threshold, trained.normal_scores, trained.map_range
        self.steps_done = trained.steps_done

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        """The learned prompt tensors."""
        return self._net.state_dict() if self._net is not None else self._learned

    def _train(self, images: list, masks: list, labels: list[int]) -> None:
        labels_array = np.asarray(labels)
        rng = np.random.default_rng(self.seed)
        normal = np.flatnonzero(labels_array == 0)
        held_out = normal[held_out_split(len(normal), self.seed)[1]]
        train = np.setdiff1d(np.arange(len(images)), held_out)
        if len(train) > self.max_images:
            train = np.sort(rng.choice(train, size=self.max_images, replace=False))
        if not (labels_array[train] == 1).any():
            raise ValueError("no anomalous image left among the training images picked; raise max_images")

        net = self._network()
        side = self._geometry()[0]
        # Every training image's tokens stay in memory for all steps: half precision halves that.
        image, patches = self._embed([images[i] for i in train], progress="faprompt: CLIP features", dtype=torch.float16)
        targets = torch.from_numpy(np.stack([mask_target(masks[i], side) for i in train]))
        train_labels = torch.from_numpy(labels_array[train])
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.5, 0.999))
        steps, batch = self.steps, min(self.batch_size, len(train))
        bar = tqdm(range(steps), desc="faprompt training", unit="step")
        try:
            for _ in bar:
                pick = torch.from_numpy(rng.choice(len(train), size=batch, replace=False))
                loss = training_loss(net, image[pick], patches[pick].float(), targets[pick], train_labels[pick],
                                     self.image_loss)
                optimizer.zero_grad()
                loss.backward(inputs=list(net.parameters()))  # CLIP stays frozen: no gradients for it at all
                optimizer.step()
                self.steps_done += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
        except KeyboardInterrupt:
            bar.close()
            print(f"faprompt: training interrupted after {self.steps_done} steps; keeping the prompts learned so far",
                  file=sys.stderr)
        self._fitted = True
        self._calibrate([images[i] for i in held_out])

    def _calibrate(self, normal_images: list) -> None:
        """Threshold and heatmap range from normal images the prompts were not trained on."""
        if not normal_images:
            return
        scores, maps = [], []
        for start in range(0, len(normal_images), self.predict_chunk):
            prediction = self.predict(normal_images[start : start + self.predict_chunk])
            scores.append(prediction.scores)
            maps += [np.asarray(m) for m in prediction.maps]
        self.set_calibration(calibrate(np.concatenate(scores), maps))
