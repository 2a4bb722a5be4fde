"""Memory-bank building blocks at scale: batched greedy k-center and approximate faiss search."""

import faiss
import numpy as np
import pytest
import torch

from defectlens.models.memory import NearestNeighbours, _k_center, _KCenter, _plain_k_center, greedy_coreset

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_pruning_skips_work_but_never_changes_a_pick(dtype):
    """The triangle-inequality pruning is exact: the plain loop's sequence in float64; in float32
    (where the pruning's slack must absorb rounding, and BLAS rounding may swap near-ties) every
    pick is still the farthest point from the previous picks. It does skip most of the work
    once the picks are dense (a full pass per round would do all of it)."""
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(60, 12, generator=generator, dtype=torch.float64) * 5
    points = (centres[torch.randint(60, (6000,), generator=generator)] + torch.randn(6000, 12, generator=generator,
                                                                                    dtype=torch.float64)).to(dtype)
    expected = plain_k_center(points.double(), 1500, first=11)
    pruned = _KCenter(points, candidates=128, whole=1000, cells=40)
    lowered = []
    original = pruned._lower
    pruned._lower = lambda rows, centre_points, norms: (lowered.append((rows.stop - rows.start) * len(centre_points)),
                                                        original(rows, centre_points, norms))
    picked = pruned.run(first=11, size=1500).tolist()
    if dtype == torch.float64:
        assert picked == expected
    else:
        distance = torch.cdist(points.double(), points[picked].double())
        to_previous = distance[:, 0]
        for step in range(1, len(picked)):
            assert float(to_previous[picked[step]]) >= float(to_previous.max()) * (1 - 1e-4)
            to_previous = torch.minimum(to_previous, distance[:, step])
    assert sum(lowered) < 0.5 * 6000 * 1500


def test_in_cache_loop_gives_the_plain_loops_picks():
    generator = torch.Generator().manual_seed(5)
    points = torch.randn(2000, 10, generator=generator, dtype=torch.float64) ** 3
    assert _plain_k_center(points.numpy(), 9, 400) == plain_k_center(points, 400, first=9)
    assert _plain_k_center(np.zeros((6, 2)), 0, 4) == [0]  # no distinct point left to pick


def test_exact_coreset_covers_all_points_at_least_as_well_as_the_pooled_one():
    """The pooled coreset (per-image k-center first) is an approximation of the exact greedy:
    both are 2-approximate k-centers of what they see, the exact one of every point, so its
    covering radius over all points is at most twice the optimum and never more than twice the
    pooled one's (the pooled radius is at least the optimum)."""
    generator = torch.Generator().manual_seed(6)
    centres = torch.randn(30, 16, generator=generator) * 4
    features = centres[torch.randint(30, (12 * 400,), generator=generator)] + torch.randn(12 * 400, 16, generator=generator)
    radius = {}
    for method in ("pooled", "exact"):
        picked = greedy_coreset(features, 150, groups=12, pool_factor=2, method=method)
        assert len(set(picked.tolist())) == 150
        radius[method] = float(torch.cdist(features, features[picked]).amin(dim=1).max())
    assert radius["exact"] <= 2.0 * radius["pooled"]
    with pytest.raises(ValueError, match="method must be"):
        greedy_coreset(features, 150, method="random")


def test_per_image_coreset_shares_the_size_out_and_keeps_each_images_own_greedy_picks():
    """pool_factor=1 (patchknn): the coreset is the per-image stage alone, ``size`` rows shared
    out evenly (the first images one more), each image's picks its own greedy k-center's."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(7 * 300, 12, generator=generator)
    picked = greedy_coreset(features, 100, groups=7, pool_factor=1)
    assert len(set(picked.tolist())) == 100
    assert np.bincount(picked.numpy() // 300, minlength=7).tolist() == [15, 15] + [14] * 5
    # The same per-image picks as the image's own greedy from its first pick.
    image = picked[picked // 300 == 3] - 900
    assert image.tolist() == _plain_k_center(features[900:1200].numpy(), int(image[0]), 14)


@pytest.mark.parametrize("method", ["pooled", "exact"])
def test_an_extended_coreset_is_the_coreset_followed_by_the_greedys_next_picks(method):
    """``extend`` continues the same greedy: the first ``size`` indices are the coreset, the
    rest are new picks in the order the greedy takes them (each the farthest from all before)."""
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(20 * 60, 12, generator=generator)
    coreset = greedy_coreset(features, 40, groups=20, method=method)
    extended = greedy_coreset(features, 40, groups=20, method=method, extend=25)
    assert len(extended) == 65 and len(set(extended.tolist())) == 65
    assert torch.equal(extended[:40], coreset)
    if method == "exact":  # 12 dims: no projection, so the next pick is the point farthest from the coreset
        to_coreset = torch.cdist(features, features[coreset]).min(dim=1).values
        assert int(extended[40]) == int(to_coreset.argmax())
    # more picks than points: every point but the last still comes in greedy order
    whole = greedy_coreset(features[:90], 40, groups=1, extend=500)
    assert len(whole) == 89 and torch.equal(whole[:40], greedy_coreset(features[:90], 40, groups=1))


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


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_bank_added_in_chunks_builds_the_index_one_call_builds(metric, monkeypatch):
    import defectlens.models.memory as memory

    bank, queries = clustered_bank(3000)
    whole_ivf = NearestNeighbours(bank, metric=metric, index="ivf")
    whole = [NearestNeighbours(bank, metric=metric),
             NearestNeighbours(bank, metric=metric, index="ivf", centroids=whole_ivf.centroids, row_lists=whole_ivf.row_lists)]
    monkeypatch.setattr(memory, "ADD_CHUNK", 700)  # 5 chunks, the last one short
    chunked = [NearestNeighbours(bank, metric=metric),
               NearestNeighbours(bank, metric=metric, index="ivf", centroids=whole_ivf.centroids, row_lists=whole_ivf.row_lists)]
    for one, other in zip(whole, chunked):
        assert one.index.ntotal == other.index.ntotal == len(bank)
        for got, expected in zip(other.search(queries, k=3), one.search(queries, k=3)):
            np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(chunked[1].row_lists, whole_ivf.row_lists)


def test_auto_index_switches_to_ivf_for_large_banks(monkeypatch):
    import defectlens.models.memory as memory

    bank, _ = clustered_bank(3000)
    assert NearestNeighbours(bank, index="auto").kind == "flat"
    monkeypatch.setattr(memory, "APPROXIMATE_FROM_ROWS", 2000)
    assert NearestNeighbours(bank, index="auto").kind == "ivf"
    with pytest.raises(ValueError, match="index must be"):
        NearestNeighbours(bank, index="lsh")


def full_search_top(index, groups, count):
    """The reference ``largest_nearest`` must match: every query searched, then a top-k per group."""
    distances, nearest = index.search(groups.reshape(-1, groups.shape[2]), k=1)
    distances, nearest = distances[:, 0].reshape(groups.shape[:2]), nearest[:, 0].reshape(groups.shape[:2])
    columns = np.argsort(-distances, axis=1, kind="stable")[:, :count]
    return np.take_along_axis(distances, columns, 1), columns, np.take_along_axis(nearest, columns, 1)


@pytest.mark.parametrize("count", [1, 5])
def test_largest_nearest_is_the_top_of_a_full_search_for_a_fraction_of_the_searches(count, monkeypatch):
    from defectlens.models.memory import BOUND_DIMS

    # Like backbone features, most of the variance in a few directions (clusters in 16 dims of 128).
    rng = np.random.default_rng(1)
    bank, queries = clustered_bank(1500, dim=16)
    mixing = rng.normal(size=(16, 4 * BOUND_DIMS)).astype(np.float32)
    bank = bank @ mixing + rng.normal(scale=0.1, size=(len(bank), 4 * BOUND_DIMS)).astype(np.float32)
    queries = queries @ mixing + rng.normal(scale=0.1, size=(len(queries), 4 * BOUND_DIMS)).astype(np.float32)
    groups = np.ascontiguousarray(queries[rng.permutation(len(queries))].reshape(4, 100, -1))  # distinct: no ties
    groups[1, 17] += 6.0  # an anomalous patch: far from every bank row
    index = NearestNeighbours(bank)
    expected = full_search_top(index, groups, count)
    searched = []
    real_search = NearestNeighbours.search
    monkeypatch.setattr(NearestNeighbours, "search",
                        lambda self, q, k=1, probes=None: searched.append(len(q)) or real_search(self, q, k, probes))
    top, columns, nearest = index.largest_nearest(groups, count)
    np.testing.assert_allclose(top, expected[0], rtol=1e-5)
    assert columns.tolist() == expected[1].tolist() and nearest.tolist() == expected[2].tolist()
    assert columns[1, 0] == 17
    assert sum(searched) < groups.shape[0] * groups.shape[1] / 4  # the point: most queries never searched exactly


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_largest_nearest_on_ivf_is_the_top_of_its_full_search_bounded_by_one_lists_scan(metric, monkeypatch):
    """On an IVF index the bound of a query is its nearest row in its nearest list (a search
    with one probe, which every search visits): the result is the IVF search's own top, not the
    exact one's, and most queries are searched with one probe only."""
    rng = np.random.default_rng(2)
    bank, queries = clustered_bank(4000, dim=32)
    groups = np.ascontiguousarray(queries[rng.permutation(len(queries))].reshape(4, 100, -1))
    groups[2, 40] = rng.normal(size=32) * 10  # a random direction, far out: far from every bank row in both metrics
    index = NearestNeighbours(bank, metric=metric, index="ivf", probes=8)
    expected = full_search_top(index, groups, 5)
    searched = []
    real_search = NearestNeighbours.search
    monkeypatch.setattr(NearestNeighbours, "search",
                        lambda self, q, k=1, probes=None: searched.append((len(q), probes)) or real_search(self, q, k, probes))
    top, columns, nearest = index.largest_nearest(groups, 5)
    np.testing.assert_allclose(top, expected[0], rtol=1e-5)
    assert columns.tolist() == expected[1].tolist() and nearest.tolist() == expected[2].tolist()
    assert columns[2, 0] == 40
    assert searched[0] == (400, 1)  # every query's bound, one list each
    assert sum(count for count, probes in searched[1:]) < 400 / 4


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("given_bounds", [False, True])
def test_largest_nearest_exact_on_ivf_is_the_top_of_a_brute_force_search_for_few_of_them(metric, given_bounds,
                                                                                          monkeypatch):
    """``exact=True`` on an approximate index: the top distances are the exact ones (a flat
    index's top), not the index's, whether the index's own distances are given as bounds (a
    patch map) or found from one list's scan; only a few queries are searched by brute force."""
    rng = np.random.default_rng(3)
    # Overlapping clusters: the nearest row is often outside the lists visited.
    centres = rng.normal(size=(64, 32))
    bank = (centres[rng.integers(64, size=4000)] + rng.normal(size=(4000, 32))).astype(np.float32)
    groups = (centres[rng.integers(64, size=400)] + rng.normal(size=(400, 32))).astype(np.float32).reshape(4, 100, 32)
    index = NearestNeighbours(bank, metric=metric, index="ivf", probes=2)
    approximate = index.search(groups.reshape(-1, 32))[0][:, 0]
    expected = full_search_top(NearestNeighbours(bank, metric=metric), groups, 5)
    assert not np.allclose(full_search_top(index, groups, 5)[0], expected[0], rtol=1e-5)  # the index alone errs
    brute = []
    real_exact = NearestNeighbours.exact_nearest
    monkeypatch.setattr(NearestNeighbours, "exact_nearest",
                        lambda self, q, within: brute.append(len(q)) or real_exact(self, q, within))
    bounds = approximate.reshape(4, 100) if given_bounds else None
    top, columns, nearest = index.largest_nearest(groups, 5, bounds=bounds, exact=True)
    np.testing.assert_allclose(top, expected[0], rtol=1e-5, atol=1e-6)
    assert columns.tolist() == expected[1].tolist() and nearest.tolist() == expected[2].tolist()
    assert 4 * 5 <= sum(brute) < 400 / 4


def test_largest_nearest_with_ties_and_exact_matches_searches_what_it_must():
    from defectlens.models.memory import BOUND_DIMS

    bank, _ = clustered_bank(500, dim=3 * BOUND_DIMS)
    index = NearestNeighbours(bank)
    # Queries that are bank rows (distance 0, where float32 rounding is largest relative to the
    # distance), and one query repeated: equal distances everywhere.
    groups = np.stack([bank[:50], np.repeat(bank[7:8] + 0.5, 50, axis=0)])
    for count in (1, 3, 50):
        top, columns, nearest = index.largest_nearest(groups, count)
        expected = full_search_top(index, groups, count)
        np.testing.assert_allclose(top, expected[0], rtol=1e-4, atol=0.05)  # |rows| ~ 30: rounding of 0 is ~0.01
        np.testing.assert_allclose(top[1], expected[0][1, 0], rtol=1e-4)
        assert set(nearest[1].tolist()) == {expected[2][1, 0]}
        assert len(set(columns[1].tolist())) == count


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind, lists_up_to", [("ivf", 1.01), ("ivf", 0.0), ("hnsw", None)])
def test_exact_nearest_within_the_index_distance_is_the_flat_search(metric, kind, lists_up_to, monkeypatch):
    """Given each query's distance from the index (its nearest row is within it), ``exact_nearest``
    finds what a flat index finds, whether the queries are searched in the IVF lists whose ball
    reaches that near (where they hold less than ``lists_up_to`` of the rows) or in all rows:
    also for queries that are bank rows (distance 0, where the rounding is largest relative to
    the distance) and far ones. Searched in lists, the queries scan a fraction of the bank."""
    from defectlens.models import memory

    if lists_up_to is not None:
        monkeypatch.setattr(memory, "SCANNED_SHARE_MAX", lists_up_to)
    rng = np.random.default_rng(4)
    bank, queries = clustered_bank(4000, seed=4)
    queries = np.concatenate([queries, bank[:20], rng.normal(size=(5, 32)).astype(np.float32) * 10])
    index = NearestNeighbours(bank, metric=metric, index=kind, probes=2)
    within = index.search(queries)[0][:, 0]
    expected, expected_rows = (array[:, 0] for array in NearestNeighbours(bank, metric=metric).search(queries))
    if kind == "ivf":
        assert not np.allclose(within, expected, rtol=1e-5)  # the index alone errs
    faiss.cvar.indexIVF_stats.reset()
    distances, rows = index.exact_nearest(queries, within)
    # The brute force (HNSW, or IVF when the lists are most of the bank) expands |q - b|^2 =
    # |q|^2 + |b|^2 - 2 q.b: ~0.01 where it is 0 (|rows| ~ 17); faiss's list scans do not
    brute_force = lists_up_to != 1.01
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=0.02 if (brute_force and metric == "l2") else 1e-6)
    assert rows.tolist() == expected_rows.tolist()
    scanned = faiss.cvar.indexIVF_stats.ndis / (len(queries) * len(bank))
    if lists_up_to == 1.01:
        assert 0 < scanned < 1 / 4
    else:
        assert scanned == 0
