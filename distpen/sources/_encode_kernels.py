"""Compiled per-block kernels of the SAE encoders (pure functions of arrays, no Dask).

A top-k key packs a gate and its latent into one uint64 that orders like (value desc, latent asc):
``float32 bits of the gate << 32 | (2^32 − 1 − latent)``. Gates are ≥ +0, so their bit patterns
order like their values; key 0 is an empty slot (value 0).

Both kernels fuse the bias, the ReLU, the JumpReLU threshold and the selection into one compiled
pass per block. Non-finite pre-activations are detected without a branch (``d = v − v`` is 0 when
``v`` is finite and NaN otherwise) and located afterwards.

The top-k kernel works on a row of a block in four steps, all but the last vectorised:

1. the gates (bias, ReLU, threshold) into a row-sized scratch, whose float32 bits, read as uint32,
   order like the gates;
2. the maxima of *segments*: the ``SEG_VECTORS`` gates at the same lane of ``SEG_VECTORS``
   consecutive vectors of ``LANES`` gates (so ``LANES`` maxima per ``LANES · SEG_VECTORS`` gates);
3. while the row has empty slots (its first block), a lower bound ``τ`` on the block's k-th gate:
   the maxima of ``S · LANES ≥ k`` disjoint subsets (a lane of several segments) are computed, and
   ``τ`` is the largest value that at least k of them reach (bisection on the bits). k distinct
   gates are ≥ ``τ``, so no gate below it is among the block's k largest, nor the row's;
4. only the lanes of segments whose maximum reaches ``max(k-th gate, τ)`` are visited, and a gate is
   inserted when its key beats the row's k-th key. The key comparison makes the result
   independent of the order gates are visited in (ties go to the lower latent).

At d_sae 16 384 and k 32 a row of random pre-activations visits ~60 of its 16 384 gates one by one
(~200 insertions before, when every gate was compared with the running k-th in index order):
0.73 ns a gate against 2.5 ns (``benchmarks/realdata.py``, design.md §6).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._parallel import run_chunks

_MASK = np.uint64(0xFFFFFFFF)


LANES = 16          # gates a vector holds (AVX-512 float32); any value gives the same result
SEG_VECTORS = 8     # vectors a segment spans: one maximum per lane per LANES · SEG_VECTORS gates
SUBSETS_PER_K = 4   # the lower bound uses about 4k subset maxima


def topk_block(pre, bias, thr, use_thr, l0, n_real, keys):
    """Merge gates of one block into the running top-k ``keys`` (rows × k, sorted descending).

    ``pre`` is ``x @ W_block.T`` (rows × L, at least ``keys.shape[0]`` rows) without bias; the gate
    is ``pre + bias`` when positive (and, with ``use_thr``, above ``thr``). Only the first
    ``n_real`` columns are real latents; ``l0`` is the block's first latent. Returns the flat index
    ``row * L + col`` of the first non-finite pre-activation, or −1 (that row's keys are then left
    as they were). Rows run on threads (:func:`distpen._parallel.run_chunks`).
    """
    m = keys.shape[0]
    L = pre.shape[1]
    bad = np.full(m, -1, dtype=np.int64)
    run_chunks(_topk_rows_k, m, pre, bias, thr, use_thr, l0, n_real, keys, bad)
    return _first_bad(bad, L)


def _first_bad(bad, L):
    rows = np.flatnonzero(bad >= 0)
    return int(rows[0] * L + bad[rows[0]]) if rows.size else -1


@njit(cache=True, nogil=True, inline="always")
def _insert_key(row, k, bits, latent):
    """Insert the gate with float32 bits ``bits`` of ``latent`` into the sorted ``row`` of k keys
    when its key beats the k-th."""
    key = (np.uint64(bits) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.uint64(latent))
    if key <= row[k - 1]:
        return
    p = k - 1
    while p > 0 and row[p - 1] < key:
        row[p] = row[p - 1]
        p -= 1
    row[p] = key


@njit(cache=True, nogil=True, inline="always")
def _cut(row, k, tau):
    """The smallest gate bits worth a look: the row's k-th gate (ties are settled by the key),
    ``tau``, and never a zero gate."""
    return max(max(np.uint32(row[k - 1] >> np.uint64(32)), tau), np.uint32(1))


@njit(cache=True, nogil=True)
def _topk_rows_k(i0, i1, pre, bias, thr, use_thr, l0, n_real, keys, bad):
    k = keys.shape[1]
    span = LANES * SEG_VECTORS
    n_seg = n_real // span
    body = n_seg * span
    gates = np.empty(n_real, dtype=np.float32)
    bits = gates.view(np.uint32)
    segmax = np.empty(max(n_seg, 1) * LANES, dtype=np.uint32)
    n_sets = min(max(1, (SUBSETS_PER_K * k + LANES - 1) // LANES), n_seg)   # subsets: lanes of n_sets groups
    per_set = n_seg // n_sets if n_sets > 0 else 0
    bound = n_seg > 0 and n_sets * LANES >= k
    submax = np.empty(max(n_sets, 1) * LANES, dtype=np.uint32)
    for i in range(i0, i1):
        row = keys[i]
        p_row = pre[i]
        nonfinite = False
        if use_thr:
            for j in range(n_real):
                v = p_row[j] + bias[j]
                d = v - v
                nonfinite |= d != d
                gates[j] = v if (v > 0) & (v > thr[j]) else np.float32(0)
        else:
            for j in range(n_real):
                v = p_row[j] + bias[j]
                d = v - v
                nonfinite |= d != d
                gates[j] = v if v > 0 else np.float32(0)
        if nonfinite:
            bad[i] = _first_nonfinite(p_row, bias, n_real)
            continue
        for s in range(n_seg):
            o = s * span
            for lane in range(LANES):
                mx = bits[o + lane]
                for r in range(1, SEG_VECTORS):
                    b = bits[o + r * LANES + lane]
                    mx = b if b > mx else mx
                segmax[s * LANES + lane] = mx
        tau = np.uint32(0)
        if row[k - 1] == 0 and bound:
            for t in range(n_sets):
                for lane in range(LANES):
                    mx = np.uint32(0)
                    for s in range(t * per_set, (t + 1) * per_set):
                        b = segmax[s * LANES + lane]
                        mx = b if b > mx else mx
                    submax[t * LANES + lane] = mx
            lo = np.uint32(0)
            hi = np.uint32(0x7F7FFFFF)      # the largest finite float32
            while lo < hi:
                mid = lo + (hi - lo + np.uint32(1)) // np.uint32(2)
                n_at = 0
                for t in range(n_sets * LANES):
                    n_at += submax[t] >= mid
                if n_at >= k:
                    lo = mid
                else:
                    hi = mid - np.uint32(1)
            tau = lo
        c = _cut(row, k, tau)
        for s in range(n_seg):
            hit = False
            for lane in range(LANES):
                hit |= segmax[s * LANES + lane] >= c
            if not hit:
                continue
            for lane in range(LANES):
                if segmax[s * LANES + lane] < c:
                    continue
                for r in range(SEG_VECTORS):
                    j = s * span + r * LANES + lane
                    if bits[j] >= c:
                        _insert_key(row, k, bits[j], l0 + j)
                        c = _cut(row, k, tau)
        for j in range(body, n_real):
            if bits[j] >= c:
                _insert_key(row, k, bits[j], l0 + j)
                c = _cut(row, k, tau)


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
