"""Compiled kernels of the nested-prefix penalty: one fused pass over an ``n_rows × F`` target.

Each row is computed with the fast form ``r = sqrt(t² + ε²)`` (vectorised) while the same pass
sums ``(t² + ε²)·0`` over the row: that sum is NaN exactly when the row holds NaN or ±inf or when
``t²`` overflowed (``|t| > 1.3e154``). Such a row is then either reported (non-finite input: every
kernel returns the first such row, or -1, and the caller raises) or recomputed with the
overflow-free ``r = hypot(t, ε)``. When ``ε²`` itself underflows (``ε < 1e-150``) every row takes
the ``hypot`` path. So results are finite and exact for any finite input, no separate validation
pass reads the target, and ordinary data pays nothing.

Fast-math here allows reassociation and contraction only (no ``nnan``/``ninf``), so NaN and inf
tests stay meaningful.

Row blocks run on threads (:func:`distpen._parallel.run_chunks`); each block writes its own partial
sums, which are then added in block order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._parallel import n_chunks_of, run_chunks

_FM = {"reassoc", "contract", "arcp", "nsz", "afn"}
_OPTS = dict(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
_SAFE = dict(cache=True, nogil=True, error_model="numpy")
_ROW_BLOCK = 1024
_TINY = 1e-300  # ε² below this: every row takes the hypot path


@njit(**_SAFE)
def _row_has_nonfinite(t, r):
    for i in range(t.shape[1]):
        if not np.isfinite(t[r, i]):
            return True
    return False


@njit(**_SAFE)
def _first_bad(bad):
    for b in range(bad.shape[0]):
        if bad[b] >= 0:
            return bad[b]
    return -1


@njit(**_SAFE)
def _sum_blocks(part):
    out = np.zeros(part.shape[1])
    for blk in range(part.shape[0]):
        for i in range(part.shape[1]):
            out[i] += part[blk, i]
    return out


def _blocks(t):
    nb = n_chunks_of(t.shape[0], _ROW_BLOCK)
    return nb, np.full(nb, -1, dtype=np.int64)


def col_sums_r(t, eps):
    """``(Σ_n sqrt(t[n, i]² + ε²) for every column i, first non-finite row or -1)``.

    Fixed-order partial sums per row block (deterministic). A block in which some row was flagged
    is summed again row by row: non-finite rows are reported, overflowing rows use ``hypot``.
    """
    nb, bad = _blocks(t)
    part = np.zeros((nb, t.shape[1]))
    run_chunks(_col_sums_k, nb, t, float(eps), part, bad)
    return _sum_blocks(part), _first_bad(bad)


@njit(**_OPTS)
def _col_sums_k(b0, b1, t, eps, part, bad):
    n, f = t.shape
    e2 = eps * eps
    safe_all = e2 < _TINY
    for blk in range(b0, b1):
        lo = blk * _ROW_BLOCK
        hi = min(n, lo + _ROW_BLOCK)
        flagged = safe_all
        if not safe_all:
            chk = 0.0
            for r in range(lo, hi):
                for i in range(f):
                    x = t[r, i]
                    q = x * x + e2
                    chk += q * 0.0
                    part[blk, i] += np.sqrt(q)
            flagged = chk != chk
        if flagged:
            for i in range(f):
                part[blk, i] = 0.0
            for r in range(lo, hi):
                if _row_has_nonfinite(t, r):
                    if bad[blk] < 0:
                        bad[blk] = r
                    continue
                for i in range(f):
                    x = t[r, i]
                    q = x * x + e2
                    if safe_all or not q * 0.0 == 0.0:
                        part[blk, i] += np.hypot(x, eps)
                    else:
                        part[blk, i] += np.sqrt(q)


def _map_rows(t, W, eps, v, out, kind):
    """``out = W_i · t/r`` (kind 0), ``W_i ε²/r³`` (kind 1) or ``W_i ε²/r³ · v`` (kind 2), ``r = sqrt(t² + ε²)``."""
    nb, bad = _blocks(t)
    run_chunks(_map_rows_k, nb, t, W, float(eps), v, out, kind, bad)
    return _first_bad(bad)


@njit(**_OPTS)
def _map_rows_k(b0, b1, t, W, eps, v, out, kind, bad):
    n, f = t.shape
    e2 = eps * eps
    safe_all = e2 < _TINY
    for blk in range(b0, b1):
        for r in range(blk * _ROW_BLOCK, min(n, (blk + 1) * _ROW_BLOCK)):
            chk = 0.0
            if not safe_all:
                if kind == 0:
                    for i in range(f):
                        x = t[r, i]
                        q = x * x + e2
                        chk += q * 0.0
                        out[r, i] = W[i] * x / np.sqrt(q)
                elif kind == 1:
                    for i in range(f):
                        x = t[r, i]
                        q = x * x + e2
                        chk += q * 0.0
                        out[r, i] = W[i] * e2 / (q * np.sqrt(q))
                else:
                    for i in range(f):
                        x = t[r, i]
                        q = x * x + e2
                        chk += q * 0.0
                        out[r, i] = W[i] * e2 / (q * np.sqrt(q)) * v[r, i]
            if safe_all or chk != chk:
                if _row_has_nonfinite(t, r):
                    if bad[blk] < 0:
                        bad[blk] = r
                    continue
                for i in range(f):
                    x = t[r, i]
                    rr = np.hypot(x, eps)
                    s = eps / rr
                    if kind == 0:
                        out[r, i] = W[i] * (x / rr)
                    elif kind == 1:
                        out[r, i] = W[i] * (s * s) / rr
                    else:
                        out[r, i] = W[i] * (s * s) / rr * v[r, i]


def grad_into(t, W, eps, out):
    """``out = W_i · t / sqrt(t² + ε²)``; returns the first non-finite row of ``t`` or -1."""
    return _map_rows(t, W, eps, t, out, 0)


def hdiag_into(t, W, eps, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2}``; returns the first non-finite row of ``t`` or -1."""
    return _map_rows(t, W, eps, t, out, 1)


def hvp_into(t, W, eps, v, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2} · v``; returns the first non-finite row of ``t`` or -1."""
    return _map_rows(t, W, eps, v, out, 2)


def value_grad_diag_into(t, W, eps, grad, diag):
    """One pass over ``t``: ``(column sums of sqrt(t² + ε²), first non-finite row or -1)``, with
    ``grad = W_i t/r`` and ``diag = W_i ε²/r³`` written on the way (``r = sqrt(t² + ε²)``).

    The column sums are accumulated in the order of :func:`col_sums_r` and the arrays by the
    formulas of :func:`_map_rows`, so on ordinary rows the results are those of the three separate
    kernels bit for bit. A block holding a flagged row is redone as those kernels redo it
    (non-finite rows reported, rows where ``t²`` overflows through ``hypot``; on such rows the
    arrays agree to rounding).
    """
    nb, bad = _blocks(t)
    part = np.zeros((nb, t.shape[1]))
    run_chunks(_value_grad_diag_k, nb, t, W, float(eps), grad, diag, part, bad)
    return _sum_blocks(part), _first_bad(bad)


@njit(**_OPTS)
def _value_grad_diag_k(b0, b1, t, W, eps, grad, diag, part, bad):
    n, f = t.shape
    e2 = eps * eps
    safe_all = e2 < _TINY
    for blk in range(b0, b1):
        lo = blk * _ROW_BLOCK
        hi = min(n, lo + _ROW_BLOCK)
        flagged = safe_all
        if not safe_all:
            chk = 0.0
            for r in range(lo, hi):
                for i in range(f):
                    x = t[r, i]
                    q = x * x + e2
                    chk += q * 0.0
                    s = np.sqrt(q)
                    part[blk, i] += s
                    grad[r, i] = W[i] * x / s
                    diag[r, i] = W[i] * e2 / (q * s)
            flagged = chk != chk
        if flagged:
            for i in range(f):
                part[blk, i] = 0.0
            for r in range(lo, hi):
                if _row_has_nonfinite(t, r):
                    if bad[blk] < 0:
                        bad[blk] = r
                    continue
                row_ok = not safe_all
                if row_ok:
                    c = 0.0
                    for i in range(f):
                        x = t[r, i]
                        c += (x * x + e2) * 0.0
                    row_ok = c == c
                for i in range(f):
                    x = t[r, i]
                    q = x * x + e2
                    if safe_all or not q * 0.0 == 0.0:
                        part[blk, i] += np.hypot(x, eps)
                    else:
                        part[blk, i] += np.sqrt(q)
                    if row_ok:
                        s = np.sqrt(q)
                        grad[r, i] = W[i] * x / s
                        diag[r, i] = W[i] * e2 / (q * s)
                    else:
                        rr = np.hypot(x, eps)
                        u = eps / rr
                        grad[r, i] = W[i] * (x / rr)
                        diag[r, i] = W[i] * (u * u) / rr
