"""DINOv2 (Oquab et al., 2023) through ``transformers``: the patch tokens of a ViT as patch features.

The backbone is named ``dinov2[:MODEL][@LAYERS]``:

- ``MODEL``: a checkpoint folder, or a hub id already in the Hugging Face cache; without it,
  ``$DEFECTLENS_DINOV2_MODEL``. Nothing is ever downloaded.
- ``LAYERS``: comma-separated transformer layers whose patch tokens are concatenated, counted
  from 1, negative from the end (default ``-1``, the last, as AnomalyDINO uses).

Each layer's tokens go through the model's final layer norm (the last layer's output already
has), the class token and any register tokens are dropped, and the rest is laid out on the
patch grid. Images are resized so that each side is the nearest multiple of the patch size to
the requested size and normalised with the ImageNet mean and std, as DINOv2 was trained;
transformers interpolates the position embeddings to that grid.
"""

from __future__ import annotations

import re

import torch

from .base import PatchBackbone
from .hf import load_dinov2, resolve_model

PREFIX = "dinov2"
_LAYERS = re.compile(r"-?\d+(,-?\d+)*")


def is_dinov2_name(name: str) -> bool:
    return name == PREFIX or name.startswith((f"{PREFIX}:", f"{PREFIX}@"))


def parse_name(name: str) -> tuple[str | None, tuple[int, ...]]:
    """``dinov2[:MODEL][@LAYERS]`` -> (MODEL or None, LAYERS)."""
    if not is_dinov2_name(name):
        raise ValueError(f"'{name}' is not a DINOv2 backbone name (dinov2[:MODEL][@LAYERS])")
    rest, layers = name[len(PREFIX):], (-1,)
    head, at, tail = rest.rpartition("@")
    if at and _LAYERS.fullmatch(tail):
        rest, layers = head, tuple(int(layer) for layer in tail.split(","))
    elif at and not head:  # "dinov2@..." with something other than layer numbers
        raise ValueError(f"backbone '{name}': layers after '@' must be comma-separated integers, e.g. dinov2@-4,-1")
    if rest and not rest.startswith(":"):
        raise ValueError(f"backbone '{name}': expected dinov2[:MODEL][@LAYERS]")
    return rest[1:] or None, layers


def resolved_name(name: str) -> str:
    """The name with its model made explicit (the environment variable read now), so that a
    cached backbone never outlives a change of ``$DEFECTLENS_DINOV2_MODEL``."""
    model, layers = parse_name(name)
    return f"{PREFIX}:{resolve_model(PREFIX, model)}@{','.join(str(layer) for layer in layers)}"


class DINOv2(PatchBackbone):
    batch_size = 4

    def __init__(self, name: str = PREFIX, size: int | tuple[int, int] = 224):
        model, layers = parse_name(name)
        self.network = load_dinov2(resolve_model(PREFIX, model))
        config = self.network.config
        self.stride = int(config.patch_size)
        height, width = (size, size) if isinstance(size, int) else size
        super().__init__((self._to_patches(height), self._to_patches(width)))
        depth = int(config.num_hidden_layers)
        for layer in layers:
            if not (1 <= layer <= depth or -depth <= layer <= -1):
                raise ValueError(f"backbone '{name}': layer {layer} does not exist (the model has {depth} layers: "
                                 f"1..{depth} or -{depth}..-1)")
        # Indices into transformers' hidden_states, whose entry 0 is the patch embedding.
        self._layers = tuple(layer if layer > 0 else depth + 1 + layer for layer in layers)
        self._last_only = self._layers == (depth,)
        self._skip = 1 + int(getattr(config, "num_register_tokens", 0))
        self._hidden = int(config.hidden_size)
        self.name = name

    def _to_patches(self, side: int) -> int:
        return max(1, round(side / self.stride)) * self.stride

    @property
    def feature_dim(self) -> int:
        return self._hidden * len(self._layers)

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        return ((self._hidden, self.stride),) * len(self._layers)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.network(pixel_values=batch.contiguous(), output_hidden_states=not self._last_only)
        if self._last_only:
            tokens = [output.last_hidden_state]
        else:
            tokens = [self.network.layernorm(output.hidden_states[index]) for index in self._layers]
        rows, cols = self.feature_hw
        grids = [t[:, self._skip:].reshape(t.shape[0], rows, cols, self._hidden) for t in tokens]
        return torch.cat(grids, dim=3).permute(0, 3, 1, 2).contiguous()
