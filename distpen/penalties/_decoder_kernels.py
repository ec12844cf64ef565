"""Compiled per-chunk kernels of the decoder incoherence penalty (pure functions of arrays).

Layout arguments shared by every kernel:

``beta``  flat float64 coefficients; atom ``a`` owns ``beta[off[a]:off[a+1]]`` as ``M_a × p`` row-major
``off``   int64 flat offsets (length ``K + 1``); ``m`` int64 block sizes ``M_a``; ``p`` = p_out

Pairs come either as parallel arrays ``(pj, pk, pw)`` or as a directed CSR over source atoms
``(indptr, nbr, wts)`` that lists every pair in both directions. Kernels that produce per-atom
output iterate over source atoms in parallel: each thread owns the rows of its atoms, so there are
no write races and no atomics, and every block ``B_a`` is read once per atom while its partners stream.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")


@njit(parallel=True, **_OPTS)
def pair_sqnorms(beta, off, m, p, pj, pk):
    """``‖B_j B_kᵀ‖²_F`` for every pair."""
    n = pj.shape[0]
    out = np.empty(n)
    for q in prange(n):
        j = pj[q]
        k = pk[q]
        oj = off[j]
        ok = off[k]
        s = 0.0
        for a in range(m[j]):
            ra = oj + a * p
            for b in range(m[k]):
                rb = ok + b * p
                c = 0.0
                for o in range(p):
                    c += beta[ra + o] * beta[rb + o]
                s += c * c
        out[q] = s
    return out


@njit(parallel=True, **_OPTS)
def grad_csr(beta, off, m, p, indptr, nbr, wts, scale, out, mmax):
    """``out_a += scale · Σ_b w_ab (B_a B_bᵀ) B_b`` for every source atom ``a``."""
    n_src = indptr.shape[0] - 1
    for a in prange(n_src):
        e0 = indptr[a]
        e1 = indptr[a + 1]
        if e0 == e1:
            continue
        ma = m[a]
        oa = off[a]
        C = np.empty((mmax, mmax))
        for e in range(e0, e1):
            b = nbr[e]
            w = wts[e] * scale
            mb = m[b]
            ob = off[b]
            for r in range(ma):
                for c in range(mb):
                    acc = 0.0
                    for o in range(p):
                        acc += beta[oa + r * p + o] * beta[ob + c * p + o]
                    C[r, c] = w * acc
            for r in range(ma):
                base = oa + r * p
                for c in range(mb):
                    coef = C[r, c]
                    src = ob + c * p
                    for o in range(p):
                        out[base + o] += coef * beta[src + o]


@njit(parallel=True, **_OPTS)
def hvp_csr(beta, v, off, m, p, indptr, nbr, wts, scale, exact, out, mmax):
    """Exact (``exact=True``) or Gauss-Newton Hessian-vector product, accumulated into ``out``.

    Per directed edge ``a → b`` with ``W = scale·w_ab``, ``C = B_a B_bᵀ``, ``dC = V_a B_bᵀ + B_a V_bᵀ``:
    ``out_a += W (dC B_b + [exact] C V_b)``.
    """
    n_src = indptr.shape[0] - 1
    for a in prange(n_src):
        e0 = indptr[a]
        e1 = indptr[a + 1]
        if e0 == e1:
            continue
        ma = m[a]
        oa = off[a]
        C = np.empty((mmax, mmax))
        dC = np.empty((mmax, mmax))
        for e in range(e0, e1):
            b = nbr[e]
            w = wts[e] * scale
            mb = m[b]
            ob = off[b]
            for r in range(ma):
                ra = oa + r * p
                for c in range(mb):
                    rb = ob + c * p
                    acc_c = 0.0
                    acc_d = 0.0
                    for o in range(p):
                        acc_c += beta[ra + o] * beta[rb + o]
                        acc_d += v[ra + o] * beta[rb + o] + beta[ra + o] * v[rb + o]
                    C[r, c] = w * acc_c
                    dC[r, c] = w * acc_d
            for r in range(ma):
                base = oa + r * p
                for c in range(mb):
                    src = ob + c * p
                    cd = dC[r, c]
                    if exact:
                        cc = C[r, c]
                        for o in range(p):
                            out[base + o] += cd * beta[src + o] + cc * v[src + o]
                    else:
                        for o in range(p):
                            out[base + o] += cd * beta[src + o]


@njit(parallel=True, **_OPTS)
def col_sqsums(beta, off, m, p, atoms):
    """``Σ_r B_a[r, o]²`` for each atom in ``atoms``: array ``(len(atoms), p)``."""
    n = atoms.shape[0]
    out = np.zeros((n, p))
    for i in prange(n):
        a = atoms[i]
        oa = off[a]
        for r in range(m[a]):
            for o in range(p):
                x = beta[oa + r * p + o]
                out[i, o] += x * x
    return out


@njit(parallel=True, **_OPTS)
def atom_grams(beta, off, m, p, atoms):
    """``G_a = B_aᵀ B_a`` for each atom in ``atoms``: array ``(len(atoms), p, p)``."""
    n = atoms.shape[0]
    out = np.zeros((n, p, p))
    for i in prange(n):
        a = atoms[i]
        oa = off[a]
        for r in range(m[a]):
            row = oa + r * p
            for o1 in range(p):
                x = beta[row + o1]
                for o2 in range(p):
                    out[i, o1, o2] += x * beta[row + o2]
    return out


@njit(parallel=True, **_OPTS)
def gn_offdiag_into(beta, off, m, p, pj, pk, pw, scale, out, r0, c0):
    """Add each pair's off-diagonal Gauss-Newton blocks into the tile ``out``.

    ``out`` holds rows ``[r0, r0 + out.shape[0])`` and columns ``[c0, c0 + out.shape[1])`` of the
    full matrix; ``H[(j,a,o1),(k,b,o2)] += W·B_j[a,o2]·B_k[b,o1]`` and its transpose. Distinct pairs
    write disjoint blocks, so the parallel loop over pairs is race-free.
    """
    nr = out.shape[0]
    nc = out.shape[1]
    for q in prange(pj.shape[0]):
        w = pw[q] * scale
        for side in range(2):
            if side == 0:
                x = pj[q]  # row atom
                y = pk[q]  # column atom
            else:
                x = pk[q]
                y = pj[q]
            ox = off[x]
            oy = off[y]
            lo = max(r0, ox)
            hi = min(r0 + nr, off[x + 1])
            clo = max(c0, oy)
            chi = min(c0 + nc, off[y + 1])
            if lo >= hi or clo >= chi:
                continue
            # row (x, a, o1), column (y, b, o2): value W · B_x[a, o2] · B_y[b, o1]
            for row in range(lo, hi):
                idx = row - ox
                a = idx // p
                o1 = idx - a * p
                rowx = ox + a * p
                b_lo = (clo - oy) // p
                b_hi = (chi - oy - 1) // p + 1
                for b in range(b_lo, b_hi):
                    colbase = oy + b * p
                    f = w * beta[colbase + o1]
                    s = max(clo, colbase)
                    t = min(chi, colbase + p)
                    for col in range(s, t):
                        out[row - r0, col - c0] += f * beta[rowx + col - colbase]


@njit(parallel=True, **_OPTS)
def diag_blocks_into(S, atoms, off, m, p, scale, out, r0, c0):
    """Add ``scale · I_{M_a} ⊗ S_a`` for each atom ``a = atoms[i]`` (``S[i]`` is ``p × p``) into the tile ``out``."""
    nr = out.shape[0]
    nc = out.shape[1]
    for i in prange(atoms.shape[0]):
        a = atoms[i]
        oa = off[a]
        for r in range(m[a]):
            base = oa + r * p
            lo = max(r0, base)
            hi = min(r0 + nr, base + p)
            clo = max(c0, base)
            chi = min(c0 + nc, base + p)
            if lo >= hi or clo >= chi:
                continue
            for row in range(lo, hi):
                o1 = row - base
                for col in range(clo, chi):
                    out[row - r0, col - c0] += scale * S[i, o1, col - base]


@njit(parallel=True, **_OPTS)
def weighted_grams_csr(beta, off, m, p, indptr, nbr, wts, atoms):
    """``S_a = Σ_b w_ab B_bᵀ B_b`` for each atom ``a`` in ``atoms``: array ``(len(atoms), p, p)``."""
    n = atoms.shape[0]
    out = np.zeros((n, p, p))
    for i in prange(n):
        a = atoms[i]
        for e in range(indptr[a], indptr[a + 1]):
            b = nbr[e]
            w = wts[e]
            ob = off[b]
            for r in range(m[b]):
                row = ob + r * p
                for o1 in range(p):
                    x = w * beta[row + o1]
                    for o2 in range(p):
                        out[i, o1, o2] += x * beta[row + o2]
    return out


@njit(parallel=True, **_OPTS)
def cross_hvp_csr(beta, v, off, m, p, indptr, nbr, wts, scale, out, mmax):
    """Off-diagonal part of the Gauss-Newton product: ``out_a += Σ_b W (B_a V_bᵀ) B_b``.

    Together with the diagonal blocks ``V_a·S_a`` it makes the full product ``Σ_b W dC B_b``.
    """
    n_src = indptr.shape[0] - 1
    for a in prange(n_src):
        e0 = indptr[a]
        e1 = indptr[a + 1]
        if e0 == e1:
            continue
        ma = m[a]
        oa = off[a]
        D = np.empty((mmax, mmax))
        for e in range(e0, e1):
            b = nbr[e]
            w = wts[e] * scale
            mb = m[b]
            ob = off[b]
            for r in range(ma):
                ra = oa + r * p
                for c in range(mb):
                    rb = ob + c * p
                    acc = 0.0
                    for o in range(p):
                        acc += beta[ra + o] * v[rb + o]
                    D[r, c] = w * acc
            for r in range(ma):
                base = oa + r * p
                for c in range(mb):
                    coef = D[r, c]
                    src = ob + c * p
                    for o in range(p):
                        out[base + o] += coef * beta[src + o]
