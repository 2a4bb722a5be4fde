"""FAPrompt's learned prompts and how they score an image (Zhu et al., arXiv 2410.10289).

Compound abnormality prompts (CAP): one normal prompt [V_1..V_E][object.] and K abnormal
prompts [V_1..V_E][A^i_1..A^i_E'][damaged object.] that share the normal context V, so each
abnormal prompt is "normal plus a specific deviation". Data-dependent abnormality prompts (DAP):
the M patches of an image that the static prompts find most abnormal go through a small prior
network, whose output is added to every abnormal token, giving per-image prompts. The words
follow the authors' code ("damaged object." on the abnormal side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import encode_prompts, word_embeddings

NORMAL_WORDS = "object."
ABNORMAL_WORDS = "damaged object."
TEMPERATURE = 0.07  # CLIP's initial logit scale, as AnomalyCLIP and FAPrompt use


@dataclass
class Scores:
    """Per-patch anomaly probabilities (mean over tapped layers) with static prompts
    (``static``) and data-dependent ones (``dynamic``), both (N, h*w); the image-level
    probability ``image`` (N,); the prior ``omega`` (N, H); the K abnormal text embeddings
    ``abnormal`` (K, D) for the orthogonality loss."""

    static: torch.Tensor
    dynamic: torch.Tensor
    image: torch.Tensor
    omega: torch.Tensor
    abnormal: torch.Tensor

    def image_score(self) -> torch.Tensor:
        """s(x) = (s_a + (max S + max Ŝ) / 2) / 2: global and local evidence, equally."""
        local = 0.5 * (self.static.amax(dim=1) + self.dynamic.amax(dim=1))
        return 0.5 * (self.image + local)

    def fused_map(self) -> torch.Tensor:
        """The paper's fusion of four maps, (M^a + 1 - M^n + M̂^a + 1 - M̂^n) / 4, at patch
        resolution. Each normal map is the other side of a two-way softmax (M^n = 1 - M^a), so
        the four terms reduce to the mean of the static and the data-dependent anomaly map."""
        return 0.5 * (self.static + self.dynamic)


class FinePrompts(nn.Module):
    """The learned parts: normal context, K abnormal contexts, deep text tokens, prior network."""

    def __init__(self, clip, tokenizer, normal_tokens: int = 5, abnormal_tokens: int = 2, prompts: int = 10,
                 top_patches: int = 10, text_depth: int = 9, deep_tokens: int = 4):
        super().__init__()
        if deep_tokens > normal_tokens:
            raise ValueError(f"deep_tokens ({deep_tokens}) must not exceed normal_tokens ({normal_tokens}): "
                             "deep tokens replace the normal context positions")
        width = clip.text_model.config.hidden_size
        dim = clip.config.projection_dim
        deep_layers = max(0, min(text_depth, clip.text_model.config.num_hidden_layers) - 1)
        self.clip = [clip]  # a list: the frozen CLIP is not a sub-module, so it is never saved or trained
        self.top_patches = top_patches
        self.normal = nn.Parameter(torch.randn(normal_tokens, width) * 0.02)
        self.abnormal = nn.Parameter(torch.randn(prompts, abnormal_tokens, width) * 0.02)
        self.deep = nn.Parameter(torch.randn(deep_layers, deep_tokens, width) * 0.02)
        hidden = max(1, top_patches * dim // 16)
        self.prior = nn.Sequential(nn.Linear(top_patches * dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self._normal_words = word_embeddings(clip, tokenizer, NORMAL_WORDS)
        self._abnormal_words = word_embeddings(clip, tokenizer, ABNORMAL_WORDS)

    def _encode(self, sequences: torch.Tensor) -> torch.Tensor:
        return encode_prompts(self.clip[0], sequences, self.deep if self.deep.shape[0] else None)

    def normal_feature(self) -> torch.Tensor:
        words = self._normal_words
        sequence = torch.cat([words[:1], self.normal, words[1:]])[None]
        return self._encode(sequence)[0]

    def abnormal_features(self, omega: torch.Tensor | None = None) -> torch.Tensor:
        """f_t(P^{a_i}) for each of the K prompts (K, D); with ``omega`` (N, H), the
        data-dependent prompts of each image (N, K, D)."""
        abnormal = self.abnormal[None] if omega is None else self.abnormal[None] + omega[:, None, None, :]
        images, count, tokens, width = abnormal.shape
        words = self._abnormal_words
        sequences = torch.cat([words[:1].expand(images * count, 1, width),
                               self.normal.expand(images * count, -1, -1),
                               abnormal.reshape(images * count, tokens, width),
                               words[1:].expand(images * count, -1, width)], dim=1)
        features = self._encode(sequences).reshape(images, count, -1)
        return features[0] if omega is None else features

    def forward(self, image: torch.Tensor, patches: torch.Tensor) -> Scores:
        """``image`` (N, D) and ``patches`` (N, layers, h*w, D), unit-norm, from encode_images."""
        normal = F.normalize(self.normal_feature(), dim=-1)
        abnormal = self.abnormal_features()
        static = _anomaly_probability(patches, normal, F.normalize(abnormal.mean(dim=0), dim=-1)[None])
        if static.shape[1] < self.top_patches:
            raise ValueError(f"the image gives {static.shape[1]} patches, fewer than top_patches={self.top_patches}: "
                             "use a larger size or a smaller top_patches")
        # The prior reads the deepest tapped layer, the one the authors' code takes its tokens from.
        top = static.topk(self.top_patches, dim=1).indices
        picked = patches[:, -1].gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))
        omega = self.prior(picked.flatten(1))
        dynamic_abnormal = F.normalize(self.abnormal_features(omega).mean(dim=1), dim=-1)
        dynamic = _anomaly_probability(patches, normal, dynamic_abnormal)
        image_logits = torch.stack([image @ normal, (image * dynamic_abnormal).sum(-1)], dim=-1) / TEMPERATURE
        return Scores(static, dynamic, image_logits.softmax(dim=-1)[:, 1], omega, abnormal)


def _anomaly_probability(patches: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """Softmax over (normal, abnormal) similarity per patch and layer, averaged over layers ->
    (N, h*w). ``abnormal`` is (1, D) shared or (N, D) per image."""
    to_normal = patches @ normal
    to_abnormal = torch.einsum("nlpd,nd->nlp", patches, abnormal.expand(patches.shape[0], -1))
    logits = torch.stack([to_normal, to_abnormal], dim=-1) / TEMPERATURE
    return logits.softmax(dim=-1)[..., 1].mean(dim=1)
