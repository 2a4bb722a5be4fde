"""Memory-bank building blocks at scale: batched greedy k-center and approximate faiss search."""

import numpy as np
import pytest
import torch

from defectlens.models.memory import NearestNeighbours, _k_center, _KCenter, greedy_coreset

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_k_center(points: torch.Tensor, size: int, first: int) -> list[int]:
    """The textbook loop: one pass over all points per pick (the reference the fast path must match)."""
    nearest = torch.full((points.shape[0],), float("inf"), dtype=points.dtype)
    picked = [first]
    while len(picked) <= size:
        nearest = torch.minimum(nearest, ((points - points[picked[-1]]) ** 2).sum(dim=1))
        if len(picked) == size:
            break
        picked.append(int(torch.argmax(nearest)))
    return picked


def test_k_center_on_a_line_picks_the_farthest_point_each_time():
    # 0, 1, ..., 10 from 4: farthest is 10 (6 away), then 0 (4 away from 4), then 7 (3 away from 4 and 10).
    points = torch.arange(11, dtype=torch.float64)[:, None]
    assert _KCenter(points, candidates=4, whole=0).run(first=4, size=4).tolist() == [4, 10, 0, 7]


def test_every_pick_is_the_farthest_point_from_the_previous_picks():
    generator = torch.Generator().manual_seed(1)
    points = torch.cat([torch.randn(1500, 6, generator=generator, dtype=torch.float64) * scale
                        for scale in (0.1, 1.0, 5.0)])
    picked = _KCenter(points, candidates=64, whole=0).run(first=0, size=120)
    distance = torch.cdist(points, points[picked])
    for step in range(1, len(picked)):
        to_previous = distance[:, :step].amin(dim=1)
        assert float(to_previous[picked[step]]) == pytest.approx(float(to_previous.max()), rel=1e-12)


@pytest.mark.parametrize("candidates", [32, 256, 10_000])  # many short rounds, some, one
def test_batched_rounds_give_exactly_the_plain_loops_picks(candidates):
    """Few candidates (many short rounds), some, and all points in one round: the same sequence."""
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 16, generator=generator, dtype=torch.float64) * 4
    points = centres[torch.randint(40, (3000,), generator=generator)] + torch.randn(3000, 16, generator=generator, dtype=torch.float64)
    expected = plain_k_center(points, 200, first=7)
    assert _KCenter(points, candidates=candidates, whole=0, chunk_elements=4096).run(first=7, size=200).tolist() == expected


def test_k_center_stops_when_points_run_out_and_keeps_small_sets_whole():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(50, 1)
    picked = _KCenter(points).run(first=0, size=10)
    assert sorted(points[picked].tolist()) == [[0.0, 0.0], [1.0, 1.0]]
    assert _k_center(points[:5], 8, torch.Generator()).tolist() == [0, 1, 2, 3, 4]


def test_greedy_coreset_is_seeded_and_unique():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(4000, 200, generator=generator).half()  # projected to 128 dims, block by block
    first = greedy_coreset(features, 300, seed=5)
    assert first.tolist() == greedy_coreset(features, 300, seed=5).tolist()
    assert len(set(first.tolist())) == 300


def clustered_bank(rows: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)) * 3
    bank = centres[rng.integers(64, size=rows)] + rng.normal(size=(rows, dim))
    queries = centres[rng.integers(64, size=400)] + rng.normal(size=(400, dim))
    return bank.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_approximate_indexes_find_true_bank_rows_and_mostly_the_nearest(kind, metric):
    bank, queries = clustered_bank(6000)
    exact_distance, _ = NearestNeighbours(bank, metric=metric).search(queries, k=1)
    index = NearestNeighbours(bank, metric=metric, index=kind)
    distance, found = index.search(queries, k=1)
    # Every answer is a real bank row at the distance reported, never nearer than the true nearest.
    rows = bank[found[:, 0]]
    if metric == "l2":
        actual = np.linalg.norm(queries - rows, axis=1)
    else:
        actual = 1.0 - (queries * rows).sum(1) / (np.linalg.norm(queries, axis=1) * np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(distance[:, 0], actual, rtol=1e-3, atol=1e-4)
    assert np.all(distance[:, 0] >= exact_distance[:, 0] - 1e-4)
    assert np.mean(np.isclose(distance[:, 0], exact_distance[:, 0], rtol=1e-4, atol=1e-5)) >= 0.9


def test_auto_index_switches_to_ivf_for_large_banks(monkeypatch):
    import defectlens.models.memory as memory

    bank, _ = clustered_bank(3000)
    assert NearestNeighbours(bank, index="auto").kind == "flat"
    monkeypatch.setattr(memory, "APPROXIMATE_FROM_ROWS", 2000)
    assert NearestNeighbours(bank, index="auto").kind == "ivf"
    with pytest.raises(ValueError, match="index must be"):
        NearestNeighbours(bank, index="lsh")
