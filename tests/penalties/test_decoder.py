"""DecoderIncoherencePenalty (docs/design.md): derivatives, majorizer, reference agreement, chunks, specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _reference import (
    assert_rel,
    dec_gn_dense,
    dec_grad,
    dec_hvp,
    dec_residual_term,
    dec_value,
    dec_weighted_grams,
    fd_directional,
    fd_grad,
    probe_dense,
    random_coactivation,
    random_decoder_problem,
    ref_resolve,
)

import distpen as dp
from distpen.errors import InvalidArgumentError, InvalidDtypeError

CONFIGS = [
    dict(seed=0, k_atoms=7, p_out=3, max_block=3, density=0.5),
    dict(seed=1, k_atoms=10, p_out=4, max_block=4, density=0.3, learnable=True),
    dict(seed=2, k_atoms=5, p_out=1, max_block=2, density=0.8),
    dict(seed=3, k_atoms=12, p_out=5, max_block=1, density=0.3, learnable=True),
    dict(seed=4, k_atoms=6, p_out=2, max_block=5, density=1.0, weight=2.5),
    # blocks of 1…9 rows: every remainder of the kernels' 2-row × 4-column register tiles
    dict(seed=5, k_atoms=6, p_out=6, max_block=9, density=0.7),
]
IDS = [f"K{c['k_atoms']}-p{c['p_out']}-M{c['max_block']}{'-learn' if c.get('learnable') else ''}" for c in CONFIGS]

REF_TOL = 1e-12  # vectorised kernels vs per-pair reference (same math, different summation order)
FD_TOL = 1e-6  # central differences


@pytest.fixture(params=CONFIGS, ids=IDS)
def prob(request):
    return random_decoder_problem(**request.param)


def _ref_args(pb):
    return pb["block_sizes"], pb["p_out"], pb["raw_pairs"], pb["s"]


# --------------------------------------------------------------------------- reference agreement


def test_value_matches_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    got = pen.value(t, rho)
    assert isinstance(got, float)
    assert got > 0
    assert got == pytest.approx(dec_value(t, *_ref_args(prob)), rel=REF_TOL)


def test_grad_matches_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    g = pen.grad_target(t, rho)
    assert g.shape == t.shape and g.dtype == np.float64
    assert_rel(g, dec_grad(t, *_ref_args(prob)), REF_TOL, "grad")


def test_hvp_and_gn_match_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    for _ in range(3):
        v = rng.standard_normal(t.shape[0])
        assert_rel(pen.hvp(t, rho, v), dec_hvp(t, v, *_ref_args(prob), exact=True), REF_TOL, "hvp")
        assert_rel(pen.psd_majorizer_hvp(t, rho, v), dec_hvp(t, v, *_ref_args(prob), exact=False),
                   REF_TOL, "gn hvp")


def test_dense_gn_matches_reference_formula(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    H = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((prob["n"], prob["n"])))
    assert_rel(H, dec_gn_dense(t, *_ref_args(prob)), REF_TOL, "dense GN")


def test_weighted_grams_match_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    S_ref = dec_weighted_grams(t, *_ref_args(prob))
    assert_rel(pen.weighted_grams(t, rho), S_ref, REF_TOL, "weighted grams")
    atoms = np.array([3, 0, 1])
    assert_rel(pen.weighted_grams(t, rho, atoms), S_ref[atoms], REF_TOL, "weighted grams subset")


def test_reference_gn_product_is_consistent_with_reference_matrix(prob):
    # guards the reference itself: the per-pair GN matrix times v is the per-pair GN product
    t = prob["t"]
    v = prob["rng"].standard_normal(t.shape[0])
    H = dec_gn_dense(t, *_ref_args(prob))
    assert_rel(H @ v, dec_hvp(t, v, *_ref_args(prob), exact=False), 1e-12, "reference GN")


# --------------------------------------------------------------------------- finite differences


def test_fd_value_to_grad(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    fd = fd_grad(lambda x: pen.value(x, rho), t, 1e-5)
    assert_rel(pen.grad_target(t, rho), fd, FD_TOL, "value → grad")


def test_fd_grad_to_hvp(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    for _ in range(3):
        v = rng.standard_normal(t.shape[0])
        fd = fd_directional(lambda x: pen.grad_target(x, rho), t, v, 1e-5)
        assert_rel(pen.hvp(t, rho, v), fd, FD_TOL, "grad → hvp")


def test_fd_value_to_grad_rho():
    pb = random_decoder_problem(5, k_atoms=8, p_out=3, max_block=3, learnable=True)
    pen, t = pb["pen"], pb["t"]
    for r in (-0.7, 0.0, 1.3):
        rho = np.array([r])
        g = pen.grad_rho(t, rho)
        assert g.shape == (1,)
        fd = fd_grad(lambda x: pen.value(t, x), rho, 1e-6)
        assert_rel(g, fd, FD_TOL, "value → grad_rho")
        assert g[0] == pytest.approx(pen.value(t, rho), rel=1e-14)  # ∂P/∂ρ = P


# --------------------------------------------------------------------------- Hessian structure


def test_hvp_symmetric(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    for _ in range(5):
        u = rng.standard_normal(t.shape[0])
        v = rng.standard_normal(t.shape[0])
        a = u @ pen.hvp(t, rho, v)
        b = v @ pen.hvp(t, rho, u)
        assert a == pytest.approx(b, rel=1e-11, abs=1e-11 * np.linalg.norm(u) * np.linalg.norm(v))
        a = u @ pen.psd_majorizer_hvp(t, rho, v)
        b = v @ pen.psd_majorizer_hvp(t, rho, u)
        assert a == pytest.approx(b, rel=1e-11, abs=1e-11 * np.linalg.norm(u) * np.linalg.norm(v))


def test_exact_hessian_is_indefinite_but_gn_is_psd():
    # The exact Hessian of this quartic is generally indefinite; the GN majorizer never is.
    pb = random_decoder_problem(11, k_atoms=8, p_out=3, max_block=3, density=0.6)
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    H = probe_dense(lambda v: pen.hvp(t, rho, v), n)
    G = probe_dense(lambda v: pen.psd_majorizer_hvp(t, rho, v), n)
    np.testing.assert_allclose(H, H.T, atol=1e-11 * np.abs(H).max())
    np.testing.assert_allclose(G, G.T, atol=1e-11 * np.abs(G).max())
    assert np.linalg.eigvalsh(H).min() < -1e-6  # the test problem really has negative curvature
    assert np.linalg.eigvalsh(G).min() >= -1e-10 * np.abs(G).max()


def test_gn_product_psd(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    scale = np.abs(pen.psd_majorizer_diag(t, rho)).max()
    for _ in range(20):
        v = rng.standard_normal(t.shape[0])
        assert v @ pen.psd_majorizer_hvp(t, rho, v) >= -1e-12 * scale * (v @ v)


def test_gn_equals_exact_minus_residual(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    for _ in range(3):
        v = rng.standard_normal(t.shape[0])
        R = dec_residual_term(t, v, *_ref_args(prob))
        assert np.linalg.norm(R) > 1e-3 * np.linalg.norm(pen.hvp(t, rho, v))  # the term is not negligible
        assert_rel(pen.psd_majorizer_hvp(t, rho, v), pen.hvp(t, rho, v) - R, 1e-12, "GN = H − C·V")


def _orthogonal_problem(learnable=False):
    """Blocks on disjoint column supports: every cross-Gram B_j B_kᵀ vanishes."""
    rng = np.random.default_rng(42)
    sizes = np.array([1, 3, 2, 2, 1])
    p = 10
    support = [[0, 1], [2, 3, 4], [5], [6, 7], [8, 9]]
    lay = dp.DecoderLayout(sizes, p)
    t = np.zeros(lay.n_coef)
    for a in range(len(sizes)):
        B = lay.block(t, a)
        B[:, support[a]] = rng.standard_normal((sizes[a], len(support[a])))
    j, k = np.triu_indices(len(sizes), 1)
    w = rng.uniform(0.5, 1.5, size=j.shape[0])
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), sizes, p, 1.3, learnable_weight=learnable)
    return pen, t, rng


@pytest.mark.parametrize("learnable", [False, True])
def test_gn_equals_exact_when_cross_grams_vanish(learnable):
    pen, t, rng = _orthogonal_problem(learnable)
    rho = np.array([0.4]) if learnable else np.zeros(0)
    assert pen.value(t, rho) == 0.0
    np.testing.assert_array_equal(pen.grad_target(t, rho), 0.0)
    n = t.shape[0]
    H = probe_dense(lambda v: pen.hvp(t, rho, v), n)
    G = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    assert np.abs(G).max() > 0.1  # non-trivial curvature
    np.testing.assert_allclose(H, G, rtol=0, atol=1e-13 * np.abs(G).max())
    for _ in range(3):
        v = rng.standard_normal(n)
        assert_rel(pen.hvp(t, rho, v), pen.psd_majorizer_hvp(t, rho, v), 1e-13, "H = GN")


def test_gn_differs_from_exact_in_general():
    pb = random_decoder_problem(0)
    v = pb["rng"].standard_normal(pb["n"])
    a = pb["pen"].hvp(pb["t"], pb["rho"], v)
    b = pb["pen"].psd_majorizer_hvp(pb["t"], pb["rho"], v)
    assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(a)


# --------------------------------------------------------------------------- dense majorizer


def test_dense_gn_equals_probe_loop_and_diag(prob):
    pen, t, rho, n = prob["pen"], prob["t"], prob["rho"], prob["n"]
    H = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    P = probe_dense(lambda v: pen.psd_majorizer_hvp(t, rho, v), n)
    assert_rel(H, P, 1e-12, "dense vs probe loop")
    d = pen.psd_majorizer_diag(t, rho)
    assert d.shape == (n,) and d.dtype == np.float64
    assert_rel(d, np.diag(H), 1e-12, "diag")
    assert (d >= 0).all()
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-13 * np.abs(H).max())
    assert np.linalg.eigvalsh(H).min() >= -1e-10 * np.abs(H).max()


def test_dense_gn_accumulates_with_scale():
    pb = random_decoder_problem(7, learnable=True)
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    H1 = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    base = pb["rng"].standard_normal((n, n))
    out = base.copy()
    ret = pen.accumulate_psd_majorizer_dense(t, rho, -2.5, out)
    assert ret is out
    assert_rel(out, base - 2.5 * H1, 1e-13, "out += scale·H")
    pen.accumulate_psd_majorizer_dense(t, rho, 2.5, out)
    np.testing.assert_allclose(out, base, atol=1e-12 * np.abs(H1).max())
    # ρ enters as exp(ρ) on top of scale
    H2 = pen.accumulate_psd_majorizer_dense(t, rho + 1.0, 1.0, np.zeros((n, n)))
    assert_rel(H2, np.e * H1, 1e-13, "ρ scaling")


def test_dense_diagonal_blocks_are_kron_identity():
    # atom a's diagonal block is I_{M_a} ⊗ s·S_a
    pb = random_decoder_problem(8, k_atoms=6, p_out=3, max_block=4, density=0.7)
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    H = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    S = pen.weighted_grams(t, rho)
    lay = pen.layout
    for a in range(pen.k_atoms):
        lo, hi = lay.coef_range(a, a + 1)
        expected = np.kron(np.eye(lay.block_sizes[a]), S[a])
        assert_rel(H[lo:hi, lo:hi], expected, 1e-13, f"diag block {a}")


# --------------------------------------------------------------------------- constructors agree


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("learnable", [False, True])
def test_from_coactivation_and_from_pairs_agree(seed, learnable):
    rng = np.random.default_rng(100 + seed)
    K, p = 9, 3
    sizes = rng.integers(1, 4, size=K)
    C = random_coactivation(rng, K, 0.5)
    jj, kk, ww = [], [], []
    for a in range(K):
        for b in range(a + 1, K):
            w = 0.5 * (C[a, b] + C[b, a])
            if w > 0:
                jj.append(a)
                kk.append(b)
                ww.append(w)
    perm = rng.permutation(len(jj))
    triple = (np.array(jj)[perm], np.array(kk)[perm], np.array(ww)[perm])
    p1 = dp.DecoderIncoherencePenalty.from_coactivation(C, sizes, p, 0.8, learnable_weight=learnable)
    p2 = dp.DecoderIncoherencePenalty.from_pairs(triple, sizes, p, 0.8, learnable_weight=learnable)
    p3 = dp.DecoderIncoherencePenalty.from_pairs(dp.PairTable(*triple, K), sizes, p, 0.8,
                                                 learnable_weight=learnable)
    assert len(p1.pairs) == len(jj)
    n = p1.n_coef
    t = rng.standard_normal(n)
    v = rng.standard_normal(n)
    rho = np.array([0.3]) if learnable else np.zeros(0)
    for other in (p2, p3):
        assert p1.value(t, rho) == pytest.approx(other.value(t, rho), rel=1e-12)
        assert_rel(p1.grad_target(t, rho), other.grad_target(t, rho), 1e-12, "grad")
        assert_rel(p1.grad_rho(t, rho), other.grad_rho(t, rho), 1e-12, "grad_rho")
        assert_rel(p1.hvp(t, rho, v), other.hvp(t, rho, v), 1e-12, "hvp")
        assert_rel(p1.psd_majorizer_hvp(t, rho, v), other.psd_majorizer_hvp(t, rho, v), 1e-12, "gn")
        assert_rel(p1.psd_majorizer_diag(t, rho), other.psd_majorizer_diag(t, rho), 1e-12, "diag")
        assert p1.hessian_diag(t, rho) is None and other.hessian_diag(t, rho) is None
        H1 = p1.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
        H2 = other.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
        assert_rel(H1, H2, 1e-12, "dense")


def test_from_coactivation_ignores_diagonal_and_uses_symmetrised_weights():
    C = np.array([[9.0, 1.0, 0.0], [3.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    pen = dp.DecoderIncoherencePenalty.from_coactivation(C, [1, 1, 1], 2, weight=1.0)
    assert (pen.pairs.j.tolist(), pen.pairs.k.tolist(), pen.pairs.w.tolist()) == ([0], [1], [2.0])
    t = np.array([1.0, 2.0, 3.0, 1.0, 5.0, 5.0])
    # ½ · 1 · 2 · (1·3 + 2·1)² = 25; atom 2 has no partner
    assert pen.value(t) == pytest.approx(25.0, rel=1e-15)


# --------------------------------------------------------------------------- chunks and restrict


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_cost", [1.0, 7.0, 30.0])
def test_restricted_chunks_sum_to_full(seed, max_cost):
    pb = random_decoder_problem(20 + seed, k_atoms=10, p_out=2, max_block=3, density=0.5,
                                learnable=bool(seed % 2))
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    v = pb["rng"].standard_normal(n)
    chunks = pen.pairs.chunks(max_cost, block_sizes=pen.block_sizes, p_out=pen.p_out)
    assert len(chunks) > 1
    # the chunking splits some atom's pair group across chunks (what this test is about)
    firsts = [set(c.j.tolist()) for c in chunks]
    assert any(firsts[i] & firsts[i + 1] for i in range(len(firsts) - 1)) or max_cost > 20
    value = 0.0
    grad = np.zeros(n)
    hv = np.zeros(n)
    gv = np.zeros(n)
    diag = np.zeros(n)
    dense = np.zeros((n, n))
    grad_rho = np.zeros(pen.rho_count)
    for c in chunks:
        local, atoms = pen.restrict(c)
        assert np.array_equal(atoms, c.atoms())
        assert local.k_atoms == len(atoms) and len(local.pairs) == len(c)
        assert local.learnable_weight == pen.learnable_weight and local.weight == pen.weight
        tl = pen.layout.gather(t, atoms)
        vl = pen.layout.gather(v, atoms)
        idx = pen.layout.scatter_index(atoms)
        value += local.value(tl, rho)
        grad[idx] += local.grad_target(tl, rho)
        hv[idx] += local.hvp(tl, rho, vl)
        gv[idx] += local.psd_majorizer_hvp(tl, rho, vl)
        diag[idx] += local.psd_majorizer_diag(tl, rho)
        grad_rho += local.grad_rho(tl, rho)
        m = idx.shape[0]
        dense[np.ix_(idx, idx)] += local.accumulate_psd_majorizer_dense(tl, rho, 1.0, np.zeros((m, m)))
    assert value == pytest.approx(pen.value(t, rho), rel=1e-12)
    assert_rel(grad, pen.grad_target(t, rho), 1e-12, "grad")
    assert_rel(hv, pen.hvp(t, rho, v), 1e-12, "hvp")
    assert_rel(gv, pen.psd_majorizer_hvp(t, rho, v), 1e-12, "gn")
    assert_rel(diag, pen.psd_majorizer_diag(t, rho), 1e-12, "diag")
    assert_rel(grad_rho, pen.grad_rho(t, rho), 1e-12, "grad_rho")
    assert_rel(dense, pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n))), 1e-12, "dense")


def test_chunks_split_atom_groups_and_still_agree_with_reference():
    # one hub atom with many partners, chunked two pairs at a time: its group is split 5 ways
    K, p = 11, 2
    sizes = np.array([3] + [1, 2] * 5)
    j = np.zeros(10, dtype=np.int64)
    k = np.arange(1, 11)
    w = np.linspace(0.5, 1.5, 10)
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), sizes, p, 1.1)
    t = np.random.default_rng(0).standard_normal(pen.n_coef)
    chunks = pen.pairs.chunks(n_chunks=5)
    assert [len(c) for c in chunks] == [2] * 5
    grad = np.zeros_like(t)
    value = 0.0
    for c in chunks:
        local, atoms = pen.restrict(c)
        idx = pen.layout.scatter_index(atoms)
        value += local.value(t[idx])
        grad[idx] += local.grad_target(t[idx])
    ref = (sizes, p, list(zip(j, k, w)), 1.1)
    assert value == pytest.approx(dec_value(t, *ref), rel=1e-12)
    assert_rel(grad, dec_grad(t, *ref), 1e-12, "grad")


# --------------------------------------------------------------------------- spec round trip


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("with_schedule", [False, True])
def test_spec_round_trip(learnable, with_schedule):
    pb = random_decoder_problem(9, learnable=learnable)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    if with_schedule:
        pen = pen.with_weight_schedule(dp.ScalarWeightSchedule(2.0, 0.5, dp.Geometric(0.5)))
        pen.apply_schedule(3)
    spec = json.loads(json.dumps(pen.to_spec()))
    assert spec["kind_tag"] == "decoder_incoherence"
    assert "pairs" not in spec and "j" not in spec
    for back in (dp.DecoderIncoherencePenalty.from_spec(spec, pen.pairs), dp.penalty_from_spec(spec, pen.pairs)):
        assert isinstance(back, dp.DecoderIncoherencePenalty)
        assert back.to_spec() == pen.to_spec()
        assert back.layout == pen.layout and back.pairs == pen.pairs
        assert back.weight == pen.weight and back.learnable_weight == learnable
        assert back.iter_count == pen.iter_count
        assert back.value(t, rho) == pen.value(t, rho)
        np.testing.assert_array_equal(back.grad_target(t, rho), pen.grad_target(t, rho))
        if with_schedule:
            back.apply_schedule(4)
            assert back.weight == pytest.approx(2.0 - 1.5 * (1 - 0.5**4), rel=1e-15)


def test_penalty_from_spec_needs_pairs():
    pen = random_decoder_problem(0)["pen"]
    with pytest.raises(InvalidArgumentError, match="needs its pairs"):
        dp.penalty_from_spec(pen.to_spec())


# --------------------------------------------------------------------------- schedules


def test_with_weight_schedule_returns_new_penalty():
    pb = random_decoder_problem(3)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v0 = pen.value(t, rho)
    sched = dp.ScalarWeightSchedule(1.4, 0.35, dp.Linear(4))
    sched.step()  # iter_count = 1 → weight 1.4 − 0.2625 = 1.1375
    new = pen.with_weight_schedule(sched)
    assert new is not pen
    assert pen.weight == 0.7 and pen.schedule is None and pen.value(t, rho) == v0
    assert new.weight == pytest.approx(1.1375, rel=1e-15)
    assert new.iter_count == 1
    assert new.value(t, rho) == pytest.approx(v0 * 1.1375 / 0.7, rel=1e-13)
    sched.step()  # the caller's schedule is not shared
    assert new.schedule.iter_count == 1


def test_apply_schedule_in_place():
    pb = random_decoder_problem(4)
    pen = pb["pen"].with_weight_schedule(dp.ScalarWeightSchedule(4.0, 1.0, dp.ReciprocalIter()))
    t, rho = pb["t"], pb["rho"]
    assert pen.weight == 4.0
    g4 = pen.grad_target(t, rho)
    for it, expected in [(0, 4.0), (1, 2.5), (2, 2.0), (5, 1.5), (2, 2.0)]:
        assert pen.apply_schedule(it) is None
        assert pen.weight == pytest.approx(expected, rel=1e-15)
        assert pen.iter_count == it + 1
        assert_rel(pen.grad_target(t, rho), g4 * expected / 4.0, 1e-13, "grad ∝ weight")


def test_apply_schedule_without_schedule_is_noop_but_validates():
    pen = random_decoder_problem(4)["pen"]
    pen.apply_schedule(10)
    assert pen.weight == 0.7 and pen.iter_count == 0
    with pytest.raises(dp.errors.ScheduleError):
        pen.apply_schedule(1_000_000)


def test_decoder_schedule_must_stay_positive():
    pen = random_decoder_problem(4)["pen"]
    with pytest.raises(InvalidArgumentError, match="decoder weight must stay > 0.*reaches 0.0"):
        pen.with_weight_schedule(dp.ScalarWeightSchedule(1.0, 0.0, dp.Linear(3)))
    with pytest.raises(InvalidArgumentError, match="schedule must be a ScalarWeightSchedule"):
        pen.with_weight_schedule(0.5)


# --------------------------------------------------------------------------- learnable weight


def test_learnable_vs_fixed():
    pb = random_decoder_problem(6, learnable=False)
    fixed, t = pb["pen"], pb["t"]
    learn = dp.DecoderIncoherencePenalty.from_pairs(fixed.pairs, fixed.block_sizes, fixed.p_out, fixed.weight,
                                                   learnable_weight=True)
    assert fixed.rho_count == 0 and learn.rho_count == 1
    assert fixed.grad_rho(t, np.zeros(0)).shape == (0,)
    assert fixed.grad_rho(t).shape == (0,)
    assert learn.grad_rho(t, [0.0]).shape == (1,)
    assert learn.value(t, [0.0]) == pytest.approx(fixed.value(t), rel=1e-15)
    for r in (-2.0, 0.5, 3.0):
        s = ref_resolve(fixed.weight, r)
        assert learn.strength([r]) == pytest.approx(s, rel=1e-15)
        assert learn.value(t, [r]) == pytest.approx(fixed.value(t) * s / fixed.weight, rel=1e-13)
    # huge ρ is clamped: finite, non-zero
    assert np.isfinite(learn.value(t, [1000.0]))
    assert learn.value(t, [-1000.0]) > 0


# --------------------------------------------------------------------------- inputs


def test_hessian_diag_is_none(prob):
    assert prob["pen"].hessian_diag(prob["t"], prob["rho"]) is None


def test_float32_and_int_inputs_are_converted():
    pb = random_decoder_problem(2, k_atoms=6, p_out=2, max_block=2)
    pen, rho = pb["pen"], pb["rho"]
    t32 = pb["t"].astype(np.float32)
    t64 = t32.astype(np.float64)
    assert pen.value(t32, rho) == pen.value(t64, rho)
    np.testing.assert_array_equal(pen.grad_target(t32, rho), pen.grad_target(t64, rho))
    v32 = np.ones(pb["n"], dtype=np.float32)
    np.testing.assert_array_equal(pen.hvp(t32, rho, v32), pen.hvp(t64, rho, v32.astype(np.float64)))
    ti = np.arange(pb["n"]) % 3 - 1
    assert pen.value(ti, rho) == pen.value(ti.astype(np.float64), rho)
    assert pen.grad_target(list(t64), rho).dtype == np.float64  # a list is fine too
    tnc = np.repeat(t64, 2)[::2]  # non-contiguous
    assert not tnc.flags.c_contiguous
    np.testing.assert_array_equal(pen.grad_target(tnc, rho), pen.grad_target(t64, rho))


def test_complex_input_refused():
    pb = random_decoder_problem(2)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    with pytest.raises(InvalidDtypeError, match="t has dtype complex128"):
        pen.value(t.astype(np.complex128), rho)
    with pytest.raises(InvalidDtypeError, match="v has dtype complex128"):
        pen.hvp(t, rho, t.astype(np.complex128))


def test_inputs_not_modified(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    v = prob["rng"].standard_normal(t.shape[0])
    t0, v0 = t.copy(), v.copy()
    pen.value(t, rho)
    pen.grad_target(t, rho)
    pen.hvp(t, rho, v)
    pen.psd_majorizer_hvp(t, rho, v)
    pen.psd_majorizer_diag(t, rho)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_array_equal(v, v0)


def test_empty_pair_set():
    pen = dp.DecoderIncoherencePenalty.from_coactivation(np.eye(3), [1, 2, 1], 2, 1.0)
    t = np.arange(8.0)
    assert len(pen.pairs) == 0
    assert pen.value(t) == 0.0
    np.testing.assert_array_equal(pen.grad_target(t), 0.0)
    np.testing.assert_array_equal(pen.hvp(t, None, t), 0.0)
    np.testing.assert_array_equal(pen.psd_majorizer_diag(t), 0.0)
    np.testing.assert_array_equal(pen.accumulate_psd_majorizer_dense(t, None, 1.0, np.zeros((8, 8))), 0.0)


def test_linear_in_weight_and_quartic_in_t():
    pb = random_decoder_problem(12)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v = pb["rng"].standard_normal(pb["n"])
    assert pen.value(2.0 * t, rho) == pytest.approx(16.0 * pen.value(t, rho), rel=1e-13)
    assert_rel(pen.grad_target(2.0 * t, rho), 8.0 * pen.grad_target(t, rho), 1e-13, "grad cubic")
    assert_rel(pen.hvp(2.0 * t, rho, v), 4.0 * pen.hvp(t, rho, v), 1e-13, "hvp quadratic")
    # Euler's theorem for a degree-4 homogeneous function: t·∇P = 4P, tᵀHt = 12P
    assert t @ pen.grad_target(t, rho) == pytest.approx(4.0 * pen.value(t, rho), rel=1e-12)
    assert t @ pen.hvp(t, rho, t) == pytest.approx(12.0 * pen.value(t, rho), rel=1e-12)


def test_metadata():
    pen = random_decoder_problem(0)["pen"]
    assert pen.kind_tag == "decoder_incoherence"
    assert pen.tier is dp.PenaltyTier.BETA
    assert isinstance(pen, dp.Penalty)
    assert "DecoderIncoherencePenalty(k_atoms=7" in repr(pen)
