"""PairTable: the sparse list of co-activating atom pairs ``(j, k, w)`` with ``j < k``, ``w > 0``."""

from __future__ import annotations

import numpy as np

from ._validation import _describe, check_float64_array, check_int_array, check_positive_int
from .errors import InvalidArgumentError, PairTableError, ShapeMismatchError

__all__ = ["PairTable"]

_FORMAT = "distpen.PairTable"
_FORMAT_VERSION = 1
_ZARR_CHUNK = 1 << 20


class PairTable:
    """Columnar, validated list of atom pairs, stored sorted by ``(j, k)``.

    Parameters
    ----------
    j, k : array of shape (n_pairs,)
        Atom indices with ``0 ≤ j < k < k_atoms``; any order (they are sorted on construction).
    w : array of shape (n_pairs,)
        Finite, non-negative weights; pairs with ``w == 0`` are dropped.
    k_atoms : int
        Number of atoms.

    Raises
    ------
    PairTableError
        On an index out of range, ``j ≥ k``, a duplicated ``(j, k)``, or a negative or non-finite weight.

    Examples
    --------
    >>> pt = PairTable([1, 0], [2, 1], [0.5, 2.0], k_atoms=3)
    >>> pt.j.tolist(), pt.k.tolist(), pt.w.tolist()
    ([0, 1], [1, 2], [2.0, 0.5])
    """

    __slots__ = ("j", "k", "w", "k_atoms", "_directed")

    def __init__(self, j, k, w, k_atoms: int, *, _trusted: bool = False):
        self.k_atoms = check_positive_int(k_atoms, "k_atoms")
        if _trusted:
            self.j, self.k, self.w = j, k, w
        else:
            self.j, self.k, self.w = _validate_pairs(j, k, w, self.k_atoms)
        for arr in (self.j, self.k, self.w):
            arr.setflags(write=False)
        self._directed = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, C) -> "PairTable":
        """Pairs of the symmetrised upper triangle ``w = ½(C[j,k] + C[k,j])`` of a dense ``K × K`` matrix.

        Examples
        --------
        >>> C = np.array([[5.0, 1.0, 0.0], [3.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
        >>> PairTable.from_dense(C).w.tolist()
        [2.0]
        """
        C = check_float64_array(C, "coactivation")
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise ShapeMismatchError(f"coactivation must be a square K × K matrix, got {_describe(C)}")
        if C.shape[0] < 2:
            raise InvalidArgumentError(f"coactivation must be at least 2 × 2, got {C.shape}")
        if not np.isfinite(C).all():
            r, c = np.argwhere(~np.isfinite(C))[0]
            raise InvalidArgumentError(f"coactivation must be finite, but C[{r}, {c}] = {float(C[r, c])}")
        if (C < 0).any():
            r, c = np.argwhere(C < 0)[0]
            raise InvalidArgumentError(f"coactivation must be ≥ 0, but C[{r}, {c}] = {float(C[r, c])}")
        K = C.shape[0]
        jj, kk = np.triu_indices(K, 1)
        w = 0.5 * (C[jj, kk] + C[kk, jj])
        keep = w > 0
        return cls(jj[keep].astype(np.int64), kk[keep].astype(np.int64), w[keep], K, _trusted=True)

    @classmethod
    def empty(cls, k_atoms: int) -> "PairTable":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), np.zeros(0), k_atoms, _trusted=True)

    @classmethod
    def concat(cls, tables) -> "PairTable":
        """Concatenate tables over the same atoms (pairs must not repeat)."""
        tables = list(tables)
        if not tables:
            raise InvalidArgumentError("concat needs at least one PairTable")
        K = tables[0].k_atoms
        if any(t.k_atoms != K for t in tables):
            raise ShapeMismatchError(f"cannot concat PairTables over different k_atoms: {[t.k_atoms for t in tables]}")
        return cls(np.concatenate([t.j for t in tables]), np.concatenate([t.k for t in tables]),
                   np.concatenate([t.w for t in tables]), K)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.j.shape[0])

    @property
    def n_pairs(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"PairTable(n_pairs={len(self)}, k_atoms={self.k_atoms})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, PairTable) and self.k_atoms == other.k_atoms
                and np.array_equal(self.j, other.j) and np.array_equal(self.k, other.k)
                and np.array_equal(self.w, other.w))

    def __getstate__(self):
        return (self.j, self.k, self.w, self.k_atoms)

    def __setstate__(self, state):
        self.j, self.k, self.w, self.k_atoms = state
        self._directed = None

    def __getitem__(self, s: slice) -> "PairTable":
        """A contiguous slice of the (sorted) table; still sorted and valid."""
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise InvalidArgumentError(f"PairTable supports contiguous slices only, got {s!r}")
        return PairTable(self.j[s], self.k[s], self.w[s], self.k_atoms, _trusted=True)

    def scaled(self, factor: float) -> "PairTable":
        return PairTable(self.j, self.k, self.w * float(factor), self.k_atoms, _trusted=True)

    def to_dense(self) -> np.ndarray:
        """The symmetric ``K × K`` matrix (small K only; for tests and inspection)."""
        C = np.zeros((self.k_atoms, self.k_atoms))
        C[self.j, self.k] = self.w
        C[self.k, self.j] = self.w
        return C

    def atoms(self) -> np.ndarray:
        """Sorted unique atoms touched by any pair."""
        return np.union1d(self.j, self.k)

    def degree(self) -> np.ndarray:
        """Number of partners of every atom."""
        return (np.bincount(self.j, minlength=self.k_atoms)
                + np.bincount(self.k, minlength=self.k_atoms))

    def adjacency(self):
        """Symmetric ``K × K`` ``scipy.sparse.csr_array`` of the weights."""
        import scipy.sparse as sp

        indptr, nbr, wts = self.directed()
        return sp.csr_array((wts, nbr, indptr), shape=(self.k_atoms, self.k_atoms))

    def directed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both directions of every pair as a CSR over source atoms: ``(indptr, neighbour, weight)``.

        Atom ``a``'s partners are ``neighbour[indptr[a]:indptr[a+1]]``; cached.
        """
        if self._directed is None:
            src = np.concatenate([self.j, self.k])
            dst = np.concatenate([self.k, self.j])
            wts = np.concatenate([self.w, self.w])
            order = np.argsort(src, kind="stable")
            indptr = np.zeros(self.k_atoms + 1, dtype=np.int64)
            np.cumsum(np.bincount(src, minlength=self.k_atoms), out=indptr[1:])
            self._directed = (indptr, np.ascontiguousarray(dst[order]), np.ascontiguousarray(wts[order]))
        return self._directed

    def restrict(self, atoms) -> tuple["PairTable", np.ndarray]:
        """Renumber the pairs onto the local index space of ``atoms`` (sorted, containing every touched atom).

        Returns the local table and ``atoms`` as int64. Used to evaluate a chunk on the blocks it touches.
        """
        atoms = np.asarray(atoms, dtype=np.int64)
        lj = np.searchsorted(atoms, self.j)
        lk = np.searchsorted(atoms, self.k)
        n = atoms.shape[0]
        if n < 2 or (lj >= n).any() or (lk >= n).any() or (atoms[np.minimum(lj, n - 1)] != self.j).any() \
                or (atoms[np.minimum(lk, n - 1)] != self.k).any():
            raise InvalidArgumentError("restrict: atoms must be sorted and contain every atom the pairs touch")
        return PairTable(lj, lk, self.w, n, _trusted=True), atoms

    # ------------------------------------------------------------------ chunking
    def pair_costs(self, block_sizes=None, p_out: int = 1) -> np.ndarray:
        """Cost of every pair, ``M_j·M_k·p_out`` (1·1·p_out when ``block_sizes`` is None)."""
        if block_sizes is None:
            return np.full(len(self), float(p_out))
        sizes = check_int_array(block_sizes, "block_sizes")
        if sizes.shape[0] != self.k_atoms:
            raise ShapeMismatchError(
                f"block_sizes has {sizes.shape[0]} atoms but the pairs index k_atoms = {self.k_atoms}"
            )
        return sizes[self.j].astype(np.float64) * sizes[self.k] * float(p_out)

    def chunk_bounds(self, max_cost: float | None = None, *, block_sizes=None, p_out: int = 1,
                     n_chunks: int | None = None) -> list[tuple[int, int]]:
        """Split the sorted table into contiguous ``[start, stop)`` ranges of balanced cost.

        Give either ``max_cost`` (each chunk costs at most that much, unless one pair alone
        costs more) or ``n_chunks`` (that many chunks of near-equal cost).
        """
        n = len(self)
        if (max_cost is None) == (n_chunks is None):
            raise InvalidArgumentError("pass exactly one of max_cost or n_chunks")
        if n == 0:
            return []
        cost = np.cumsum(self.pair_costs(block_sizes, p_out))
        total = float(cost[-1])
        if n_chunks is not None:
            n_chunks = min(check_positive_int(n_chunks, "n_chunks"), n)
            targets = total * np.arange(1, n_chunks) / n_chunks
            cuts = np.searchsorted(cost, targets, side="left") + 1
        else:
            if not (max_cost > 0):
                raise InvalidArgumentError(f"max_cost must be > 0, got {max_cost!r}")
            cuts = []
            start = 0
            base = 0.0
            while start < n:
                stop = int(np.searchsorted(cost, base + max_cost, side="right"))
                stop = max(stop, start + 1)
                cuts.append(stop)
                base = float(cost[stop - 1])
                start = stop
            cuts = np.asarray(cuts[:-1], dtype=np.int64)
        edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n - 1) if n > 1 else [], [n]]).astype(np.int64))
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def chunks(self, max_cost: float | None = None, *, block_sizes=None, p_out: int = 1,
               n_chunks: int | None = None) -> list["PairTable"]:
        """Contiguous sub-tables of balanced cost (see :meth:`chunk_bounds`).

        Examples
        --------
        >>> pt = PairTable([0, 0, 1, 2], [1, 2, 3, 3], [1.0] * 4, k_atoms=4)
        >>> [len(c) for c in pt.chunks(2)]
        [2, 2]
        """
        return [self[a:b] for a, b in self.chunk_bounds(max_cost, block_sizes=block_sizes,
                                                         p_out=p_out, n_chunks=n_chunks)]

    # ------------------------------------------------------------------ Zarr I/O
    def save(self, path, *, overwrite: bool = True, chunk: int = _ZARR_CHUNK):
        """Write the table to a Zarr group at ``path`` (arrays ``j``, ``k``, ``w``; JSON attributes)."""
        import zarr

        group = zarr.open_group(str(path) if not hasattr(path, "store") else path,
                                mode="w" if overwrite else "w-")
        n = len(self)
        c = max(1, min(chunk, n))
        for name, arr in (("j", self.j), ("k", self.k), ("w", self.w)):
            z = group.create_array(name, shape=(n,), chunks=(c,), dtype=arr.dtype, fill_value=0)
            if n:
                z[:] = arr
        group.attrs.update({"format": _FORMAT, "format_version": _FORMAT_VERSION,
                            "k_atoms": self.k_atoms, "n_pairs": n})
        return group

    @classmethod
    def open(cls, path, *, validate: bool = True) -> "PairTable":
        """Read a table written by :meth:`save`."""
        import zarr

        from .errors import StoreCorruptError

        try:
            group = zarr.open_group(str(path) if not hasattr(path, "store") else path, mode="r")
        except FileNotFoundError:
            raise InvalidArgumentError(f"no PairTable store at {path!r}") from None
        attrs = dict(group.attrs)
        if attrs.get("format") != _FORMAT:
            raise StoreCorruptError(f"{path!r} is not a PairTable store (format={attrs.get('format')!r})")
        j, k, w = (np.asarray(group[name][:]) for name in ("j", "k", "w"))
        if not (len(j) == len(k) == len(w) == attrs["n_pairs"]):
            raise StoreCorruptError(f"PairTable store {path!r} is truncated: lengths {len(j)}, {len(k)}, {len(w)}, "
                                    f"expected {attrs['n_pairs']}")
        if validate:
            return cls(j, k, w, attrs["k_atoms"])
        return cls(j.astype(np.int64), k.astype(np.int64), w.astype(np.float64), attrs["k_atoms"], _trusted=True)


    def to_parquet(self, path, *, measure: str | None = None) -> None:
        """Write the table as Parquet (pyarrow): int64 columns ``j``, ``k``, float64 ``w`` and, with
        ``measure``, a copy of ``w`` under that name; ``k_atoms`` in the schema metadata.

        pandas, polars, DuckDB and networkx read it directly.

        Examples
        --------
        >>> PairTable([0, 1], [1, 2], [0.5, 0.25], 3).to_parquet("pairs.parquet", measure="jaccard")  # doctest: +SKIP
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"j": pa.array(self.j, pa.int64()), "k": pa.array(self.k, pa.int64()), "w": pa.array(self.w, pa.float64())}
        if measure is not None:
            if not isinstance(measure, str) or measure in ("j", "k", "w") or not measure:
                raise InvalidArgumentError(f"measure must be a column name other than j, k and w, got {measure!r}")
            cols[measure] = cols["w"]
        meta = {b"distpen.format": _FORMAT.encode(), b"distpen.k_atoms": str(self.k_atoms).encode()}
        if measure is not None:
            meta[b"distpen.measure"] = measure.encode()
        pq.write_table(pa.table(cols).replace_schema_metadata(meta), str(path))

    @classmethod
    def from_parquet(cls, path, *, k_atoms: int | None = None, weight: str = "w") -> "PairTable":
        """Read pairs from Parquet: columns ``j``, ``k`` and ``weight`` (any order of rows; validated).

        ``k_atoms`` defaults to the value :meth:`to_parquet` stored; a file written by another tool
        needs it passed.
        """
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(path))
        except (FileNotFoundError, OSError) as exc:
            raise InvalidArgumentError(f"cannot read pairs from Parquet file {str(path)!r}: {exc}") from None
        missing = [c for c in ("j", "k", weight) if c not in table.column_names]
        if missing:
            raise InvalidArgumentError(f"Parquet file {str(path)!r} has columns {table.column_names}, "
                                       f"missing {missing}; expected j, k and {weight!r}")
        meta = table.schema.metadata or {}
        if k_atoms is None:
            if b"distpen.k_atoms" not in meta:
                raise InvalidArgumentError(f"Parquet file {str(path)!r} does not record k_atoms (not written by "
                                           "PairTable.to_parquet); pass k_atoms=")
            k_atoms = int(meta[b"distpen.k_atoms"])
        col = {name: table.column(name).to_numpy() for name in ("j", "k", weight)}
        return cls(col["j"], col["k"], col[weight], k_atoms)

    def to_networkx(self):
        """An undirected ``networkx.Graph`` over atoms ``0 … k_atoms − 1`` with edge attribute ``weight``."""
        try:
            import networkx as nx
        except ImportError:
            raise InvalidArgumentError("PairTable.to_networkx needs networkx: pip install networkx") from None
        g = nx.Graph()
        g.add_nodes_from(range(self.k_atoms))
        g.add_weighted_edges_from(zip(self.j.tolist(), self.k.tolist(), self.w.tolist()))
        return g


def _validate_pairs(j, k, w, k_atoms: int):
    j = check_int_array(j, "pairs j")
    k = check_int_array(k, "pairs k")
    w = check_float64_array(w, "pairs w", ndim=1).copy()
    if not (j.shape == k.shape == w.shape):
        raise ShapeMismatchError(
            f"pairs j, k and w must have the same length, got {j.shape[0]}, {k.shape[0]}, {w.shape[0]}"
        )
    if j.size:
        bad = (j < 0) | (j >= k_atoms) | (k < 0) | (k >= k_atoms)
        if bad.any():
            q = int(np.flatnonzero(bad)[0])
            raise PairTableError(
                f"pair {q} = ({j[q]}, {k[q]}) is out of range; atom indices must be in [0, {k_atoms})"
            )
        bad = j >= k
        if bad.any():
            q = int(np.flatnonzero(bad)[0])
            raise PairTableError(
                f"pair {q} = ({j[q]}, {k[q]}) has j ≥ k; list each pair once with j < k "
                "(PairTable.from_dense symmetrises a full matrix)"
            )
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            q = int(np.flatnonzero(bad)[0])
            raise PairTableError(
                f"pair {q} = ({j[q]}, {k[q]}) has weight {float(w[q])}; weights must be finite and ≥ 0"
            )
    keep = w > 0
    if not keep.all():
        j, k, w = j[keep], k[keep], w[keep]
    order = np.lexsort((k, j))
    j, k, w = j[order], k[order], w[order]
    if j.size > 1:
        dup = (j[1:] == j[:-1]) & (k[1:] == k[:-1])
        if dup.any():
            q = int(np.flatnonzero(dup)[0])
            raise PairTableError(f"pair ({j[q]}, {k[q]}) appears more than once; merge duplicates before building the table")
    return np.ascontiguousarray(j), np.ascontiguousarray(k), np.ascontiguousarray(w)
