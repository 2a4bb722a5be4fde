"""Windows over the ViT patch grid and the score arithmetic of WinCLIP.

A k×k window is the list of its k² patch indices (row-major on the h×w grid); windows slide
with stride 1, so an h×w grid has (h-k+1)(w-k+1) of them. Window scores go back to patches by
harmonic averaging over the windows that cover each patch: one low (normal) window keeps a
patch low, which sharpens the maps at defect borders.
"""

from __future__ import annotations

import torch


def window_patches(height: int, width: int, k: int) -> torch.Tensor:
    """(windows, k*k) patch indices of every k×k window of an height×width grid."""
    if not 1 <= k <= min(height, width):
        raise ValueError(f"a {k}×{k} window does not fit a {height}×{width} patch grid; use a larger --size")
    rows = torch.arange(height - k + 1)[:, None, None, None] + torch.arange(k)[None, None, :, None]
    cols = torch.arange(width - k + 1)[None, :, None, None] + torch.arange(k)[None, None, None, :]
    return (rows * width + cols).reshape(-1, k * k)


def window_cover(windows: torch.Tensor, patches: int) -> torch.Tensor:
    """(windows, patches) bool: which patches each window holds."""
    cover = torch.zeros(windows.shape[0], patches, dtype=torch.bool)
    cover.scatter_(1, windows, True)
    return cover


def harmonic_mean(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """n / Σ 1/v over ``dim``; 0 where any value is 0 (scores are never negative)."""
    return values.shape[dim] / values.clamp_min(0).reciprocal().sum(dim)


def harmonic_aggregation(scores: torch.Tensor, windows: torch.Tensor, patches: int) -> torch.Tensor:
    """(N, windows) window scores -> (N, patches): per patch, the harmonic mean of the scores
    of the windows that cover it."""
    reciprocal = scores.clamp_min(0).reciprocal()
    sums = torch.zeros(scores.shape[0], patches, dtype=scores.dtype)
    sums.index_add_(1, windows.flatten(), reciprocal.repeat_interleave(windows.shape[1], dim=1))
    counts = torch.bincount(windows.flatten(), minlength=patches).to(scores.dtype)
    return counts / sums


def two_class_scores(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(anomalous) from unit embeddings (..., D) and unit [normal, anomalous] text prototypes
    (2, D): a softmax over the two scaled cosine similarities."""
    return torch.softmax(temperature * embeddings @ prototypes.T, dim=-1)[..., 1]


def association_scores(queries: torch.Tensor, memory: torch.Tensor, block: int = 2**24) -> torch.Tensor:
    """min over the memory of (1 - cos)/2, for unit queries (Q, D) and unit memory (M, D): 0 for
    a feature seen in a normal image, 1 for the exact opposite of every normal feature. Queries
    go in chunks whose similarity matrix has at most ``block`` entries (64 MB by default)."""
    scores = torch.empty(queries.shape[0], dtype=queries.dtype)
    chunk = max(1, block // max(1, memory.shape[0]))
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ memory.T
        scores[start : start + chunk] = ((1 - similarity.amax(dim=1)) / 2).clamp_min(0)
    return scores
