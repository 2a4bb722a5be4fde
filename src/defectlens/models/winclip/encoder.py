"""CLIP's image encoder on whole images and on windows of their patch tokens, and the text
prototypes of the prompt ensemble.

A window's embedding is CLIP's class embedding computed from the class token and the window's
patch tokens only: the other tokens are dropped from the sequence after the patch and position
embeddings, so attention never sees them (exactly what masking them out of attention does, in a
sequence 1 + k² long instead of 1 + h·w). The image is never cropped or resized per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...backbones.base import configure_threads
from ...data.io import as_image
from .prompts import ANOMALOUS_STATES, NORMAL_STATES, prompts
from .windows import window_patches

# Pixel statistics of CLIP's training images; every CLIP checkpoint that CLIPModel loads
# (OpenAI's and the LAION/OpenCLIP conversions) was trained with them.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_BATCH = 4  # images per forward pass
WINDOW_BATCH = 1024  # window sequences per encoder call: bounds the MLP activations to ~100 MB at ViT-B


@dataclass
class ImageFeatures:
    """Unit-length features of N images at every scale WinCLIP uses."""

    image: torch.Tensor  # (N, D) CLIP embedding of the whole image
    windows: dict[int, torch.Tensor]  # k -> (N, windows, D) CLIP embedding of each k×k window
    patches: torch.Tensor  # (N, h*w, C) penultimate-layer patch tokens of the whole image

    def __len__(self) -> int:
        return self.image.shape[0]

    def select(self, index) -> ImageFeatures:
        return ImageFeatures(self.image[index], {k: w[index] for k, w in self.windows.items()}, self.patches[index])

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        return ImageFeatures(torch.cat([p.image for p in parts]),
                             {k: torch.cat([p.windows[k] for p in parts]) for k in parts[0].windows},
                             torch.cat([p.patches for p in parts]))


class WindowEncoder:
    """Runs a transformers CLIPModel at ``size`` px (rounded down to whole patches) with k×k
    windows for each k in ``scales``."""

    def __init__(self, clip, size: int, scales: Sequence[int]):
        self.clip = clip
        patch = clip.config.vision_config.patch_size
        self.grid = size // patch
        if self.grid < max(scales):
            raise ValueError(f"--size {size} gives a {self.grid}×{self.grid} patch grid (patch {patch} px): "
                             f"too small for {max(scales)}×{max(scales)} windows")
        self.side = self.grid * patch
        self.windows = {k: window_patches(self.grid, self.grid, k) for k in scales}
        configure_threads()

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """The whole image, squashed to side×side (maps must cover all of it: no centre crop)."""
        shrink = max(image.shape[:2]) > self.side
        resized = cv2.resize(image, (self.side, self.side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        return ((resized.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)

    def encode(self, images: Sequence, progress: str | None = None) -> ImageFeatures:
        parts = []
        batches = range(0, len(images), IMAGE_BATCH)
        with torch.no_grad():
            for start in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False):
                pixels = np.stack([self.preprocess(as_image(i)) for i in images[start : start + IMAGE_BATCH]])
                parts.append(self._encode_batch(torch.from_numpy(pixels)))
        return ImageFeatures.cat(parts)

    def _embed(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """Final class tokens -> unit CLIP image embeddings (CLIP's own head)."""
        vision = self.clip.vision_model
        return F.normalize(self.clip.visual_projection(vision.post_layernorm(class_tokens)), dim=-1)

    def _encode_batch(self, pixels: torch.Tensor) -> ImageFeatures:
        vision = self.clip.vision_model
        whole = vision(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        tokens = whole.hidden_states[0]  # patch + position embeddings after the pre-norm: the encoder's input
        windows = {}
        for k, patches in self.windows.items():
            keep = torch.cat([torch.zeros(len(patches), 1, dtype=torch.long), patches + 1], dim=1)  # class token first
            sequences = tokens[:, keep].flatten(0, 1)
            class_tokens = torch.cat([vision.encoder(inputs_embeds=part).last_hidden_state[:, 0]
                                      for part in sequences.split(WINDOW_BATCH)])
            windows[k] = self._embed(class_tokens).view(len(pixels), len(patches), -1)
        return ImageFeatures(image=self._embed(whole.last_hidden_state[:, 0]), windows=windows,
                             patches=F.normalize(whole.hidden_states[-2][:, 1:], dim=-1))


def text_prototypes(clip, tokenizer, name: str) -> torch.Tensor:
    """(2, D) unit [normal, anomalous] prototypes: the mean of each prompt ensemble's unit text
    embeddings, re-normalised."""
    limit = clip.config.text_config.max_position_embeddings
    rows = []
    with torch.no_grad():
        for states in (NORMAL_STATES, ANOMALOUS_STATES):
            batch = tokenizer(prompts(states, name), padding=True, truncation=True, max_length=limit, return_tensors="pt")
            pooled = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
            rows.append(F.normalize(F.normalize(clip.text_projection(pooled), dim=-1).mean(0), dim=0))
    return torch.stack(rows)
