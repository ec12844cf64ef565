"""``CoactivationStats``: the read side of a statistics store, its measures and pair selection.

Measures (``mean``, ``count``, ``jaccard``, ``cosine``, ``lift``) are derived tile by tile from the
stored sums; :meth:`CoactivationStats.pairs` turns them into a :class:`~distpen.pairs.PairTable`
without ever forming a dense ``K × K`` array (``top_m`` is found in two passes over the tiles).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._validation import check_finite_scalar, check_positive_int
from ..errors import InvalidArgumentError, StoreCorruptError
from ..pairs import PairTable
from ..store import RunStore
from ._measures import MEASURES, Tile, _InProcess, _tile_pairs, tile_measure, top_m_theta
from .plan import _FORMAT, STAGE, _parse_unit

__all__ = ["MEASURES", "Tile", "CoactivationStats", "open_stats"]


MAX_DENSE_K = 16384
# ============================================================================ results
class CoactivationStats:
    """Co-activation statistics in a Zarr run store (read side).

    The store holds ``pair_sum`` (float64) and ``pair_count`` (int64) of shape (K, K), chunked by
    ``tile × tile`` and stored only on tiles ``I ≤ J`` (diagonal tiles hold the full symmetric
    block; absent tiles are zero); ``fire_count`` (int64), ``gate_sum`` and ``gate_sq_sum``
    (float64) of shape (K,); the attribute ``n_tokens``; and the job manifest under ``_distpen/``.

    For window co-occurrence (``coactivation_stats(..., window=W)``) every row counted is a window:
    ``n_tokens`` is the number of windows, and ``window``, ``seq_len`` and ``n_source_tokens``
    (the tokens they cover) say so; they are None for per-token statistics.

    Parameters
    ----------
    path : str or os.PathLike
        A store written by :func:`coactivation_stats` or :func:`merge_stats`.
    allow_incomplete : bool
        Open a store whose job has not finished (missing tiles read as zero).

    Raises
    ------
    InvalidArgumentError
        Nothing at ``path``.
    StoreCorruptError
        Not a statistics store, or (unless ``allow_incomplete``) an unfinished job.
    """

    def __init__(self, path, *, allow_incomplete: bool = False):
        import zarr

        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise InvalidArgumentError(f"no statistics store at {self.path!r}")
        try:
            self._group = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise StoreCorruptError(f"{self.path!r} is not a Zarr group: {exc}") from None
        attrs = dict(self._group.attrs)
        if attrs.get("format") != _FORMAT:
            raise StoreCorruptError(
                f"{self.path!r} is not a coactivation statistics store (format={attrs.get('format')!r})"
            )
        self.n_tokens = int(attrs["n_tokens"])
        self.k_atoms = int(attrs["k_atoms"])
        self.tile_size = int(attrs["tile"])
        self.window = int(attrs["window"]) if attrs.get("window") is not None else None
        self.seq_len = int(attrs["seq_len"]) if attrs.get("seq_len") is not None else None
        self.n_source_tokens = int(attrs.get("n_source_tokens", self.n_tokens))
        self.n_blocks = math.ceil(self.k_atoms / self.tile_size)
        self.attrs = attrs
        self._store = RunStore(self.path)
        self._job = self._store.job(STAGE)
        if not allow_incomplete:
            pending = self._job.pending()
            if pending:
                raise StoreCorruptError(
                    f"statistics store {self.path!r} is incomplete: {len(self._job.units) - len(pending)} of "
                    f"{len(self._job.units)} tiles complete; re-run coactivation_stats with the same "
                    "arguments to finish it (or open with allow_incomplete=True)"
                )
        self._vec = {}

    def __repr__(self) -> str:
        win = f", window={self.window}, seq_len={self.seq_len}" if self.window is not None else ""
        return (f"CoactivationStats({self.path!r}, n_tokens={self.n_tokens}, k_atoms={self.k_atoms}, "
                f"tile={self.tile_size}{win})")

    def __reduce__(self):
        return (_open_trusted, (self.path,))

    @property
    def fingerprint(self) -> str:
        return self._job.fingerprint

    def _vector(self, name):
        if name not in self._vec:
            self._vec[name] = np.asarray(self._group[name][:])
        return self._vec[name]

    @property
    def fire_count(self) -> np.ndarray:
        """array of shape (k_atoms,), int64: tokens where each atom fires (gate > 0)."""
        return self._vector("fire_count")

    @property
    def gate_sum(self) -> np.ndarray:
        """array of shape (k_atoms,), float64: Σ_n g[n, j]."""
        return self._vector("gate_sum")

    @property
    def gate_sq_sum(self) -> np.ndarray:
        """array of shape (k_atoms,), float64: Σ_n g[n, j]²."""
        return self._vector("gate_sq_sum")

    @property
    def pair_sum(self):
        """The stored ``zarr.Array`` of shape (K, K) (upper tiles only)."""
        return self._group["pair_sum"]

    @property
    def pair_count(self):
        """The stored ``zarr.Array`` of shape (K, K) (upper tiles only)."""
        return self._group["pair_count"]

    def _check_block(self, b, name):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < self.n_blocks:
            raise InvalidArgumentError(
                f"tile index {name} = {b!r} out of range; expected an integer in [0, {self.n_blocks}) "
                f"(K = {self.k_atoms}, tile = {self.tile_size})"
            )
        return int(b)

    def tile(self, I, J) -> Tile:
        """The statistics of atom block ``I`` × atom block ``J`` (any order; ``I > J`` is transposed).

        Returns
        -------
        Tile
            ``rows``, ``cols`` (slices of atoms), ``pair_sum`` (float64) and ``pair_count`` (int64)
            of shape (len(rows), len(cols)).
        """
        I, J = self._check_block(I, "I"), self._check_block(J, "J")
        T, K = self.tile_size, self.k_atoms
        rows, cols = slice(I * T, min(K, (I + 1) * T)), slice(J * T, min(K, (J + 1) * T))
        if I <= J:
            ps, pc = self.pair_sum[rows, cols], self.pair_count[rows, cols]
        else:
            ps, pc = self.pair_sum[cols, rows].T, self.pair_count[cols, rows].T
        return Tile(rows, cols, np.ascontiguousarray(ps), np.ascontiguousarray(pc))

    def block(self, r0: int, r1: int, c0: int, c1: int, name: str = "pair_sum") -> np.ndarray:
        """Any rectangle ``[r0, r1) × [c0, c1)`` of the full symmetric matrix ``name``."""
        T = self.tile_size
        arr = self._group[name]
        out = np.zeros((r1 - r0, c1 - c0), dtype=arr.dtype)
        for I in range(r0 // T, (r1 - 1) // T + 1):
            for J in range(c0 // T, (c1 - 1) // T + 1):
                a0, a1 = max(r0, I * T), min(r1, (I + 1) * T)
                b0, b1 = max(c0, J * T), min(c1, (J + 1) * T)
                if I <= J:
                    out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = arr[a0:a1, b0:b1]
                else:
                    out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = arr[b0:b1, a0:a1].T
        return out

    def nonzero_tiles(self) -> list:
        """Tiles ``(I, J)``, ``I ≤ J``, that hold any non-zero statistic."""
        out = []
        markers = self._job.markers()
        for u in self._job.units:
            m = markers.get(u)
            if m is None or m.get("info", {}).get("nonzero", True):
                out.append(_parse_unit(u))
        return out

    def coactivation_dense(self, force: bool = False) -> np.ndarray:
        """The dense ``K × K`` co-activation ``pair_sum / n_tokens`` (symmetric, float64).

        Raises
        ------
        InvalidArgumentError
            If ``K > 16384`` (a 2 GiB+ matrix) and ``force`` is False; use :meth:`pairs` or :meth:`tile`.
        """
        K = self.k_atoms
        if K > MAX_DENSE_K and not force:
            raise InvalidArgumentError(
                f"coactivation_dense: K = {K} > {MAX_DENSE_K} would allocate {8 * K * K / 2**30:.1f} GiB; "
                "use .pairs(...) or .tile(I, J), or pass force=True"
            )
        C = np.zeros((K, K))
        for I, J in self.nonzero_tiles():
            t = self.tile(I, J)
            C[t.rows, t.cols] = t.pair_sum
            if I != J:
                C[t.cols, t.rows] = t.pair_sum.T
        C /= self.n_tokens
        return C

    def pairs(self, threshold=0.0, top_m=None, measure="mean", min_count=0, out=None, *, client=None) -> PairTable:
        """Atom pairs ``(j, k, w)``, ``j < k``, with ``w`` the chosen measure, built tile by tile on the cluster.

        Parameters
        ----------
        threshold : float ≥ 0
            Keep pairs whose measure is strictly greater.
        top_m : int, optional
            Keep a pair only if it is among the ``m`` strongest partners of *either* of its atoms
            (among the pairs passing ``threshold`` and ``min_count``; ties at the m-th value are kept).
        measure : {"mean", "count", "jaccard", "cosine", "lift", "npmi", "phi", "pearson", "dice"}
            With ``N = n_tokens``, ``f = fire_count``, ``c = pair_count``, ``s = gate_sum``,
            ``q = gate_sq_sum``, ``S = pair_sum``:
            ``mean = S/N`` (what ``DecoderIncoherencePenalty.from_pairs`` consumes); ``count = c``;
            ``jaccard = c/(f_j + f_k − c)``; ``cosine = S/sqrt(q_j·q_k)``; ``lift = c·N/(f_j·f_k)``;
            ``npmi = log(c·N/(f_j·f_k)) / −log(c/N)`` (normalised pointwise mutual information of
            firing, in [−1, 1]); ``phi = (c/N − p_j p_k)/sqrt(p_j(1−p_j) p_k(1−p_k))`` with
            ``p = f/N`` (the correlation of the firing indicators); ``pearson = (S/N − μ_j μ_k)/(σ_j σ_k)``
            with ``μ = s/N``, ``σ² = q/N − μ²`` (the correlation of the gate values);
            ``dice = 2c/(f_j + f_k)``. A pair whose measure is undefined (a zero denominator;
            ``c = 0`` or ``c = N`` for npmi) is absent. Pair weights are positive, so a correlation
            at or below ``threshold`` (≥ 0) is absent too: the table holds positive associations.
        min_count : int ≥ 0
            Keep pairs that co-fire on at least this many tokens.
        out : path, optional
            Also save the table there (:meth:`PairTable.save`).
        client : distributed.Client or "local", optional
            Where the tiles are processed: the cluster (default: the current client), or
            ``"local"``: one after the other in this process (a dashboard with no scheduler).

        Returns
        -------
        PairTable
        """
        from ..cluster import get_client

        threshold = check_finite_scalar(threshold, "threshold", nonnegative=True)
        if measure not in MEASURES:
            raise InvalidArgumentError(f"measure must be one of {MEASURES}, got {measure!r}")
        if top_m is not None:
            top_m = check_positive_int(top_m, "top_m")
        min_count = check_positive_int(min_count, "min_count", allow_zero=True)
        from dask.base import tokenize

        client = _InProcess() if client == "local" else (client or get_client())
        tiles = self.nonzero_tiles()
        opts = (measure, threshold, min_count)
        tok = tokenize(self.path, self.fingerprint, opts, top_m)
        theta = None
        if top_m is not None and tiles:
            theta = top_m_theta(self, tiles, top_m, opts, client, f"distpen-pairs-{tok}")
        if not tiles:
            table = PairTable.empty(self.k_atoms)
        else:
            th_parts = [None if theta is None else (theta[I * self.tile_size:(I + 1) * self.tile_size],
                                                    theta[J * self.tile_size:(J + 1) * self.tile_size])
                        for I, J in tiles]
            futs = client.map(_tile_pairs, [self] * len(tiles), tiles, [opts] * len(tiles), th_parts,
                              key=[f"distpen-pairs-tile-{tok}-{I}-{J}" for I, J in tiles])
            res = client.gather(futs)
            j = np.concatenate([r[0] for r in res])
            k = np.concatenate([r[1] for r in res])
            w = np.concatenate([r[2] for r in res])
            order = np.lexsort((k, j))
            table = PairTable(np.ascontiguousarray(j[order]), np.ascontiguousarray(k[order]),
                              np.ascontiguousarray(w[order]), self.k_atoms, _trusted=True)
        if out is not None:
            table.save(out)
        return table

    # ------------------------------------------------------------------ measure on one tile
    def neighbours(self, measure: str = "jaccard", top_m: int = 250, out=None, *, client=None) -> dict:
        """Every latent's ``top_m`` strongest partners under ``measure``: ``{latent: [(score, partner), …]}``.

        Strongest first, ties broken by the lower partner index; a latent that never fires has an
        empty list. With ``out``, also writes delphi's co-occurrence neighbour JSON there
        (``{"<latent>": [[score, neighbour], …]}``, standard JSON); see
        :mod:`distpen.coactivation.neighbours`.

        Examples
        --------
        >>> st.neighbours(top_m=250, out="neighbours/layers.6-co-occurrence.json")   # doctest: +SKIP
        """
        from .neighbours import neighbour_lists, write_delphi_neighbours

        lists = neighbour_lists(self, measure, top_m, client=client)
        if out is not None:
            write_delphi_neighbours(lists, out)
        return lists

    def clusters(self, measure: str = "jaccard", *, threshold=None, max_size: int = 200,
                 method: str = "components", top_m=None, seed: int = 0, client=None):
        """Groups of co-occurring latents from the pair graph, never from a dense ``K × K``.

        The client gathers only the edges that decide the result, never every positive pair: the
        edges above ``threshold`` when it is given, or else, strongest first in bands tile by tile,
        those down to the weight at which the largest component outgrows ``max_size``
        (:mod:`distpen.coactivation.clusters`). The result is that of
        :func:`~distpen.coactivation.clusters.find_clusters` on ``self.pairs(measure=measure, top_m=top_m)``.

        Parameters
        ----------
        measure : str
            Edge weight (any of :data:`MEASURES`).
        threshold : float ≥ 0, optional
            Keep edges whose measure is strictly above it. Default for ``"components"``: the smallest
            threshold among the edge weights and 0 at which the largest connected component has at
            most ``max_size`` latents, as sae_cooccurrence's bisection finds it.
        max_size : int ≥ 2
        method : {"components", "louvain"}
            Connected components of the thresholded graph, or networkx's Louvain communities of the
            weighted graph (threshold 0 unless given; ``seed`` fixes its order).
        top_m : int, optional
            Build the graph from each latent's ``top_m`` strongest partners only (smaller graphs).
        client : distributed.Client or "local", optional
            As for :meth:`pairs`.

        Returns
        -------
        Clusters
            ``rows`` (cluster, size, edges, density, hub, members), largest first, and ``threshold``.

        Examples
        --------
        >>> cl = st.clusters("jaccard", max_size=200)          # doctest: +SKIP
        >>> cl.threshold, cl.rows[0]["size"], cl.rows[0]["hub"]   # doctest: +SKIP
        """
        from .clusters import stats_clusters

        return stats_clusters(self, measure, threshold=threshold, max_size=max_size, method=method, top_m=top_m,
                              seed=seed, client=client)

    def _tile_measure(self, I, J, measure, threshold, min_count):
        """(values, eligible) of shape (n_I, n_J) for the tile; eligible excludes a == b."""
        return tile_measure(self, I, J, measure, threshold, min_count)

def _open_trusted(path):
    return CoactivationStats(path, allow_incomplete=True)


def open_stats(path, *, allow_incomplete: bool = False) -> CoactivationStats:
    """Open a statistics store written by :func:`coactivation_stats` or :func:`merge_stats`.

    Examples
    --------
    >>> st = open_stats("stats.zarr")                   # doctest: +SKIP
    >>> st.n_tokens, st.k_atoms, st.fire_count.shape    # doctest: +SKIP
    """
    return CoactivationStats(path, allow_incomplete=allow_incomplete)
