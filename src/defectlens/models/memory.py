"""Memory-bank building blocks: faiss nearest neighbours and greedy coreset subsampling."""

from __future__ import annotations

import threading
from typing import NamedTuple

import faiss
from faiss.contrib.ivf_tools import add_preassigned
import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.base import configure_threads

# Above this many bank rows an approximate index pays off: a flat search costs rows × dim per
# query patch, IVF about (rows / lists) × probes × dim, HNSW about log(rows) × neighbours × dim.
APPROXIMATE_FROM_ROWS = 65536

#: Queries ``NearestNeighbours.exact_nearest`` compares with the whole bank at once (128 × 65,536
#: products: 32 MB).
EXACT_BLOCK = 128
#: Bank rows ``NearestNeighbours`` normalises and adds to its index at a time (5 MB at 152 dims).
ADD_CHUNK = 8192
#: Index kinds of :class:`NearestNeighbours` (the ``search`` parameter of the kNN detectors).
SEARCHES = ("flat", "ivf", "hnsw", "auto")
#: ``NearestNeighbours.exact_nearest`` on IVF searches a block of queries in the lists that could
#: hold their nearest rows when those hold less than this share of the bank on average, else over
#: all rows: faiss scans a list row by row, about 5.5 times the cost per row of the brute force's
#: matrix product on 2 cores (the default's 65,536 rows). A block's queries go one way: a brute
#: force over a few queries costs nearly what it costs over a block (it streams the whole bank).
#: On BSData's most distant patches the lists are 3-11 % of the bank at 256 px squashed (10 per
#: image: 0.9 ms/img in lists, 2.5 by brute force), 65-90 % in 18 tiles (whose bank keeps each
#: tile's most distinct patches; 60 ms/img in lists, 9-11 by brute force).
SCANNED_SHARE_MAX = 1 / 6
#: Lloyd iterations of an IVF index's k-means (faiss's default is 25). The partition only routes
#: a search: with 10, a 65,536-row bank of BSData patches trains in 1.6-2.0 s instead of 4.5-5.3,
#: and the IVF search (16 of 1,024 lists) finds the exact nearest row for the same 99.99 % of
#: 30,720 held-out patches, at the same distances (5 iterations also; 10 keeps a margin).
KMEANS_ITERATIONS = 10
#: Bank rows per list the k-means trains on at most (a random sample beyond; faiss's default is
#: 256). Measured like the iterations: with 32, the 65,536-row bank's k-means takes 0.5 s instead
#: of 0.95 and the IVF search still finds the exact nearest row for all of 10,240 held-out BSData
#: patches (16: 0.25 s, 99.99 %).
KMEANS_POINTS_PER_LIST = 32
#: Coreset algorithms (PatchCore's ``coreset`` parameter), see :func:`greedy_coreset`.
CORESETS = ("pooled", "exact")
#: Up to this many points (8 MB at 128 dims) a pass over all of them stays in cache, so the
#: plain loop (one pass per pick) is fastest; beyond, the batched rounds of ``_KCenter``.
IN_CACHE_POINTS = 16384
#: Cells the rounds split the points into to skip far ones (``_KCenter``); 256 measured on
#: BSData: 15 % of the products of a full pass at 32768 picks from 131072 points.
CELLS = 256


class NearestNeighbours:
    """k-nearest-neighbour search over a fixed bank with faiss, L2 or cosine.

    ``index``: "flat" (exact), "ivf" (inverted lists over a k-means partition of the bank,
    ``probes`` lists visited per query), "hnsw" (graph search) or "auto": flat below
    ``APPROXIMATE_FROM_ROWS`` rows, IVF above. The approximate indexes return distances to
    true bank rows, so a distance is never smaller than the exact one, only sometimes larger.
    """

    def __init__(self, bank: np.ndarray, metric: str = "l2", index: str = "flat", probes: int = 16, seed: int = 0,
                 centroids: np.ndarray | None = None, row_lists: np.ndarray | None = None):
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', not {metric!r}")
        if index not in SEARCHES:
            raise ValueError(f"index must be 'flat', 'ivf', 'hnsw' or 'auto', not {index!r}")
        faiss.omp_set_num_threads(configure_threads())
        self.metric = metric
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        rows, dim = bank.shape
        if index == "auto":
            index = "ivf" if rows >= APPROXIMATE_FROM_ROWS else "flat"
        self.kind = index
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if index == "flat":
            self.index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        elif index == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, 32, faiss_metric)
            self.index.hnsw.efSearch = 64
        else:
            # About sqrt(rows) lists (faiss's rule of thumb), each trained from at most 256 rows of the
            # bank, unless ``centroids`` (an earlier k-means, see ``centroids``) say where the lists are.
            lists = max(1, min(int(4 * rows**0.5), rows // 39)) if centroids is None else len(centroids)
            quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss_metric)
            if centroids is None:
                self.index.cp.seed = seed
                self.index.cp.niter = KMEANS_ITERATIONS
                self.index.cp.max_points_per_centroid = KMEANS_POINTS_PER_LIST
                self.index.train(self._prepare(bank))
            else:
                quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
                self.index.is_trained = True
            self.index.nprobe = min(probes, lists)
        self._add(bank, row_lists)
        # The index holds its own copy of the rows; ours is kept only where the upper bounds
        # need it (exact L2, where it is the caller's array, not a copy). A cosine bank's
        # normalised copy was 40 MB of every predict with the default's 65,536 rows.
        self.bank = bank if (index == "flat" and metric == "l2") else None
        # ``exact_nearest`` on an approximate index compares with the rows as given (no copy), by
        # their squared norms (L2) or inverse norms (cosine), or on IVF scans the lists a nearer row
        # could lie in, by their balls (``_list_balls``, built from the same rows on first use).
        self._rows = self._row_norms = self._inverse_norms = None
        if index != "flat":
            self._rows = torch.from_numpy(bank)
            self._row_norms = (self._rows * self._rows).sum(dim=1)
            if metric == "cosine":
                self._inverse_norms = 1.0 / self._row_norms.sqrt().clamp_(min=1e-12)
        self._bounds: _UpperBounds | None = None
        self._balls: _ListBalls | None = None
        self._lazy_lock = threading.Lock()  # what is built on first use is built once, whatever the threads

    def __getstate__(self) -> dict:  # pickling and deepcopy: a lock is not copied, a fresh one is made
        state = dict(self.__dict__)
        del state["_lazy_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lazy_lock = threading.Lock()

    def _add(self, bank: np.ndarray, row_lists: np.ndarray | None) -> None:
        """The bank's rows into the index, brought to its space ``ADD_CHUNK`` rows at a time where
        that builds the same index (a flat one, or IVF lists given ``row_lists``): no normalised
        copy of the whole bank beside the index's own (a cosine bank's was 40 MB more at the peak
        of the default's fit and of every predict's model load)."""
        if self.kind == "ivf" and row_lists is not None:  # each row's list is known: nothing to assign
            row_lists = np.ascontiguousarray(row_lists, dtype=np.int64)
            for start in range(0, len(bank), ADD_CHUNK):
                add_preassigned(self.index, self._prepare(bank[start : start + ADD_CHUNK]), row_lists[start : start + ADD_CHUNK])
        elif self.kind == "flat":
            for start in range(0, len(bank), ADD_CHUNK):
                self.index.add(self._prepare(bank[start : start + ADD_CHUNK]))
        else:  # faiss assigns (IVF) or links (HNSW) the rows of one call together
            self.index.add(self._prepare(bank))

    @property
    def row_lists(self) -> np.ndarray | None:
        """Each bank row's IVF list, None for other indexes. Passed back to the constructor with
        the ``centroids`` they rebuild the index without assigning the rows to lists again (a
        search of every row against every list centre: 0.2 s of each ``predict`` process with
        the default's 65,536 rows)."""
        if self.kind != "ivf":
            return None
        row_lists = np.empty(self.index.ntotal, dtype=np.int64)
        inverted = self.index.invlists
        for number in range(self.index.nlist):
            size = inverted.list_size(number)
            if size:
                row_lists[faiss.rev_swig_ptr(inverted.get_ids(number), size)] = number
        return row_lists

    def assign(self, rows: np.ndarray) -> np.ndarray:
        """The IVF list each of ``rows`` (vectors as the bank's) would be added to."""
        _, row_lists = self.index.quantizer.search(self._prepare(rows), 1)
        return row_lists[:, 0]

    @property
    def centroids(self) -> np.ndarray | None:
        """(lists, dim) the IVF partition's k-means centroids, None for other indexes. Passed back
        to the constructor they rebuild the same partition without the k-means (most of an IVF
        index's build time); they only route the search, the distances are to the bank's rows."""
        if self.kind != "ivf":
            return None
        return self.index.quantizer.reconstruct_n(0, self.index.nlist)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.metric == "cosine":
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def search(self, queries: np.ndarray, k: int = 1, probes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Euclidean, or cosine distance 1 - cos) and indices of the k nearest bank
        rows. ``probes``: IVF lists visited per query for this search (default: the index's)."""
        k = min(k, self.index.ntotal)
        params = None if probes is None else faiss.SearchParametersIVF(nprobe=probes)
        similarity_or_sq, indices = self.index.search(self._prepare(queries), k, params=params)
        if self.metric == "l2":
            return np.sqrt(np.maximum(similarity_or_sq, 0.0)), indices
        return 1.0 - similarity_or_sq, indices

    def largest_nearest(self, groups: np.ndarray, count: int, bounds: np.ndarray | None = None,
                        exact: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per group of queries (N, P, dim): the ``count`` largest nearest-neighbour distances,
        largest first (N, count), the queries they belong to (N, count; the lower index first
        among equal distances) and their nearest bank rows (N, count). The same as a ``search``
        of every query followed by a top-k, up to float32 rounding, for a fraction of the cost:
        PatchCore's and patch kNN's image scores need only the most distant patches.

        ``exact``: on an approximate index, the distances are the exact ones (``exact_nearest``)
        instead of the index's, for the few queries they are needed for. ``bounds``: (N, P) this
        index's ``search`` distances of all the queries, when the caller has them (a patch map;
        their nearest rows are not given, so only the exact phase finds rows: use with ``exact``);
        else every query first gets a cheaper upper bound (``_distance_bounds``).

        Each query's distance is known at one of three levels, each at most the one before: an
        upper bound, the index's distance, the exact distance. In rounds, each group's queries
        with the largest known distance not yet at the level a phase asks for go one level down
        (bound to index, index to exact), until none of them could be above the ``count``-th
        distance found at that level. The index's phase comes first: its top then tells which
        few queries the costly exact phase starts from."""
        groups = np.ascontiguousarray(groups, dtype=np.float32)
        n_groups, per_group, dim = groups.shape
        count = min(count, per_group)
        level = np.zeros((n_groups, per_group), np.int8)
        found = np.zeros((n_groups, per_group), np.float32)  # at level 1 or 2
        nearest = np.zeros((n_groups, per_group), np.int64)
        if bounds is not None:
            found[:], level[:] = np.asarray(bounds, dtype=np.float32).reshape(n_groups, per_group), 1
            upper = None
        else:
            upper = self._distance_bounds(groups.reshape(-1, dim)) if per_group > count else None
            if upper is None:  # no cheaper bound: every query searched
                found[:], nearest[:] = (array[:, 0].reshape(n_groups, per_group) for array in self.search(groups.reshape(-1, dim)))
                level[:] = 1
            else:
                upper = upper.reshape(n_groups, per_group)
        # (level reached, first round's width, width growth): widths grow while the index's
        # searches are cheap; in the exact phase the first round takes the index's top and each
        # later one every query still above the cut.
        phases = [(1, max(count, 16), 4)] + ([(2, count, per_group)] if exact and self.kind != "flat" else [])
        for final, width, growth in phases:
            self._refine(groups, count, level, found, nearest, upper, final, width, growth)
        return _top_of_groups(found, nearest, level == phases[-1][0], count)

    def _refine(self, groups: np.ndarray, count: int, level: np.ndarray, found: np.ndarray, nearest: np.ndarray,
                upper: np.ndarray | None, final: int, width: int, growth: int) -> None:
        """One phase of ``largest_nearest``: rounds until every group's ``count`` largest
        distances at level ``final`` are known, updating ``level``, ``found`` and ``nearest``."""
        per_group = groups.shape[1]
        todo = np.arange(groups.shape[0])
        while len(todo):
            known = found[todo] if upper is None else np.where(level[todo] > 0, found[todo], upper[todo])
            open_known = np.where(level[todo] < final, known, -np.inf)
            cut = -np.sort(-np.where(level[todo] == final, known, -np.inf), axis=1)[:, count - 1]
            highest = open_known.max(axis=1)
            going = (highest > -np.inf) & (highest >= cut)
            todo, open_known, cut = todo[going], open_known[going], cut[going]
            if not len(todo):
                return
            picks = np.argsort(-open_known, axis=1, kind="stable")[:, : min(width, per_group)]
            owners = np.broadcast_to(todo[:, None], picks.shape)
            known_picked = np.take_along_axis(open_known, picks, 1)
            taken = (known_picked > -np.inf) & (known_picked >= cut[:, None])
            owners, picks = owners[taken], picks[taken]
            from_level = level[owners, picks]  # each query goes one level down per round
            for step in range(final):
                chosen = owners[from_level == step], picks[from_level == step]
                if len(chosen[0]):
                    queries = groups[chosen]
                    # an exact search starts from the index's distance, which the nearest row is within
                    distances, rows = self._index_nearest(queries) if step == 0 else self.exact_nearest(queries, found[chosen])
                    found[chosen], nearest[chosen], level[chosen] = distances, rows, step + 1
            width *= growth

    def _index_nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances, rows = self.search(queries, k=1)
        return distances[:, 0], rows[:, 0]

    def exact_nearest(self, queries: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances (in ``search``'s units) and rows of the nearest bank row of each query,
        whatever the index, given ``within``: for each query a distance its nearest row is not
        beyond (the index's own distance of it is one).

        - IVF: queries whose nearest rows can only lie in a few lists are searched in those
          lists alone (``_search_reaching_lists``); the others as on HNSW;
        - HNSW (no lists): a brute-force search over all rows, by matrix products in torch (2-3
          times faster than faiss's brute force on 2 cores for tens to a thousand queries against
          65,536 rows), ``EXACT_BLOCK`` queries at a time;
        - flat: its own search."""
        if self.kind == "flat":
            return self._index_nearest(queries)
        prepared = self._prepare(queries)
        distances, rows = np.empty(len(prepared), np.float32), np.empty(len(prepared), np.int64)
        wide = np.arange(len(prepared))
        if self.kind == "ivf":
            wide = self._search_reaching_lists(prepared, np.asarray(within, dtype=np.float64), distances, rows)
        for start in range(0, len(wide), EXACT_BLOCK):
            taken = wide[start : start + EXACT_BLOCK]
            block = torch.from_numpy(prepared[taken])
            if self.metric == "l2":
                squared, nearest = _centre_terms(block, self._rows, self._row_norms).min(dim=1)
                value = squared.add_((block * block).sum(dim=1)).clamp_(min=0.0).sqrt_()
            else:
                # q·b / |b| for a unit query q: its cosine with b
                similarity, nearest = (block @ self._rows.T).mul_(self._inverse_norms).max(dim=1)
                value = 1.0 - similarity
            distances[taken], rows[taken] = value.numpy(), nearest.numpy()
        return distances, rows

    def _search_reaching_lists(self, prepared: np.ndarray, within: np.ndarray, distances: np.ndarray,
                               rows: np.ndarray) -> np.ndarray:
        """The IVF part of ``exact_nearest``: the lists a row within ``within`` of a query could
        lie in are those whose ball reaches that near (list L is out when |q - c_L| - r_L >
        within, c_L its centre and r_L its rows' largest distance from it: triangle inequality).
        ``EXACT_BLOCK`` queries at a time: where their lists hold less than ``SCANNED_SHARE_MAX``
        of the rows on average, each query's nearest row in its lists is searched by faiss (each
        given as many lists as the one of the block that needs most, padded with -1, which faiss
        skips) into ``distances`` and ``rows``; the indices of the other blocks' queries are
        returned."""
        # Euclidean reach in the index's space (cosine: unit vectors, |q - b|^2 = 2 (1 - cos)), with
        # room for the float32 rounding of the index's distance and of the unit vectors.
        if self.metric == "cosine":
            reach = np.sqrt(2.0 * np.maximum(within, 0.0) + 4e-6) * (1 + 1e-4)
        else:
            reach = within * (1 + 1e-4) + 1e-6
        # torch, not numpy, for the products: OpenBLAS's threads spin after a call and took the
        # cores from faiss's next searches (the bound searches of a predict ran 2.2 times longer)
        centres, centre_norms, radii, sizes = self._list_balls()
        wide = []
        for start in range(0, len(prepared), EXACT_BLOCK):
            block = torch.from_numpy(prepared[start : start + EXACT_BLOCK]).double()
            centre_distances = _centre_terms(block, centres, centre_norms).add_((block * block).sum(dim=1, keepdim=True))
            centre_distances = centre_distances.clamp_(min=0.0).sqrt_().sub_(radii).numpy()
            reaching = centre_distances <= reach[start : start + len(block), None]
            taken = np.arange(start, start + len(block))
            if np.where(reaching, sizes, 0.0).sum() >= SCANNED_SHARE_MAX * sizes.sum() * len(block):  # no BLAS call (above)
                wide.append(taken)
                continue
            width = max(1, int(reaching.sum(axis=1).max()))
            lists = np.argsort(~reaching, axis=1, kind="stable")[:, :width]  # the reaching lists first
            lists = np.ascontiguousarray(np.where(np.take_along_axis(reaching, lists, 1), lists, -1), dtype=np.int64)
            queries = np.ascontiguousarray(prepared[taken])
            found, nearest = np.empty((len(queries), 1), np.float32), np.empty((len(queries), 1), np.int64)
            # the low-level call: faiss's Python wrapper takes no per-search number of lists
            self.index.search_preassigned_c(len(queries), faiss.swig_ptr(queries), 1, faiss.swig_ptr(lists),
                                            faiss.swig_ptr(np.zeros(lists.shape, np.float32)), faiss.swig_ptr(found),
                                            faiss.swig_ptr(nearest), False, faiss.SearchParametersIVF(nprobe=width), None)
            distances[taken] = np.sqrt(np.maximum(found[:, 0], 0.0)) if self.metric == "l2" else 1.0 - found[:, 0]
            rows[taken] = nearest[:, 0]
        return np.concatenate(wide) if wide else np.zeros(0, np.int64)

    def _distance_bounds(self, queries: np.ndarray) -> np.ndarray | None:
        """For each query, a distance its ``search`` cannot exceed, in ``search``'s units, for
        less than the search costs; None where no such bound is cheaper.

        - exact L2: the exact distance to the bank row nearest to it in a low-dimensional
          principal projection of the bank (``_UpperBounds``), with room for the float32 rounding
          of squared distances (|q|² + |b|² - 2 q·b), so that a query left out could not come
          out above the cut in an exact search either;
        - IVF: its nearest row in the one list nearest to it, which every search visits among
          others (so it can only find a nearer row); the list scans dominate the search, and this
          is one of ``probes``. Cheaper IVF bounds were measured and not kept (the default
          ensemble's 65,536-row cosine bank, 300 BSData images at 256 px, the same top distances
          each time): the distance to the 1, 4 or 16 rows nearest the query's list centre, to the
          nearest rows of the neighbouring patches, or to the nearest row of the nearest list in a
          32-dim principal projection. Each is looser: 29,000 to 117,000 queries instead of 9,300
          went on to the index's search, which cost more than the one-list scan saved."""
        if self.kind == "ivf" and self.index.nprobe > 1:
            distances, _ = self.search(queries, k=1, probes=1)
            return distances[:, 0].astype(np.float64) * (1 + 1e-6) + 1e-6
        if self.kind != "flat" or self.metric != "l2" or queries.shape[1] <= 2 * BOUND_DIMS:
            return None
        bounds = self._upper_bounds()
        slack = 1e-5 * (float((queries * queries).sum(axis=1).max()) + bounds.max_sq_norm)
        return np.sqrt(bounds.squared(queries, self.bank) + slack)

    def _upper_bounds(self) -> _UpperBounds:
        with self._lazy_lock:
            if self._bounds is None:
                self._bounds = _UpperBounds(self.bank)
            return self._bounds

    def _list_balls(self) -> _ListBalls:
        """The IVF lists' balls, built on first use: 20-40 ms for the default's 65,536 rows, which
        an index never searched exactly (PatchCore's) would pay at every build."""
        with self._lazy_lock:
            if self._balls is None:
                self._balls = _ListBalls.of(self._rows.numpy(), self._prepare, self.centroids, self.row_lists)
            return self._balls


#: Dimensions of the principal projection that finds upper bounds (``largest_nearest``): on
#: 152-dim EfficientNet features it keeps ~88 % of the bank's variance, and its nearest row is
#: the true nearest for ~3 of 4 patches; the exact searches left are a few patches per image.
BOUND_DIMS = 32


class _UpperBounds:
    """For each query, the squared distance to one real bank row: the row nearest to it in the
    bank's top ``BOUND_DIMS`` principal directions (a search BOUND_DIMS / dim as costly)."""

    def __init__(self, bank: np.ndarray):
        centred = bank.astype(np.float64) - bank.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        self.basis = np.ascontiguousarray(vectors[:, ::-1][:, :BOUND_DIMS], dtype=np.float32)
        self.index = faiss.IndexFlatL2(BOUND_DIMS)
        self.index.add(np.ascontiguousarray(bank @ self.basis))
        self.max_sq_norm = float((bank * bank).sum(axis=1).max())

    def squared(self, queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
        _, rows = self.index.search(np.ascontiguousarray(queries @ self.basis), 1)
        difference = queries - bank[rows[:, 0]]
        return (difference * difference).sum(axis=1, dtype=np.float64)


class _ListBalls(NamedTuple):
    """Each IVF list's centre (float64), its squared norm, the largest distance of the list's rows
    from it (0 for an empty list), and how many rows it holds."""

    centres: torch.Tensor
    centre_norms: torch.Tensor
    radii: torch.Tensor
    sizes: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, prepare, centres: np.ndarray, row_lists: np.ndarray, chunk: int = 1024) -> _ListBalls:
        """From the bank ``rows`` as given, brought to the index's space by ``prepare`` ``chunk``
        rows at a time: a float64 (or normalised) copy of the default's 65,536 rows would be 80
        (40) MB more of every predict."""
        centres = torch.from_numpy(np.asarray(centres)).double()
        lists = torch.from_numpy(np.asarray(row_lists, dtype=np.int64))
        radii = torch.zeros(len(centres), dtype=torch.float64)
        for start in range(0, len(rows), chunk):
            owners = lists[start : start + chunk]
            difference = torch.from_numpy(prepare(rows[start : start + chunk])).double() - centres[owners]
            radii.scatter_reduce_(0, owners, difference.norm(dim=1), reduce="amax")
        sizes = np.bincount(lists.numpy(), minlength=len(centres)).astype(np.float64)
        return cls(centres, (centres * centres).sum(dim=1), radii, sizes)


def _top_of_groups(distances: np.ndarray, nearest: np.ndarray, valid: np.ndarray, count: int):
    """The ``count`` largest valid distances of each row, largest first, lower column first
    among equals, with their columns and nearest rows."""
    keyed = np.where(valid, distances, -np.inf)
    columns = np.lexsort((np.broadcast_to(np.arange(keyed.shape[1]), keyed.shape), -keyed), axis=1)[:, :count]
    return (np.take_along_axis(distances, columns, 1), columns, np.take_along_axis(nearest, columns, 1))


def _centre_terms(points: torch.Tensor, centres: torch.Tensor, centre_norms: torch.Tensor) -> torch.Tensor:
    """(n, m) -2 x.c + |c|^2 by one matrix product (BLAS, all threads): squared distances less
    each row's |x|^2, which is added to the row's minimum afterwards instead of to every entry."""
    return torch.addmm(centre_norms[None, :], points, centres.T, beta=1.0, alpha=-2.0)


class _KCenter:
    """Greedy k-center (farthest-point) picks, exactly those of the one-pass-per-pick loop, with
    the passes over all points batched into one matrix product per round (BLAS, all threads,
    in chunks of bounded memory).

    Every point keeps its squared distance to the nearest centre picked so far. A round takes
    the ``candidates`` points farthest from the centres and picks greedily among them (they stay
    in cache, so this is cheap); every other point is at most ``outside`` away, so a pick whose
    distance is still >= ``outside`` is exactly the one the plain loop would make next. The round
    stops at the first pick below it, then all distances are brought up to date at once.
    Up to ``whole`` points (8 MB at 128 dims: they stay in cache) all are candidates, which is
    the plain loop itself: rounds only pay off when a pass over the points is a trip to memory.

    With ``cells`` > 0 the update skips, exactly, the points a new centre cannot come closer to.
    The points are split into the Voronoi cells of ``cells`` anchors (greedy picks on a sample,
    so they are spread out); by the triangle inequality a centre c can lower a point x of the
    cell of anchor a only if |c - a| < |x - a| + d(x), d(x) its distance to the nearest centre
    so far. Once the picks are dense, d(x) is small and a centre reaches only the cells next to
    it, so the update costs a fraction of a full pass, and the picks are unchanged.
    """

    def __init__(self, points: torch.Tensor, candidates: int = 2048, whole: int = 16384, chunk_elements: int = 1 << 20,
                 cells: int = 0, seed: int = 0):
        self.candidates = points.shape[0] if points.shape[0] <= whole else candidates
        self.rows_per_chunk = max(1, chunk_elements // self.candidates)
        self.order = None
        if cells and points.shape[0] > whole:
            points = self._into_cells(points, cells, whole, seed)
        self.points = points
        self.norms = (points * points).sum(dim=1)
        self.nearest = torch.full((points.shape[0],), float("inf"), dtype=points.dtype)

    def _into_cells(self, points: torch.Tensor, cells: int, sample: int, seed: int) -> torch.Tensor:
        """``points`` reordered cell by cell (``self.order`` maps back), and each point's cell
        and distance to its anchor."""
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(points.shape[0], generator=generator)[:sample]
        self.anchors = points[chosen[_plain_k_center(points[chosen].numpy(), 0, cells)]]
        anchor_norms = (self.anchors * self.anchors).sum(dim=1)
        cell = torch.empty(points.shape[0], dtype=torch.long)
        to_anchor = torch.empty(points.shape[0], dtype=points.dtype)
        for start in range(0, points.shape[0], self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            squared, cell[rows] = _centre_terms(points[rows], self.anchors, anchor_norms).min(dim=1)
            to_anchor[rows] = squared.add_((points[rows] * points[rows]).sum(dim=1)).clamp_(min=0.0).sqrt_()
        self.order = torch.argsort(cell, stable=True)
        self.cell, self.to_anchor = cell[self.order], to_anchor[self.order]
        self.bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(cell, minlength=len(self.anchors)).cumsum(0)]).tolist()
        # float32 rounding of squared distances (about 1e-6 of the squared norms) must never
        # prune a point that a centre does come closer to: its square root is 1e-3 of a norm.
        largest = max(float(self.to_anchor.max()), float((points * points).sum(dim=1).max()) ** 0.5)
        self.slack = 1e-3 * largest + 1e-6
        return points[self.order]

    def _update(self, centres: list[int]) -> None:
        """Lower every point's distance to its nearest centre by the new ``centres``."""
        index = torch.tensor(centres)
        centre_points, centre_norms = self.points[index], self.norms[index]
        if self.order is not None:
            reach = self.to_anchor + self.nearest.clamp(min=0.0).sqrt()
            cell_reach = torch.zeros(len(self.anchors), dtype=reach.dtype).scatter_reduce_(0, self.cell, reach, "amax")
            near = torch.cdist(centre_points, self.anchors) < cell_reach + self.slack
            # Where most (cell, centre) pairs are in reach, one dense pass is cheaper.
            if float(near.float().mean()) < 0.5:
                for cell in near.any(dim=0).nonzero().flatten().tolist():
                    rows = slice(self.bounds[cell], self.bounds[cell + 1])
                    reaching = near[:, cell]
                    self._lower(rows, centre_points[reaching], centre_norms[reaching])
                return
        for start in range(0, self.points.shape[0], self.rows_per_chunk):
            self._lower(slice(start, start + self.rows_per_chunk), centre_points, centre_norms)

    def _lower(self, rows: slice, centre_points: torch.Tensor, centre_norms: torch.Tensor) -> None:
        nearest = _centre_terms(self.points[rows], centre_points, centre_norms).amin(dim=1).add_(self.norms[rows])
        torch.minimum(self.nearest[rows], nearest, out=self.nearest[rows])

    def run(self, first: int, size: int, progress: bool = False) -> torch.Tensor:
        """``size`` picks starting from point ``first`` (indices into the points as given)."""
        count = self.points.shape[0]
        if self.order is not None:
            first = int((self.order == first).nonzero()[0, 0])
        picked = [first]
        self._update(picked)
        width = min(self.candidates, count)
        bar = tqdm(total=size, initial=1, desc="coreset", disable=not progress, leave=False, mininterval=1.0)
        while len(picked) < size:
            values, top = torch.topk(self.nearest, min(width + 1, count))
            if float(values[0]) <= 0.0:
                break  # every point coincides with a centre: fewer distinct points than ``size``
            outside = float(values[width]) if width < count else 0.0
            pool, pool_norms, distance = self.points[top[:width]], self.norms[top[:width]], values[:width].clone()
            new: list[int] = []
            while len(picked) + len(new) < size:
                best = int(torch.argmax(distance))
                if new and (float(distance[best]) < outside or float(distance[best]) <= 0.0):
                    break
                new.append(int(top[best]))
                torch.minimum(distance, pool_norms - 2.0 * (pool @ pool[best]) + pool_norms[best], out=distance)
            self._update(new)
            picked.extend(new)
            bar.update(len(new))
        bar.close()
        picked = torch.tensor(picked)
        return picked if self.order is None else self.order[picked]


def _plain_k_center(points: np.ndarray, first: int, size: int) -> list[int]:
    """The one-pass-per-pick loop, in numpy: on points that stay in cache its cost is the
    per-call overhead, a few times lower than torch's (per-image pools: 131072 picks at 32768)."""
    norms = np.einsum("ij,ij->i", points, points)
    nearest = np.full(points.shape[0], np.inf, dtype=points.dtype)
    picked = [first]
    while len(picked) < size:
        np.minimum(nearest, norms - 2.0 * (points @ points[picked[-1]]) + norms[picked[-1]], out=nearest)
        best = int(nearest.argmax())
        if nearest[best] <= 0.0:
            break  # every point coincides with a centre: fewer distinct points than ``size``
        picked.append(best)
    return picked


def _k_center(points: torch.Tensor, size: int, generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Indices of ``size`` greedy k-center picks on (already projected) points, starting from a
    random one: each pick is the point farthest from the points picked so far."""
    count = points.shape[0]
    if size >= count:
        return torch.arange(count)
    first = int(torch.randint(count, (1,), generator=generator))
    if count <= IN_CACHE_POINTS:
        return torch.tensor(_plain_k_center(points.numpy(), first, size))
    return _KCenter(points, cells=CELLS).run(first, size, progress)


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0, progress: bool = False,
                   groups: int = 1, pool_factor: int = 4, method: str = "pooled", extend: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center coreset (PatchCore) of ``size`` rows of ``features``.

    Distances are computed on a random projection, which preserves them approximately
    (Johnson-Lindenstrauss). ``method="pooled"`` with many points (``groups`` > 1 consecutive
    blocks, one per image) first keeps the k-center of each image (``pool_factor`` × ``size``
    points in all, shared out evenly, the first images one more where it does not divide), then
    runs the global k-center on that pool: a patch far from every other patch is also far from
    those of its own image, so the points that matter survive the first stage. With
    ``pool_factor=1`` the pool is the coreset (each image's most distinct patches; a global pass
    would only drop a handful of points at the cost of a full greedy). ``method="exact"`` (or
    ``groups=1``) is the paper's greedy over all points. Both pick exactly what the
    one-pass-per-pick loop would (see ``_KCenter``).

    ``extend``: up to that many further picks of the same greedy after the coreset (which stays
    the first ``size`` indices), from the same pool: the order in which the points beyond the
    coreset would have joined it.
    """
    if method not in CORESETS:
        raise ValueError(f"method must be one of {', '.join(CORESETS)}, not {method!r}")
    count = features.shape[0]
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    projection = _projection(features.shape[1], projection_dim, generator)
    if method == "pooled" and groups > 1 and count > pool_factor * size:
        quota, extra = divmod(pool_factor * size, groups)
        # Each image's rows projected on their own: no projected copy of every patch is held.
        bounds = np.cumsum([0] + [len(block) for block in torch.tensor_split(torch.arange(count), groups)])
        pool = torch.cat([int(start) + _k_center(_project(features[start:stop], projection), quota + (extra > 0), generator)
                          [: quota + (index < extra)] for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))])
        if len(pool) <= size:
            return pool
        return pool[_k_center(_project(features[pool], projection), _picks_in_order(size, extend, len(pool)), generator,
                              progress)]
    return _k_center(_project(features, projection), _picks_in_order(size, extend, count), generator, progress)


def _picks_in_order(size: int, extend: int, count: int) -> int:
    """``size + extend`` picks, but fewer than ``count``: a k-center asked for every point
    returns them unordered, and the first ``size`` must be the coreset."""
    return size if extend <= 0 else min(size + extend, count - 1)


def per_image_picks(features: torch.Tensor, picks: int, projection_dim: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """The first ``picks`` greedy k-center picks of each image of (N, C, h, w) ``features``
    (indices into its h·w positions, in pick order; an image with no more positions keeps all)
    on ``greedy_coreset``'s projection and from its random start per image, so that an image's
    first ``q`` picks are those ``greedy_coreset``'s per-image stage keeps when it gives the image
    ``q`` (on the same patches flattened, one block per image). A greedy pick depends only on the
    picks before it: fits on subsets of the images (calibration folds) can take their shares
    from this one computation. One image at a time: no flattened or projected copy of all
    patches is made (a tiled set's is gigabytes)."""
    generator = torch.Generator().manual_seed(seed)
    projection = _projection(features.shape[1], projection_dim, generator)
    return [_k_center(_project(image.flatten(1).T.contiguous(), projection), picks, generator) for image in features]


def _projection(dims: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor | None:
    """A random projection from ``dims`` to ``projection_dim`` dimensions (drawn first from
    ``generator``), None when the rows have no more dimensions than that."""
    if dims <= projection_dim:
        return None
    return torch.randn(dims, projection_dim, generator=generator) / projection_dim**0.5


def _project(rows: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """float32 ``rows`` on ``projection`` (None: the rows themselves)."""
    if projection is None:
        return rows.float()
    # Block by block into one buffer: no float copy of all the rows beside the result.
    points = torch.empty(rows.shape[0], projection.shape[1])
    for start in range(0, rows.shape[0], 65536):
        torch.matmul(rows[start : start + 65536].float(), projection, out=points[start : start + 65536])
    return points
