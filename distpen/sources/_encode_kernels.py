"""Compiled per-block kernels of the SAE encoders (pure functions of arrays, no Dask).

A top-k key packs a gate and its latent into one uint64 that orders like (value desc, latent asc):
``float32 bits of the gate << 32 | (2^32 − 1 − latent)``. Gates are ≥ +0, so their bit patterns
order like their values; key 0 is an empty slot (value 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._parallel import run_chunks

_MASK = np.uint64(0xFFFFFFFF)


def topk_block(pre, bias, thr, use_thr, l0, n_real, keys):
    """Merge gates of one block into the running top-k ``keys`` (rows × k, sorted descending).

    ``pre`` is ``x @ W_block.T`` (rows × L) without bias; the gate is ``pre + bias`` when positive
    (and, with ``use_thr``, above ``thr``). Only the first ``n_real`` columns are real latents.
    Returns the flat index ``row * L + col`` of the first non-finite pre-activation, or −1.
    Rows run on threads (:func:`distpen._parallel.run_chunks`).
    """
    m, L = pre.shape
    bad = np.full(m, -1, dtype=np.int64)
    run_chunks(_topk_rows_k, m, pre, bias, thr, use_thr, l0, n_real, keys, bad)
    rows = np.flatnonzero(bad >= 0)
    return int(rows[0] * L + bad[rows[0]]) if rows.size else -1


@njit(cache=True, nogil=True)
def _topk_rows_k(i0, i1, pre, bias, thr, use_thr, l0, n_real, keys, bad):
    k = keys.shape[1]
    buf = np.empty(1, dtype=np.float32)
    ubuf = buf.view(np.uint32)
    for i in range(i0, i1):
        row = keys[i]
        lo = row[k - 1]
        for j in range(n_real):
            v = pre[i, j] + bias[j]
            if not np.isfinite(v):
                if bad[i] < 0:
                    bad[i] = j
                continue
            if v <= 0.0:
                continue
            if use_thr and not v > thr[j]:
                continue
            buf[0] = v
            bits = np.uint64(ubuf[0])
            key = (bits << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.uint64(l0 + j))
            if key > lo:
                p = k - 1
                while p > 0 and row[p - 1] < key:
                    row[p] = row[p - 1]
                    p -= 1
                row[p] = key
                lo = row[k - 1]


def decode_keys(keys):
    """``(latent int32, value float32)`` of packed keys; empty slots → ``(−1, 0.0)``."""
    vals = (keys >> np.uint64(32)).astype(np.uint32).view(np.float32)
    lat = (_MASK - (keys & _MASK)).astype(np.int64)
    empty = keys == 0
    return np.where(empty, -1, lat).astype(np.int32), np.where(empty, np.float32(0), vals)
