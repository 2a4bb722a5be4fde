"""Mutual scoring (MuSc's MSM and RsCIN) on patch-feature tensors: no backbone, no images.

The images of a batch score each other's patches: a patch's distance to another image is its
distance to that image's nearest patch, and its anomaly score is the mean of the smallest ``keep``
fraction of those distances over the other images (all of them, or a random sample). A normal patch finds a close match in most images; a
defect is absent from most of them, so even its smallest distances are large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Similarity matrices computed in one batched product: 16 M floats (64 MB) at a time.
CHUNK_ELEMENTS = 1 << 24


def reference_pairs(count: int, references: int | None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which images score each other, as groups of pairs (a[i], b[i]).

    The images sit on a ring in a random order and offset k pairs each image with the one k
    places ahead, so offsets 1..m/2 give every image m partners (all others when ``references``
    is None) and each pair is met once: one similarity matrix serves both directions. An odd m
    adds the opposite image on an even ring; on an odd ring such an image gets one partner fewer.
    """
    wanted = count - 1 if references is None else min(references, count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    pairs = [(order, order.roll(-offset)) for offset in range(1, wanted // 2 + 1)]
    if wanted % 2 and count % 2 == 0:
        pairs.append((order[: count // 2], order[count // 2 :]))
    return pairs


def nearest_similarities(patches: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                         progress: tqdm | None = None) -> torch.Tensor:
    """(N, P, C) unit patch features -> (N, P, m): each patch's cosine similarity to the most
    similar patch of each of its image's m partners."""
    count, size, _ = patches.shape
    partners = sum(len(first) + len(second) for first, second in pairs) // count  # the same for every image
    best = patches.new_empty(count, size, partners)
    filled = torch.zeros(count, dtype=torch.long)
    step = max(1, CHUNK_ELEMENTS // (size * size))
    for first, second in pairs:
        for start in range(0, len(first), step):
            a, b = first[start : start + step], second[start : start + step]
            similarity = torch.bmm(patches[a], patches[b].transpose(1, 2))
            best[a, :, filled[a]] = similarity.amax(dim=2)
            filled[a] += 1
            best[b, :, filled[b]] = similarity.amax(dim=1)
            filled[b] += 1
            if progress is not None:
                progress.update(len(a))
    return best


def interval_mean(similarities: torch.Tensor, keep: float) -> torch.Tensor:
    """(N, P, m) best similarities -> (N, P) mean Euclidean distance (between unit vectors)
    over the ``keep`` fraction of partner images that match each patch best."""
    count = max(1, round(keep * similarities.shape[2]))
    closest = similarities.topk(count, dim=2).values
    return (2.0 - 2.0 * closest).clamp_min(0.0).sqrt().mean(dim=2)


def aggregate(features: torch.Tensor, degree: int) -> torch.Tensor:
    """MuSc's local neighbourhood aggregation of degree r: each patch feature becomes the mean
    of the r×r patches around it (r = 1: unchanged; border patches average what exists)."""
    if degree == 1:
        return features
    return F.avg_pool2d(features, degree, stride=1, padding=degree // 2, count_include_pad=False)


def mutual_scores(levels: list[torch.Tensor], references: int | None = None, keep: float = 0.5, seed: int = 0,
                  progress: bool = False, degrees: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Patch anomaly scores of N images scored by each other.

    ``levels``: feature maps (N, C_l, h_l, w_l) of one batch, finest first. Each level, at each
    aggregation degree (:func:`aggregate`), is scored on its own grid with unit-length patch
    features, its scores upsampled to the finest grid, and all (level, degree) maps averaged:
    (N, h_0, w_0). Several degrees let small and large defects each win at their own scale.
    """
    count, _, height, width = levels[0].shape
    if count < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {count}")
    pairs = reference_pairs(count, references, seed)
    total = len(levels) * len(degrees) * sum(len(first) for first, _ in pairs)
    scores = []
    with tqdm(total=total, desc="mutual scoring", unit="pair", disable=not progress, leave=False) as bar:
        for features in (aggregate(level, degree) for level in levels for degree in degrees):
            patches = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=2).contiguous()
            level = interval_mean(nearest_similarities(patches, pairs, bar), keep).reshape(count, 1, *features.shape[2:])
            if level.shape[2:] != (height, width):
                level = F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)
            scores.append(level[:, 0])
    return torch.stack(scores).mean(dim=0)


def similar_image_mean(scores: torch.Tensor, image_features: torch.Tensor, neighbours: int) -> torch.Tensor:
    """RsCIN: each image score becomes the similarity-weighted mean score of its k most similar
    images (itself included), averaged over k = 1..``neighbours``.

    ``image_features``: (N, D) unit vectors, one per image.
    """
    neighbours = min(neighbours, scores.shape[0])
    similarity, index = (image_features @ image_features.T).topk(neighbours, dim=1)
    weights = similarity.clamp_min(0.0).double()
    neighbour_scores = scores.double()[index]
    smoothed = [(weights[:, :k] * neighbour_scores[:, :k]).sum(1) / weights[:, :k].sum(1).clamp_min(1e-12)
                for k in range(1, neighbours + 1)]
    return torch.stack(smoothed).mean(dim=0).to(scores.dtype)


def neighbour_agreement(scores: torch.Tensor, image_features: torch.Tensor, neighbours: int) -> float:
    """How much the scores of similar images agree, in [0, 1]: the correlation between each
    image's standardised score and the mean of its ``neighbours`` - 1 most similar other images'
    (Moran's I on the nearest-neighbour graph), clipped at 0."""
    count = scores.shape[0]
    neighbours = min(neighbours, count)
    spread = scores.double().std() if count > 1 else torch.tensor(0.0)
    if neighbours < 2 or spread <= 0:
        return 0.0
    similarity = image_features @ image_features.T
    similarity.fill_diagonal_(float("inf"))
    others = similarity.topk(neighbours, dim=1).indices[:, 1:]
    standard = (scores.double() - scores.double().mean()) / spread
    return float((standard * standard[others].mean(dim=1)).mean().clamp(0.0, 1.0))


def rescore(scores: torch.Tensor, image_features: torch.Tensor, neighbours: int) -> torch.Tensor:
    """RsCIN, weighted by how far it can be trusted in this batch: (1 - a) · score + a · RsCIN
    score, a = :func:`neighbour_agreement`.

    Smoothing over similar images removes noise when similar images share their condition (a
    part photographed in sequence as it wears, product variants that differ in defect rate);
    where the most similar images are as good as random (a uniform texture), it would only mix
    other images' scores in, and a ≈ 0 leaves the scores alone.
    """
    if min(neighbours, scores.shape[0]) < 2:
        return scores
    agreement = neighbour_agreement(scores, image_features, neighbours)
    return (1.0 - agreement) * scores + agreement * similar_image_mean(scores, image_features, neighbours)
