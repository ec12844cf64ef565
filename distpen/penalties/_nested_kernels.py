"""Compiled kernels of the nested-prefix penalty: one fused pass over an ``n_rows × F`` target.

Each row is first computed with the fast form ``r = sqrt(t² + ε²)`` (vectorised); a row in which
``t² + ε²`` left the safe range (overflow for ``|t| > 1e150``, underflow of ``ε²`` for tiny ``ε``)
is recomputed with the overflow-free ``r = hypot(t, ε)``, so results are finite and exact for
any finite input at no cost to ordinary data.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")
_SAFE = dict(cache=True, nogil=True, error_model="numpy")
_ROW_BLOCK = 2048
_HI = 1e300
_LO = 1e-300


@njit(**_SAFE)
def _row_is_unsafe(t, r, e2):
    qmax = 0.0
    qmin = np.inf
    for i in range(t.shape[1]):
        x = t[r, i]
        q = x * x + e2
        qmax = max(qmax, q)
        qmin = min(qmin, q)
    return qmax > _HI or qmin < _LO


@njit(parallel=True, **_OPTS)
def col_sums_r(t, eps):
    """``Σ_n sqrt(t[n, i]² + ε²)`` for every column ``i`` (fixed-order partial sums: deterministic).

    Each block of rows is summed in one fast pass; a block in which some ``t² + ε²`` left the safe
    range is summed again row by row, with ``hypot`` for the unsafe rows.
    """
    n, f = t.shape
    nb = (n + _ROW_BLOCK - 1) // _ROW_BLOCK
    part = np.zeros((nb, f))
    e2 = eps * eps
    for blk in prange(nb):
        lo = blk * _ROW_BLOCK
        hi = min(n, lo + _ROW_BLOCK)
        acc = np.zeros(f)
        qmax = 0.0
        qmin = np.inf
        for r in range(lo, hi):
            for i in range(f):
                x = t[r, i]
                q = x * x + e2
                qmax = max(qmax, q)
                qmin = min(qmin, q)
                acc[i] += np.sqrt(q)
        if qmax > _HI or qmin < _LO:
            acc[:] = 0.0
            for r in range(lo, hi):
                if _row_is_unsafe(t, r, e2):
                    for i in range(f):
                        acc[i] += np.hypot(t[r, i], eps)
                else:
                    for i in range(f):
                        x = t[r, i]
                        acc[i] += np.sqrt(x * x + e2)
        part[blk, :] = acc
    out = np.zeros(f)
    for blk in range(nb):
        for i in range(f):
            out[i] += part[blk, i]
    return out


@njit(parallel=True, **_OPTS)
def grad_into(t, W, eps, out):
    """``out = W_i · t / sqrt(t² + ε²)``."""
    n, f = t.shape
    e2 = eps * eps
    for r in prange(n):
        qmax = 0.0
        qmin = np.inf
        for i in range(f):
            x = t[r, i]
            q = x * x + e2
            qmax = max(qmax, q)
            qmin = min(qmin, q)
            out[r, i] = W[i] * x / np.sqrt(q)
        if qmax > _HI or qmin < _LO:
            for i in range(f):
                x = t[r, i]
                out[r, i] = W[i] * (x / np.hypot(x, eps))


@njit(parallel=True, **_OPTS)
def hdiag_into(t, W, eps, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2}``."""
    n, f = t.shape
    e2 = eps * eps
    for r in prange(n):
        qmax = 0.0
        qmin = np.inf
        for i in range(f):
            x = t[r, i]
            q = x * x + e2
            qmax = max(qmax, q)
            qmin = min(qmin, q)
            out[r, i] = W[i] * e2 / (q * np.sqrt(q))
        if qmax > _HI or qmin < _LO:
            for i in range(f):
                rr = np.hypot(t[r, i], eps)
                s = eps / rr
                out[r, i] = W[i] * (s * s) / rr


@njit(parallel=True, **_OPTS)
def hvp_into(t, W, eps, v, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2} · v``."""
    n, f = t.shape
    e2 = eps * eps
    for r in prange(n):
        qmax = 0.0
        qmin = np.inf
        for i in range(f):
            x = t[r, i]
            q = x * x + e2
            qmax = max(qmax, q)
            qmin = min(qmin, q)
            out[r, i] = W[i] * e2 / (q * np.sqrt(q)) * v[r, i]
        if qmax > _HI or qmin < _LO:
            for i in range(f):
                rr = np.hypot(t[r, i], eps)
                s = eps / rr
                out[r, i] = W[i] * (s * s) / rr * v[r, i]
