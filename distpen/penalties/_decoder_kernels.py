"""Compiled per-chunk kernels of the decoder incoherence penalty (pure functions of arrays).

Layout arguments shared by every kernel:

``beta``  flat float64 coefficients; atom ``a`` owns ``beta[off[a]:off[a+1]]`` as ``M_a × p`` row-major
``off``   int64 flat offsets (length ``K + 1``); ``m`` int64 block sizes ``M_a``; ``p`` = p_out

Pairs come either as parallel arrays ``(pj, pk, pw)`` or as a directed CSR over source atoms
``(indptr, nbr, wts)`` that lists every pair in both directions. Kernels that produce per-atom
output iterate over source atoms in parallel: each thread owns the rows of its atoms, so there are
no write races and no atomics, and every block ``B_a`` is read once per atom while its partners stream.

Each public kernel is a Python function that allocates its output and runs a serial compiled
``_…_k(c0, c1, …)`` over chunks on threads (:func:`distpen._parallel.run_chunks`); numba's own
``parallel=True`` would compile every kernel several times over.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._intrinsics import prefetch
from .._parallel import n_chunks_of, run_chunks

_OPTS = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")
_INL = dict(inline="always", **_OPTS)
_U = np.uint64


# ---------------------------------------------------------------- register-blocked micro-kernels
# Positions are converted to uint64 so that LLVM sees non-negative indices: signed indices make
# numba emit a negative-index wraparound per load, which blocks vectorisation of the o-loops.
# (Array slices would avoid that too, but each one costs an atomic refcount update on the shared
# buffer, which two threads then fight over.)

@njit(**_INL)
def _d2x4(x, i0, i1, y, j0, j1, j2, j3, p):
    """Dot products of two rows of ``x`` with four rows of ``y`` (rows start at the given positions)."""
    i0 = _U(i0); i1 = _U(i1); j0 = _U(j0); j1 = _U(j1); j2 = _U(j2); j3 = _U(j3)
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = 0.0
    for o in range(_U(p)):
        a0 = x[i0 + o]; a1 = x[i1 + o]
        b0 = y[j0 + o]; b1 = y[j1 + o]; b2 = y[j2 + o]; b3 = y[j3 + o]
        c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3
        c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3
    return c00, c01, c02, c03, c10, c11, c12, c13


@njit(**_INL)
def _d1x4(x, i0, y, j0, j1, j2, j3, p):
    i0 = _U(i0); j0 = _U(j0); j1 = _U(j1); j2 = _U(j2); j3 = _U(j3)
    c0 = c1 = c2 = c3 = 0.0
    for o in range(_U(p)):
        a = x[i0 + o]
        c0 += a * y[j0 + o]; c1 += a * y[j1 + o]; c2 += a * y[j2 + o]; c3 += a * y[j3 + o]
    return c0, c1, c2, c3


@njit(**_INL)
def _d1x1(x, i0, y, j0, p):
    i0 = _U(i0); j0 = _U(j0)
    c = 0.0
    for o in range(_U(p)):
        c += x[i0 + o] * y[j0 + o]
    return c


@njit(**_INL)
def _cross(x, ox, mx, y, oy, my, p, w, C):
    """``C[r, c] = w · x_r · y_c`` for the ``mx`` rows of ``x`` at ``ox`` and ``my`` rows of ``y`` at ``oy``."""
    r = 0
    while r + 2 <= mx:
        s = ox + r * p
        c = 0
        while c + 4 <= my:
            t = oy + c * p
            v = _d2x4(x, s, s + p, y, t, t + p, t + 2 * p, t + 3 * p, p)
            C[r, c] = w * v[0]; C[r, c + 1] = w * v[1]; C[r, c + 2] = w * v[2]; C[r, c + 3] = w * v[3]
            C[r + 1, c] = w * v[4]; C[r + 1, c + 1] = w * v[5]; C[r + 1, c + 2] = w * v[6]
            C[r + 1, c + 3] = w * v[7]
            c += 4
        r += 2
    # rows left over by the 2-row tiles, then columns left over by the 4-column tiles
    while r < mx:
        s = ox + r * p
        c = 0
        while c + 4 <= my:
            t = oy + c * p
            v = _d1x4(x, s, y, t, t + p, t + 2 * p, t + 3 * p, p)
            C[r, c] = w * v[0]; C[r, c + 1] = w * v[1]; C[r, c + 2] = w * v[2]; C[r, c + 3] = w * v[3]
            c += 4
        r += 1
    c0 = my - my % 4
    if c0 < my:
        for c in range(c0, my):
            t = oy + c * p
            r = 0
            while r + 4 <= mx:
                s = ox + r * p
                v = _d1x4(y, t, x, s, s + p, s + 2 * p, s + 3 * p, p)
                C[r, c] = w * v[0]; C[r + 1, c] = w * v[1]; C[r + 2, c] = w * v[2]; C[r + 3, c] = w * v[3]
                r += 4
            while r < mx:
                C[r, c] = w * _d1x1(x, ox + r * p, y, t, p)
                r += 1


@njit(**_INL)
def _gemm_acc(out, oa, ma, C, y, oy, my, p):
    """``out_r += Σ_c C[r, c] · y_c`` for the ``ma`` rows of ``out`` at ``oa`` and ``my`` rows of ``y`` at ``oy``."""
    up = _U(p)
    r = 0
    while r + 2 <= ma:
        s0 = _U(oa + r * p); s1 = s0 + up
        c = 0
        while c + 4 <= my:
            t0 = _U(oy + c * p); t1 = t0 + up; t2 = t1 + up; t3 = t2 + up
            a0 = C[r, c]; a1 = C[r, c + 1]; a2 = C[r, c + 2]; a3 = C[r, c + 3]
            b0 = C[r + 1, c]; b1 = C[r + 1, c + 1]; b2 = C[r + 1, c + 2]; b3 = C[r + 1, c + 3]
            for o in range(up):
                u0 = y[t0 + o]; u1 = y[t1 + o]; u2 = y[t2 + o]; u3 = y[t3 + o]
                out[s0 + o] += a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3
                out[s1 + o] += b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3
            c += 4
        while c < my:
            t0 = _U(oy + c * p)
            a0 = C[r, c]; b0 = C[r + 1, c]
            for o in range(up):
                u0 = y[t0 + o]
                out[s0 + o] += a0 * u0
                out[s1 + o] += b0 * u0
            c += 1
        r += 2
    while r < ma:
        s0 = _U(oa + r * p)
        c = 0
        while c + 4 <= my:
            t0 = _U(oy + c * p); t1 = t0 + up; t2 = t1 + up; t3 = t2 + up
            a0 = C[r, c]; a1 = C[r, c + 1]; a2 = C[r, c + 2]; a3 = C[r, c + 3]
            for o in range(up):
                out[s0 + o] += a0 * y[t0 + o] + a1 * y[t1 + o] + a2 * y[t2 + o] + a3 * y[t3 + o]
            c += 4
        while c < my:
            t0 = _U(oy + c * p)
            a0 = C[r, c]
            for o in range(up):
                out[s0 + o] += a0 * y[t0 + o]
            c += 1
        r += 1


@njit(**_OPTS)
def _cross_call(x, ox, mx, y, oy, my, p, w, C):
    """:func:`_cross` as a call (kernels that use it several times compile it once, not inlined each time)."""
    _cross(x, ox, mx, y, oy, my, p, w, C)


@njit(**_OPTS)
def _gemm_acc_call(out, oa, ma, C, y, oy, my, p):
    """:func:`_gemm_acc` as a call (see :func:`_cross_call`)."""
    _gemm_acc(out, oa, ma, C, y, oy, my, p)


_PAIR_CHUNK = 64
_ATOM_CHUNK = 8


@njit(**_OPTS)
def _max_block(m):
    mmax = 1
    for a in range(m.shape[0]):
        mmax = max(mmax, m[a])
    return mmax


def pair_sqnorms(beta, off, m, p, pj, pk):
    """``‖B_j B_kᵀ‖²_F`` for every pair."""
    n = pj.shape[0]
    out = np.empty(n)
    run_chunks(_pair_sqnorms_k, n_chunks_of(n, _PAIR_CHUNK), beta, off, m, p, pj, pk, _max_block(m), out)
    return out


@njit(**_INL)
def _pair_sqnorm(beta, off, mj, mk, p, j, k, C):
    """``‖B_j B_kᵀ‖²_F`` (``C``: an ``mmax × mmax`` scratch for the cross Gram)."""
    _cross(beta, off[j], mj, beta, off[k], mk, p, 1.0, C)
    s = 0.0
    for r in range(mj):
        for c in range(mk):
            s += C[r, c] * C[r, c]
    return s


@njit(**_OPTS)
def _pair_sqnorms_k(c0, c1, beta, off, m, p, pj, pk, mmax, out):
    n = pj.shape[0]
    C = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for q in range(ch * _PAIR_CHUNK, min(n, ch * _PAIR_CHUNK + _PAIR_CHUNK)):
            j = pj[q]
            k = pk[q]
            out[q] = _pair_sqnorm(beta, off, m[j], m[k], p, j, k, C)


def grad_csr(beta, off, m, p, indptr, nbr, wts, scale, out, mmax, a0, a1, out_base):
    """``out_a += scale · Σ_b w_ab (B_a B_bᵀ) B_b`` for every source atom ``a0 ≤ a < a1``.

    Atom ``a``'s rows go to ``out[off[a] − out_base:]``, so ``out`` may hold only the rows of the
    range ``[off[a0], off[a1])`` (``out_base = off[a0]``) or the whole vector (``out_base = 0``).
    The parallel loop runs over chunks of the range only.
    """
    run_chunks(_grad_k, n_chunks_of(a1 - a0, _ATOM_CHUNK), beta, off, m, p, indptr, nbr, wts, scale, out,
               mmax, a0, a1, out_base)


@njit(**_OPTS)
def _grad_k(c0, c1, beta, off, m, p, indptr, nbr, wts, scale, out, mmax, a0, a1, out_base):
    C = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for a in range(a0 + ch * _ATOM_CHUNK, min(a1, a0 + ch * _ATOM_CHUNK + _ATOM_CHUNK)):
            ma = m[a]
            oa = off[a]
            for e in range(indptr[a], indptr[a + 1]):
                b = nbr[e]
                _cross(beta, oa, ma, beta, off[b], m[b], p, wts[e] * scale, C)
                _gemm_acc(out, oa - out_base, ma, C, beta, off[b], m[b], p)


def hvp_csr(beta, v, off, m, p, indptr, nbr, wts, scale, mode, out, mmax, a0, a1, out_base, inv):
    """Hessian-vector products for source atoms ``a0 ≤ a < a1`` (output placed as in :func:`grad_csr`).

    Per directed edge ``a → b`` with ``W = scale·w_ab``, ``C = B_a B_bᵀ``, ``dC = V_a B_bᵀ + B_a V_bᵀ``:
    ``mode`` 1 (exact) ``out_a += W (dC B_b + C V_b)``; 0 (Gauss-Newton) ``out_a += W dC B_b``;
    2 (Gauss-Newton without its diagonal blocks ``V_a S_a``) ``out_a += W (B_a V_bᵀ) B_b``.
    A non-empty ``inv`` (per-atom ``1/N_a``, see :func:`inverse_sqnorms`) makes the pair weight
    ``κ = W·inv_a·inv_b`` (the Gauss-Newton blocks of the normalised penalty; modes 0 and 2).
    """
    run_chunks(_hvp_k, n_chunks_of(a1 - a0, _ATOM_CHUNK), beta, v, off, m, p, indptr, nbr, wts, scale, mode,
               out, mmax, a0, a1, out_base, inv)


@njit(**_OPTS)
def _hvp_k(c0, c1, beta, v, off, m, p, indptr, nbr, wts, scale, mode, out, mmax, a0, a1, out_base, inv):
    C = np.empty((mmax, mmax))
    D = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for a in range(a0 + ch * _ATOM_CHUNK, min(a1, a0 + ch * _ATOM_CHUNK + _ATOM_CHUNK)):
            ma = m[a]
            oa = off[a]
            ow = oa - out_base
            for e in range(indptr[a], indptr[a + 1]):
                b = nbr[e]
                mb = m[b]
                ob = off[b]
                w = wts[e] * scale
                if inv.shape[0]:
                    w = w * (inv[a] * inv[b])
                    if w == 0.0:
                        continue
                _cross_call(beta, oa, ma, v, ob, mb, p, w, D)
                if mode != 2:
                    _cross_call(v, oa, ma, beta, ob, mb, p, w, C)
                    for r in range(ma):
                        for c in range(mb):
                            D[r, c] += C[r, c]
                _gemm_acc_call(out, ow, ma, D, beta, ob, mb, p)
                if mode == 1:
                    _cross_call(beta, oa, ma, beta, ob, mb, p, w, C)
                    _gemm_acc_call(out, ow, ma, C, v, ob, mb, p)


def gn_diag_csr(beta, off, m, p, indptr, nbr, wts, scale, out, a0, a1, out_base, inv):
    """Diagonal of the Gauss-Newton matrix for atoms ``a0 ≤ a < a1``: every row of atom ``a`` gets
    ``diag(S_a) = scale · Σ_b w_ab Σ_c B_b[c, :]²`` (output placed as in :func:`grad_csr`; a
    non-empty ``inv`` weights each pair by ``inv_a·inv_b`` as in :func:`hvp_csr`)."""
    run_chunks(_gn_diag_k, a1 - a0, beta, off, m, p, indptr, nbr, wts, scale, out, a0, out_base, inv)


@njit(**_OPTS)
def _gn_diag_k(c0, c1, beta, off, m, p, indptr, nbr, wts, scale, out, a0, out_base, inv):
    d = np.empty(p)
    for a in range(a0 + c0, a0 + c1):
        d[:] = 0.0
        for e in range(indptr[a], indptr[a + 1]):
            b = nbr[e]
            w = wts[e] * scale
            if inv.shape[0]:
                w = w * (inv[a] * inv[b])
            ob = off[b]
            for r in range(m[b]):
                row = _U(ob + r * p)
                for o in range(_U(p)):
                    x = beta[row + o]
                    d[o] += w * x * x
        ow = off[a] - out_base
        for r in range(m[a]):
            dst = _U(ow + r * p)
            for o in range(_U(p)):
                out[dst + o] = d[o]


def gn_offdiag_into(beta, off, m, p, pj, pk, pw, scale, out, r0, c0):
    """Add each pair's off-diagonal Gauss-Newton blocks into the tile ``out``.

    ``out`` holds rows ``[r0, r0 + out.shape[0])`` and columns ``[c0, c0 + out.shape[1])`` of the
    full matrix; ``H[(j,a,o1),(k,b,o2)] += W·B_j[a,o2]·B_k[b,o1]`` and its transpose. Distinct pairs
    write disjoint blocks, so the parallel loop over pairs is race-free.
    """
    run_chunks(_gn_offdiag_k, pj.shape[0], beta, off, m, p, pj, pk, pw, scale, out, r0, c0)


@njit(**_OPTS)
def _gn_offdiag_k(q0, q1, beta, off, m, p, pj, pk, pw, scale, out, r0, c0):
    nr = out.shape[0]
    nc = out.shape[1]
    for q in range(q0, q1):
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
                orow = row - r0
                for b in range(b_lo, b_hi):
                    colbase = oy + b * p
                    f = w * beta[colbase + o1]
                    s = max(clo, colbase)
                    t = min(chi, colbase + p)
                    if s >= t:
                        continue
                    # unsigned positions: no negative-index wraparound, so the loop vectorises
                    src = _U(rowx + s - colbase)
                    dst = _U(s - c0)
                    for u in range(_U(t - s)):
                        out[orow, dst + u] += f * beta[src + u]


def diag_blocks_into(S, atoms, off, m, p, scale, out, r0, c0):
    """Add ``scale · I_{M_a} ⊗ S_a`` for each atom ``a = atoms[i]`` (``S[i]`` is ``p × p``) into the tile ``out``."""
    run_chunks(_diag_blocks_k, atoms.shape[0], S, atoms, off, m, p, scale, out, r0, c0)


@njit(**_OPTS)
def _diag_blocks_k(i0, i1, S, atoms, off, m, p, scale, out, r0, c0):
    nr = out.shape[0]
    nc = out.shape[1]
    for i in range(i0, i1):
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
            dst = _U(clo - c0)
            src = _U(clo - base)
            for row in range(lo, hi):
                o1 = row - base
                orow = row - r0
                for u in range(_U(chi - clo)):
                    out[orow, dst + u] += scale * S[i, o1, src + u]


def weighted_grams_csr(beta, off, m, p, indptr, nbr, wts, atoms, inv):
    """``S_a = Σ_b w_ab B_bᵀ B_b`` for each atom ``a`` in ``atoms``: array ``(len(atoms), p, p)``
    (a non-empty ``inv`` weights each pair by ``inv_a·inv_b`` as in :func:`hvp_csr`)."""
    out = np.zeros((atoms.shape[0], p, p))
    run_chunks(_weighted_grams_k, atoms.shape[0], beta, off, m, p, indptr, nbr, wts, atoms, inv, out)
    return out


@njit(**_OPTS)
def _weighted_grams_k(i0, i1, beta, off, m, p, indptr, nbr, wts, atoms, inv, out):
    for i in range(i0, i1):
        a = atoms[i]
        for e in range(indptr[a], indptr[a + 1]):
            b = nbr[e]
            w = wts[e]
            if inv.shape[0]:
                w = w * (inv[a] * inv[b])
            ob = off[b]
            for r in range(m[b]):
                row = _U(ob + r * p)
                for o1 in range(p):
                    x = w * beta[row + _U(o1)]
                    for o2 in range(_U(p)):
                        out[i, o1, o2] += x * beta[row + o2]


# ---------------------------------------------------------------- Frobenius-normalised penalty
# Per pair, with C = B_j B_kᵀ, E = ‖C‖²_F, N_x = ‖B_x‖²_F and κ = W/(N_j N_k): P = ½ Σ κ E.
# Every kernel takes ``inv`` (length K): 1/N_a, or 0 for an atom whose block is zero; such an
# atom's pairs then carry κ = 0 and contribute nothing. A block with N_a < N_FLOOR counts as zero:
# its 1/N_a would make κ = W/(N_j N_k) overflow (and fast-math forbids testing for inf afterwards).
N_FLOOR = 1e-150

def inverse_sqnorms(beta, off, m, p):
    """``(N, inv)``: ``N_a = ‖B_a‖²_F`` and ``inv_a = 1/N_a`` (0 when ``N_a < N_FLOOR``)."""
    N = np.empty(m.shape[0])
    inv = np.empty(m.shape[0])
    run_chunks(_inverse_sqnorms_k, m.shape[0], beta, off, m, p, N, inv)
    return N, inv


@njit(**_OPTS)
def _inverse_sqnorms_k(a0, a1, beta, off, m, p, N, inv):
    for a in range(a0, a1):
        s = 0.0
        o0 = _U(off[a])
        for u in range(_U(m[a] * p)):
            x = beta[o0 + u]
            s += x * x
        N[a] = s
        inv[a] = 1.0 / s if s >= N_FLOOR else 0.0


def block_dots(beta, v, off, m, p, inv):
    """``α_a = 2⟨B_a, V_a⟩ / N_a`` (0 where ``inv_a = 0``): the relative change of ``N_a`` along ``v``."""
    out = np.empty(m.shape[0])
    run_chunks(_block_dots_k, m.shape[0], beta, v, off, m, p, inv, out)
    return out


@njit(**_OPTS)
def _block_dots_k(a0, a1, beta, v, off, m, p, inv, out):
    for a in range(a0, a1):
        s = 0.0
        o0 = _U(off[a])
        for u in range(_U(m[a] * p)):
            s += beta[o0 + u] * v[o0 + u]
        out[a] = 2.0 * s * inv[a]


@njit(**_INL)
def _axpy_rows(out, oa, x, ox, n, c):
    """``out[oa:oa+n] += c · x[ox:ox+n]``."""
    oa = _U(oa); ox = _U(ox)
    for u in range(_U(n)):
        out[oa + u] += c * x[ox + u]


def grad_norm_csr(beta, off, m, p, indptr, nbr, wts, scale, inv, out, mmax, a0, a1, out_base):
    """Gradient of the normalised penalty for source atoms ``a0 ≤ a < a1`` (placed as in :func:`grad_csr`):
    ``out_a += Σ_b κ_ab (C B_b − (E_ab/N_a) B_a)`` with ``κ_ab = scale·w_ab·inv_a·inv_b``."""
    run_chunks(_grad_norm_k, n_chunks_of(a1 - a0, _ATOM_CHUNK), beta, off, m, p, indptr, nbr, wts, scale, inv,
               out, mmax, a0, a1, out_base)


@njit(**_OPTS)
def _grad_norm_k(c0, c1, beta, off, m, p, indptr, nbr, wts, scale, inv, out, mmax, a0, a1, out_base):
    C = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for a in range(a0 + ch * _ATOM_CHUNK, min(a1, a0 + ch * _ATOM_CHUNK + _ATOM_CHUNK)):
            ma = m[a]
            oa = off[a]
            radial = 0.0  # Σ_b κ_ab E_ab
            for e in range(indptr[a], indptr[a + 1]):
                b = nbr[e]
                kap = wts[e] * scale * (inv[a] * inv[b])
                if kap == 0.0:
                    continue
                mb = m[b]
                _cross(beta, oa, ma, beta, off[b], mb, p, 1.0, C)
                E = 0.0
                for r in range(ma):
                    for c in range(mb):
                        x = C[r, c]
                        E += x * x
                        C[r, c] = kap * x
                radial += kap * E
                _gemm_acc(out, oa - out_base, ma, C, beta, off[b], mb, p)
            if radial != 0.0:
                _axpy_rows(out, oa - out_base, beta, oa, ma * p, -radial * inv[a])


def hvp_norm_csr(beta, v, off, m, p, indptr, nbr, wts, scale, inv, alpha, out, mmax, a0, a1, out_base):
    """Exact Hessian-vector product of the normalised penalty for atoms ``a0 ≤ a < a1`` (placed as in
    :func:`grad_csr`). Per directed edge ``a → b``, with ``α = alpha`` (:func:`block_dots`),
    ``dC = V_a B_bᵀ + B_a V_bᵀ``, ``DE = 2⟨C, dC⟩``:

    ``out_a += κ [dC B_b + C V_b − (α_a+α_b) C B_b + ((2α_a+α_b) E − DE)/N_a · B_a − E/N_a · V_a]``.
    """
    run_chunks(_hvp_norm_k, n_chunks_of(a1 - a0, _ATOM_CHUNK), beta, v, off, m, p, indptr, nbr, wts, scale,
               inv, alpha, out, mmax, a0, a1, out_base)


@njit(**_OPTS)
def _hvp_norm_k(c0, c1, beta, v, off, m, p, indptr, nbr, wts, scale, inv, alpha, out, mmax, a0, a1, out_base):
    C = np.empty((mmax, mmax))
    X = np.empty((mmax, mmax))
    Y = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for a in range(a0 + ch * _ATOM_CHUNK, min(a1, a0 + ch * _ATOM_CHUNK + _ATOM_CHUNK)):
            ma = m[a]
            oa = off[a]
            ow = oa - out_base
            cb = 0.0  # coefficient of B_a, times N_a
            cv = 0.0  # coefficient of V_a, times N_a
            for e in range(indptr[a], indptr[a + 1]):
                b = nbr[e]
                kap = wts[e] * scale * (inv[a] * inv[b])
                if kap == 0.0:
                    continue
                mb = m[b]
                ob = off[b]
                _cross_call(beta, oa, ma, beta, ob, mb, p, 1.0, C)
                _cross_call(v, oa, ma, beta, ob, mb, p, 1.0, X)
                _cross_call(beta, oa, ma, v, ob, mb, p, 1.0, Y)
                g = -(alpha[a] + alpha[b])
                E = 0.0
                DE = 0.0
                for r in range(ma):
                    for c in range(mb):
                        x = C[r, c]
                        d = X[r, c] + Y[r, c]
                        E += x * x
                        DE += x * d
                        X[r, c] = kap * (d + g * x)
                        C[r, c] = kap * x
                DE *= 2.0
                cb += kap * ((2.0 * alpha[a] + alpha[b]) * E - DE)
                cv += kap * E
                _gemm_acc_call(out, ow, ma, X, beta, ob, mb, p)
                _gemm_acc_call(out, ow, ma, C, v, ob, mb, p)
            if cb != 0.0:
                _axpy_rows(out, ow, beta, oa, ma * p, cb * inv[a])
            if cv != 0.0:
                _axpy_rows(out, ow, v, oa, ma * p, -cv * inv[a])


# ---------------------------------------------------------------- collinearity overlap
def self_gram_norms(beta, off, m, p, mmax):
    """``‖B_a B_aᵀ‖_F`` for every atom (``= ‖B_aᵀ B_a‖_F``, computed on the ``M_a × M_a`` side)."""
    out = np.empty(m.shape[0])
    run_chunks(_self_gram_norms_k, n_chunks_of(m.shape[0], _ATOM_CHUNK), beta, off, m, p, mmax, out)
    return out


@njit(**_OPTS)
def _self_gram_norms_k(c0, c1, beta, off, m, p, mmax, out):
    K_ = m.shape[0]
    C = np.empty((mmax, mmax))
    for ch in range(c0, c1):
        for a in range(ch * _ATOM_CHUNK, min(K_, ch * _ATOM_CHUNK + _ATOM_CHUNK)):
            ma = m[a]
            _cross(beta, off[a], ma, beta, off[a], ma, p, 1.0, C)
            s = 0.0
            for r in range(ma):
                for c in range(ma):
                    s += C[r, c] * C[r, c]
            out[a] = np.sqrt(s)


# ---------------------------------------------------------------- collinearity gate: prefetching pair kernel
# Candidate pairs are random, so the partner block B_k of each pair comes from memory (8 KiB for
# M = 4, p = 256) while B_j stays in cache across the pairs of one atom. Measured here the plain
# pair kernel waits on those loads (0.6 M pairs/s a core, 2.4 M/s when both blocks are in L1), and
# a burst of prefetches per pair does not help (the fill buffers overflow), so the blocks of 4 rows
# use a 4 × 4 register tile whose o-loop is cut into segments of _PF_SEG entries, each preceded by
# a few prefetches of the partner block _PF_AHEAD pairs ahead: the loads of the next pairs overlap
# the arithmetic of this one.

_PF_SEG = 32
_PF_AHEAD = 2


@njit(**_INL)
def _sq_tiles4(x, oj, mj, ok, mk, p, pf, pf_end):
    """``‖B_j B_kᵀ‖²_F`` for ``M_j``, ``M_k`` multiples of 4, by 4 × 4 register tiles; prefetches the
    entries ``[pf, pf_end)`` of ``x`` spread over the o-loop (``pf_end ≤ pf``: none)."""
    up = _U(p)
    seg = _U(_PF_SEG)
    n_seg = (p + _PF_SEG - 1) // _PF_SEG
    n_steps = (mj // 4) * (mk // 4) * n_seg
    lines = (pf_end - pf + 15) // 8 if pf_end > pf else 0  # one line more: blocks need not be line-aligned
    per = (lines + n_steps - 1) // n_steps
    cur = _U(pf)
    last = _U(pf_end - 1) if pf_end > pf else _U(0)
    s = 0.0
    for r in range(0, mj, 4):
        s0 = _U(oj + r * p)
        s1 = s0 + up
        s2 = s1 + up
        s3 = s2 + up
        for c in range(0, mk, 4):
            t0 = _U(ok + c * p)
            t1 = t0 + up
            t2 = t1 + up
            t3 = t2 + up
            c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = 0.0
            c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = 0.0
            for o0 in range(_U(0), up, seg):
                for _ in range(per):
                    prefetch(x, min(cur, last))
                    cur += _U(8)
                for o in range(o0, min(o0 + seg, up)):
                    a0 = x[s0 + o]
                    a1 = x[s1 + o]
                    a2 = x[s2 + o]
                    a3 = x[s3 + o]
                    b0 = x[t0 + o]
                    b1 = x[t1 + o]
                    b2 = x[t2 + o]
                    b3 = x[t3 + o]
                    c00 += a0 * b0
                    c01 += a0 * b1
                    c02 += a0 * b2
                    c03 += a0 * b3
                    c10 += a1 * b0
                    c11 += a1 * b1
                    c12 += a1 * b2
                    c13 += a1 * b3
                    c20 += a2 * b0
                    c21 += a2 * b1
                    c22 += a2 * b2
                    c23 += a2 * b3
                    c30 += a3 * b0
                    c31 += a3 * b1
                    c32 += a3 * b2
                    c33 += a3 * b3
            s += (c00 * c00 + c01 * c01 + c02 * c02 + c03 * c03 + c10 * c10 + c11 * c11 + c12 * c12 + c13 * c13
                  + c20 * c20 + c21 * c21 + c22 * c22 + c23 * c23 + c30 * c30 + c31 * c31 + c32 * c32 + c33 * c33)
    return s


def gate_sqnorms(beta, off, m, p, pj, pk, order=None):
    """``‖B_j B_kᵀ‖²_F`` for every pair, like :func:`pair_sqnorms` (≤ a few ulps apart: another tiling).

    The pairs are visited in ``order`` (a permutation of the pair positions; None: as given) and
    the result is written in pair order, so the order changes the speed only. Pairs whose blocks
    both have a multiple of 4 rows use the prefetching 4 × 4 kernel, the others the 2 × 4 one.
    """
    n = pj.shape[0]
    out = np.empty(n)
    order = np.zeros(0, dtype=np.int64) if order is None else order
    run_chunks(_gate_sqnorms_k, n_chunks_of(n, _PAIR_CHUNK), beta, off, m, p, pj, pk, order, _max_block(m), out)
    return out


@njit(**_OPTS)
def _gate_sqnorms_k(c0, c1, beta, off, m, p, pj, pk, order, mmax, out):
    n = pj.shape[0]
    ident = order.shape[0] == 0
    C = np.empty((mmax, mmax))
    q1 = min(n, c1 * _PAIR_CHUNK)
    for i in range(c0 * _PAIR_CHUNK, q1):
        q = i if ident else order[i]
        j = pj[q]
        k = pk[q]
        mj = m[j]
        mk = m[k]
        if mj % 4 == 0 and mk % 4 == 0:
            ia = min(i + _PF_AHEAD, q1 - 1)  # within this piece: the next piece may run on another thread
            ka = pk[ia] if ident else pk[order[ia]]
            out[q] = _sq_tiles4(beta, off[j], mj, off[k], mk, p, off[ka], off[ka + 1])
            continue
        out[q] = _pair_sqnorm(beta, off, mj, mk, p, j, k, C)


@njit(**_OPTS)
def order_by_band(pj, pk, k_atoms, band):
    """A visiting order of the pairs by ``(pj // band, pk)``: stable counting sorts, by ``pk`` then
    by the band of ``pj`` (``O(n + k_atoms)``).

    The blocks ``B_j`` of one band (a few MiB) stay in cache while the partners ``B_k`` are read in
    increasing address order, which the hardware prefetchers follow; random candidates read in
    ``j``-major order wait on memory for every ``B_k`` instead (1.3 µs against 0.9-1.1 µs a pair at
    K = 32 768, M = 4, p = 256, ``band`` 512).
    """
    n = pj.shape[0]
    start = np.zeros(k_atoms + 1, dtype=np.int64)
    for q in range(n):
        start[pk[q] + 1] += 1
    for a in range(k_atoms):
        start[a + 1] += start[a]
    by_k = np.empty(n, dtype=np.int64)
    for q in range(n):
        a = pk[q]
        by_k[start[a]] = q
        start[a] += 1
    n_bands = (k_atoms + band - 1) // band
    first = np.zeros(n_bands + 1, dtype=np.int64)
    for q in range(n):
        first[pj[q] // band + 1] += 1
    for b in range(n_bands):
        first[b + 1] += first[b]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        q = by_k[i]
        b = pj[q] // band
        order[first[b]] = q
        first[b] += 1
    return order
