"""DecoderIncoherencePenalty with ``normalize="frobenius"`` (docs/design.md): properties, references,
Gauss-Newton majorizer, zero blocks, specs and the owner-computes split."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from _reference import (
    assert_rel,
    dec_gn_dense,
    dec_weighted_grams,
    decn_grad,
    decn_hvp,
    decn_kappa_pairs,
    decn_value,
    fd_directional,
    fd_grad,
    probe_dense,
    ref_blocks,
    ref_resolve,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import distpen as dp
from distpen.errors import InvalidArgumentError

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REF_TOL = 1e-12


# --------------------------------------------------------------------------- problems


def _build(sizes, p, j, k, w, weight, learnable, rho0, t, rng):
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), sizes, p, weight, learnable_weight=learnable,
                                                  normalize="frobenius")
    rho = np.array([rho0]) if learnable else np.zeros(0)
    s = ref_resolve(weight, rho0) if learnable else weight
    return dict(pen=pen, t=t, rho=rho, s=s, sizes=np.asarray(sizes), p=p,
                pairs=list(zip(j.tolist(), k.tolist(), w.tolist())), rng=rng, n=t.shape[0])


@st.composite
def normalized_problems(draw, max_atoms=7, max_block=5, max_p=5, zero_blocks=False):
    """Random block sizes (blocks of one row included), pairs, weights and a decoder.

    ``shared`` draws every block's rows from a small common basis (pairs whose blocks share
    directions, so ``B_j B_kᵀ`` is large); ``zero_blocks`` may set whole blocks to zero.
    """
    K = draw(st.integers(2, max_atoms))
    p = draw(st.integers(1, max_p))
    sizes = draw(st.lists(st.integers(1, max_block), min_size=K, max_size=K))
    all_pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
    chosen = draw(st.lists(st.sampled_from(all_pairs), unique=True, min_size=1, max_size=len(all_pairs)))
    ws = draw(st.lists(st.floats(0.01, 10.0), min_size=len(chosen), max_size=len(chosen)))
    weight = draw(st.floats(0.01, 10.0))
    learnable = draw(st.booleans())
    rho0 = draw(st.floats(-3.0, 3.0))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    shared = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    blocks = []
    basis = rng.standard_normal((max(1, p // 2), p))
    for m in sizes:
        if shared:
            b = rng.standard_normal((m, basis.shape[0])) @ basis
            if rng.random() < 0.5:  # a row repeated exactly in another block
                b[0] = basis[0]
        else:
            b = rng.standard_normal((m, p))
        blocks.append(scale * rng.uniform(0.3, 3.0) * b)
    if zero_blocks:
        for x in draw(st.lists(st.integers(0, K - 1), max_size=K)):
            blocks[x][:] = 0.0
    t = np.concatenate([b.reshape(-1) for b in blocks])
    j = np.array([a for a, _ in chosen], dtype=np.int64)
    k = np.array([b for _, b in chosen], dtype=np.int64)
    return _build(sizes, p, j, k, np.array(ws), weight, learnable, rho0, t, rng)


def _ref(pb):
    return pb["sizes"], pb["p"], pb["pairs"], pb["s"]


def _block_norms(pb):
    return np.array([np.linalg.norm(b) for b in ref_blocks(pb["t"], pb["sizes"], pb["p"])])


def _sum_w(pb):
    return pb["s"] * sum(w for _, _, w in pb["pairs"])


def _offsets(pen):
    return pen.layout.offsets


def _close(a, b, tol, floor):
    err = float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
    den = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    assert err <= tol * den + floor, f"error {err:.3e} vs tol·{den:.3e} + {floor:.3e}"


# --------------------------------------------------------------------------- reference agreement


@SETTINGS
@given(normalized_problems(zero_blocks=True))
def test_matches_reference(pb):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v = pb["rng"].standard_normal(pb["n"])
    val = pen.value(t, rho)
    assert 0.0 <= val <= 0.5 * _sum_w(pb) * (1 + 1e-12)  # E ≤ N_j N_k
    assert math.isclose(val, decn_value(t, *_ref(pb)), rel_tol=REF_TOL, abs_tol=1e-300)
    nrm = _block_norms(pb)
    nmin = nrm[nrm > 0].min() if (nrm > 0).any() else 1.0
    gfloor = 1e-13 * _sum_w(pb) / nmin
    _close(pen.grad_target(t, rho), decn_grad(t, *_ref(pb)), REF_TOL, gfloor)
    _close(pen.hvp(t, rho, v), decn_hvp(t, v, *_ref(pb)), REF_TOL, gfloor * np.linalg.norm(v) / nmin)
    g = pen.grad_rho(t, rho)
    assert g.shape == (pen.rho_count,)
    if pen.learnable_weight:
        assert g[0] == pytest.approx(val, rel=1e-14, abs=1e-300)
    kp = [(a, b, pb["s"] * w) for a, b, w in decn_kappa_pairs(t, pb["sizes"], pb["p"], pb["pairs"])]
    got = pen.gn_pair_weights(t, rho)
    want = np.zeros(len(pen.pairs))
    lookup = {(a, b): w for a, b, w in kp}
    for q, (a, b) in enumerate(zip(pen.pairs.j.tolist(), pen.pairs.k.tolist())):
        want[q] = lookup.get((a, b), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_hand_computed_example():
    # B_0 = [1, 0], B_1 = [1, 1]: C = 1, E = 1, N_0 = 1, N_1 = 2, κ = 2·0.5/2
    C = np.array([[0.0, 0.5], [0.5, 0.0]])
    pen = dp.DecoderIncoherencePenalty.from_coactivation(C, [1, 1], 2, weight=2.0, normalize="frobenius")
    t = np.array([1.0, 0.0, 1.0, 1.0])
    assert pen.value(t) == pytest.approx(0.25, rel=1e-15)
    kap = 0.5
    g0 = kap * (1.0 * np.array([1.0, 1.0]) - 1.0 * np.array([1.0, 0.0]))
    g1 = kap * (1.0 * np.array([1.0, 0.0]) - 0.5 * np.array([1.0, 1.0]))
    np.testing.assert_allclose(pen.grad_target(t), np.concatenate([g0, g1]), rtol=1e-15)
    np.testing.assert_allclose(pen.gn_pair_weights(t), [kap], rtol=1e-15)


# --------------------------------------------------------------------------- homogeneity


@SETTINGS
@given(normalized_problems(), st.floats(1e-3, 1e3), st.data())
def test_degree_zero_in_every_block(pb, c, data):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    a = data.draw(st.integers(0, pen.k_atoms - 1))
    off = _offsets(pen)
    t2 = t.copy()
    t2[off[a]:off[a + 1]] *= c
    assert pen.value(t2, rho) == pytest.approx(pen.value(t, rho), rel=1e-12, abs=1e-14 * _sum_w(pb))
    # and a rescale of every block at once
    assert pen.value(c * t, rho) == pytest.approx(pen.value(t, rho), rel=1e-12, abs=1e-14 * _sum_w(pb))


@SETTINGS
@given(normalized_problems(zero_blocks=True))
def test_radial_freedom_and_euler_identity(pb):
    """``⟨∂P/∂B_a, B_a⟩ = 0`` per block; differentiating that along ``B_a`` itself (Euler for a
    degree-0 function) gives ``H·B_a = −∂P/∂B_a`` on atom a's rows and 0 on every other row."""
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    g = pen.grad_target(t, rho)
    off = _offsets(pen)
    nrm = _block_norms(pb)
    for a in range(pen.k_atoms):
        sl = slice(off[a], off[a + 1])
        dot = float(np.dot(g[sl], t[sl]))
        assert abs(dot) <= 1e-12 * (np.linalg.norm(g[sl]) * nrm[a] + _sum_w(pb)), (a, dot)
        if nrm[a] == 0:
            continue
        v = np.zeros_like(t)
        v[sl] = t[sl]
        hv = pen.hvp(t, rho, v)
        want = np.zeros_like(t)
        want[sl] = -g[sl]
        _close(hv, want, 1e-11, 1e-12 * _sum_w(pb) / nrm[nrm > 0].min())


# --------------------------------------------------------------------------- central differences


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(normalized_problems(max_atoms=5, max_block=4, max_p=4))
def test_gradient_and_hvp_against_central_differences(pb):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    nrm = _block_norms(pb)
    assume(nrm.min() > 0)
    # per-block steps scaled to each block (the penalty is degree 0 in every block)
    off = _offsets(pen)
    step = np.repeat(1e-5 * nrm, np.diff(off))
    f = lambda x: pen.value(x, rho)  # noqa: E731
    g = pen.grad_target(t, rho)
    # coordinate i perturbed by step[i]: fd_grad on the rescaled variable y = t/step
    fd = fd_grad(lambda y: f(y * step), t / step, 1.0) / step
    floor = 1e-7 * _sum_w(pb) / nrm.min()
    _close(g, fd, 1e-6, floor)
    v = pb["rng"].standard_normal(pb["n"]) * np.repeat(nrm / np.sqrt(np.diff(off)), np.diff(off))
    hv = pen.hvp(t, rho, v)
    fdh = fd_directional(lambda x: pen.grad_target(x, rho), t, v, 1e-5)
    _close(hv, fdh, 1e-6, floor)
    # the symmetric bilinear form uᵀHv = vᵀHu
    u = pb["rng"].standard_normal(pb["n"]) * np.repeat(nrm / np.sqrt(np.diff(off)), np.diff(off))
    hu = pen.hvp(t, rho, u)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    assert abs(u @ hv - v @ hu) <= 1e-10 * (nu * np.linalg.norm(hv) + nv * np.linalg.norm(hu)
                                            + nu * nv * _sum_w(pb) / nrm.min() ** 2)


# --------------------------------------------------------------------------- Gauss-Newton majorizer


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(normalized_problems(max_atoms=5, max_block=4, max_p=3, zero_blocks=True))
def test_gauss_newton_majorizer(pb):
    pen, t, rho, n = pb["pen"], pb["t"], pb["rho"], pb["n"]
    H = pen.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))
    kp = decn_kappa_pairs(t, pb["sizes"], pb["p"], pb["pairs"])
    ref = dec_gn_dense(t, pb["sizes"], pb["p"], kp, pb["s"])
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-300)
    np.testing.assert_allclose(H, ref, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-13 * scale)
    assert np.linalg.eigvalsh(H).min() >= -1e-12 * scale
    probed = probe_dense(lambda x: pen.psd_majorizer_hvp(t, rho, x), n)
    np.testing.assert_allclose(probed, H, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(pen.psd_majorizer_diag(t, rho), np.diag(H), rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(pen.weighted_grams(t, rho), dec_weighted_grams(t, pb["sizes"], pb["p"], kp, pb["s"]),
                               rtol=0, atol=1e-12 * scale)
    assert pen.hessian_diag(t, rho) is None


def test_majorizer_does_not_dominate_the_exact_hessian():
    """PSD, but H_GN − H_exact has a negative direction: the docs say it is not a majorizer of P."""
    rng = np.random.default_rng(3)
    found = False
    for seed in range(20):
        pb = _build([2, 3, 2], 3, np.array([0, 0, 1]), np.array([1, 2, 2]), np.ones(3), 1.0, False, 0.0,
                    rng.standard_normal(21), rng)
        pen, t, n = pb["pen"], pb["t"], pb["n"]
        Hx = probe_dense(lambda x: pen.hvp(t, None, x), n)
        Hg = pen.accumulate_psd_majorizer_dense(t, None, 1.0, np.zeros((n, n)))
        if np.linalg.eigvalsh(0.5 * (Hg - Hx + (Hg - Hx).T)).min() < -1e-8 * np.abs(Hg).max():
            found = True
            break
    assert found


# --------------------------------------------------------------------------- zero blocks


@pytest.mark.parametrize("tiny", [0.0, 1e-80, 1e-160, 1e-300])
def test_zero_norm_blocks_contribute_nothing(tiny):
    """A zero block (and one with ``N < 1e-150``, whose ``1/N`` would overflow κ) drops its pairs."""
    rng = np.random.default_rng(1)
    sizes, p = [2, 1, 3, 2, 1], 3
    j = np.array([0, 0, 1, 1, 2, 3]); k = np.array([1, 2, 2, 4, 3, 4]); w = rng.uniform(0.5, 2, 6)
    pb = _build(sizes, p, j, k, w, 1.3, True, 0.2, rng.standard_normal(sum(sizes) * p), rng)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    off = _offsets(pen)
    t[off[1]:off[2]] = tiny  # atom 1: zero (or a norm whose inverse overflows)
    keep = (j != 1) & (k != 1)
    ref_pen = pen.with_pairs(dp.PairTable(j[keep], k[keep], w[keep], len(sizes)))
    v = rng.standard_normal(t.shape[0])
    n = t.shape[0]
    ops = {"value": lambda q: q.value(t, rho), "grad": lambda q: q.grad_target(t, rho),
           "grad_rho": lambda q: q.grad_rho(t, rho), "hvp": lambda q: q.hvp(t, rho, v),
           "gn": lambda q: q.psd_majorizer_hvp(t, rho, v), "diag": lambda q: q.psd_majorizer_diag(t, rho),
           "grams": lambda q: q.weighted_grams(t, rho),
           "dense": lambda q: q.accumulate_psd_majorizer_dense(t, rho, 1.0, np.zeros((n, n)))}
    for name, op in ops.items():
        got, want = np.asarray(op(pen)), np.asarray(op(ref_pen))
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0, err_msg=name)
    assert pen.gn_pair_weights(t, rho)[~keep].tolist() == [0.0] * int((~keep).sum())
    # all blocks zero: every operation is exactly zero
    z = np.zeros_like(t)
    assert pen.value(z, rho) == 0.0
    for arr in (pen.grad_target(z, rho), pen.hvp(z, rho, v), pen.psd_majorizer_hvp(z, rho, v),
                pen.psd_majorizer_diag(z, rho)):
        assert not arr.any()


# --------------------------------------------------------------------------- spec, copies, schedules


@pytest.mark.parametrize("learnable", [False, True])
def test_spec_round_trip_and_copies(learnable):
    rng = np.random.default_rng(4)
    pb = _build([1, 3, 2, 2], 2, np.array([0, 1, 0]), np.array([1, 3, 2]), np.array([0.5, 1.0, 2.0]), 0.9,
                learnable, -0.4, rng.standard_normal(16), rng)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    sched = pen.with_weight_schedule(dp.ScalarWeightSchedule(2.0, 0.5, dp.Geometric(0.5)))
    sched.apply_schedule(2)
    for p_ in (pen, sched):
        spec = json.loads(json.dumps(p_.to_spec()))
        assert spec["normalize"] == "frobenius"
        back = dp.penalty_from_spec(spec, p_.pairs)
        assert back.normalize == "frobenius" and back.to_spec() == p_.to_spec()
        assert back.value(t, rho) == p_.value(t, rho)
        np.testing.assert_array_equal(back.hvp(t, rho, t), p_.hvp(t, rho, t))
    assert sched.normalize == "frobenius" and sched.weight != pen.weight
    assert sched.value(t, rho) == pytest.approx(pen.value(t, rho) * sched.weight / pen.weight, rel=1e-14)
    assert copy.copy(pen).normalize == "frobenius" and copy.deepcopy(pen).normalize == "frobenius"
    other = pen.with_pairs(dp.PairTable([0], [3], [1.0], 4))
    assert other.normalize == "frobenius"
    local, atoms = pen.restrict(pen.pairs[0:2])
    assert local.normalize == "frobenius"
    assert "normalize='frobenius'" in repr(pen)


def test_unnormalised_spec_and_older_specs():
    pen = dp.DecoderIncoherencePenalty.from_pairs(([0], [1], [1.0]), [1, 2], 2, 1.0)
    spec = pen.to_spec()
    assert spec["normalize"] is None and "normalize=" not in repr(pen)
    del spec["normalize"]  # a spec written before the option existed
    assert dp.penalty_from_spec(spec, pen.pairs).normalize is None


@pytest.mark.parametrize("bad", ["l2", "Frobenius", 1, True])
def test_bad_normalize_is_refused(bad):
    with pytest.raises(InvalidArgumentError, match="normalize must be None .* or 'frobenius'"):
        dp.DecoderIncoherencePenalty.from_pairs(([0], [1], [1.0]), [1, 1], 2, 1.0, normalize=bad)


# --------------------------------------------------------------------------- owner computes


VECTOR_OPS = ("grad", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "psd_majorizer_offdiag_hvp")


def _full(pen, t, rho, v, name):
    return pen.evaluate_owned(t, rho, (name,), v)[name]


@SETTINGS
@given(normalized_problems(max_atoms=9, zero_blocks=True), st.data())
def test_evaluate_owned_over_a_split_equals_the_full_call(pb, data):
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    v = pb["rng"].standard_normal(pb["n"])
    K = pen.k_atoms
    cuts = sorted(set(data.draw(st.lists(st.integers(1, K - 1), max_size=4))))
    bounds = [0, *cuts, K]
    full = {name: _full(pen, t, rho, v, name) for name in VECTOR_OPS}
    np.testing.assert_array_equal(full["grad"], pen.grad_target(t, rho))
    np.testing.assert_array_equal(full["hvp"], pen.hvp(t, rho, v))
    value = 0.0
    rows = {name: [] for name in VECTOR_OPS}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        res = pen.evaluate_owned(t, rho, ("value", "grad_rho") + VECTOR_OPS, v, out_atoms=(lo, hi),
                                 value_atoms=(lo, hi))
        value += res["value"]
        for name in VECTOR_OPS:
            rows[name].append(res[name])
    assert value == pytest.approx(pen.value(t, rho), rel=1e-12, abs=1e-300)
    for name in VECTOR_OPS:
        np.testing.assert_array_equal(np.concatenate(rows[name]), full[name], err_msg=name)
    # the factored form: off-diagonal product + I ⊗ S_a equals the Gauss-Newton product
    S = pen.weighted_grams(t, rho)
    diag = pen.layout.block_matmul(v, S)
    _close(full["psd_majorizer_offdiag_hvp"] + diag, full["psd_majorizer_hvp"], 1e-12, 1e-300)


@pytest.mark.parametrize("n_parts", [1, 3, 7])
def test_restricted_parts_equal_the_full_call(n_parts):
    """What a worker does with a Zarr ``t``: a local penalty over the atoms its pairs touch, fed only
    those atoms' blocks (the distributed layer's parts), reproduces the in-memory results."""
    from distpen.curvature.plan import DecoderPlan

    rng = np.random.default_rng(7)
    K, p = 23, 4
    sizes = rng.integers(1, 5, K)
    jj, kk = np.triu_indices(K, 1)
    keep = rng.random(jj.shape[0]) < 0.25
    t = rng.standard_normal(int(sizes.sum()) * p)
    pb = _build(sizes, p, jj[keep], kk[keep], rng.uniform(0.1, 2, int(keep.sum())), 1.7, True, 0.3, t, rng)
    pen, rho = pb["pen"], pb["rho"]
    off = _offsets(pen)
    t[off[5]:off[6]] = 0.0  # one zero block
    v = rng.standard_normal(t.shape[0])
    plan = DecoderPlan.balanced(pen, n_parts)
    ops = ("value",) + VECTOR_OPS
    got = {name: np.zeros_like(t) for name in VECTOR_OPS}
    value = 0.0
    for part in plan.parts:
        idx = np.concatenate([np.arange(s, s + n) for s, n in zip(part.starts, part.lengths)])
        res = part.local.evaluate_owned(t[idx], rho, ops, v[idx], out_atoms=part.out_atoms,
                                        value_atoms=part.value_atoms)
        a, b = part.trim
        value += res["value"]
        for name in VECTOR_OPS:
            got[name][part.c0:part.c1] = res[name][a:b]
        lo, hi = part.out_atoms
        S_local = part.local.weighted_grams(t[idx], rho, atoms=np.arange(lo, hi))
        np.testing.assert_allclose(S_local, pen.weighted_grams(t, rho, atoms=part.atoms[lo:hi]), rtol=1e-13,
                                   atol=1e-15)
    assert value == pytest.approx(pen.value(t, rho), rel=1e-12)
    for name in VECTOR_OPS:
        want = _full(pen, t, rho, v, name)
        assert_rel(got[name], want, 1e-12, name)


# --------------------------------------------------------------------------- the distributed layer


def test_distributed_evaluate_assemble_and_factored(client, tmp_path):
    import zarr

    from distpen.curvature.factored import FactoredMajorizer
    from distpen.curvature.tiles import assemble_majorizer
    from distpen.curvature.evaluate import evaluate

    rng = np.random.default_rng(11)
    K, p = 30, 4
    sizes = rng.integers(1, 5, K)
    jj, kk = np.triu_indices(K, 1)
    keep = rng.random(jj.shape[0]) < 0.15
    beta = rng.standard_normal(int(sizes.sum()) * p)
    pb = _build(sizes, p, jj[keep], kk[keep], rng.uniform(0.1, 2, int(keep.sum())), 1.7, True, 0.3, beta, rng)
    pen, rho = pb["pen"], pb["rho"]
    beta[_offsets(pen)[3]:_offsets(pen)[4]] = 0.0
    v = rng.standard_normal(beta.shape[0])
    ops = ("value", "grad", "grad_rho", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
    want = {"value": pen.value(beta, rho), "grad": pen.grad_target(beta, rho), "grad_rho": pen.grad_rho(beta, rho),
            "hvp": pen.hvp(beta, rho, v), "psd_majorizer_hvp": pen.psd_majorizer_hvp(beta, rho, v),
            "psd_majorizer_diag": pen.psd_majorizer_diag(beta, rho)}
    z = zarr.create_array(str(tmp_path / "beta.zarr"), shape=beta.shape, chunks=(37,), dtype="f8")
    z[:] = beta
    for t in (beta, z):
        res = evaluate(pen, t, rho, ops=ops, v=v, n_tasks=5,
                       out=None if t is beta else str(tmp_path / "run"))
        assert res["hessian_diag"] is None
        for name, w in want.items():
            got = np.asarray(res[name][...] if isinstance(res[name], zarr.Array) else res[name])
            assert_rel(got.reshape(np.shape(w)), w, 1e-12, name)
    n = beta.shape[0]
    dense = pen.accumulate_psd_majorizer_dense(beta, rho, 1.5, np.zeros((n, n)))
    H = assemble_majorizer(pen, beta, rho, str(tmp_path / "asm"), scale=1.5, tile=23)
    np.testing.assert_allclose(H[...], dense, rtol=0, atol=1e-12 * np.abs(dense).max())
    fm = assemble_majorizer(pen, beta, rho, str(tmp_path / "fac"), scale=2.0, format="factored")
    assert isinstance(fm, FactoredMajorizer) and fm.penalty.normalize == "frobenius"
    gn = 2.0 * want["psd_majorizer_hvp"]
    np.testing.assert_allclose(fm.matvec(v), gn, rtol=0, atol=1e-12 * np.abs(gn).max())
    # Newton: (H_GN + δI) x = rhs against a dense solve of the same κ-weighted matrix
    res = dp.newton_step(pen, beta, rho, v, damping=0.1, tol=1e-10, maxiter=400)
    x = np.linalg.solve(dense / 1.5 + 0.1 * np.eye(n), v)
    assert res.converged
    assert_rel(res.x, x, 1e-7, "newton x")
