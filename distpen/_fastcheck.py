"""A compiled single-pass finiteness check (numpy's ``isfinite(x).all()`` allocates a mask as large as ``x``)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._parallel import n_chunks_of, run_chunks

_BLOCK = 1 << 16


def _first_nonfinite(x):
    first = np.full(n_chunks_of(x.shape[0], _BLOCK), -1, dtype=np.int64)
    run_chunks(_first_nonfinite_k, first.shape[0], x, first)
    hit = first[first >= 0]
    return int(hit[0]) if hit.size else -1


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _first_nonfinite_k(b0, b1, x, first):
    n = x.shape[0]
    for b in range(b0, b1):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        acc = 0.0
        for i in range(lo, hi):
            acc += x[i] * 0.0  # NaN for NaN and ±inf, 0 otherwise; reassoc lets it vectorise
        if acc != 0.0 or acc != acc:
            for i in range(lo, hi):
                if not np.isfinite(x[i]):
                    first[b] = i
                    break


def first_nonfinite(x: np.ndarray) -> int:
    """Index of the first NaN/inf of a 1-D float64 array, or -1 when all entries are finite."""
    if x.shape[0] < 4096:
        bad = np.flatnonzero(~np.isfinite(x))
        return int(bad[0]) if bad.size else -1
    return int(_first_nonfinite(x))


def _first_difference(a, b):
    diff = np.zeros(n_chunks_of(a.shape[0], _BLOCK), dtype=np.bool_)
    run_chunks(_first_difference_k, diff.shape[0], a, b, diff)
    hit = np.flatnonzero(diff)
    return int(hit[0]) if hit.size else -1


@njit(cache=True, nogil=True)
def _first_difference_k(b0, b1, a, b, diff):
    n = a.shape[0]
    for blk in range(b0, b1):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        d = 0
        for i in range(lo, hi):
            d |= a[i] ^ b[i]
        diff[blk] = d != 0


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two float64 arrays hold the same bits (no mask as large as the arrays)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = np.ascontiguousarray(a).reshape(-1)
    b = np.ascontiguousarray(b).reshape(-1)
    if a.dtype.itemsize != 8:
        return bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))
    return int(_first_difference(a.view(np.int64), b.view(np.int64))) < 0
