"""Memory-bank building blocks: faiss nearest neighbours and greedy coreset subsampling."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.base import configure_threads


class NearestNeighbours:
    """Exact k-nearest-neighbour search over a fixed bank (faiss flat index, L2 or cosine)."""

    def __init__(self, bank: np.ndarray, metric: str = "l2"):
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', not {metric!r}")
        faiss.omp_set_num_threads(configure_threads())
        self.metric = metric
        self.bank = self._prepare(bank)
        self.index = faiss.IndexFlatL2(self.bank.shape[1]) if metric == "l2" else faiss.IndexFlatIP(self.bank.shape[1])
        self.index.add(self.bank)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.metric == "cosine":
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Euclidean, or cosine distance 1 - cos) and indices of the k nearest bank rows."""
        k = min(k, self.index.ntotal)
        similarity_or_sq, indices = self.index.search(self._prepare(queries), k)
        if self.metric == "l2":
            return np.sqrt(np.maximum(similarity_or_sq, 0.0)), indices
        return 1.0 - similarity_or_sq, indices


def _k_center(points: torch.Tensor, size: int, generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Greedy k-center on (already projected) points: each pick is the point farthest from the
    points picked so far. Squared distances via |x|^2 - 2 x.c + |c|^2, one product per pick."""
    count = points.shape[0]
    if size >= count:
        return torch.arange(count)
    squared_norms = (points * points).sum(dim=1)
    picked = torch.empty(size, dtype=torch.long)
    picked[0] = int(torch.randint(count, (1,), generator=generator))
    min_distance = torch.full((count,), float("inf"))
    for step in tqdm(range(size), desc="coreset", disable=not progress, leave=False, mininterval=1.0):
        if step:
            picked[step] = int(torch.argmax(min_distance))
        centre = picked[step]
        torch.minimum(min_distance, squared_norms - 2.0 * (points @ points[centre]) + squared_norms[centre], out=min_distance)
    return picked


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0, progress: bool = False,
                   groups: int = 1, pool_factor: int = 4) -> torch.Tensor:
    """Indices of a greedy k-center coreset (PatchCore) of ``size`` rows of ``features``.

    Distances are computed on a random projection, which preserves them approximately
    (Johnson-Lindenstrauss). Each pick is one pass over all points, which is memory-bound on
    a CPU, so with many points (``groups`` > 1 consecutive blocks, one per image) we first keep
    the k-center of each image (about ``pool_factor`` × ``size`` points in all), then run the
    global k-center on that pool: a patch far from every other patch is also far from those of
    its own image, so the points that matter survive the first stage.
    """
    count = features.shape[0]
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection
    if groups > 1 and count > pool_factor * size:
        keep = -(-pool_factor * size // groups)
        pool = torch.cat([block[_k_center(points[block], keep, generator)]
                          for block in torch.tensor_split(torch.arange(count), groups)])
        return pool[_k_center(points[pool], size, generator, progress)]
    return _k_center(points, size, generator, progress)
