"""Compiled per-block kernels of the SAE encoders (pure functions of arrays, no Dask).

A top-k key packs a gate and its latent into one uint64 that orders like (value desc, latent asc):
``float32 bits of the gate << 32 | (2^32 − 1 − latent)``. Gates are ≥ +0, so their bit patterns
order like their values; key 0 is an empty slot (value 0).

Both kernels make one pass over a block of pre-activations (bias, ReLU, the JumpReLU threshold and
the selection fused). The top-k pass keeps each row's current k-th largest gate as a float32
threshold: latents arrive in increasing index, so a later gate equal to it loses the tie, and most
entries cost one add and one compare. Non-finite pre-activations are detected without a branch
(``d = v − v`` is 0 when ``v`` is finite and NaN otherwise) and located afterwards. (Comparing
groups of 16 gates at once as int32 bit patterns saved ~20% of this pass, ~1% of an encode: not
kept.)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._parallel import run_chunks

_MASK = np.uint64(0xFFFFFFFF)


def topk_block(pre, bias, thr, use_thr, l0, n_real, keys):
    """Merge gates of one block into the running top-k ``keys`` (rows × k, sorted descending).

    ``pre`` is ``x @ W_block.T`` (rows × L, at least ``keys.shape[0]`` rows) without bias; the gate
    is ``pre + bias`` when positive (and, with ``use_thr``, above ``thr``). Only the first
    ``n_real`` columns are real latents; blocks must come in increasing ``l0``. Returns the flat
    index ``row * L + col`` of the first non-finite pre-activation, or −1. Rows run on threads
    (:func:`distpen._parallel.run_chunks`).
    """
    m = keys.shape[0]
    L = pre.shape[1]
    bad = np.full(m, -1, dtype=np.int64)
    run_chunks(_topk_rows_k, m, pre, bias, thr, use_thr, l0, n_real, keys, bad)
    return _first_bad(bad, L)


def _first_bad(bad, L):
    rows = np.flatnonzero(bad >= 0)
    return int(rows[0] * L + bad[rows[0]]) if rows.size else -1


@njit(cache=True, nogil=True)
def _topk_rows_k(i0, i1, pre, bias, thr, use_thr, l0, n_real, keys, bad):
    k = keys.shape[1]
    buf = np.empty(1, dtype=np.uint32)
    fbuf = buf.view(np.float32)
    for i in range(i0, i1):
        row = keys[i]
        p_row = pre[i]
        buf[0] = np.uint32(row[k - 1] >> np.uint64(32))
        lo_v = fbuf[0]          # the row's current k-th gate; +0 while it has empty slots
        nonfinite = False
        for j in range(n_real):
            v = p_row[j] + bias[j]
            d = v - v           # 0, or NaN when v is ±inf or NaN
            nonfinite |= d != d
            if v > lo_v:        # a later latent equal to lo_v loses the tie
                if use_thr and not v > thr[j]:
                    continue
                if not np.isfinite(v):
                    continue
                fbuf[0] = v
                key = (np.uint64(buf[0]) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.uint64(l0 + j))
                p = k - 1
                while p > 0 and row[p - 1] < key:
                    row[p] = row[p - 1]
                    p -= 1
                row[p] = key
                buf[0] = np.uint32(row[k - 1] >> np.uint64(32))
                lo_v = fbuf[0]
        if nonfinite:
            bad[i] = _first_nonfinite(p_row, bias, n_real)


@njit(cache=True, nogil=True)
def _first_nonfinite(p_row, bias, n_real):
    for j in range(n_real):
        if not np.isfinite(p_row[j] + bias[j]):
            return j
    return -1


def csr_block(pre, bias, thr, use_thr, n_real, m):
    """Positive gates of one block (rows ``0..m`` of ``pre``, first ``n_real`` columns) as a CSR
    block ``(counts int64 [m], cols int32 [nnz], vals float32 [nnz])``, columns relative to the
    block and increasing within a row; plus the flat index of the first non-finite
    pre-activation, or −1.
    """
    L = pre.shape[1]
    counts = np.zeros(m, dtype=np.int64)
    bad = np.full(m, -1, dtype=np.int64)
    run_chunks(_count_rows_k, m, pre, bias, thr, use_thr, n_real, counts, bad)
    first = _first_bad(bad, L)
    if first >= 0:
        return counts, np.zeros(0, np.int32), np.zeros(0, np.float32), first
    starts = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    cols = np.empty(int(starts[-1]), dtype=np.int32)
    vals = np.empty(int(starts[-1]), dtype=np.float32)
    run_chunks(_fill_rows_k, m, pre, bias, thr, use_thr, n_real, starts, cols, vals)
    return counts, cols, vals, -1


@njit(cache=True, nogil=True)
def _count_rows_k(i0, i1, pre, bias, thr, use_thr, n_real, counts, bad):
    for i in range(i0, i1):
        p_row = pre[i]
        c = 0
        nonfinite = False
        if use_thr:
            for j in range(n_real):
                v = p_row[j] + bias[j]
                d = v - v
                nonfinite |= d != d
                c += (v > 0) & (v > thr[j])
        else:
            for j in range(n_real):
                v = p_row[j] + bias[j]
                d = v - v
                nonfinite |= d != d
                c += v > 0
        counts[i] = c
        if nonfinite:
            bad[i] = _first_nonfinite(p_row, bias, n_real)


@njit(cache=True, nogil=True)
def _fill_rows_k(i0, i1, pre, bias, thr, use_thr, n_real, starts, cols, vals):
    for i in range(i0, i1):
        p_row = pre[i]
        o = starts[i]
        for j in range(n_real):
            v = p_row[j] + bias[j]
            if v > 0 and (not use_thr or v > thr[j]):
                cols[o] = j
                vals[o] = v
                o += 1


def merge_csr_blocks(counts, cols, vals, l0s):
    """Row-major CSR of a row block from its latent blocks' CSR blocks (in increasing ``l0``):
    ``(counts int64 [m], indices int32 [nnz], values float32 [nnz])``."""
    nb = len(counts)
    m = counts[0].shape[0] if nb else 0
    cmat = np.stack(counts) if nb else np.zeros((0, m), np.int64)
    total = cmat.sum(axis=0)
    if nb == 1:
        return total, (cols[0] + np.int32(l0s[0])).astype(np.int32, copy=False), vals[0]
    starts = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(total, out=starts[1:])
    out_c = np.empty(int(starts[-1]), dtype=np.int32)
    out_v = np.empty(int(starts[-1]), dtype=np.float32)
    offs = np.zeros((nb, m + 1), dtype=np.int64)
    np.cumsum(cmat, axis=1, out=offs[:, 1:])
    for b in range(nb):
        _scatter_block_k(cmat[b], offs[b], cols[b], vals[b], np.int32(l0s[b]), starts, out_c, out_v)
        starts[:-1] += cmat[b]
    return total, out_c, out_v


@njit(cache=True, nogil=True)
def _scatter_block_k(cnt, off, cols, vals, l0, starts, out_c, out_v):
    for i in range(cnt.shape[0]):
        s = off[i]
        d = starts[i]
        for t in range(cnt[i]):
            out_c[d + t] = cols[s + t] + l0
            out_v[d + t] = vals[s + t]


def decode_keys(keys):
    """``(latent int32, value float32)`` of packed keys; empty slots → ``(−1, 0.0)``."""
    vals = (keys >> np.uint64(32)).astype(np.uint32).view(np.float32)
    lat = (_MASK - (keys & _MASK)).astype(np.int64)
    empty = keys == 0
    return np.where(empty, -1, lat).astype(np.int32), np.where(empty, np.float32(0), vals)
