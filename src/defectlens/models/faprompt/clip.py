"""CLIP run layer by layer, the way AnomalyCLIP and FAPrompt use it.

Vision: patch tokens of a few layers (a quarter, half, three quarters and all of the depth by
default), each through CLIP's own post-layernorm and visual projection so they live in the
joint image-text space. From the first tapped layer on, the tokens come from a second, V-V
attention path (values attend to values, no MLP) fed by the original path: plain CLIP
attention is dominated by a few global tokens and localises poorly, V-V attention keeps each
patch close to its own content. The image embedding is CLIP's usual one.

Text: prompts are given as token embeddings (learned vectors between the start token and the
words), run through the causal text transformer, pooled at the end-of-text token. Deeper
layers may replace the first context positions with their own learned vectors (AnomalyCLIP's
deep text prompts).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...data.io import as_image

# Every OpenAI CLIP checkpoint is trained with these.
CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def default_layers(depth: int) -> list[int]:
    """Quarter points of the vision depth, 1-based: 6, 12, 18, 24 for ViT-L."""
    return sorted({max(1, round(depth * q / 4)) for q in range(1, 5)})


def input_side(size: int, patch: int) -> int:
    """The square input side: ``size`` rounded down to whole patches."""
    side = (int(size) // patch) * patch
    if side < patch:
        raise ValueError(f"size {size} is smaller than one CLIP patch ({patch} px)")
    return side


def preprocess(images, side: int) -> torch.Tensor:
    """RGB uint8 images (or paths) -> a normalised (N, 3, side, side) batch."""
    batch = []
    for item in images:
        image = as_image(item)
        shrink = max(image.shape[:2]) > side
        resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        batch.append(((resized.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(batch))


def _value_attention(attention, hidden: torch.Tensor) -> torch.Tensor:
    """Self-attention with values as queries and keys (same heads, scale and projections)."""
    count, length, width = hidden.shape
    values = attention.v_proj(hidden).view(count, length, attention.num_heads, attention.head_dim).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(values, values, values, scale=attention.scale)
    return attention.out_proj(mixed.transpose(1, 2).reshape(count, length, width))


@torch.no_grad()
def encode_images(clip, pixels: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image embeddings (N, D) and patch tokens (N, len(layers), h*w, D)."""
    vision = clip.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))
    value_path, taps = None, []
    for index, layer in enumerate(vision.encoder.layers, start=1):
        if index >= layers[0]:
            base = hidden if value_path is None else value_path
            value_path = base + _value_attention(layer.self_attn, layer.layer_norm1(hidden))
        hidden = layer(hidden, None)
        if index in layers:
            taps.append(value_path[:, 1:])
    image = clip.visual_projection(vision.post_layernorm(hidden[:, 0]))
    patches = clip.visual_projection(vision.post_layernorm(torch.stack(taps, dim=1)))
    return F.normalize(image, dim=-1), F.normalize(patches, dim=-1)


def encode_prompts(clip, embeddings: torch.Tensor, deep: torch.Tensor | None = None) -> torch.Tensor:
    """Text embeddings (P, D) of prompts given as token embeddings (P, L, H) whose last
    position is the end-of-text token. ``deep`` (layers, T, H) replaces positions 1..T at text
    layers 1, 2, ... (layer 0 sees ``embeddings`` as given)."""
    text = clip.text_model
    length = embeddings.shape[1]
    hidden = embeddings + text.embeddings.position_embedding.weight[:length]
    causal = torch.full((length, length), float("-inf"), dtype=hidden.dtype).triu(1)[None, None]
    for index, layer in enumerate(text.encoder.layers):
        if deep is not None and 1 <= index <= deep.shape[0]:
            learned = deep[index - 1].expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], learned, hidden[:, 1 + learned.shape[1]:]], dim=1)
        hidden = layer(hidden, causal)
    # Causal attention: nothing after the end-of-text token reaches it, so no padding is needed.
    return clip.text_projection(text.final_layer_norm(hidden[:, -1]))


def word_embeddings(clip, tokenizer, words: str) -> torch.Tensor:
    """Frozen token embeddings (L, H) of start token + ``words`` + end-of-text token."""
    ids = tokenizer(words)["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"the CLIP tokenizer does not wrap text in start/end tokens: {ids}")
    with torch.no_grad():
        return clip.text_model.embeddings.token_embedding(torch.tensor(ids)).clone()
