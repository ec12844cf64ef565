"""Per-chunk kernels of the co-activation statistics (pure functions of numpy arrays, no Dask).

A *row chunk* is a block of consecutive tokens; a *tile* ``(I, J)`` is a block of atom rows
``[i0, i1)`` × atom columns ``[j0, j1)`` of the ``K × K`` statistics with ``I ≤ J``. For one row
chunk and one tile the kernels add into two accumulators of shape ``(T, T)`` (``T`` = tile size):

``acc_sum[a - i0, b - j0]  += Σ_rows g_a · g_b``      (float64)
``acc_cnt[a - i0, b - j0]  += #{rows: g_a > 0 and g_b > 0}``   (int64)

On a diagonal tile (``I == J``) only the upper triangle including the diagonal is accumulated
(``a ≤ b``); the diagonal holds ``Σ g_a²`` and the firing count. Callers symmetrise when writing.

Two routes, chosen per (row chunk, tile) from the data by :func:`choose_route`:

* ``"blas"``: float64 GEMM ``G_Iᵀ G_J`` (SYRK on diagonal tiles) for the sums, and a float32
  GEMM/SYRK of the 0/1 firing indicators for the counts (exact while a chunk has ≤ 2²⁴ rows).
* ``"scatter"``: each row's non-zero gates as a sorted sparse row (CSR), and every in-tile pair
  product scattered into the accumulators by a compiled loop (:func:`scatter_group`, atom-major so
  that the updates for one atom stay in one cached row). Top-k gates always take this route.

Every kernel is sequential with a fixed loop order and no fast-math, so a given row chunking and
reduction tree give bit-identical sums. Invalid data (NaN, ±inf, negative gate, repeated or
out-of-range top-k index) raises :class:`~distpen.errors.GateDataError` naming the row and atom.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .errors import GateDataError

__all__ = [
    "MAX_BLAS_ROWS",
    "BadGate",
    "dense_scan",
    "dense_to_csr",
    "topk_block_csr",
    "scatter_pairs",
    "scatter_group",
    "dense_scan_blocks",
    "csr_vector_stats",
    "dense_vector_stats",
    "blas_tile",
    "choose_route",
    "new_partial",
    "combine_partials",
    "symmetrise_diag",
]

_OPTS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")

#: the float32 count GEMM is exact while a row chunk holds at most 2**24 rows
MAX_BLAS_ROWS = 1 << 24

# error codes returned by the compiled scanners
_OK, _NAN, _INF, _NEG, _RANGE, _REPEAT = 0, 1, 2, 3, 4, 5
_WHAT = {
    _NAN: "is NaN",
    _INF: "is infinite",
    _NEG: "is negative",
    _RANGE: "is an atom index outside [-1, k_atoms)",
    _REPEAT: "is repeated within the row",
}

# cost model of choose_route (seconds per unit, measured on one core; only the ratios matter)
_COST_SCATTER_PAIR = 4.0e-9   # one pair product scattered into two cache-resident accumulators
_CACHE_BYTES = 4 * 2**20      # accumulators larger than this miss the cache on most scatters ...
_CACHE_EXPONENT = 0.35        # ... costing (bytes / _CACHE_BYTES) ** _CACHE_EXPONENT times more
_COST_SCATTER_NNZ = 3.0e-9    # building one CSR entry
_COST_BLAS_MAC = 0.13e-9      # one multiply-add of the float64 GEMM plus one of the float32 count GEMM
_COST_BLAS_ENTRY = 1.0e-9     # converting one gate to float64 + float32 indicator


class BadGate:
    """Description of the first invalid entry a scanner found (row and atom are global)."""

    __slots__ = ("code", "row", "atom", "value")

    def __init__(self, code, row, atom, value):
        self.code, self.row, self.atom, self.value = int(code), int(row), int(atom), value

    def error(self, rows: tuple[int, int], what: str = "gate") -> GateDataError:
        r0, r1 = rows
        return GateDataError(
            f"{what} at row {self.row}, atom {self.atom} {_WHAT[self.code]} (value {self.value!r}; "
            f"row chunk [{r0}, {r1})); gates must be finite and ≥ 0, top-k indices in [-1, k_atoms) "
            "and not repeated within a row"
        )


# ----------------------------------------------------------------------------- dense gates
def dense_scan(x: np.ndarray, row0: int = 0, col0: int = 0, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a dense gate block and count its non-zeros per row.

    Parameters
    ----------
    x : array of shape (n_rows, n_cols), float32 or float64
        Gates of rows ``row0 + [0, n_rows)`` and atoms ``col0 + [0, n_cols)``.
    row0, col0 : int
        Global position of ``x[0, 0]`` (used in error messages only).
    rows : (int, int), optional
        The row chunk to name in an error (defaults to the block's rows).

    Returns
    -------
    nnz : array of shape (n_rows,), int64
        Number of non-zero gates of each row.

    Raises
    ------
    GateDataError
        On the first NaN, ±inf or negative gate, naming its row and atom.
    """
    if x.size == 0:
        return np.zeros(x.shape[0], dtype=np.int64)
    nnz = np.zeros((x.shape[0], 1), dtype=np.int64)  # one block spanning every column
    code, r, c = _dense_scan_blocks(x, x.shape[1], nnz)
    if code != _OK:
        raise BadGate(code, row0 + r, col0 + c, float(x[r, c])).error(rows or (row0, row0 + x.shape[0]))
    return nnz[:, 0]


@njit(**_OPTS)
def _dense_to_csr(x, col0, indptr, cols, vals):
    rows, ncol = x.shape
    p = 0
    for r in range(rows):
        for c in range(ncol):
            v = x[r, c]
            if v != 0.0:
                cols[p] = col0 + c
                vals[p] = v
                p += 1
        indptr[r + 1] = p


def dense_to_csr(x: np.ndarray, col0: int, nnz_rows: np.ndarray):
    """Sparse rows of a (validated) dense block.

    Parameters
    ----------
    x : array of shape (n_rows, n_cols)
    col0 : int
        Global atom index of column 0 (stored column indices are global).
    nnz_rows : array of shape (n_rows,), int64
        Non-zeros per row, as returned by :func:`dense_scan`.

    Returns
    -------
    indptr : array of shape (n_rows + 1,), int64
    cols : array of shape (nnz,), int64, sorted within each row
    vals : array of shape (nnz,), float64
    """
    indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
    total = int(nnz_rows.sum())
    cols = np.empty(total, dtype=np.int64)
    vals = np.empty(total, dtype=np.float64)
    if total:
        _dense_to_csr(x, col0, indptr, cols, vals)
    return indptr, cols, vals


def dense_vector_stats(x: np.ndarray, fire: np.ndarray, gsum: np.ndarray, gsq: np.ndarray) -> None:
    """Add a block's per-atom firing count, gate sum and squared-gate sum (in place, float64/int64).

    ``x`` has shape (n_rows, n); ``fire``, ``gsum``, ``gsq`` have shape (≥ n,).
    """
    n = x.shape[1]
    x64 = x.astype(np.float64, copy=False)
    fire[:n] += np.count_nonzero(x, axis=0)
    gsum[:n] += x64.sum(axis=0)
    gsq[:n] += np.einsum("ij,ij->j", x64, x64)


# ----------------------------------------------------------------------------- top-k gates
@njit(**_OPTS)
def _topk_sorted_csr(si, sv, lo, hi, k_atoms, indptr, cols, vals):
    """``si``/``sv``: each row's indices sorted ascending with their values."""
    rows, k = si.shape
    p = 0
    for r in range(rows):
        prev = -2
        for s in range(k):
            a = si[r, s]
            if a < -1 or a >= k_atoms:
                return _RANGE, r, a, p
            if a == -1:
                continue
            v = sv[r, s]
            if v == 0.0 or a < lo or a >= hi:
                continue
            if v != v:
                return _NAN, r, a, p
            if v < 0.0:
                return _NEG, r, a, p
            if v == np.inf:
                return _INF, r, a, p
            if a == prev:
                return _REPEAT, r, a, p
            prev = a
            cols[p] = a
            vals[p] = v
            p += 1
        indptr[r + 1] = p
    return _OK, -1, -1, p


def topk_block_csr(idx: np.ndarray, val: np.ndarray, lo: int, hi: int, k_atoms: int, row0: int = 0,
                   rows: tuple[int, int] | None = None):
    """Sparse rows of the top-k entries whose atom lies in ``[lo, hi)``, sorted by atom.

    Empty slots (index −1 or value 0) are skipped. Every slot's index is range-checked, whether or
    not it falls in ``[lo, hi)``; values and repeats are checked for the selected atoms.

    Parameters
    ----------
    idx : array of shape (n_rows, k), integer
    val : array of shape (n_rows, k), float32 or float64
    lo, hi : int
        Atom range to select.
    k_atoms : int
    row0 : int
        Global index of row 0 (for error messages).

    Returns
    -------
    indptr : array of shape (n_rows + 1,), int64
    cols : array of shape (nnz,), int64
    vals : array of shape (nnz,), float64

    Raises
    ------
    GateDataError
        On an index outside ``[-1, k_atoms)``, a NaN/inf/negative value or a repeated index.
    """
    n, k = idx.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    if idx.size == 0:
        return indptr, np.zeros(0, dtype=np.int64), np.zeros(0)
    # sort each row by atom: packed keys (index in the high bits, slot in the low bits), one sort
    shift = max(1, int(k - 1).bit_length())
    key = (idx.astype(np.int64) << shift) | np.arange(k, dtype=np.int64)[None, :]
    key.sort(axis=1)
    si = key >> shift
    sv = np.take_along_axis(val, key & ((1 << shift) - 1), axis=1)
    cols = np.empty(idx.size, dtype=np.int64)
    vals = np.empty(idx.size, dtype=np.float64)
    code, r, a, p = _topk_sorted_csr(si, sv, lo, hi, k_atoms, indptr, cols, vals)
    if code != _OK:
        what = "top-k index" if code == _RANGE else "top-k gate"
        if code in (_RANGE, _REPEAT):
            value = int(a)
        else:
            value = float(sv[r][si[r] == a][0])
        raise BadGate(code, row0 + r, int(a), value).error(rows or (row0, row0 + n), what)
    return indptr, cols[:p], vals[:p]


# ----------------------------------------------------------------------------- scatter route
@njit(**_OPTS)
def _lower_bound(a, lo, hi, x):
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_OPTS)
def _scatter_pairs(ipa, ca, va, ipb, cb, vb, i0, i1, j0, j1, diag, acc_sum, acc_cnt):
    rows = ipa.shape[0] - 1
    for r in range(rows):
        a_lo = _lower_bound(ca, ipa[r], ipa[r + 1], i0)
        a_hi = _lower_bound(ca, a_lo, ipa[r + 1], i1)
        if a_lo == a_hi:
            continue
        if diag:
            for p in range(a_lo, a_hi):
                ap = ca[p] - i0
                xp = va[p]
                for q in range(p, a_hi):
                    bq = ca[q] - i0
                    acc_sum[ap, bq] += xp * va[q]
                    acc_cnt[ap, bq] += 1
        else:
            b_lo = _lower_bound(cb, ipb[r], ipb[r + 1], j0)
            b_hi = _lower_bound(cb, b_lo, ipb[r + 1], j1)
            if b_lo == b_hi:
                continue
            for p in range(a_lo, a_hi):
                ap = ca[p] - i0
                xp = va[p]
                for q in range(b_lo, b_hi):
                    bq = cb[q] - j0
                    acc_sum[ap, bq] += xp * vb[q]
                    acc_cnt[ap, bq] += 1


def scatter_pairs(csr_a, csr_b, i0: int, i1: int, j0: int, j1: int, diag: bool,
                  acc_sum: np.ndarray, acc_cnt: np.ndarray) -> None:
    """Scatter every in-tile pair product of a row chunk into the tile accumulators.

    Parameters
    ----------
    csr_a, csr_b : (indptr, cols, vals)
        Sparse rows (global, sorted atom indices; positive values) holding at least the atoms of
        ``[i0, i1)`` and ``[j0, j1)`` respectively; both describe the same rows.
    i0, i1, j0, j1 : int
        The tile's atom ranges.
    diag : bool
        True on a diagonal tile (``[i0, i1) == [j0, j1)``): accumulate ``a ≤ b`` only.
    acc_sum : array of shape (≥ i1 - i0, ≥ j1 - j0), float64
    acc_cnt : array of the same shape, int64
    """
    _scatter_pairs(csr_a[0], csr_a[1], csr_a[2], csr_b[0], csr_b[1], csr_b[2],
                   i0, i1, j0, j1, bool(diag), acc_sum, acc_cnt)


@njit(**_OPTS)
def _scatter_group(indptr, cols, vals, lo, T, slot_of, acc_sum, acc_cnt):
    rows = indptr.shape[0] - 1
    nnz = indptr[rows]
    n_blocks = slot_of.shape[0]
    span = n_blocks * T
    # column-major view of the chunk (counting sort by atom, stable in row order)
    start = np.zeros(span + 1, dtype=np.int64)
    for p in range(nnz):
        start[cols[p] - lo + 1] += 1
    for a in range(span):
        start[a + 1] += start[a]
    fill = start[:-1].copy()
    pos = np.empty(nnz, dtype=np.int64)
    row_of = np.empty(nnz, dtype=np.int64)
    for r in range(rows):
        for p in range(indptr[r], indptr[r + 1]):
            a = cols[p] - lo
            e = fill[a]
            pos[e] = p
            row_of[e] = r
            fill[a] = e + 1
    row_used = np.zeros(n_blocks, dtype=np.bool_)
    for I in range(n_blocks):
        for J in range(n_blocks):
            if slot_of[I, J] >= 0:
                row_used[I] = True
    # atom-major accumulation: atom a only touches row a of its tiles, which stays in cache
    for a in range(span):
        I = a // T
        if not row_used[I]:
            continue
        ai = a - I * T
        for e in range(start[a], start[a + 1]):
            p = pos[e]
            r = row_of[e]
            xa = vals[p]
            for q in range(p, indptr[r + 1]):  # the row's atoms b ≥ a (sorted)
                b = cols[q] - lo
                J = b // T
                s = slot_of[I, J]
                if s < 0:
                    continue
                bj = b - J * T
                acc_sum[s, ai, bj] += xa * vals[q]
                acc_cnt[s, ai, bj] += 1


def scatter_group(csr, lo: int, tile: int, n_blocks: int, tiles, slots, acc_sum: np.ndarray,
                  acc_cnt: np.ndarray) -> None:
    """Scatter the pair products of several tiles from one sparse row chunk (the scatter route).

    Parameters
    ----------
    csr : (indptr, cols, vals)
        Sparse rows over the atom span ``[lo, lo + n_blocks·tile)`` (global, sorted atom ids,
        positive values).
    lo : int
        First atom of the span (a multiple of ``tile``).
    tile : int
        Tile size ``T``.
    n_blocks : int
        Blocks in the span.
    tiles : sequence of (I, J)
        Tiles to accumulate, as block indices *local to the span* (``I ≤ J``).
    slots : sequence of int
        For each tile, its index along the first axis of the accumulators.
    acc_sum : array of shape (n_slots, T, T), float64
    acc_cnt : array of shape (n_slots, T, T), int64

    Notes
    -----
    Gustavson order: the chunk is transposed (counting sort by atom) and the pairs are generated
    atom by atom, so that all updates for atom ``a`` land in row ``a`` of its tiles, which stays in
    cache. Each accumulator entry still receives its contributions in row (token) order.
    """
    if not len(tiles):
        return
    slot_of = np.full((int(n_blocks), int(n_blocks)), -1, dtype=np.int64)
    for (i, j), s in zip(tiles, slots):
        slot_of[i, j] = s
    _scatter_group(csr[0], csr[1], csr[2], int(lo), int(tile), slot_of, acc_sum, acc_cnt)


@njit(**_OPTS)
def _dense_scan_blocks(x, T, out_nnz):
    rows, cols = x.shape
    for r in range(rows):
        for c in range(cols):
            v = x[r, c]
            if v != 0.0:
                if v != v:
                    return _NAN, r, c
                if v < 0.0:
                    return _NEG, r, c
                if v == np.inf:
                    return _INF, r, c
                out_nnz[r, c // T] += 1
    return _OK, -1, -1


def dense_scan_blocks(x: np.ndarray, tile: int, row0: int = 0, col0: int = 0,
                      rows: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a dense block and count its non-zeros per row and per block of ``tile`` columns.

    Returns
    -------
    nnz : array of shape (n_rows, ceil(n_cols / tile)), int64

    Raises
    ------
    GateDataError
        On the first NaN, ±inf or negative gate, naming its row and atom.
    """
    nnz = np.zeros((x.shape[0], max(1, -(-x.shape[1] // tile))), dtype=np.int64)
    if x.size == 0:
        return nnz
    code, r, c = _dense_scan_blocks(x, tile, nnz)
    if code != _OK:
        raise BadGate(code, row0 + r, col0 + c, float(x[r, c])).error(rows or (row0, row0 + x.shape[0]))
    return nnz


@njit(**_OPTS)
def _csr_vector_stats(ip, c, v, c0, c1, fire, gsum, gsq):
    rows = ip.shape[0] - 1
    for r in range(rows):
        lo = _lower_bound(c, ip[r], ip[r + 1], c0)
        hi = _lower_bound(c, lo, ip[r + 1], c1)
        for p in range(lo, hi):
            a = c[p] - c0
            x = v[p]
            fire[a] += 1
            gsum[a] += x
            gsq[a] += x * x


def csr_vector_stats(csr, c0: int, c1: int, fire: np.ndarray, gsum: np.ndarray, gsq: np.ndarray) -> None:
    """Add the per-atom firing count, gate sum and squared sum of atoms ``[c0, c1)`` (in place)."""
    _csr_vector_stats(csr[0], csr[1], csr[2], c0, c1, fire, gsum, gsq)


# ----------------------------------------------------------------------------- BLAS route
def blas_tile(x_i64: np.ndarray, f_i32: np.ndarray, x_j64: np.ndarray | None, f_j32: np.ndarray | None,
              acc_sum: np.ndarray, acc_cnt: np.ndarray) -> None:
    """Add ``G_Iᵀ G_J`` and the firing-indicator product to the accumulators by BLAS.

    Parameters
    ----------
    x_i64 : array of shape (n_rows, n_i), float64, C-contiguous
    f_i32 : array of shape (n_rows, n_i), float32 0/1 firing indicators
    x_j64, f_j32 : the same for the columns ``J``, or None on a diagonal tile (SYRK, upper triangle)
    acc_sum : array of shape (≥ n_i, ≥ n_j), float64
    acc_cnt : array of the same shape, int64

    Notes
    -----
    Counts are exact: the float32 products sum 0/1 values over at most ``MAX_BLAS_ROWS`` rows.
    Call inside ``threadpoolctl.threadpool_limits(1)`` for reproducible sums.
    """
    from scipy.linalg import blas

    n_rows, n_i = x_i64.shape
    if n_rows > MAX_BLAS_ROWS:  # pragma: no cover - guarded by the planner
        raise ValueError(f"blas_tile takes at most {MAX_BLAS_ROWS} rows, got {n_rows}")
    if n_rows == 0:
        return
    if x_j64 is None:
        s = blas.dsyrk(1.0, x_i64.T, trans=0, lower=0)
        c = blas.ssyrk(1.0, f_i32.T, trans=0, lower=0)
        iu = np.triu_indices(n_i)
        acc_sum[:n_i, :n_i][iu] += s[iu]
        acc_cnt[:n_i, :n_i][iu] += np.rint(c[iu]).astype(np.int64)
    else:
        n_j = x_j64.shape[1]
        acc_sum[:n_i, :n_j] += x_i64.T @ x_j64
        acc_cnt[:n_i, :n_j] += np.rint(f_i32.T @ f_j32).astype(np.int64)


def choose_route(nnz_i: np.ndarray, nnz_j: np.ndarray | None, n_i: int, n_j: int) -> str:
    """Pick ``"scatter"`` or ``"blas"`` for one (row chunk, tile) from its measured sparsity.

    Parameters
    ----------
    nnz_i : array of shape (n_rows,)
        Non-zeros of each row among the tile's row atoms.
    nnz_j : array of shape (n_rows,) or None
        The same among its column atoms; None on a diagonal tile.
    n_i, n_j : int
        The tile's width in atoms.

    Returns
    -------
    str
        The route with the lower modelled cost: scattering costs per pair product present in the
        chunk (``Σ_rows nnz_I·nnz_J``, halved on the diagonal; dearer when the accumulators
        outgrow the cache), BLAS per multiply-add
        (``n_rows·n_i·n_j``, halved on the diagonal). Chunks above ``MAX_BLAS_ROWS`` rows scatter.
    """
    n_rows = nnz_i.shape[0]
    if n_rows == 0:
        return "scatter"
    if n_rows > MAX_BLAS_ROWS:
        return "scatter"
    if nnz_j is None:
        ni = nnz_i.astype(np.float64)
        pairs = float(np.dot(ni, ni + 1.0)) * 0.5
        macs = n_rows * n_i * (n_i + 1) * 0.5
        nnz = float(ni.sum())
        entries = n_rows * n_i
    else:
        pairs = float(np.dot(nnz_i.astype(np.float64), nnz_j.astype(np.float64)))
        macs = float(n_rows) * n_i * n_j
        nnz = float(nnz_i.sum() + nnz_j.sum())
        entries = n_rows * (n_i + n_j)
    acc_bytes = 16.0 * n_i * (n_i if nnz_j is None else n_j)
    per_pair = _COST_SCATTER_PAIR * max(1.0, acc_bytes / _CACHE_BYTES) ** _CACHE_EXPONENT
    scatter = pairs * per_pair + nnz * _COST_SCATTER_NNZ
    gemm = macs * _COST_BLAS_MAC + entries * _COST_BLAS_ENTRY
    return "scatter" if scatter <= gemm else "blas"


# ----------------------------------------------------------------------------- partials
def new_partial(n_tiles: int, tile: int, n_diag: int) -> dict:
    """A zero partial: ``rows``; ``sum``/``cnt`` of shape (n_tiles, T, T); ``fire``/``gsum``/``gsq``
    of shape (n_diag, T)."""
    return {
        "rows": 0,
        "sum": np.zeros((n_tiles, tile, tile), dtype=np.float64),
        "cnt": np.zeros((n_tiles, tile, tile), dtype=np.int64),
        "fire": np.zeros((n_diag, tile), dtype=np.int64),
        "gsum": np.zeros((n_diag, tile), dtype=np.float64),
        "gsq": np.zeros((n_diag, tile), dtype=np.float64),
    }


def combine_partials(parts) -> dict:
    """Sum partials key by key, in list order, into a new partial (inputs are not modified).

    ``parts`` is a list of partials (or a single partial, returned as is). Every key holds a
    number or an array of a fixed shape, so the sum is associative and never concatenates.
    """
    if isinstance(parts, dict):
        return parts
    parts = list(parts)
    out = {name: (v.copy() if isinstance(v, np.ndarray) else v) for name, v in parts[0].items()}
    for p in parts[1:]:
        for name in out:
            if isinstance(out[name], np.ndarray):
                out[name] += p[name]
            else:
                out[name] = out[name] + p[name]
    return out


def symmetrise_diag(upper: np.ndarray) -> np.ndarray:
    """Full symmetric block from an upper-triangular (diagonal included) accumulator."""
    full = np.triu(upper)
    full = full + np.triu(full, 1).T
    return full
