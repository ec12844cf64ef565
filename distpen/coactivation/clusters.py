"""Groups of latents from the pair graph: thresholded connected components, or communities.

sae_cooccurrence (Clarke et al.) builds a dense ``K × K`` Jaccard matrix per firing threshold on a
GPU, then bisects an edge threshold until the largest connected component of the thresholded graph
has at most ~200 latents, and tabulates each component. Here the graph is never dense, and the
client never holds every positive pair either: only the edges that decide the result.

* **The threshold** is the smallest edge weight (or 0) at which the largest component has at most
  ``max_size`` latents; edges strictly above it are kept. The largest component only grows as the
  threshold falls, so only the strongest edges matter, down to the weight at which it first
  outgrows ``max_size`` (at K = 16 384 and ``max_size`` 200, about 10⁴ of 10⁸ pairs). The edges
  come in **bands, strongest first**: each tile (a task on the workers) sends its ``budget``
  strongest edges below its cursor — every tie at the cut included — and moves its cursor to the
  strongest weight it left out. Every edge above the largest cursor is then known. If those edges
  already make a component larger than ``max_size``, the answer lies among their weights: a
  maximum spanning forest of them (scipy's ``minimum_spanning_tree`` on the weights' ranks) has,
  above every threshold, the same components with at most K − 1 edges, and a bisection over its
  weights with ``connected_components`` finds it. Otherwise the next band is fetched (the budget
  ×4), down to the last edge, where the threshold is 0.
* With an explicit ``threshold``, or for ``method="louvain"`` (threshold 0 unless given), the tiles
  send exactly their edges above the threshold.
* Measures of counts alone (``count``, ``jaccard``, ``lift``, ``dice``, ``npmi``, ``phi``) read
  ``pair_count`` and not ``pair_sum``.

The result equals the bisection over every sorted unique edge weight of the full pair table
(:func:`find_clusters` on :meth:`CoactivationStats.pairs`), which the tests check, ties included.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .._validation import check_finite_scalar, check_positive_int
from ..errors import InvalidArgumentError
from ..pairs import PairTable
from ._measures import MEASURES, Tile, _InProcess, _tile_topm, tile_measure, top_m_theta

__all__ = ["METHODS", "Clusters", "find_clusters", "stats_clusters"]

METHODS = ("components", "louvain")
#: measures :meth:`CoactivationStats._tile_measure` derives from ``pair_count`` and ``fire_count`` alone
COUNT_MEASURES = ("count", "jaccard", "lift", "dice", "npmi", "phi")
#: first band: about this many edges per latent over all tiles (at least ``MIN_TILE_BUDGET`` per tile)
BAND_EDGES_PER_LATENT = 32
MIN_TILE_BUDGET = 256


@dataclass
class Clusters:
    """Groups of latents with at least two members, largest first.

    Attributes
    ----------
    threshold : float
        The edge threshold used (edges with a measure strictly above it are kept).
    measure, method : str
    rows : list of dict
        One per group: ``cluster``, ``size``, ``edges``, ``density`` (edges over ``size·(size−1)/2``),
        ``hub`` (the member with the largest weighted degree inside the group) and ``members``
        (sorted latent ids).
    n_isolated : int
        Latents in no group (no kept edge).
    """

    threshold: float
    measure: str
    method: str
    rows: list = field(default_factory=list)
    n_isolated: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([r["size"] for r in self.rows], dtype=np.int64)

    def labels(self, k_atoms: int) -> np.ndarray:
        """Cluster id of every latent (−1 for isolated ones)."""
        out = np.full(k_atoms, -1, dtype=np.int64)
        for r in self.rows:
            out[r["members"]] = r["cluster"]
        return out


def find_clusters(table: PairTable, measure: str, *, threshold=None, max_size: int = 200,
                  method: str = "components", seed: int = 0) -> Clusters:
    """Groups of the latents of ``table`` (pairs with positive weights), in this process.

    See :meth:`CoactivationStats.clusters`, which gives the same result without gathering the
    table (:func:`stats_clusters`).
    """
    method, max_size = _check_method(method, max_size)
    n = table.k_atoms
    j, k, w = table.j, table.k, table.w
    if threshold is None and method == "components":
        threshold = _search(_TableBands(j, k, w), n, max_size, _first_budget(n, 1))[0]
    else:
        threshold = 0.0 if threshold is None else check_finite_scalar(threshold, "threshold", nonnegative=True)
    keep = w > threshold
    return _groups(j[keep], k[keep], w[keep], n, threshold, measure, method, seed)


def stats_clusters(stats, measure: str = "jaccard", *, threshold=None, max_size: int = 200,
                   method: str = "components", top_m=None, seed: int = 0, client=None,
                   budget=None) -> Clusters:
    """:meth:`CoactivationStats.clusters`: the groups, fetching from the tiles only the edges that decide them.

    ``budget`` (edges per tile in the first band; default about 32·K over all tiles) changes how
    many bands are fetched, never the result.
    """
    from dask.base import tokenize

    from ..cluster import get_client

    if measure not in MEASURES:
        raise InvalidArgumentError(f"measure must be one of {MEASURES}, got {measure!r}")
    method, max_size = _check_method(method, max_size)
    if threshold is not None:
        threshold = check_finite_scalar(threshold, "threshold", nonnegative=True)
    if top_m is not None:
        top_m = check_positive_int(top_m, "top_m")
    if budget is not None:
        budget = check_positive_int(budget, "budget")
    client = _InProcess() if client == "local" else (client or get_client())
    n = stats.k_atoms
    tiles = stats.nonzero_tiles()
    floor = 0.0 if threshold is None else threshold
    bands = _TileBands(stats, tiles, measure, top_m, floor, client,
                       tokenize(stats.path, stats.fingerprint, measure, top_m, floor))
    try:
        if threshold is None and method == "components":
            threshold, (j, k, w) = _search(bands, n, max_size, budget or _first_budget(n, len(tiles)))
        else:
            j, k, w = bands.more(None)
            threshold = floor
    finally:
        bands.close()
    order = np.lexsort((k, j))  # the order of the pair table
    return _groups(j[order], k[order], w[order], n, threshold, measure, method, seed)


# ============================================================================ the threshold
def _check_method(method, max_size):
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    max_size = check_positive_int(max_size, "max_size")
    if max_size < 2:
        raise InvalidArgumentError(f"max_size must be ≥ 2 (a group has two latents at least), got {max_size}")
    return method, max_size


def _first_budget(n: int, n_tiles: int) -> int:
    return max(MIN_TILE_BUDGET, math.ceil(BAND_EDGES_PER_LATENT * n / max(n_tiles, 1)))


def _search(bands, n: int, max_size: int, budget: int):
    """The smallest threshold (an edge weight, or 0) whose largest component has ≤ ``max_size`` latents.

    Returns ``(threshold, (j, k, w))`` with the edges strictly above the threshold. ``bands`` gives
    edges strongest first: ``more(budget)`` the next band, ``bound`` a weight above which every edge
    has been given (0 once all have).
    """
    parts = []
    while True:
        parts.append(bands.more(budget))
        j, k, w = (np.concatenate([p[i] for p in parts]) for i in range(3))
        parts = [(j, k, w)]
        b = bands.bound
        above = w > b
        if _largest(_components(j[above], k[above], n)) > max_size:
            threshold = _lowest_fit(*_forest(j[above], k[above], w[above], n), n, max_size)
            break
        if b <= 0.0:  # every edge is in, and the largest component still fits
            threshold = 0.0
            break
        budget *= 4
    keep = w > threshold
    return threshold, (j[keep], k[keep], w[keep])


def _forest(j, k, w, n):
    """A maximum spanning forest of the edges: above every threshold, its edges join the same latents.

    Kruskal on the weights' ranks (exact integers, strongest first), so ties and rounding cannot
    reorder edges.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    uniq, inv = np.unique(w, return_inverse=True)
    rank = (uniq.shape[0] - inv).astype(np.float64)  # 1 for the strongest; never 0 (no edge)
    f = minimum_spanning_tree(coo_matrix((rank, (j, k)), shape=(n, n)).tocsr()).tocoo()
    return f.row.astype(np.int64), f.col.astype(np.int64), uniq[uniq.shape[0] - f.data.astype(np.int64)]


def _lowest_fit(j, k, w, n: int, max_size: int) -> float:
    """Bisection over the forest's weights, given that all its edges make a component > ``max_size``.

    The answer is one of them: lowering the threshold past a weight changes the components only if
    an edge of that weight joins two of them, and then the forest has such an edge.
    """
    cand = np.unique(w)
    lo, hi = 0, cand.shape[0] - 1  # cand[hi] keeps no forest edge: always fits
    while lo < hi:
        mid = (lo + hi) // 2
        keep = w > cand[mid]
        if _largest(_components(j[keep], k[keep], n)) <= max_size:
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


def _select(M, ok, budget, floor: float):
    """The entries of ``M`` to send: flat indices of the ``budget`` strongest eligible ones (``ok``),
    every tie at the cut included, or of all of them when ``budget`` is None; and the new cursor,
    the strongest eligible weight left out (``floor``, below every eligible weight, when none is).

    A strided sample first sets a lower bound with about twice ``budget`` entries above it, so the
    exact cut is found among those; when the sample misjudges, among all.
    """
    if budget is None or np.count_nonzero(ok) <= budget:
        return np.flatnonzero(ok), floor
    Mf, okf = M.reshape(-1), ok.reshape(-1)
    step = max(1, budget // 16)  # ~32 sampled entries above the bound
    sample = Mf[::step][okf[::step]]
    q = min(sample.shape[0], max(1, (2 * budget) // step))
    cand = np.zeros(0, dtype=np.intp)
    if q:
        bound = np.partition(sample, sample.shape[0] - q)[sample.shape[0] - q]
        cand = np.flatnonzero(okf & (Mf >= bound))
    if cand.shape[0] < budget:
        cand = np.flatnonzero(okf)
    w = Mf[cand]
    cut = np.partition(w, w.shape[0] - budget)[w.shape[0] - budget]
    keep = w >= cut
    rest = w[~keep]
    cursor = rest.max() if rest.shape[0] else np.max(Mf, where=okf & (Mf < cut), initial=floor)
    return cand[keep], float(cursor)


class _TableBands:
    """The bands of an in-memory pair table (one cursor)."""

    def __init__(self, j, k, w):
        self.j, self.k, self.w = j, k, w
        self.bound = math.inf

    def more(self, budget):
        ok = self.w <= self.bound if math.isfinite(self.bound) else np.ones(self.w.shape[0], dtype=bool)
        band, self.bound = _select(self.w, ok, budget, 0.0)
        return self.j[band], self.k[band], self.w[band]


class _TileBands:
    """The bands of a statistics store: one cursor per tile, each band one task per tile on the cluster."""

    def __init__(self, stats, tiles, measure, top_m, floor, client, tok):
        self.tiles, self.measure, self.floor, self.client, self.tok = tiles, measure, floor, client, tok
        self.cursor = dict.fromkeys(tiles, math.inf)  # every edge of the tile above its cursor is given
        self.stats = stats if isinstance(client, _InProcess) else client.scatter(stats, broadcast=True, hash=False)
        self.theta = None
        if top_m is not None and tiles:
            theta = top_m_theta(stats, tiles, top_m, (measure, 0.0, 0), client, f"distpen-clusters-{tok}",
                                tile_fn=_tile_top_values, stats_arg=self.stats)
            T = stats.tile_size
            self.theta = {(I, J): (theta[I * T:(I + 1) * T], theta[J * T:(J + 1) * T]) for I, J in tiles}

    @property
    def bound(self) -> float:
        return max(self.cursor.values(), default=self.floor)

    def more(self, budget):
        from dask.base import tokenize

        todo = [t for t in self.tiles if self.cursor[t] > self.floor]
        if not todo:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy(), np.zeros(0)
        his = [self.cursor[t] for t in todo]
        futs = self.client.map(
            _tile_band, [self.stats] * len(todo), todo, [self.measure] * len(todo), [self.floor] * len(todo),
            [None if self.theta is None else self.theta[t] for t in todo], his, [budget] * len(todo),
            key=[f"distpen-clusters-band-{tokenize(self.tok, hi, budget)}-{I}-{J}" for (I, J), hi in zip(todo, his)])
        res = self.client.gather(futs)
        del futs
        for t, r in zip(todo, res):
            self.cursor[t] = r[3]
        return tuple(np.concatenate([r[i] for r in res]) for i in range(3))

    def close(self):
        self.stats = None


def _tile_top_values(stats, tile, m, opts):
    """``_tile_topm`` of :meth:`CoactivationStats.pairs`, reading ``pair_count`` alone for the count measures."""
    return _tile_topm(_CountTiles(stats) if opts[0] in COUNT_MEASURES else stats, tile, m, opts)


class _CountTiles:
    """A statistics store whose tiles carry ``pair_count`` alone (``pair_sum`` a read-only broadcast
    zero of its shape): all that the measures of counts read, and a fraction of the bytes
    (``pair_sum`` compresses far less)."""

    def _tile_measure(self, I, J, measure, threshold, min_count):
        return tile_measure(self, I, J, measure, threshold, min_count)

    def __init__(self, stats):
        self._stats = stats

    def __getattr__(self, name):
        return getattr(self._stats, name)

    def tile(self, I, J) -> Tile:
        st = self._stats
        T, K = st.tile_size, st.k_atoms
        rows, cols = slice(I * T, min(K, (I + 1) * T)), slice(J * T, min(K, (J + 1) * T))
        pc = _stored_counts(st, I, J) if I <= J else _stored_counts(st, J, I).T
        return Tile(rows, cols, np.broadcast_to(np.float64(0.0), pc.shape), np.ascontiguousarray(pc))


def _stored_counts(stats, I, J):
    """``pair_count`` of the stored tile (I, J), I ≤ J: decoded straight from its chunk file where
    :mod:`distpen._chunkio` can (Zarr's indexing costs about as much again), else through Zarr."""
    from .._chunkio import _decode_into, direct_layout

    arr = stats.pair_count
    T, K = stats.tile_size, stats.k_atoms
    n_i, n_j = min(K, (I + 1) * T) - I * T, min(K, (J + 1) * T) - J * T
    lay = direct_layout(arr, rows=False)
    if lay is None or tuple(lay.chunk) != (T, T):
        return np.asarray(arr[I * T:I * T + n_i, J * T:J * T + n_j])
    path = os.path.join(lay.root, *lay.encode_key((I, J)).split("/"))
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return np.full((n_i, n_j), lay.fill, dtype=lay.dtype)
    out = np.empty((T, T), dtype=lay.dtype)
    _decode_into(lay, buf, out, path)
    return out[:n_i, :n_j]


def _tile_band(stats, tile, measure, floor, theta, hi, budget):
    """One tile's next band: its ``budget`` strongest edges above ``floor`` and at most ``hi`` (all of
    them when ``budget`` is None), every tie at the cut included.

    Returns ``(j, k, w, cut)``: global atom ids (``j < k``), weights, and the tile's new cursor (the
    strongest edge left out, or ``floor``). The edges are those of :meth:`CoactivationStats.pairs`
    (``top_m`` through ``theta``) with ``floor < w ≤ hi``.
    """
    I, J = tile
    if measure == "jaccard":  # the default: one compiled pass instead of a dozen array operations
        t = _CountTiles(stats).tile(I, J)
        f = stats.fire_count.astype(np.float64)
        M = np.empty(t.pair_count.shape)
        ok = np.empty(t.pair_count.shape, dtype=bool)
        _jaccard_tile(t.pair_count, f[t.rows], f[t.cols], float(floor), float(hi), I == J, M, ok)
    else:
        source = _CountTiles(stats) if measure in COUNT_MEASURES else stats
        M, ok = source._tile_measure(I, J, measure, floor, 0)
        if I == J:
            ok = np.triu(ok, 1)
        if math.isfinite(hi):
            ok &= M <= hi
    if theta is not None:
        th_i, th_j = theta
        ok &= (M >= th_i[:, None]) | (M >= th_j[None, :])
    idx, cut = _select(M, ok, budget, floor)
    w = M.reshape(-1)[idx]
    a, b = np.divmod(idx, M.shape[1])
    T = stats.tile_size
    return (a + I * T).astype(np.int64), (b + J * T).astype(np.int64), w.astype(np.float64), cut


@njit(cache=True, nogil=True)
def _jaccard_tile(pc, f_rows, f_cols, floor, hi, upper, M, ok):  # pragma: no cover - compiled
    """``M, ok`` of :meth:`CoactivationStats._tile_measure` for ``"jaccard"`` (threshold ``floor``,
    ``min_count`` 0), the same float64 operations in the same order, so the same bits; ``ok`` also
    requires ``M ≤ hi`` and, with ``upper`` (a diagonal tile), column > row."""
    n_i, n_j = pc.shape
    for a in range(n_i):
        fa = f_rows[a]
        for b in range(n_j):
            c = float(pc[a, b])
            den = (fa + f_cols[b]) - c
            v = 0.0
            e = False
            if den > 0:
                v = c / den
                e = v > floor and v <= hi
            M[a, b] = v
            ok[a, b] = e and (b > a or not upper)


# ============================================================================ the groups
def _components(j, k, n):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(j.shape[0]), (j, k)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def _largest(labels) -> int:
    return int(np.bincount(labels).max()) if labels.size else 0


def _table(labels, j, k, w, n) -> tuple[list, int]:
    sizes = np.bincount(labels, minlength=labels.max() + 1 if labels.size else 0)
    groups = np.flatnonzero(sizes >= 2)
    same = labels[j] == labels[k]
    edges = np.bincount(labels[j][same], minlength=sizes.shape[0])
    degree = np.bincount(j[same], weights=w[same], minlength=n) + np.bincount(k[same], weights=w[same], minlength=n)
    order = groups[np.lexsort((groups, -sizes[groups]))]  # largest first, then by label
    rows = []
    for cid, g in enumerate(order):
        members = np.flatnonzero(labels == g)
        size = int(members.shape[0])
        hub = int(members[np.argmax(degree[members])])
        rows.append({"cluster": cid, "size": size, "edges": int(edges[g]),
                     "density": float(edges[g]) / (size * (size - 1) / 2), "hub": hub, "members": members})
    return rows, int(np.sum(sizes == 1))


def _groups(j, k, w, n, threshold, measure, method, seed) -> Clusters:
    """The groups of the kept edges ``(j, k, w)`` (all above ``threshold``)."""
    if method == "components":
        labels = _components(j, k, n)
    else:
        g = PairTable(j, k, w, n, _trusted=True).to_networkx()
        import networkx as nx

        labels = np.arange(n, dtype=np.int64)  # isolated latents stay alone
        comms = nx.community.louvain_communities(g, weight="weight", seed=seed)
        for c, members in enumerate(sorted(comms, key=lambda m: (-len(m), min(m)))):
            labels[list(members)] = n + c
        _, labels = np.unique(labels, return_inverse=True)
    rows, isolated = _table(labels, j, k, w, n)
    return Clusters(float(threshold), measure, method, rows, isolated)
