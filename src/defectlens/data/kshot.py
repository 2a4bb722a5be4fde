"""Few-shot protocol: which normal images a k-shot run may see, reproducibly."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from defectlens.data.datasets import Sample


def sample_shots(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """Pick ``shots`` samples with ``numpy.random.default_rng(seed)``, returned sorted by path.

    Picks depend on the set of samples, not on their order, and for one seed a smaller k is
    a subset of a larger k (a prefix of one permutation), so k-shot curves compare like with like.
    """
    ordered = sorted(samples, key=lambda sample: sample.path)
    if shots <= 0:
        return []
    if shots >= len(ordered):
        return ordered
    picked = np.random.default_rng(seed).permutation(len(ordered))[:shots]
    return [ordered[index] for index in sorted(picked)]


def shot_plan(n_available: int, shots_list: Iterable[int], seeds: int | Iterable[int]) -> list[tuple[int, int]]:
    """The (shots, seed) runs worth doing: a seed only matters when it changes the picks.

    ``seeds`` is a count (seeds 0..N-1) or the seeds themselves. Zero-shot and full-shot
    (shots >= n_available, reported as n_available) runs get the first seed only, once.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("shot_plan needs at least one seed")
    plan: list[tuple[int, int]] = []
    for shots in shots_list:
        shots = max(0, min(int(shots), n_available))
        deterministic = shots == 0 or shots == n_available
        for seed in seeds[:1] if deterministic else seeds:
            if (shots, seed) not in plan:
                plan.append((shots, seed))
    return plan
