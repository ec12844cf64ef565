"""Property-based tests (hypothesis) over shapes, block sizes, pair sets, probes and schedules."""

from __future__ import annotations

import math

import numpy as np
from _reference import (
    dec_gn_dense,
    dec_grad,
    dec_hvp,
    dec_value,
    nest_grad,
    nest_grad_rho,
    nest_hessian_diag,
    nest_value,
    probe_dense,
    ref_blocks,
    ref_resolve,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distpen as dp

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- strategies


@st.composite
def decoder_problems(draw, max_atoms=8, max_block=7, max_p=4):
    K = draw(st.integers(2, max_atoms))
    p = draw(st.integers(1, max_p))
    sizes = draw(st.lists(st.integers(1, max_block), min_size=K, max_size=K))
    all_pairs = [(j, k) for j in range(K) for k in range(j + 1, K)]
    chosen = draw(st.lists(st.sampled_from(all_pairs), unique=True, min_size=1, max_size=len(all_pairs)))
    ws = draw(st.lists(st.floats(0.01, 10.0), min_size=len(chosen), max_size=len(chosen)))
    weight = draw(st.floats(0.01, 10.0))
    learnable = draw(st.booleans())
    rho = np.array([draw(st.floats(-3.0, 3.0))]) if learnable else np.zeros(0)
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = sum(sizes) * p
    t = scale * rng.standard_normal(n)
    # sparsify some blocks to hit exact zeros
    if draw(st.booleans()):
        t[rng.random(n) < 0.3] = 0.0
    j = np.array([a for a, _ in chosen], dtype=np.int64)
    k = np.array([b for _, b in chosen], dtype=np.int64)
    w = np.array(ws)
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), sizes, p, weight, learnable_weight=learnable)
    s = ref_resolve(weight, rho[0]) if learnable else weight
    return dict(pen=pen, t=t, rho=rho, s=s, sizes=sizes, p=p, pairs=list(zip(j, k, w)), rng=rng, n=n)


def _ref(pb):
    return pb["sizes"], pb["p"], pb["pairs"], pb["s"]


def _close_to_bound(actual, expected, bound, tol):
    """``‖actual − expected‖ ≤ tol·‖bound‖`` where ``bound`` majorises every summand (no cancellation)."""
    err = np.linalg.norm(np.asarray(actual) - np.asarray(expected))
    assert err <= tol * np.linalg.norm(bound) + 1e-300, f"error {err:.3e} vs bound {np.linalg.norm(bound):.3e}"


# --------------------------------------------------------------------------- decoder


@SETTINGS
@given(decoder_problems())
def test_decoder_matches_reference(pb):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v = pb["rng"].standard_normal(pb["n"])
    at, av = np.abs(t), np.abs(v)
    val = pen.value(t, rho)
    assert val >= 0
    assert math.isclose(val, dec_value(t, *_ref(pb)), rel_tol=1e-12, abs_tol=1e-300)
    _close_to_bound(pen.grad_target(t, rho), dec_grad(t, *_ref(pb)), dec_grad(at, *_ref(pb)), 1e-12)
    _close_to_bound(pen.hvp(t, rho, v), dec_hvp(t, v, *_ref(pb)), dec_hvp(at, av, *_ref(pb)), 1e-12)
    _close_to_bound(pen.psd_majorizer_hvp(t, rho, v), dec_hvp(t, v, *_ref(pb), exact=False),
                    dec_hvp(at, av, *_ref(pb), exact=False), 1e-12)
    g = pen.grad_rho(t, rho)
    assert g.shape == (pen.rho_count,)
    if pen.learnable_weight:
        assert math.isclose(g[0], val, rel_tol=1e-14, abs_tol=1e-300)


@SETTINGS
@given(decoder_problems(max_atoms=6, max_block=5, max_p=3))
def test_decoder_dense_majorizer(pb):
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    H = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    ref = dec_gn_dense(t, *_ref(pb))
    bound = dec_gn_dense(np.abs(t), *_ref(pb))
    _close_to_bound(H, ref, bound, 1e-12)
    _close_to_bound(H, probe_dense(lambda x: pen.psd_majorizer_hvp(t, rho, x), n), bound, 1e-12)
    _close_to_bound(pen.psd_majorizer_diag(t, rho), np.diag(H), np.diag(bound), 1e-12)
    _close_to_bound(H, H.T, bound, 1e-13)
    top = np.abs(bound).max()
    assert np.linalg.eigvalsh(H).min() >= -1e-10 * max(top, 1e-300)


@SETTINGS
@given(decoder_problems())
def test_decoder_hvp_symmetric_and_gn_quadratic_form(pb):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    u = pb["rng"].standard_normal(pb["n"])
    v = pb["rng"].standard_normal(pb["n"])
    Hu, Hv = pen.hvp(t, rho, u), pen.hvp(t, rho, v)
    bound = np.abs(u) @ dec_hvp(np.abs(t), np.abs(v), *_ref(pb))
    assert abs(u @ Hv - v @ Hu) <= 1e-11 * bound + 1e-300
    # vᵀ G v = Σ_pairs W ‖V_j B_kᵀ + B_j V_kᵀ‖² ≥ 0 (an independent formula)
    B = ref_blocks(t, pb["sizes"], pb["p"])
    V = ref_blocks(v, pb["sizes"], pb["p"])
    quad = sum(pb["s"] * w * float(np.sum((V[j] @ B[k].T + B[j] @ V[k].T) ** 2)) for j, k, w in pb["pairs"])
    got = v @ pen.psd_majorizer_hvp(t, rho, v)
    gbound = np.abs(v) @ dec_hvp(np.abs(t), np.abs(v), *_ref(pb), exact=False)
    assert got >= -1e-12 * gbound
    assert abs(got - quad) <= 1e-11 * gbound + 1e-300


@SETTINGS
@given(decoder_problems(max_atoms=10), st.floats(0.5, 200.0))
def test_decoder_chunks_restrict_sum_to_full(pb, max_cost):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v = pb["rng"].standard_normal(pb["n"])
    chunks = pen.pairs.chunks(max_cost, block_sizes=pen.block_sizes, p_out=pen.p_out)
    value, grad, gv = 0.0, np.zeros_like(t), np.zeros_like(t)
    for c in chunks:
        local, atoms = pen.restrict(c)
        idx = pen.layout.scatter_index(atoms)
        value += local.value(t[idx], rho)
        grad[idx] += local.grad_target(t[idx], rho)
        gv[idx] += local.psd_majorizer_hvp(t[idx], rho, v[idx])
    assert math.isclose(value, pen.value(t, rho), rel_tol=1e-12, abs_tol=1e-300)
    _close_to_bound(grad, pen.grad_target(t, rho), dec_grad(np.abs(t), *_ref(pb)), 1e-12)
    _close_to_bound(gv, pen.psd_majorizer_hvp(t, rho, v), dec_hvp(np.abs(t), np.abs(v), *_ref(pb), exact=False),
                    1e-12)


# --------------------------------------------------------------------------- pairs


@st.composite
def pair_tables(draw):
    K = draw(st.integers(2, 25))
    all_pairs = [(j, k) for j in range(K) for k in range(j + 1, K)]
    chosen = draw(st.lists(st.sampled_from(all_pairs), unique=True, max_size=min(len(all_pairs), 80)))
    ws = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), min_size=len(chosen), max_size=len(chosen)))
    sizes = np.array(draw(st.lists(st.integers(1, 5), min_size=K, max_size=K)))
    p = draw(st.integers(1, 6))
    return chosen, ws, K, sizes, p


@SETTINGS
@given(pair_tables(), st.integers(1, 400))
def test_pairtable_chunks_cover_in_order_within_cost(data, max_cost):
    chosen, ws, K, sizes, p = data
    pt = dp.PairTable([a for a, _ in chosen], [b for _, b in chosen], ws, K)
    expected = sorted((a, b, w) for (a, b), w in zip(chosen, ws) if w > 0)
    assert list(zip(pt.j.tolist(), pt.k.tolist(), pt.w.tolist())) == expected
    cost = (sizes[pt.j] * sizes[pt.k] * p).astype(float)
    bounds = pt.chunk_bounds(float(max_cost), block_sizes=sizes, p_out=p)
    if len(pt) == 0:
        assert bounds == []
        return
    flat = [i for a, b in bounds for i in range(a, b)]
    assert flat == list(range(len(pt)))
    for a, b in bounds:
        assert b > a
        assert cost[a:b].sum() <= max_cost or b - a == 1
    assert dp.PairTable.concat(pt.chunks(float(max_cost), block_sizes=sizes, p_out=p)) == pt


@SETTINGS
@given(pair_tables(), st.integers(1, 12))
def test_pairtable_n_chunks_balanced(data, n_chunks):
    chosen, ws, K, sizes, p = data
    pt = dp.PairTable([a for a, _ in chosen], [b for _, b in chosen], ws, K)
    bounds = pt.chunk_bounds(n_chunks=n_chunks, block_sizes=sizes, p_out=p)
    if len(pt) == 0:
        assert bounds == []
        return
    cost = (sizes[pt.j] * sizes[pt.k] * p).astype(float)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(len(pt)))
    assert 1 <= len(bounds) <= min(n_chunks, len(pt))
    n_eff = min(n_chunks, len(pt))
    for a, b in bounds:
        assert cost[a:b].sum() <= cost.sum() / n_eff + cost.max()


@SETTINGS
@given(st.integers(2, 12), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_from_dense_round_trip(K, seed, density):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (K, K)) * (rng.random((K, K)) < density)
    pt = dp.PairTable.from_dense(C)
    S = 0.5 * (C + C.T)
    np.fill_diagonal(S, 0.0)
    np.testing.assert_allclose(pt.to_dense(), S, rtol=1e-15, atol=0)
    assert (pt.w > 0).all() and (pt.j < pt.k).all()
    indptr, nbr, wts = pt.directed()
    assert indptr[-1] == 2 * len(pt)


# --------------------------------------------------------------------------- nested


@st.composite
def nested_problems(draw):
    F = draw(st.integers(1, 10))
    n_rows = draw(st.integers(1, 6))
    prefix = sorted(draw(st.sets(st.integers(1, F), min_size=1, max_size=F)))
    latent_dim = draw(st.sampled_from([None, F]))
    ws = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 5.0)), min_size=len(prefix), max_size=len(prefix)))
    eps = draw(st.floats(1e-3, 10.0))
    rho = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=len(prefix), max_size=len(prefix))))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    t = scale * np.random.default_rng(seed).standard_normal(n_rows * (latent_dim or prefix[-1]))
    pen = dp.NestedPrefixPenalty(prefix, ws, eps, latent_dim=latent_dim)
    return dict(pen=pen, t=t, rho=rho, ref=(prefix, ws, eps, rho, latent_dim or prefix[-1]),
                rng=np.random.default_rng(seed + 1))


@SETTINGS
@given(nested_problems())
def test_nested_matches_reference(pb):
    pen, t, rho, ref = pb["pen"], pb["t"], pb["rho"], pb["ref"]
    assert math.isclose(pen.value(t, rho), nest_value(t, *ref), rel_tol=1e-12, abs_tol=1e-300)
    np.testing.assert_allclose(pen.grad_target(t, rho), nest_grad(t, *ref), rtol=1e-12, atol=1e-300)
    hd = nest_hessian_diag(t, *ref)
    np.testing.assert_allclose(pen.hessian_diag(t, rho), hd, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(pen.psd_majorizer_diag(t, rho), hd, rtol=1e-12, atol=1e-300)
    v = pb["rng"].standard_normal(t.shape[0])
    np.testing.assert_allclose(pen.hvp(t, rho, v), hd * v, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(pen.psd_majorizer_hvp(t, rho, v), hd * v, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(pen.grad_rho(t, rho), nest_grad_rho(t, *ref), rtol=1e-12, atol=1e-300)


@SETTINGS
@given(nested_problems())
def test_nested_bounds_and_convexity(pb):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    W = pen.column_weights(rho)
    F = W.shape[0]
    g = pen.grad_target(t, rho).reshape(-1, F)
    assert (np.abs(g) <= W * (1 + 1e-15)).all()  # |W t / sqrt(t² + ε²)| ≤ W
    assert (pen.hessian_diag(t, rho) >= 0).all()
    assert (np.diff(W) <= 1e-12 * max(W.max(), 1e-300)).all()  # W_i non-increasing in i
    u = pb["rng"].standard_normal(t.shape[0]) * (np.abs(t).max() + 1)
    mid = pen.value(0.5 * (t + u), rho)
    assert mid <= 0.5 * (pen.value(t, rho) + pen.value(u, rho)) * (1 + 1e-12)


# --------------------------------------------------------------------------- weights


@SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False))
def test_resolve_learnable_weight_finite_and_signed(base, rho):
    w = dp.resolve_learnable_weight(base, rho)
    assert math.isfinite(w)
    if base == 0:
        assert w == 0.0
    else:
        assert w != 0.0 and math.copysign(1, w) == math.copysign(1, base)
        assert math.exp(-700) <= abs(w) <= math.exp(700)
        assert math.isclose(w, ref_resolve(base, rho), rel_tol=1e-13)


kinds = st.one_of(
    st.floats(1e-6, 1 - 1e-6).map(dp.Geometric),
    st.integers(1, 1000).map(dp.Linear),
    st.just(dp.ReciprocalIter()),
)


@SETTINGS
@given(st.floats(0.0, 1e6), st.floats(0.0, 1e6), kinds,
       st.lists(st.integers(0, 999_999), min_size=2, max_size=20))
def test_schedule_bounded_monotone_and_starts_at_w_start(w_start, w_end, kind, its):
    s = dp.ScalarWeightSchedule(w_start, w_end, kind)
    lo, hi = min(w_start, w_end), max(w_start, w_end)
    # exactness at it = 0 is tested in test_weights; here only to the formula's rounding
    assert abs(s.current_weight(0) - w_start) <= 4e-16 * hi
    its = sorted(its)
    ws = [s.current_weight(it) for it in its]
    assert all(lo <= w <= hi for w in ws)
    pairs = list(zip(ws[:-1], ws[1:]))
    if w_end >= w_start:
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)
    if isinstance(kind, dp.Linear):
        assert s.current_weight(kind.steps) == w_end
    # step() walks the same sequence
    seq = [s.step() for _ in range(5)]
    assert seq == [s.current_weight(i) for i in range(5)]
    assert s.iter_count == 5
