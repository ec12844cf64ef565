"""A compiled single-pass finiteness check (numpy's ``isfinite(x).all()`` allocates a mask as large as ``x``)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_BLOCK = 1 << 16


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _first_nonfinite(x):
    n = x.shape[0]
    nb = (n + _BLOCK - 1) // _BLOCK
    first = np.full(nb, -1, dtype=np.int64)
    for b in prange(nb):
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
    for b in range(nb):
        if first[b] >= 0:
            return first[b]
    return -1


def first_nonfinite(x: np.ndarray) -> int:
    """Index of the first NaN/inf of a 1-D float64 array, or -1 when all entries are finite."""
    if x.shape[0] < 4096:
        bad = np.flatnonzero(~np.isfinite(x))
        return int(bad[0]) if bad.size else -1
    return int(_first_nonfinite(x))
