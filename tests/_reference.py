"""Plain, obviously-correct reference implementations for the tests (docs/design.md).

Everything here is written from the formulas of docs/design.md, one pair (or one shell) at a time, with
explicit Python loops and small numpy operations. It shares no code with ``distpen`` except the
data it is handed, so an agreement between the two is evidence, not a tautology.

Imported by the test modules as ``from _reference import ...`` (pytest puts ``tests/`` on
``sys.path`` because the directory has no ``__init__.py``).
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------- comparisons


def rel_err(a, b) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖, tiny)`` for arrays or scalars."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    den = max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)
    return float(np.linalg.norm(a - b) / den)


def assert_rel(a, b, tol, what=""):
    """Assert ``rel_err(a, b) ≤ tol`` (shapes must match)."""
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def assert_eq_array(actual, expected, *, rtol=1e-12, atol=0.0, dtype=np.float64):
    """Check shape, dtype and values (an ``assert_eq``-style helper)."""
    assert isinstance(actual, np.ndarray), f"expected ndarray, got {type(actual).__name__}"
    assert actual.dtype == dtype, f"dtype {actual.dtype} != {dtype}"
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- weights


def ref_resolve(base: float, rho: float) -> float:
    """The learnable weight of docs/design.md, written out."""
    if base == 0:
        return 0.0
    x = math.log(abs(base)) + rho
    x = min(max(x, -700.0), 700.0)
    return math.copysign(math.exp(x), base)


# --------------------------------------------------------------------------- decoder layout


def ref_offsets(block_sizes, p_out):
    offs = [0]
    for m in block_sizes:
        offs.append(offs[-1] + int(m) * p_out)
    return offs


def ref_blocks(t, block_sizes, p_out):
    """``B_k`` as ``M_k × p_out`` arrays (copies), in atom order, from the flat vector."""
    offs = ref_offsets(block_sizes, p_out)
    out = []
    for k, m in enumerate(block_sizes):
        B = np.empty((int(m), p_out))
        for a in range(int(m)):
            for o in range(p_out):
                B[a, o] = t[offs[k] + a * p_out + o]
        out.append(B)
    return out


def ref_flatten(blocks):
    return np.concatenate([B.ravel() for B in blocks]) if blocks else np.zeros(0)


# --------------------------------------------------------------------------- decoder penalty


def _pairs_list(pairs):
    """Accept a PairTable-like object (``.j .k .w``) or an iterable of ``(j, k, w)``."""
    if hasattr(pairs, "j"):
        return [(int(j), int(k), float(w)) for j, k, w in zip(pairs.j, pairs.k, pairs.w)]
    return [(int(j), int(k), float(w)) for j, k, w in pairs]


def dec_value(t, block_sizes, p_out, pairs, s):
    B = ref_blocks(t, block_sizes, p_out)
    P = 0.0
    for j, k, w in _pairs_list(pairs):
        C = B[j] @ B[k].T
        P += 0.5 * s * w * float(np.sum(C * C))
    return P


def dec_grad(t, block_sizes, p_out, pairs, s):
    B = ref_blocks(t, block_sizes, p_out)
    G = [np.zeros_like(b) for b in B]
    for j, k, w in _pairs_list(pairs):
        W = s * w
        C = B[j] @ B[k].T
        G[j] += W * C @ B[k]
        G[k] += W * C.T @ B[j]
    return ref_flatten(G)


def dec_hvp(t, v, block_sizes, p_out, pairs, s, *, exact=True):
    """Exact HVP (``exact``) or Gauss-Newton product, per the decoder formulas of docs/design.md."""
    B = ref_blocks(t, block_sizes, p_out)
    V = ref_blocks(v, block_sizes, p_out)
    H = [np.zeros_like(b) for b in B]
    for j, k, w in _pairs_list(pairs):
        W = s * w
        C = B[j] @ B[k].T
        dC = V[j] @ B[k].T + B[j] @ V[k].T
        H[j] += W * (dC @ B[k])
        H[k] += W * (dC.T @ B[j])
        if exact:
            H[j] += W * (C @ V[k])
            H[k] += W * (C.T @ V[j])
    return ref_flatten(H)


def dec_residual_term(t, v, block_sizes, p_out, pairs, s):
    """Only the ``C·V`` terms of the exact HVP: ``(R v)_j += W C_jk V_k``, ``(R v)_k += W C_jkᵀ V_j``."""
    B = ref_blocks(t, block_sizes, p_out)
    V = ref_blocks(v, block_sizes, p_out)
    R = [np.zeros_like(b) for b in B]
    for j, k, w in _pairs_list(pairs):
        W = s * w
        C = B[j] @ B[k].T
        R[j] += W * (C @ V[k])
        R[k] += W * (C.T @ V[j])
    return ref_flatten(R)


def dec_gn_dense(t, block_sizes, p_out, pairs, s):
    """The Gauss-Newton matrix assembled entry by entry from the per-pair formula of docs/design.md."""
    B = ref_blocks(t, block_sizes, p_out)
    offs = ref_offsets(block_sizes, p_out)
    n = offs[-1]
    p = p_out
    H = np.zeros((n, n))

    def idx(atom, a, o):
        return offs[atom] + a * p + o

    for j, k, w in _pairs_list(pairs):
        W = s * w
        Gj = B[j].T @ B[j]
        Gk = B[k].T @ B[k]
        for a in range(B[j].shape[0]):
            for o in range(p):
                for o2 in range(p):
                    H[idx(j, a, o), idx(j, a, o2)] += W * Gk[o, o2]
        for a in range(B[k].shape[0]):
            for o in range(p):
                for o2 in range(p):
                    H[idx(k, a, o), idx(k, a, o2)] += W * Gj[o, o2]
        for a in range(B[j].shape[0]):
            for b in range(B[k].shape[0]):
                for o1 in range(p):
                    for o2 in range(p):
                        val = W * B[j][a, o2] * B[k][b, o1]
                        H[idx(j, a, o1), idx(k, b, o2)] += val
                        H[idx(k, b, o2), idx(j, a, o1)] += val
    return H


def dec_weighted_grams(t, block_sizes, p_out, pairs, s):
    """``s·S_a = s·Σ_{b~a} w_ab B_bᵀ B_b`` for every atom: array ``(K, p, p)``."""
    B = ref_blocks(t, block_sizes, p_out)
    S = np.zeros((len(block_sizes), p_out, p_out))
    for j, k, w in _pairs_list(pairs):
        S[j] += s * w * (B[k].T @ B[k])
        S[k] += s * w * (B[j].T @ B[j])
    return S


# --------------------------------------------------------------------------- normalised decoder (§2.2b)


def decn_kappa_pairs(t, block_sizes, p_out, pairs):
    """The pairs with ``w`` replaced by ``w/(N_j N_k)``; pairs with a zero block dropped.

    The Gauss-Newton majorizer of the normalised penalty is ``dec_gn_dense`` on these pairs.
    """
    B = ref_blocks(t, block_sizes, p_out)
    out = []
    for j, k, w in _pairs_list(pairs):
        Nj, Nk = float(np.sum(B[j] ** 2)), float(np.sum(B[k] ** 2))
        if Nj > 0 and Nk > 0:
            out.append((j, k, w / (Nj * Nk)))
    return out


def decn_value(t, block_sizes, p_out, pairs, s):
    B = ref_blocks(t, block_sizes, p_out)
    P = 0.0
    for j, k, w in decn_kappa_pairs(t, block_sizes, p_out, pairs):
        C = B[j] @ B[k].T
        P += 0.5 * s * w * float(np.sum(C * C))
    return P


def decn_grad(t, block_sizes, p_out, pairs, s):
    """``∂P/∂B_j = κ (C B_k − (E/N_j) B_j)`` and symmetrically, pair by pair."""
    B = ref_blocks(t, block_sizes, p_out)
    G = [np.zeros_like(b) for b in B]
    for j, k, w in _pairs_list(pairs):
        Nj, Nk = float(np.sum(B[j] ** 2)), float(np.sum(B[k] ** 2))
        if Nj == 0 or Nk == 0:
            continue
        kap = s * w / (Nj * Nk)
        C = B[j] @ B[k].T
        E = float(np.sum(C * C))
        G[j] += kap * (C @ B[k] - (E / Nj) * B[j])
        G[k] += kap * (C.T @ B[j] - (E / Nk) * B[k])
    return ref_flatten(G)


def decn_hvp(t, v, block_sizes, p_out, pairs, s):
    """The exact HVP in the seed engine's form (docs/design.md), pair by pair."""
    B = ref_blocks(t, block_sizes, p_out)
    V = ref_blocks(v, block_sizes, p_out)
    H = [np.zeros_like(b) for b in B]
    for j, k, w in _pairs_list(pairs):
        Nj, Nk = float(np.sum(B[j] ** 2)), float(np.sum(B[k] ** 2))
        if Nj == 0 or Nk == 0:
            continue
        kap = s * w / (Nj * Nk)
        C = B[j] @ B[k].T
        E = float(np.sum(C * C))
        dC = V[j] @ B[k].T + B[j] @ V[k].T
        al = 2 * float(np.sum(B[j] * V[j])) / Nj
        be = 2 * float(np.sum(B[k] * V[k])) / Nk
        DE = 2 * float(np.sum(C * dC))
        Gj, Gk = C @ B[k], C.T @ B[j]
        DGj, DGk = dC @ B[k] + C @ V[k], dC.T @ B[j] + C.T @ V[j]
        H[j] += kap * (DGj - (al + be) * Gj - (DE / Nj) * B[j] + (E / Nj) * (2 * al + be) * B[j] - (E / Nj) * V[j])
        H[k] += kap * (DGk - (al + be) * Gk - (DE / Nk) * B[k] + (E / Nk) * (2 * be + al) * B[k] - (E / Nk) * V[k])
    return ref_flatten(H)


def probe_dense(matvec, n):
    """Test-only: a dense ``n × n`` matrix built column by column as ``matvec(e_i)``."""
    H = np.zeros((n, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        H[:, i] = matvec(e)
    return H


# --------------------------------------------------------------------------- nested penalty


def nest_lambdas(shell_weights, rho, multiplier=1.0):
    return np.array([multiplier * ref_resolve(float(w), float(r)) for w, r in zip(shell_weights, rho)])


def nest_column_weights(prefix_sizes, shell_weights, rho, F, multiplier=1.0):
    lam = nest_lambdas(shell_weights, rho, multiplier)
    W = np.zeros(F)
    for i in range(F):
        for k, m in enumerate(prefix_sizes):
            if m > i:
                W[i] += lam[k]
    return W


def nest_value(t, prefix_sizes, shell_weights, eps, rho, F, multiplier=1.0):
    W = nest_column_weights(prefix_sizes, shell_weights, rho, F, multiplier)
    T = np.asarray(t).reshape(-1, F)
    P = 0.0
    for n in range(T.shape[0]):
        for i in range(F):
            P += W[i] * math.sqrt(T[n, i] ** 2 + eps**2)
    return P


def nest_grad(t, prefix_sizes, shell_weights, eps, rho, F, multiplier=1.0):
    W = nest_column_weights(prefix_sizes, shell_weights, rho, F, multiplier)
    T = np.asarray(t).reshape(-1, F)
    G = np.empty_like(T)
    for n in range(T.shape[0]):
        for i in range(F):
            G[n, i] = W[i] * T[n, i] / math.sqrt(T[n, i] ** 2 + eps**2)
    return G.ravel()


def nest_hessian_diag(t, prefix_sizes, shell_weights, eps, rho, F, multiplier=1.0):
    W = nest_column_weights(prefix_sizes, shell_weights, rho, F, multiplier)
    T = np.asarray(t).reshape(-1, F)
    D = np.empty_like(T)
    for n in range(T.shape[0]):
        for i in range(F):
            D[n, i] = W[i] * eps**2 / (T[n, i] ** 2 + eps**2) ** 1.5
    return D.ravel()


def nest_grad_rho(t, prefix_sizes, shell_weights, eps, rho, F, multiplier=1.0):
    lam = nest_lambdas(shell_weights, rho, multiplier)
    T = np.asarray(t).reshape(-1, F)
    g = np.zeros(len(prefix_sizes))
    for k, m in enumerate(prefix_sizes):
        acc = 0.0
        for n in range(T.shape[0]):
            for i in range(m):
                acc += math.sqrt(T[n, i] ** 2 + eps**2)
        g[k] = lam[k] * acc
    return g


# --------------------------------------------------------------------------- finite differences


def fd_grad(f, x, h):
    """Central-difference gradient of scalar ``f`` at ``x`` (coordinate by coordinate)."""
    x = np.array(x, dtype=np.float64)
    g = np.empty_like(x)
    for i in range(x.shape[0]):
        xp = x.copy()
        xm = x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def fd_directional(f, x, d, h):
    """Central difference of (scalar or vector) ``f`` at ``x`` along ``d``."""
    return (np.asarray(f(x + h * d)) - np.asarray(f(x - h * d))) / (2 * h)


# --------------------------------------------------------------------------- random problems


def random_block_sizes(rng, k_atoms, max_block=4):
    """Heterogeneous block sizes in ``[1, max_block]``; the first two differ when possible."""
    sizes = rng.integers(1, max_block + 1, size=k_atoms)
    if max_block > 1 and k_atoms >= 2:
        sizes[0], sizes[1] = 1, max_block  # guarantee heterogeneity
    return sizes.astype(np.int64)


def random_pairs(rng, k_atoms, density=0.4, *, min_pairs=1):
    """Random pair set ``(j, k, w)``, ``j < k``, ``w ∈ [0.1, 2)``; shuffled (unsorted)."""
    jj, kk = np.triu_indices(k_atoms, 1)
    keep = rng.random(jj.shape[0]) < density
    if keep.sum() < min_pairs:
        keep[rng.choice(jj.shape[0], size=min(min_pairs, jj.shape[0]), replace=False)] = True
    j, k = jj[keep], kk[keep]
    w = rng.uniform(0.1, 2.0, size=j.shape[0])
    perm = rng.permutation(j.shape[0])
    return j[perm].astype(np.int64), k[perm].astype(np.int64), w[perm]


def random_coactivation(rng, k_atoms, density=0.4):
    """A non-symmetric, non-negative ``K × K`` matrix with random zeros and a non-zero diagonal."""
    C = rng.uniform(0.0, 1.0, size=(k_atoms, k_atoms))
    C[rng.random((k_atoms, k_atoms)) > density] = 0.0
    np.fill_diagonal(C, rng.uniform(0.5, 1.0, size=k_atoms))
    return C


def random_decoder_problem(seed, k_atoms=7, p_out=3, max_block=3, density=0.5, weight=0.7,
                           learnable=False):
    """A random decoder problem: dict with ``pen``, ``t``, ``rho``, ``s``, ``block_sizes``, ``pairs``."""
    import distpen as dp

    rng = np.random.default_rng(seed)
    sizes = random_block_sizes(rng, k_atoms, max_block)
    j, k, w = random_pairs(rng, k_atoms, density)
    pairs = dp.PairTable(j, k, w, k_atoms)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, sizes, p_out, weight, learnable_weight=learnable)
    n = int(sizes.sum()) * p_out
    t = rng.standard_normal(n)
    rho = np.array([rng.uniform(-0.5, 0.5)]) if learnable else np.zeros(0)
    s = ref_resolve(weight, rho[0]) if learnable else weight
    return dict(pen=pen, t=t, rho=rho, s=s, block_sizes=sizes, p_out=p_out, pairs=pairs,
                raw_pairs=list(zip(j.tolist(), k.tolist(), w.tolist())), rng=rng, n=n)


def random_nested_problem(seed, n_rows=4, latent_dim=9, n_shells=3, eps=0.3, tight=True):
    """A random nested problem: dict with ``pen``, ``t``, ``rho``, ``prefix``, ``weights``, ``F``, ``eps``."""
    import distpen as dp

    rng = np.random.default_rng(seed)
    prefix = np.sort(rng.choice(np.arange(1, latent_dim + 1), size=n_shells, replace=False))
    if tight:
        prefix[-1] = latent_dim
    weights = rng.uniform(0.2, 2.0, size=n_shells)
    F = latent_dim
    pen = dp.NestedPrefixPenalty(prefix, weights, eps, latent_dim=F)
    t = rng.standard_normal(n_rows * F)
    rho = rng.uniform(-0.5, 0.5, size=n_shells)
    return dict(pen=pen, t=t, rho=rho, prefix=prefix.tolist(), weights=weights, F=F, eps=eps,
                rng=rng, n=n_rows * F)
