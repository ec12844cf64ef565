"""Compiled kernels of the nested-prefix penalty: one fused pass over an ``n_rows × F`` target."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")
_ROW_BLOCK = 2048


@njit(parallel=True, **_OPTS)
def col_sums_r(t, eps):
    """``Σ_n sqrt(t[n, i]² + ε²)`` for every column ``i`` (fixed-order partial sums: deterministic)."""
    n, f = t.shape
    nb = (n + _ROW_BLOCK - 1) // _ROW_BLOCK
    part = np.zeros((nb, f))
    e2 = eps * eps
    for blk in prange(nb):
        lo = blk * _ROW_BLOCK
        hi = min(n, lo + _ROW_BLOCK)
        for r in range(lo, hi):
            for i in range(f):
                x = t[r, i]
                part[blk, i] += np.sqrt(x * x + e2)
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
        for i in range(f):
            x = t[r, i]
            out[r, i] = W[i] * x / np.sqrt(x * x + e2)


@njit(parallel=True, **_OPTS)
def hdiag_into(t, W, eps, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2}``."""
    n, f = t.shape
    e2 = eps * eps
    for r in prange(n):
        for i in range(f):
            x = t[r, i]
            q = x * x + e2
            out[r, i] = W[i] * e2 / (q * np.sqrt(q))


@njit(parallel=True, **_OPTS)
def hvp_into(t, W, eps, v, out):
    """``out = W_i · ε² / (t² + ε²)^{3/2} · v``."""
    n, f = t.shape
    e2 = eps * eps
    for r in prange(n):
        for i in range(f):
            x = t[r, i]
            q = x * x + e2
            out[r, i] = W[i] * e2 / (q * np.sqrt(q)) * v[r, i]
