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
  product scattered into the accumulators by a compiled loop (:func:`scatter_group`: the products
  are first bucketed by their row atom, reading the chunk sequentially, then added atom by atom so
  that the updates for one atom stay in one cached row). Top-k gates always take this route. Every
  accumulator entry receives its products in token order, so the scatter route's sums do not
  depend on the row chunking at all.

Every kernel is sequential with a fixed loop order and no fast-math, so a given row chunking and
reduction tree give bit-identical sums. Invalid data (NaN, ±inf, negative gate, repeated or
out-of-range top-k index) raises :class:`~distpen.errors.GateDataError` naming the row and atom.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._alloc import carve, carve_bytes, zeros
from .._intrinsics import popcount, prefetch
from ..errors import GateDataError

__all__ = [
    "BadGate",
    "dense_scan",
    "dense_to_csr",
    "topk_block_csr",
    "sparse_block_csr",
    "threshold_args",
    "dense_threshold",
    "dense_row_max",
    "scatter_pairs",
    "scatter_group",
    "ScatterWorkspace",
    "dense_scan_blocks",
    "dense_scan_stats",
    "csr_vector_stats",
    "dense_vector_stats",
    "blas_tile",
    "fire_bits",
    "popcount_gram",
    "choose_route",
    "new_partial",
    "combine_partials",
    "symmetrise_diag",
]

_OPTS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


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
_COST_BLAS_MAC = 0.09e-9      # one multiply-add of the float64 GEMM (plus 1/36 of it: the popcount counts)
_COST_BLAS_ENTRY = 0.7e-9     # converting one gate to float64 and packing its firing bit


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


def _dense_error(code, r, c, x, row0, col0, rows) -> GateDataError:
    """The error for the bad gate ``x[r, c]`` a dense scan stopped at (``rows``: the row chunk)."""
    return BadGate(code, row0 + r, col0 + c, float(x[r, c])).error(rows or (row0, row0 + x.shape[0]))


def _block_counts(x: np.ndarray, tile: int) -> np.ndarray:
    """Zero non-zero counts per row and block of ``tile`` columns of ``x``."""
    return np.zeros((x.shape[0], max(1, -(-x.shape[1] // tile))), dtype=np.int64)


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
        raise _dense_error(code, r, c, x, row0, col0, rows)
    return nnz[:, 0]


def csr_dtypes(k_atoms: int, gate_dtype) -> tuple:
    """Column and value dtypes of sparse rows: int32 atom ids while they fit, and the gates' own
    float dtype (float32 gates stay float32: every kernel multiplies in float64, where the product
    of two float32 numbers is exact, so the bits of the sums do not depend on this choice)."""
    cols = np.int32 if int(k_atoms) <= np.iinfo(np.int32).max else np.int64
    vals = np.float32 if np.dtype(gate_dtype) == np.float32 else np.float64
    return cols, vals


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
    cols : array of shape (nnz,), int32 (int64 past 2³¹ atoms), sorted within each row
    vals : array of shape (nnz,), the gates' dtype (float32 or float64; see :func:`csr_dtypes`)
    """
    indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
    total = int(nnz_rows.sum())
    cdt, vdt = csr_dtypes(col0 + x.shape[1], x.dtype)
    cols = np.empty(total, dtype=cdt)
    vals = np.empty(total, dtype=vdt)
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
#: firing-threshold modes of the kernels that build sparse rows (see :func:`threshold_args`)
THR_SCALAR, THR_PER_ATOM, THR_RELATIVE = 0, 1, 2
#: the default threshold: a gate fires when it is > 0
NO_THRESHOLD = (THR_SCALAR, 0.0, np.zeros(1))


def threshold_args(threshold) -> tuple:
    """``(mode, value, vector)`` of a firing threshold for the kernels (None: the default, > 0).

    ``threshold`` is ``("scalar", t)``, ``("per_atom", array of shape (K,))`` or
    ``("relative", rho)``; a gate ``g`` of atom ``a`` on row ``r`` fires when ``g > t``,
    ``g > vector[a]`` or ``g > rho · max_b g[r, b]`` respectively.
    """
    if threshold is None:
        return NO_THRESHOLD
    kind, arg = threshold
    if kind == "scalar":
        return THR_SCALAR, float(arg), np.zeros(1)
    if kind == "per_atom":
        return THR_PER_ATOM, 0.0, np.ascontiguousarray(arg, dtype=np.float64)
    if kind == "relative":
        return THR_RELATIVE, float(arg), np.zeros(1)
    raise ValueError(f"unknown threshold kind {kind!r}")


def is_default_threshold(thr: tuple) -> bool:
    return thr[0] == THR_SCALAR and thr[1] == 0.0


@njit(**_OPTS)
def _cut(mode, value, vec, a, row_max):
    """The threshold a gate of atom ``a`` must exceed on a row whose largest gate is ``row_max``."""
    if mode == THR_PER_ATOM:
        return vec[a]
    if mode == THR_RELATIVE:
        return value * row_max
    return value


@njit(**_OPTS)
def _topk_row_error(idx, val, r, lo, hi, k_atoms):
    """The first problem of row ``r`` in slot order, as :func:`_topk_rows_csr` reports it:
    ``(code, atom, value)``, or ``(_OK, …)`` when the row is valid. Only run on a row the fast
    pass flagged, so it may take its time: it replays the checks slot by slot, with the sorted
    insertion that finds a repeated atom where it first appears twice."""
    k = idx.shape[1]
    ti = np.empty(k, dtype=np.int64)
    m = 0
    for s in range(k):
        a = np.int64(idx[r, s])
        if a < -1 or a >= k_atoms:
            return _RANGE, a, 0.0
        if a == -1:
            continue
        v = np.float64(val[r, s])
        if v == 0.0 or a < lo or a >= hi:
            continue
        code = _gate_code(v)
        if code != _OK:
            return code, a, v
        t = m
        while t > 0 and ti[t - 1] > a:
            ti[t] = ti[t - 1]
            t -= 1
        if t > 0 and ti[t - 1] == a:
            return _REPEAT, a, v
        ti[t] = a
        m += 1
    return _OK, -1, 0.0


@njit(**_OPTS)
def _topk_rows_csr(idx, val, lo, hi, k_atoms, mode, tval, tvec, indptr, cols, vals):
    """Each row's selected slots, sorted by atom, into CSR arrays; entries at or below the firing
    threshold are left out (after validation).

    A row is sorted by rank: each selected slot's position is the number of selected atoms
    smaller than its own, k comparisons that the compiler vectorises (k ≤ a few hundred here),
    instead of an insertion sort whose every step is a branch it cannot predict (2.2× faster at
    k = 32). Slots that are not selected (index −1, value 0, or an atom outside ``[lo, hi)``)
    get a key above every atom. A row with anything wrong in it — an index out of range, a
    selected gate that is NaN, negative or infinite, an atom twice — is handed to
    :func:`_topk_row_error`, so the error named is the first in slot order, as before."""
    rows, k = idx.shape
    key = np.empty(k, dtype=np.int64)
    kv = np.empty(k, dtype=np.float64)
    ti = np.empty(k, dtype=np.int64)
    tv = np.empty(k, dtype=np.float64)
    unsel = np.int64(k_atoms) + 1  # above every atom
    ulo, width = np.uint64(lo), np.uint64(hi - lo)
    p = 0
    for r in range(rows):
        ir = idx[r]
        vr = val[r]
        n_bad = 0
        m = 0
        for s in range(k):
            a = np.int64(ir[s])
            v = np.float64(vr[s])
            sel = (np.uint64(a) - ulo < width) & (v != 0.0)  # lo ≤ a < hi (−1 wraps above) and v ≠ 0
            n_bad += (a < -1) | (a >= k_atoms) | (sel & ~((v >= 0.0) & (v < np.inf)))
            key[s] = a if sel else unsel
            kv[s] = v
            m += sel
        if n_bad == 0:
            for s in range(k):
                ks = key[s]
                if ks == unsel:
                    continue
                c = 0
                e = 0
                for t in range(k):
                    c += key[t] < ks
                    e += key[t] == ks
                if e > 1:  # a repeated atom
                    n_bad = 1
                    break
                ti[c] = ks
                tv[c] = kv[s]
        if n_bad:
            code, a, v = _topk_row_error(idx, val, r, lo, hi, k_atoms)
            return code, r, a, v
        row_max = 0.0
        if mode == THR_RELATIVE:  # over every slot of the row, whatever the span
            for s in range(k):
                v = np.float64(vr[s])
                if ir[s] >= 0 and v > row_max:
                    row_max = v
        for t in range(m):
            if tv[t] > _cut(mode, tval, tvec, ti[t], row_max):
                cols[p] = ti[t]
                vals[p] = tv[t]
                p += 1
        indptr[r + 1] = p
    return _OK, -1, p, 0.0


def topk_block_csr(idx: np.ndarray, val: np.ndarray, lo: int, hi: int, k_atoms: int, row0: int = 0,
                   rows: tuple[int, int] | None = None, workspace: ScatterWorkspace | None = None,
                   threshold: tuple = NO_THRESHOLD):
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
    rows : (int, int), optional
        The row chunk to name in an error.
    workspace : ScatterWorkspace, optional
        Buffers to build the result in; it is then valid only until the workspace's next use.
    threshold : tuple, optional
        A firing threshold from :func:`threshold_args`; entries at or below it are left out.

    Returns
    -------
    indptr : array of shape (n_rows + 1,), int64
    cols : array of shape (nnz,), int32 (int64 past 2³¹ atoms)
    vals : array of shape (nnz,), the values' dtype (see :func:`csr_dtypes`)

    Raises
    ------
    GateDataError
        On an index outside ``[-1, k_atoms)``, a NaN/inf/negative value or a repeated index.
    """
    n, k = idx.shape
    cdt, vdt = csr_dtypes(k_atoms, val.dtype)
    if idx.size == 0:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=cdt), np.zeros(0, dtype=vdt)
    if workspace is None:
        indptr = np.empty(n + 1, dtype=np.int64)
        cols = np.empty(idx.size, dtype=cdt)
        vals = np.empty(idx.size, dtype=vdt)
    else:  # views into reused buffers, valid until the workspace's next call
        indptr = workspace.get("csr_indptr", n + 1, np.int64)
        cols = workspace.get(f"csr_cols_{np.dtype(cdt).name}", idx.size, cdt)
        vals = workspace.get(f"csr_vals_{np.dtype(vdt).name}", idx.size, vdt)
    indptr[0] = 0
    mode, tval, tvec = threshold
    code, r, a, v = _topk_rows_csr(idx, val, lo, hi, k_atoms, mode, tval, tvec, indptr, cols, vals)
    if code != _OK:
        what = "top-k index" if code == _RANGE else "top-k gate"
        value = int(a) if code in (_RANGE, _REPEAT) else float(v)
        raise BadGate(code, row0 + r, int(a), value).error(rows or (row0, row0 + n), what)
    p = int(indptr[n])
    return indptr, cols[:p], vals[:p]


# ----------------------------------------------------------------------------- CSR gates
@njit(**_OPTS)
def _sparse_rows_csr(ip, ind, val, lo, hi, k_atoms, mode, tval, tvec, indptr, cols, vals, ti, tv):
    """Validate CSR rows, sort each by atom (stable merge sort when not already sorted), reject a
    repeated atom, and emit the entries of atoms ``[lo, hi)`` above the firing threshold."""
    rows = ip.shape[0] - 1
    p = 0
    for r in range(rows):
        p0, p1 = ip[r], ip[r + 1]
        m = 0
        ordered = True
        row_max = 0.0
        for q in range(p0, p1):
            a = np.int64(ind[q])
            v = np.float64(val[q])
            if a < 0 or a >= k_atoms:
                return _RANGE, r, a, v
            if v != v:
                return _NAN, r, a, v
            if v < 0.0:
                return _NEG, r, a, v
            if v == np.inf:
                return _INF, r, a, v
            if v == 0.0:  # an explicitly stored zero: no entry
                continue
            if m > 0 and ti[m - 1] >= a:
                ordered = False
            if v > row_max:
                row_max = v
            ti[m] = a
            tv[m] = v
            m += 1
        if not ordered:
            order = np.argsort(ti[:m], kind="mergesort")
            si = ti[:m][order]
            sv = tv[:m][order]
            for t in range(m):
                ti[t] = si[t]
                tv[t] = sv[t]
            for t in range(1, m):
                if ti[t] == ti[t - 1]:
                    return _REPEAT, r, ti[t], tv[t]
        for t in range(m):
            a = ti[t]
            if a >= lo and a < hi and tv[t] > _cut(mode, tval, tvec, a, row_max):
                cols[p] = a
                vals[p] = tv[t]
                p += 1
        indptr[r + 1] = p
    return _OK, -1, p, 0.0


def sparse_block_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, lo: int, hi: int,
                     k_atoms: int, row0: int = 0, rows: tuple[int, int] | None = None,
                     workspace: ScatterWorkspace | None = None, threshold: tuple = NO_THRESHOLD):
    """Validated sparse rows (sorted by atom) of the CSR entries whose atom lies in ``[lo, hi)``.

    The CSR form of the kernels from raw CSR input, whose rows may be in any order. Explicitly
    stored zeros are dropped; every entry's index and value are checked, whether or not its atom
    falls in ``[lo, hi)``.

    Parameters
    ----------
    indptr : array of shape (n_rows + 1,), integer, non-decreasing, ``indptr[0] == 0``
    indices : array of shape (indptr[-1],), integer
    values : array of shape (indptr[-1],), float32 or float64
    lo, hi, k_atoms, row0, rows, workspace, threshold
        As in :func:`topk_block_csr`.

    Returns
    -------
    indptr, cols, vals
        As :func:`topk_block_csr` returns them.

    Raises
    ------
    GateDataError
        On an index outside ``[0, k_atoms)``, a NaN/inf/negative value, or an atom repeated within
        a row (row and atom named).
    """
    n = indptr.shape[0] - 1
    cdt, vdt = csr_dtypes(k_atoms, values.dtype)
    nnz = int(indptr[-1]) if n >= 0 else 0
    if nnz == 0:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=cdt), np.zeros(0, dtype=vdt)
    ip = np.ascontiguousarray(indptr, dtype=np.int64)
    width = int(np.diff(ip).max())
    if workspace is None:
        out_ip = np.empty(n + 1, dtype=np.int64)
        cols = np.empty(nnz, dtype=cdt)
        vals = np.empty(nnz, dtype=vdt)
    else:
        out_ip = workspace.get("csr_indptr", n + 1, np.int64)
        cols = workspace.get(f"csr_cols_{np.dtype(cdt).name}", nnz, cdt)
        vals = workspace.get(f"csr_vals_{np.dtype(vdt).name}", nnz, vdt)
    out_ip[0] = 0
    ti = np.empty(width, dtype=np.int64)
    tv = np.empty(width, dtype=np.float64)
    mode, tval, tvec = threshold
    code, r, a, v = _sparse_rows_csr(ip, np.ascontiguousarray(indices), np.ascontiguousarray(values),
                                     lo, hi, k_atoms, mode, tval, tvec, out_ip, cols, vals, ti, tv)
    if code != _OK:
        what = "CSR index" if code == _RANGE else "CSR gate"
        value = int(a) if code in (_RANGE, _REPEAT) else float(v)
        err = BadGate(code, row0 + r, int(a), value)
        if code == _RANGE:
            rr = rows or (row0, row0 + n)
            raise GateDataError(
                f"{what} at row {err.row} is {err.atom}, outside [0, {k_atoms}) (row chunk "
                f"[{rr[0]}, {rr[1]})); CSR indices must be atom ids in [0, k_atoms)")
        raise err.error(rows or (row0, row0 + n), what)
    p = int(out_ip[n])
    return out_ip, cols[:p], vals[:p]


# ----------------------------------------------------------------------------- thresholds on dense blocks
@njit(**_OPTS)
def _row_max(x, out):
    rows, ncol = x.shape
    for r in range(rows):
        m = 0.0
        for c in range(ncol):
            v = np.float64(x[r, c])
            if v > m:
                m = v
        out[r] = m


def dense_row_max(x: np.ndarray) -> np.ndarray:
    """Largest gate of each row of a dense block (0 for an empty row; NaN is ignored)."""
    out = np.zeros(x.shape[0], dtype=np.float64)
    if x.size:
        _row_max(x, out)
    return out


@njit(**_OPTS)
def _dense_threshold(x, col0, mode, tval, tvec, row_max):
    rows, ncol = x.shape
    for r in range(rows):
        for c in range(ncol):
            v = x[r, c]
            if v != 0.0:
                if v != v:
                    return _NAN, r, c
                if v < 0.0:
                    return _NEG, r, c
                if v == np.inf:
                    return _INF, r, c
                if np.float64(v) <= _cut(mode, tval, tvec, col0 + c, row_max[r]):
                    x[r, c] = 0.0
    return _OK, -1, -1


def dense_threshold(x: np.ndarray, col0: int, threshold: tuple, row_max: np.ndarray | None = None,
                    row0: int = 0, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Zero, in place, the gates of a dense block at or below the firing threshold (after checking
    every gate: a NaN, ±inf or negative gate raises :class:`GateDataError`). ``row_max`` is each
    row's largest gate over *every* atom (needed by a relative threshold). Returns ``x``."""
    if x.size == 0:
        return x
    mode, tval, tvec = threshold
    if row_max is None:
        row_max = np.zeros(x.shape[0]) if mode != THR_RELATIVE else dense_row_max(x)
    code, r, c = _dense_threshold(x, col0, mode, tval, tvec, row_max)
    if code != _OK:
        raise _dense_error(code, r, c, x, row0, col0, rows)
    return x


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
                xp = np.float64(va[p])
                for q in range(p, a_hi):
                    bq = ca[q] - i0
                    acc_sum[ap, bq] += xp * np.float64(va[q])
                    acc_cnt[ap, bq] += 1
        else:
            b_lo = _lower_bound(cb, ipb[r], ipb[r + 1], j0)
            b_hi = _lower_bound(cb, b_lo, ipb[r + 1], j1)
            if b_lo == b_hi:
                continue
            for p in range(a_lo, a_hi):
                ap = ca[p] - i0
                xp = np.float64(va[p])
                for q in range(b_lo, b_hi):
                    bq = cb[q] - j0
                    acc_sum[ap, bq] += xp * np.float64(vb[q])
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


@njit(inline="always", **_OPTS)
def _partners(cols, p, p1, lo, T, I, jlo, jhi):
    """``[q0, q1)``: the positions of row atom ``p``'s partners (``q ≥ p``) whose block lies in
    ``[jlo[I], jhi[I])``, the blocks of row ``I``'s tiles in the group (rows are sorted)."""
    q0 = p if jlo[I] <= I else _lower_bound(cols, p + 1, p1, lo + jlo[I] * T)
    if jhi[I] >= jhi.shape[0]:  # the row's tiles run to the span's end (most rows of a group)
        return q0, p1
    return q0, _lower_bound(cols, q0, p1, lo + jhi[I] * T)


@njit(**_OPTS)
def _row_partner_blocks(slot_of):
    """For each block row ``I``: the first and one past the last block ``J`` of its tiles in the group."""
    n = slot_of.shape[0]
    jlo = np.full(n, n, dtype=np.int64)
    jhi = np.zeros(n, dtype=np.int64)
    for I in range(n):
        for J in range(n):
            if slot_of[I, J] >= 0:
                jlo[I] = min(jlo[I], J)
                jhi[I] = J + 1
    return jlo, jhi


@njit(**_OPTS)
def _add_row(p0, p1, cols, vals, lo, T, slot_of, blk, jlo, jhi, acc_sum, acc_cnt):
    """Add one row's in-group pair products straight into the flat accumulators."""
    for p in range(p0, p1):
        a = cols[p] - lo
        I = blk[a]
        if jhi[I] == 0:
            continue
        xa = np.float64(vals[p])
        q0, q1 = _partners(cols, p, p1, lo, T, I, jlo, jhi)
        for q in range(q0, q1):
            b = cols[q] - lo
            J = blk[b]
            s = slot_of[I, J]
            if s >= 0:
                o = s * T * T + (a - I * T) * T + (b - J * T)
                acc_sum[o] += xa * np.float64(vals[q])
                acc_cnt[o] += 1


@njit(**_OPTS)
def _scatter_group(indptr, cols, vals, lo, T, slot_of, blk, acc_sum, acc_cnt, start, fill, buf_off, buf_val):
    rows = indptr.shape[0] - 1
    n_blocks = slot_of.shape[0]
    span = start.shape[0] - 1
    TT = T * T
    cap = buf_val.shape[0]
    # each row atom enumerates only its partners in the blocks of its row's tiles (a group that
    # starts or ends inside a block row would otherwise walk, and drop, the pairs of the others);
    # a block row with no tile in the group has jhi = 0
    jlo, jhi = _row_partner_blocks(slot_of)
    r = 0
    while r < rows:
        # pass 1: room for each row atom's pairs (its partners in its row's tiles: a bound, O(nnz))
        # over rows [r, r_end) while the bound fits the buffers
        start[:] = 0
        total = 0
        r_end = r
        while r_end < rows:
            # the row's atoms inside the span (rows are sorted; atoms outside it are skipped)
            p0 = _lower_bound(cols, indptr[r_end], indptr[r_end + 1], lo)
            p1 = _lower_bound(cols, p0, indptr[r_end + 1], lo + span)
            n_row = 0
            for p in range(p0, p1):
                I = blk[cols[p] - lo]
                if jhi[I] > 0:
                    q0, q1 = _partners(cols, p, p1, lo, T, I, jlo, jhi)
                    n_row += q1 - q0
            if total + n_row > cap:
                if r_end == r:  # one row alone exceeds the buffers: add it directly
                    _add_row(p0, p1, cols, vals, lo, T, slot_of, blk, jlo, jhi, acc_sum, acc_cnt)
                    r_end += 1
                break
            for p in range(p0, p1):
                a = cols[p] - lo
                I = blk[a]
                if jhi[I] > 0:
                    q0, q1 = _partners(cols, p, p1, lo, T, I, jlo, jhi)
                    start[a + 1] += q1 - q0
            total += n_row
            r_end += 1
        if total > 0:
            for a in range(span):
                start[a + 1] += start[a]
            for a in range(span):
                fill[a] = start[a]
            # pass 2: rows in order, each pair product appended to its row atom's bucket
            for rr in range(r, r_end):
                p0 = _lower_bound(cols, indptr[rr], indptr[rr + 1], lo)
                p1 = _lower_bound(cols, p0, indptr[rr + 1], lo + span)
                for p in range(p0, p1):
                    a = cols[p] - lo
                    I = blk[a]
                    if jhi[I] == 0:
                        continue
                    xa = np.float64(vals[p])
                    e = fill[a]
                    q0, q1 = _partners(cols, p, p1, lo, T, I, jlo, jhi)
                    for q in range(q0, q1):
                        b = cols[q] - lo
                        J = blk[b]
                        s = slot_of[I, J]
                        if s >= 0:
                            buf_off[e] = s * TT + (b - J * T)
                            buf_val[e] = xa * np.float64(vals[q])
                            e += 1
                    fill[a] = e
            # pass 3: atom by atom; all of atom a's updates land in row a of its tiles. The row of a
            # group spanning many tiles outgrows L2, so each target is prefetched PF_SCATTER ahead
            for a in range(span):
                e0, e1 = start[a], fill[a]
                if e0 == e1:
                    continue
                base = (a - blk[a] * T) * T
                e_pf = e1 - PF_SCATTER
                for e in range(e0, e1):
                    if e < e_pf:
                        o_pf = buf_off[e + PF_SCATTER] + base
                        prefetch(acc_sum, o_pf)
                        prefetch(acc_cnt, o_pf)
                    o = buf_off[e] + base
                    acc_sum[o] += buf_val[e]
                    acc_cnt[o] += 1
        r = r_end


#: pair updates between a target's prefetch and its update in :func:`_scatter_group`'s last pass.
#: Measured here (10⁶ top-k tokens, K = 32 768, a group of 105 tiles of 1024², 1.3 GB): that pass took
#: 2.7 s without prefetching, 1.3-1.6 s at 64 (16: 1.5 s; 128 and 256: slower, the fill buffers overflow)
PF_SCATTER = 64

#: pair products bucketed per pass of :func:`scatter_group` (12 bytes each: 384 MiB). Fewer, larger
#: passes touch each accumulator row more often per pass: 32 Mi pairs scatter ~8% faster than 16 Mi.
SCATTER_BUFFER_PAIRS = 1 << 25


class ScatterWorkspace:
    """Buffers of :func:`scatter_group`, kept across the row chunks of a task.

    Reusing them avoids faulting in fresh pages on every chunk, which otherwise costs as much as
    the scatter itself. ``cap`` bounds the pair products bucketed per pass (12 bytes each).
    """

    def __init__(self, cap: int = SCATTER_BUFFER_PAIRS):
        self.cap = max(1, int(cap))
        self._bufs = {}
        self._blk_key = None

    def get(self, name: str, size: int, dtype) -> np.ndarray:
        """A buffer of at least ``size`` elements (contents undefined), grown when needed."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < size or buf.dtype != np.dtype(dtype):
            buf = np.empty(max(int(size), 1), dtype=dtype)
            self._bufs[name] = buf
        return buf[:size]

    def block_of(self, span: int, tile: int) -> np.ndarray:
        """``a // tile`` for every local atom ``a < span``."""
        blk = self.get("blk", span, np.int64)
        if self._blk_key != (span, tile):
            np.floor_divide(np.arange(span, dtype=np.int64), tile, out=blk)
            self._blk_key = (span, tile)
        return blk


@njit(**_OPTS)
def _span_pairs(indptr, cols, lo, hi):
    """Pairs ``a ≤ b`` of atoms in ``[lo, hi)`` over every row (the work of a scatter over that span)."""
    total = 0
    for r in range(indptr.shape[0] - 1):
        p0 = _lower_bound(cols, indptr[r], indptr[r + 1], lo)
        m = _lower_bound(cols, p0, indptr[r + 1], hi) - p0
        total += m * (m + 1) // 2
    return total


#: Above this many span pairs per (row, tile), :func:`scatter_group` adds each tile straight from the
#: rows (:func:`scatter_pairs`, one tile's accumulators in cache at a time); below it, it buckets the
#: pair products by atom first. Measured here: a tile costs ~140 ns per row to locate its atoms, then
#: ~5 ns per pair; bucketing costs ~12 ns per pair with no per-tile cost (dense 2% gates, 20-80
#: atoms per row: the direct route is 1.6-2x faster; top-k gates over 34 tiles: bucketing is 2.8x).
DIRECT_PAIRS_PER_ROW_TILE = 20


def scatter_group(csr, lo: int, tile: int, n_blocks: int, tiles, slots, acc_sum: np.ndarray,
                  acc_cnt: np.ndarray, workspace: ScatterWorkspace | None = None,
                  method: str | None = None) -> str:
    """Scatter the pair products of several tiles from one sparse row chunk (the scatter route).

    Parameters
    ----------
    csr : (indptr, cols, vals)
        Sparse rows (global, sorted atom ids, positive values); atoms outside the span
        ``[lo, lo + n_blocks·tile)`` are ignored.
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
    acc_sum : array of shape (n_slots, T, T), float64, C-contiguous
    acc_cnt : array of shape (n_slots, T, T), int64 or int32 (see :func:`count_dtype`), C-contiguous
    workspace : ScatterWorkspace, optional
        Buffers to reuse across calls (a fresh one otherwise).
    method : {"tile", "bucket"}, optional
        Force a method (see Notes); by default it is chosen from the rows' density.

    Returns
    -------
    str
        The method used.

    Notes
    -----
    With many pairs per row and tile (dense rows: above :data:`DIRECT_PAIRS_PER_ROW_TILE`), each
    tile is accumulated on its own, straight from the rows (:func:`scatter_pairs`). Otherwise rows
    are taken in blocks whose in-group pairs fit the workspace. For each block, every pair
    product ``g_a·g_b`` (``a ≤ b``, tile ``(I(a), J(b))`` in the group) is appended, row by row, to
    a bucket of its row atom ``a``; then the buckets are added atom by atom, so that all updates of
    atom ``a`` land in row ``a`` of its tiles while it stays in cache, and the chunk's rows are
    read sequentially. Each accumulator entry receives its contributions in row (token) order, as
    in :func:`scatter_pairs`, so the two kernels agree bit for bit.
    """
    if method not in (None, "tile", "bucket"):
        raise ValueError(f"method must be 'tile', 'bucket' or None, got {method!r}")
    if not len(tiles):
        return method or "bucket"
    T, nb = int(tile), int(n_blocks)
    if acc_sum.ndim != 3 or acc_sum.shape[1:] != (T, T) or acc_cnt.shape != acc_sum.shape:
        raise ValueError(f"accumulators must have shape (n_slots, {T}, {T}), got {acc_sum.shape} "
                         f"and {acc_cnt.shape}")
    if not (acc_sum.flags.c_contiguous and acc_cnt.flags.c_contiguous):
        raise ValueError("accumulators must be C-contiguous")
    slot_of = np.full((nb, nb), -1, dtype=np.int64)
    for (i, j), s in zip(tiles, slots):
        slot_of[i, j] = s
    indptr, cols, vals = csr
    span = nb * T
    rows = indptr.shape[0] - 1
    if method is None:
        dense = _span_pairs(indptr, cols, int(lo), int(lo) + span) > DIRECT_PAIRS_PER_ROW_TILE * rows * len(tiles)
        method = "tile" if dense else "bucket"
    if method == "tile":
        for (i, j), s in zip(tiles, slots):
            i0, j0 = int(lo) + i * T, int(lo) + j * T
            _scatter_pairs(indptr, cols, vals, indptr, cols, vals, i0, i0 + T, j0, j0 + T, i == j,
                           acc_sum[s], acc_cnt[s])
        return method
    ws = workspace if workspace is not None else ScatterWorkspace()
    row_nnz = np.diff(indptr)
    cap = max(1, min(ws.cap, int(np.dot(row_nnz, row_nnz + 1) // 2)))
    off_dtype = np.int32 if acc_sum.size < 2**31 else np.int64
    _scatter_group(indptr, cols, vals, int(lo), T, slot_of, ws.block_of(span, T), acc_sum.reshape(-1),
                   acc_cnt.reshape(-1), ws.get("start", span + 1, np.int64), ws.get("fill", span, np.int64),
                   ws.get("off", cap, off_dtype),
                   ws.get("val", cap, np.float64))
    return method


@njit(inline="always", **_OPTS)
def _gate_code(v):
    """``_OK`` for a valid dense gate, else the code of what is wrong with it."""
    if v != v:
        return _NAN
    if v < 0.0:
        return _NEG
    if v == np.inf:
        return _INF
    return _OK


@njit(**_OPTS)
def _dense_scan_blocks(x, T, out_nnz):
    rows, cols = x.shape
    for r in range(rows):
        for c in range(cols):
            v = x[r, c]
            if v != 0.0:
                code = _gate_code(v)
                if code != _OK:
                    return code, r, c
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
    nnz = _block_counts(x, tile)
    if x.size == 0:
        return nnz
    code, r, c = _dense_scan_blocks(x, tile, nnz)
    if code != _OK:
        raise _dense_error(code, r, c, x, row0, col0, rows)
    return nnz


@njit(**_OPTS)
def _first_bad(x, r):
    """The code and column of the first NaN, negative or infinite gate of row ``r``."""
    for c in range(x.shape[1]):
        code = _gate_code(x[r, c])
        if code != _OK:
            return code, c
    return _OK, -1


#: rows a block is scanned by the branching loop before its density is checked
_SCAN_PROBE_ROWS = 64


@njit(**_OPTS)
def _count_nonzero(x, r0):
    """Non-zero entries of rows ``[r0, n)``: one branch-free pass (NaN counts as non-zero)."""
    n = 0
    for r in range(r0, x.shape[0]):
        for c in range(x.shape[1]):
            n += np.int64(x[r, c] != 0.0)
    return n


@njit(**_OPTS)
def _scan_row_sparse(x, r, T, out_nnz, fire, gsum, gsq, col0, cols, vals, p):
    """Row ``r`` of :func:`_dense_scan_stats` while the sparse rows fit: returns (code, atom, p)."""
    cap = cols.shape[0]
    for c in range(x.shape[1]):
        v = x[r, c]
        if v != 0.0:
            code = _gate_code(v)
            if code != _OK:
                return code, c, p
            out_nnz[r, c // T] += 1
            w = np.float64(v)
            fire[c] += 1
            gsum[c] += w
            gsq[c] += w * w
            if p >= 0:
                if p < cap:
                    cols[p] = col0 + c
                    vals[p] = w
                    p += 1
                else:
                    p = -1
    return _OK, -1, p


@njit(**_OPTS)
def _scan_row_dense(x, r, T, out_nnz, fire, gsum, gsq):
    """Row ``r`` of :func:`_dense_scan_stats` once they did not: loops without branches; returns
    (code, atom)."""
    ncol = x.shape[1]
    bad = 0
    for c in range(ncol):
        v = x[r, c]
        bad += np.int64(not ((v >= 0.0) & (v < np.inf)))  # NaN fails both
    if bad:
        return _first_bad(x, r)
    # one loop per output array: with more arrays in one loop LLVM gives up proving they do not
    # overlap and leaves the loop scalar (measured: 7.4 ms against 2.x ms for 4 096 × 1 024)
    for c in range(ncol):
        w = np.float64(x[r, c])
        gsum[c] += w
        gsq[c] += w * w
    for c in range(ncol):
        fire[c] += np.int64(x[r, c] != 0.0)
    for b in range(out_nnz.shape[1]):
        n = 0
        for c in range(b * T, min(ncol, (b + 1) * T)):
            n += np.int64(x[r, c] != 0.0)
        out_nnz[r, b] += n
    return _OK, -1


@njit(**_OPTS)
def _dense_scan_stats(x, T, out_nnz, fire, gsum, gsq, col0, indptr, cols, vals):
    """One pass over the rows: validate, count per row and block, add the column vectors, and emit
    the sparse rows while they fit ``cols`` (returns the entries emitted, or -1 once they did not fit).

    While the rows fit, one loop branches on each non-zero (few, so well predicted). Once they do
    not (a dense block), each row is read in L1 by loops without branches, which the compiler
    vectorises: 12.6 ms against 26.8 ms for 4 096 × 1 024 gates at 50%. Adding the zero gates'
    ``0.0`` to the non-negative sums leaves every bit as adding the non-zeros only does.

    After :data:`_SCAN_PROBE_ROWS` rows at more than twice the room's density, the rest of the
    block's non-zeros are counted (without branches): when they cannot fit either, the rows take
    the dense loops at once instead of branching until the room runs out. Either way ``p`` ends as
    -1 exactly when the block holds more non-zeros than ``cols`` has room for."""
    rows, ncol = x.shape
    cap = cols.shape[0]
    p = 0
    for r in range(rows):
        if p >= 0:
            code, c, p = _scan_row_sparse(x, r, T, out_nnz, fire, gsum, gsq, col0, cols, vals, p)
            if code != _OK:
                return code, r, c, p
            if p >= 0:
                indptr[r + 1] = p
                if r + 1 == _SCAN_PROBE_ROWS and p * rows > 2 * cap * (r + 1) and p + _count_nonzero(x, r + 1) > cap:
                    p = -1
            continue
        code, c = _scan_row_dense(x, r, T, out_nnz, fire, gsum, gsq)
        if code != _OK:
            return code, r, c, p
    return _OK, -1, -1, p


def dense_scan_stats(x: np.ndarray, tile: int, fire: np.ndarray, gsum: np.ndarray, gsq: np.ndarray,
                     row0: int = 0, col0: int = 0, rows: tuple[int, int] | None = None,
                     workspace: ScatterWorkspace | None = None, max_density: float = 0.125):
    """:func:`dense_scan_blocks` that also adds each column's firing count, gate sum and squared sum,
    and builds the sparse rows of a sparse block, in one pass.

    ``fire``, ``gsum``, ``gsq`` (length ≥ n_cols; int64, float64, float64) receive the column's
    non-zero gates in row order, as :func:`csr_vector_stats` does for sparse rows, so the dense and
    top-k forms of the same gates give bit-identical vectors.

    Returns
    -------
    nnz : array of shape (n_rows, ceil(n_cols / tile)), int64
    csr : (indptr, cols, vals) or None
        With ``workspace``: the block's sparse rows (global atom ids ``col0 + c``, as
        :func:`dense_to_csr` gives them, in the workspace's buffers), or None when the block holds
        more than ``max_density`` non-zeros (build them with :func:`dense_to_csr` if needed).
        Without ``workspace``: None.

    Raises
    ------
    GateDataError
        On the first NaN, ±inf or negative gate, naming its row and atom.
    """
    nnz = _block_counts(x, tile)
    if x.size == 0:
        return nnz, None
    if workspace is not None:
        cap = max(1, int(x.size * max_density))
        indptr = workspace.get("dense_indptr", x.shape[0] + 1, np.int64)
        cdt, vdt = csr_dtypes(col0 + x.shape[1], x.dtype)
        cols = workspace.get(f"dense_cols_{np.dtype(cdt).name}", cap, cdt)
        vals = workspace.get(f"dense_vals_{np.dtype(vdt).name}", cap, vdt)
        indptr[0] = 0
    else:
        indptr, cols, vals = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=x.dtype)
    code, r, c, p = _dense_scan_stats(x, tile, nnz, fire, gsum, gsq, col0, indptr, cols, vals)
    if code != _OK:
        raise _dense_error(code, r, c, x, row0, col0, rows)
    if workspace is None or p < 0:
        return nnz, None
    return nnz, (indptr, cols[:p], vals[:p])


@njit(**_OPTS)
def _csr_vector_stats(ip, c, v, c0, c1, fire, gsum, gsq):
    rows = ip.shape[0] - 1
    for r in range(rows):
        lo = _lower_bound(c, ip[r], ip[r + 1], c0)
        hi = _lower_bound(c, lo, ip[r + 1], c1)
        for p in range(lo, hi):
            a = c[p] - c0
            x = np.float64(v[p])
            fire[a] += 1
            gsum[a] += x
            gsq[a] += x * x


def csr_vector_stats(csr, c0: int, c1: int, fire: np.ndarray, gsum: np.ndarray, gsq: np.ndarray) -> None:
    """Add the per-atom firing count, gate sum and squared sum of atoms ``[c0, c1)`` (in place)."""
    _csr_vector_stats(csr[0], csr[1], csr[2], c0, c1, fire, gsum, gsq)


# ----------------------------------------------------------------------------- BLAS route
#: words (64 tokens each) of a bit-packed block that :func:`_popcount_gram` takes per pass: four row
#: atoms and four column atoms of 256 words are 16 KiB, in L1 while their 16 counts are summed
_GRAM_WORDS = 256


@njit(**_OPTS)
def _pack_fire_bits(x, out, word):
    n, m = x.shape
    for w in range(out.shape[1]):
        r0 = w * 64
        for c in range(m):
            word[c] = 0
        for r in range(r0, min(n, r0 + 64)):
            sh = np.uint64(r - r0)
            for c in range(m):  # branch-free: vectorised over the atoms of a row
                word[c] |= np.uint64(x[r, c] > 0) << sh
        for c in range(m):
            out[c, w] = word[c]


def fire_bits(x: np.ndarray) -> np.ndarray:
    """The firing indicators of a dense block, bit-packed by atom.

    Parameters
    ----------
    x : array of shape (n_rows, m), float32 or float64, C-contiguous, validated (no NaN, none < 0)

    Returns
    -------
    array of shape (m, ceil(n_rows / 64)), uint64
        Bit ``r % 64`` of word ``r // 64`` of row ``c`` is set iff ``x[r, c] > 0``; the bits past
        ``n_rows`` are zero.
    """
    n, m = x.shape
    out = np.empty((m, (n + 63) // 64), dtype=np.uint64)
    if out.size:
        _pack_fire_bits(x, out, np.empty(m, dtype=np.uint64))
    return out


@njit(**_OPTS)
def _and_count(a, i, b, j, w0, w1):
    s = 0
    for w in range(w0, w1):
        s += popcount(a[i, w] & b[j, w])
    return s


@njit(**_OPTS)
def _popcount_gram(a, b, cnt, upper):
    n_i, W = a.shape
    n_j = b.shape[0]
    for w in range(0, W, _GRAM_WORDS):
        # unsigned word indices: numba then adds no negative-index wraparound to the inner loops,
        # which kept them scalar (8.3 ms against 2.5 ms at 4 096 rows x 1 024 atoms)
        w0, w1 = np.uint64(w), np.uint64(min(W, w + _GRAM_WORDS))
        for i0 in range(0, n_i, 4):
            if i0 + 4 > n_i:  # the last rows, one at a time
                for i in range(i0, n_i):
                    for j in range(i if upper else 0, n_j):
                        cnt[i, j] += _and_count(a, i, b, j, w0, w1)
                continue
            j0 = 0
            if upper:  # the 4 x 4 block on the diagonal: its upper triangle only
                for i in range(i0, i0 + 4):
                    for j in range(i, i0 + 4):
                        cnt[i, j] += _and_count(a, i, b, j, w0, w1)
                j0 = i0 + 4
            while j0 + 4 <= n_j:  # 16 counts in registers, vectorised over the words
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = 0
                for w in range(w0, w1):
                    a0 = a[i0, w]; a1 = a[i0 + 1, w]; a2 = a[i0 + 2, w]; a3 = a[i0 + 3, w]
                    b0 = b[j0, w]; b1 = b[j0 + 1, w]; b2 = b[j0 + 2, w]; b3 = b[j0 + 3, w]
                    s00 += popcount(a0 & b0); s01 += popcount(a0 & b1)
                    s02 += popcount(a0 & b2); s03 += popcount(a0 & b3)
                    s10 += popcount(a1 & b0); s11 += popcount(a1 & b1)
                    s12 += popcount(a1 & b2); s13 += popcount(a1 & b3)
                    s20 += popcount(a2 & b0); s21 += popcount(a2 & b1)
                    s22 += popcount(a2 & b2); s23 += popcount(a2 & b3)
                    s30 += popcount(a3 & b0); s31 += popcount(a3 & b1)
                    s32 += popcount(a3 & b2); s33 += popcount(a3 & b3)
                cnt[i0, j0] += s00; cnt[i0, j0 + 1] += s01; cnt[i0, j0 + 2] += s02; cnt[i0, j0 + 3] += s03
                cnt[i0 + 1, j0] += s10; cnt[i0 + 1, j0 + 1] += s11
                cnt[i0 + 1, j0 + 2] += s12; cnt[i0 + 1, j0 + 3] += s13
                cnt[i0 + 2, j0] += s20; cnt[i0 + 2, j0 + 1] += s21
                cnt[i0 + 2, j0 + 2] += s22; cnt[i0 + 2, j0 + 3] += s23
                cnt[i0 + 3, j0] += s30; cnt[i0 + 3, j0 + 1] += s31
                cnt[i0 + 3, j0 + 2] += s32; cnt[i0 + 3, j0 + 3] += s33
                j0 += 4
            for i in range(i0, i0 + 4):  # the last columns
                for j in range(j0, n_j):
                    cnt[i, j] += _and_count(a, i, b, j, w0, w1)


def popcount_gram(a: np.ndarray, b: np.ndarray | None, cnt: np.ndarray) -> None:
    """Add the pair counts of two bit-packed blocks (:func:`fire_bits`) to ``cnt``, in place.

    ``cnt[i, j] += popcount(a[i] & b[j])``: the tokens on which atoms ``i`` and ``j`` both fire,
    exact in integers. With ``b`` None, ``b`` is ``a`` and only the upper triangle (``j ≥ i``) is
    added. One AND and one population count cover 64 tokens of a pair, where a float32 GEMM of 0/1
    indicators spends 64 multiply-adds: measured at 8 192 × 1 024, 5.5 ms against ssyrk's 104 ms.
    """
    upper = b is None
    b = a if upper else b
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"bit blocks cover different rows: {a.shape[1]} and {b.shape[1]} words")
    if cnt.shape[0] < a.shape[0] or cnt.shape[1] < b.shape[0]:
        raise ValueError(f"cnt of shape {cnt.shape} cannot hold {a.shape[0]} x {b.shape[0]} counts")
    if a.size and b.size:
        _popcount_gram(a, b, cnt, upper)


def blas_tile(x_i64: np.ndarray, bits_i: np.ndarray, x_j64: np.ndarray | None, bits_j: np.ndarray | None,
              acc_sum: np.ndarray, acc_cnt: np.ndarray) -> None:
    """Add ``G_Iᵀ G_J`` (by BLAS) and the pair counts (by :func:`popcount_gram`) to the accumulators.

    Parameters
    ----------
    x_i64 : array of shape (n_rows, n_i), float64, C-contiguous
    bits_i : array of shape (n_i, ceil(n_rows / 64)), uint64: :func:`fire_bits` of the same gates
    x_j64, bits_j : the same for the columns ``J``, or None on a diagonal tile (SYRK, upper triangle)
    acc_sum : array of shape (≥ n_i, ≥ n_j), float64
    acc_cnt : array of the same shape, int64 or int32

    Notes
    -----
    Counts are exact integers. Call inside ``threadpoolctl.threadpool_limits(1)`` for reproducible
    sums. On a diagonal tile only the upper triangle (diagonal included) is added to: the lower one
    is never read (see :func:`symmetrise_diag`).
    """
    from scipy.linalg import blas

    n_rows, n_i = x_i64.shape
    if n_rows == 0:
        return
    # BLAS adds into the accumulator itself when it is one Fortran-ordered block: acc (C order) is
    # accᵀ in Fortran order, and accᵀ = G_Jᵀ G_I (the upper triangle of acc is accᵀ's lower one)
    if x_j64 is None:
        c = acc_sum[:n_i, :n_i].T
        if c.flags.f_contiguous:
            out = blas.dsyrk(1.0, x_i64.T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
            if not np.shares_memory(out, acc_sum):  # pragma: no cover - f2py made a copy after all
                c[...] = out
        else:  # a narrower last tile: SYRK's upper triangle of a zeroed result (the lower one adds zeros)
            acc_sum[:n_i, :n_i] += blas.dsyrk(1.0, x_i64.T, trans=0, lower=0)
        popcount_gram(bits_i, None, acc_cnt)
    else:
        n_j = x_j64.shape[1]
        c = acc_sum[:n_i, :n_j].T
        if c.flags.f_contiguous:
            out = blas.dgemm(1.0, x_j64.T, x_i64.T, beta=1.0, c=c, trans_b=1, overwrite_c=1)
            if not np.shares_memory(out, acc_sum):  # pragma: no cover - f2py made a copy after all
                c[...] = out
        else:
            acc_sum[:n_i, :n_j] += x_i64.T @ x_j64
        popcount_gram(bits_i, bits_j, acc_cnt)


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
        (``n_rows·n_i·n_j``, halved on the diagonal).
    """
    n_rows = nnz_i.shape[0]
    if n_rows == 0:
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
def count_dtype(n_rows: int):
    """Dtype of the pair-count accumulators of a job over ``n_rows`` tokens: int32 while every count
    fits (a count never exceeds the rows it covers), int64 beyond. Stored counts are int64 either
    way; int32 accumulators take a quarter less memory and traffic per pair of atoms."""
    return np.int32 if int(n_rows) <= np.iinfo(np.int32).max else np.int64


def _partial_specs(n_tiles: int, tile: int, n_diag: int, cnt_dtype=np.int64):
    return [((n_tiles, tile, tile), np.float64), ((n_tiles, tile, tile), cnt_dtype),
            ((n_diag, tile), np.int64), ((n_diag, tile), np.float64), ((n_diag, tile), np.float64)]


def new_partial(n_tiles: int, tile: int, n_diag: int, buffer: np.ndarray | None = None,
                cnt_dtype=np.int64) -> dict:
    """A zero partial: ``rows``; ``sum``/``cnt`` of shape (n_tiles, T, T); ``fire``/``gsum``/``gsq``
    of shape (n_diag, T).

    With ``buffer`` (a uint8 array of at least :func:`partial_nbytes` bytes) the arrays are views
    into it; otherwise they are freshly allocated.
    """
    specs = _partial_specs(n_tiles, tile, n_diag, cnt_dtype)
    if buffer is None:
        arrays = [zeros(shape, dtype) for shape, dtype in specs]
    else:
        arrays = carve(buffer, specs)
    return {"rows": 0, **dict(zip(("sum", "cnt", "fire", "gsum", "gsq"), arrays))}


def partial_nbytes(n_tiles: int, tile: int, n_diag: int, cnt_dtype=np.int64) -> int:
    """Bytes of a partial laid out in one buffer (see :func:`new_partial`)."""
    return carve_bytes(_partial_specs(n_tiles, tile, n_diag, cnt_dtype))


def combine_partials(parts) -> dict:
    """Sum partials key by key, in list order, into a new partial (inputs are not modified).

    ``parts`` is a list of partials (or a single partial, returned as is). Every key holds a
    number or an array of a fixed shape, so the sum is associative and never concatenates.
    """
    if isinstance(parts, dict):
        return parts
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name, v in parts[0].items():
        if isinstance(v, np.ndarray):
            acc = np.add(v, parts[1][name])  # one pass into a new array (no copy, then add)
            for p in parts[2:]:
                acc += p[name]
        else:
            acc = v
            for p in parts[1:]:
                acc = acc + p[name]
        out[name] = acc
    return out


@njit(**_OPTS)
def _mirror_upper(src, out):
    n = src.shape[0]
    B = 64  # square blocks, so the transposed writes stay in cache
    for i0 in range(0, n, B):
        i1 = min(i0 + B, n)
        for j0 in range(i0, n, B):
            j1 = min(j0 + B, n)
            for i in range(i0, i1):
                for j in range(max(j0, i), j1):
                    v = src[i, j]
                    out[i, j] = v
                    out[j, i] = v


def symmetrise_diag(upper: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Full symmetric block from an upper-triangular (diagonal included) accumulator.

    Entries below the diagonal of ``upper`` are ignored. ``out`` (which may be ``upper`` itself,
    to symmetrise in place, or an array of a wider dtype, to convert on the way) receives the
    result; by default a new array does.
    """
    n = upper.shape[0]
    if upper.ndim != 2 or upper.shape[1] != n:
        raise ValueError(f"upper must be a square 2-D block, got shape {upper.shape}")
    if out is None:
        out = np.empty_like(upper)
    elif out.shape != upper.shape or not np.can_cast(upper.dtype, out.dtype, "safe"):
        raise ValueError(f"out must have shape {upper.shape} and a dtype that holds {upper.dtype}, got "
                         f"{out.shape} and {out.dtype}")
    _mirror_upper(upper, out)
    return out
