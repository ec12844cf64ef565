"""NestedPrefixPenalty (docs/design.md): reference agreement, finite differences, schedules, specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _reference import (
    assert_rel,
    fd_directional,
    fd_grad,
    nest_column_weights,
    nest_grad,
    nest_grad_rho,
    nest_hessian_diag,
    nest_lambdas,
    nest_value,
    random_nested_problem,
)

import distpen as dp
from distpen.errors import InvalidDtypeError

CONFIGS = [
    dict(seed=0, n_rows=4, latent_dim=9, n_shells=3, eps=0.3),
    dict(seed=1, n_rows=1, latent_dim=5, n_shells=1, eps=1.0),
    dict(seed=2, n_rows=6, latent_dim=8, n_shells=8, eps=0.5),  # every latent its own shell
    dict(seed=3, n_rows=3, latent_dim=12, n_shells=4, eps=0.2, tight=False),  # F > largest prefix
    dict(seed=4, n_rows=5, latent_dim=1, n_shells=1, eps=2.0),
]
IDS = [f"n{c['n_rows']}-F{c['latent_dim']}-K{c['n_shells']}{'-loose' if c.get('tight') is False else ''}"
       for c in CONFIGS]
REF_TOL = 1e-12
FD_TOL = 1e-6


@pytest.fixture(params=CONFIGS, ids=IDS)
def prob(request):
    return random_nested_problem(**request.param)


def _ref(pb, rho=None, multiplier=1.0):
    rho = pb["rho"] if rho is None else rho
    return (pb["prefix"], pb["weights"], pb["eps"], rho, pb["F"], multiplier)


# --------------------------------------------------------------------------- reference agreement


def test_value_matches_reference(prob):
    got = prob["pen"].value(prob["t"], prob["rho"])
    assert isinstance(got, float)
    assert got == pytest.approx(nest_value(prob["t"], *_ref(prob)), rel=REF_TOL)


def test_grad_matches_reference(prob):
    g = prob["pen"].grad_target(prob["t"], prob["rho"])
    assert g.shape == prob["t"].shape and g.dtype == np.float64
    assert_rel(g, nest_grad(prob["t"], *_ref(prob)), REF_TOL, "grad")


def test_hessian_diag_and_majorizer_match_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    ref = nest_hessian_diag(t, *_ref(prob))
    assert_rel(pen.hessian_diag(t, rho), ref, REF_TOL, "hessian_diag")
    assert_rel(pen.psd_majorizer_diag(t, rho), ref, REF_TOL, "psd_majorizer_diag")
    v = prob["rng"].standard_normal(t.shape[0])
    assert_rel(pen.hvp(t, rho, v), ref * v, REF_TOL, "hvp")
    assert_rel(pen.psd_majorizer_hvp(t, rho, v), ref * v, REF_TOL, "gn hvp")


def test_grad_rho_matches_reference(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    g = pen.grad_rho(t, rho)
    assert g.shape == (pen.rho_count,) == (len(prob["prefix"]),)
    assert_rel(g, nest_grad_rho(t, *_ref(prob)), REF_TOL, "grad_rho")


def test_column_weights_and_lambdas(prob):
    pen, rho = prob["pen"], prob["rho"]
    assert_rel(pen.shell_lambdas(rho), nest_lambdas(prob["weights"], rho), 1e-15, "λ")
    assert_rel(pen.column_weights(rho), nest_column_weights(*_ref(prob)[:2], rho, prob["F"]), 1e-14, "W")


def test_hand_computed_example():
    pen = dp.NestedPrefixPenalty([1, 3], [2.0, 0.5], eps=1e-3, latent_dim=4)
    rho = np.zeros(2)
    np.testing.assert_allclose(pen.column_weights(rho), [2.5, 0.5, 0.5, 0.0], rtol=1e-15)
    t = np.array([3.0, -4.0, 0.0, 100.0])
    e2 = 1e-6
    expected = 2.5 * np.sqrt(9 + e2) + 0.5 * np.sqrt(16 + e2) + 0.5 * 1e-3 + 0.0
    assert pen.value(t, rho) == pytest.approx(expected, rel=1e-14)
    g = pen.grad_target(t, rho)
    np.testing.assert_allclose(g, [2.5 * 3 / np.sqrt(9 + e2), -0.5 * 4 / np.sqrt(16 + e2), 0.0, 0.0], rtol=1e-14)
    # ∂P/∂ρ_1 = λ_1 Σ_{i<1} r_i ; ∂P/∂ρ_2 = λ_2 Σ_{i<3} r_i
    r = np.sqrt(t**2 + e2)
    np.testing.assert_allclose(pen.grad_rho(t, rho), [2.0 * r[0], 0.5 * r[:3].sum()], rtol=1e-14)


def test_latents_beyond_largest_prefix_are_free():
    pen = dp.NestedPrefixPenalty([2, 3], [1.0, 1.0], eps=0.1, latent_dim=6)
    rng = np.random.default_rng(0)
    t = rng.standard_normal(24)
    rho = np.zeros(2)
    t2 = t.copy().reshape(4, 6)
    t2[:, 3:] = 1e6 * rng.standard_normal((4, 3))
    assert pen.value(t2.ravel(), rho) == pytest.approx(pen.value(t, rho), rel=1e-14)
    g = pen.grad_target(t2.ravel(), rho).reshape(4, 6)
    np.testing.assert_array_equal(g[:, 3:], 0.0)
    assert (g[:, :3] != 0).all()


# --------------------------------------------------------------------------- finite differences


def test_fd_value_to_grad(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    fd = fd_grad(lambda x: pen.value(x, rho), t, 1e-5)
    assert_rel(pen.grad_target(t, rho), fd, FD_TOL, "value → grad")


def test_fd_grad_to_hvp(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    for _ in range(3):
        v = prob["rng"].standard_normal(t.shape[0])
        fd = fd_directional(lambda x: pen.grad_target(x, rho), t, v, 1e-5)
        assert_rel(pen.hvp(t, rho, v), fd, FD_TOL, "grad → hvp")


def test_fd_value_to_grad_rho(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    fd = fd_grad(lambda r: pen.value(t, r), rho, 1e-6)
    assert_rel(pen.grad_rho(t, rho), fd, FD_TOL, "value → grad_rho")


def test_fd_with_multiplier():
    pb = random_nested_problem(7)
    pen = pb["pen"].with_weight_schedule(dp.ScalarWeightSchedule(3.0, 0.5, dp.Linear(5)))
    pen.apply_schedule(2)  # m = 2.0
    t, rho = pb["t"], pb["rho"]
    assert_rel(pen.grad_rho(t, rho), fd_grad(lambda r: pen.value(t, r), rho, 1e-6), FD_TOL, "grad_rho")
    assert_rel(pen.grad_target(t, rho), fd_grad(lambda x: pen.value(x, rho), t, 1e-5), FD_TOL, "grad")


# --------------------------------------------------------------------------- Hessian structure


def test_hvp_symmetric_and_psd(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    rng = prob["rng"]
    for _ in range(5):
        u = rng.standard_normal(t.shape[0])
        v = rng.standard_normal(t.shape[0])
        assert u @ pen.hvp(t, rho, v) == pytest.approx(v @ pen.hvp(t, rho, u), rel=1e-13, abs=1e-300)
        assert v @ pen.hvp(t, rho, v) >= 0.0
        assert v @ pen.psd_majorizer_hvp(t, rho, v) >= 0.0
    assert (pen.hessian_diag(t, rho) >= 0).all()


def test_majorizer_equals_exact(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    v = prob["rng"].standard_normal(t.shape[0])
    np.testing.assert_array_equal(pen.hvp(t, rho, v), pen.psd_majorizer_hvp(t, rho, v))
    np.testing.assert_array_equal(pen.hessian_diag(t, rho), pen.psd_majorizer_diag(t, rho))


# --------------------------------------------------------------------------- schedules (multiplier)


def test_with_weight_schedule_sets_multiplier_on_a_copy():
    pb = random_nested_problem(8)
    pen, t, rho = pb["pen"], pb["t"], pb["rho"]
    base_value = pen.value(t, rho)
    sched = dp.ScalarWeightSchedule(0.5, 2.0, dp.Geometric(0.5))
    sched.step()
    sched.step()  # iter_count 2 → m = 2 − 1.5·0.25 = 1.625
    new = pen.with_weight_schedule(sched)
    assert new is not pen
    assert pen.multiplier == 1.0 and pen.schedule is None and pen.value(t, rho) == base_value
    assert new.multiplier == pytest.approx(1.625, rel=1e-15)
    assert new.iter_count == 2
    m = new.multiplier
    # λ_k = m·w_k·exp(ρ_k)
    np.testing.assert_allclose(new.shell_lambdas(rho), m * pb["weights"] * np.exp(rho), rtol=1e-14)
    assert new.value(t, rho) == pytest.approx(nest_value(t, *_ref(pb, multiplier=m)), rel=1e-12)
    assert new.value(t, rho) == pytest.approx(m * base_value, rel=1e-13)
    assert_rel(new.grad_target(t, rho), m * pen.grad_target(t, rho), 1e-13, "grad")
    assert_rel(new.grad_rho(t, rho), nest_grad_rho(t, *_ref(pb, multiplier=m)), 1e-12, "grad_rho")
    assert_rel(new.hessian_diag(t, rho), m * pen.hessian_diag(t, rho), 1e-13, "hdiag")
    sched.step()  # the caller's schedule is not shared
    assert new.schedule.iter_count == 2


def test_apply_schedule_in_place():
    pb = random_nested_problem(9)
    pen = pb["pen"].with_weight_schedule(dp.ScalarWeightSchedule(1.0, 0.0, dp.Linear(4)))
    t, rho = pb["t"], pb["rho"]
    v1 = pen.value(t, rho)
    for it, m in [(0, 1.0), (1, 0.75), (3, 0.25), (4, 0.0), (100, 0.0), (2, 0.5)]:
        pen.apply_schedule(it)
        assert pen.multiplier == m
        assert pen.iter_count == it + 1
        assert pen.value(t, rho) == pytest.approx(m * v1, rel=1e-13, abs=0)
    pen.apply_schedule(4)
    np.testing.assert_array_equal(pen.grad_target(t, rho), 0.0)
    np.testing.assert_array_equal(pen.grad_rho(t, rho), 0.0)


def test_zero_shell_weight_stays_zero():
    pen = dp.NestedPrefixPenalty([1, 2, 4], [1.0, 0.0, 2.0], eps=0.5)
    t = np.random.default_rng(0).standard_normal(8)
    for r in (0.0, 50.0, 1000.0):
        rho = np.array([0.0, r, 0.0])
        assert pen.shell_lambdas(rho)[1] == 0.0
        assert pen.grad_rho(t, rho)[1] == 0.0
        assert pen.value(t, rho) == pen.value(t, np.zeros(3))


def test_extreme_rho_is_clamped():
    pen = dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=0.5)
    t = np.array([0.3, -0.2])
    for r in (1000.0, -1000.0):
        rho = np.array([r, r])
        assert np.isfinite(pen.value(t, rho)) and pen.value(t, rho) > 0
        assert np.isfinite(pen.grad_target(t, rho)).all()
        assert np.isfinite(pen.grad_rho(t, rho)).all()


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize("tier", [dp.PenaltyTier.PSI, dp.PenaltyTier.BETA, "rho"])
@pytest.mark.parametrize("with_schedule", [False, True])
def test_spec_round_trip(tier, with_schedule):
    pen = dp.NestedPrefixPenalty([2, 3, 5], [1.0, 0.5, 0.25], eps=0.1, latent_dim=7, tier=tier)
    if with_schedule:
        pen = pen.with_weight_schedule(dp.ScalarWeightSchedule(2.0, 1.0, dp.ReciprocalIter()))
        pen.apply_schedule(3)
    spec = json.loads(json.dumps(pen.to_spec()))
    assert spec["kind_tag"] == "nested_prefix"
    t = np.random.default_rng(1).standard_normal(21)
    rho = np.array([0.1, -0.2, 0.3])
    for back in (dp.NestedPrefixPenalty.from_spec(spec), dp.penalty_from_spec(spec)):
        assert isinstance(back, dp.NestedPrefixPenalty)
        assert back.to_spec() == pen.to_spec()
        assert back.tier is dp.PenaltyTier.parse(tier)
        assert back.latent_dim == 7 and back.multiplier == pen.multiplier
        assert back.value(t, rho) == pen.value(t, rho)
        assert back.iter_count == pen.iter_count


def test_penalty_from_spec_unknown_tag():
    with pytest.raises(dp.errors.InvalidArgumentError, match="unknown penalty kind_tag 'bogus'"):
        dp.penalty_from_spec({"kind_tag": "bogus"})


# --------------------------------------------------------------------------- inputs


def test_rho_count_and_metadata():
    pen = dp.NestedPrefixPenalty([1, 4, 6], [1.0, 1.0, 1.0], eps=0.1)
    assert pen.rho_count == 3
    assert pen.latent_dim == 6  # largest prefix
    assert pen.kind_tag == "nested_prefix"
    assert pen.tier is dp.PenaltyTier.PSI
    assert pen.grad_rho(np.zeros(12), np.zeros(3)).shape == (3,)


def test_float32_and_int_inputs_are_converted():
    pb = random_nested_problem(3)
    pen, rho = pb["pen"], pb["rho"]
    t32 = pb["t"].astype(np.float32)
    t64 = t32.astype(np.float64)
    assert pen.value(t32, rho) == pen.value(t64, rho)
    np.testing.assert_array_equal(pen.grad_target(t32, rho.astype(np.float32)),
                                  pen.grad_target(t64, rho.astype(np.float32).astype(np.float64)))
    ti = np.arange(pb["n"], dtype=np.int32) - 5
    np.testing.assert_array_equal(pen.hessian_diag(ti, rho), pen.hessian_diag(ti.astype(np.float64), rho))
    rho_int = np.zeros(pen.rho_count, dtype=np.int64)
    assert pen.value(t64, rho_int) == pen.value(t64, np.zeros(pen.rho_count))


def test_complex_refused():
    pb = random_nested_problem(3)
    with pytest.raises(InvalidDtypeError, match="t has dtype complex128"):
        pb["pen"].value(pb["t"] + 0j, pb["rho"])
    with pytest.raises(InvalidDtypeError, match="rho has dtype complex128"):
        pb["pen"].value(pb["t"], pb["rho"] + 0j)


def test_constructor_does_not_alias_caller_arrays():
    prefix = np.array([1, 3], dtype=np.int64)
    weights = np.array([1.0, 2.0])
    pen = dp.NestedPrefixPenalty(prefix, weights, eps=0.1)
    t = np.array([1.0, -2.0, 0.5])
    rho = np.zeros(2)
    before = pen.value(t, rho)
    weights[0] = 100.0
    prefix[0] = 2
    assert pen.shell_weights.tolist() == [1.0, 2.0]
    assert pen.prefix_sizes.tolist() == [1, 3]
    assert pen.value(t, rho) == before


# --------------------------------------------------------------------------- numerical range


def test_large_targets_do_not_overflow():
    # t² overflows float64 for |t| > 1.3e154; P and ∇P stay finite and correct (|∂P/∂t| → W_i)
    pen = dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=0.1)
    rho = np.zeros(2)
    t = np.array([1e200, -1e200])
    assert np.isfinite(pen.value(t, rho))
    assert pen.value(t, rho) == pytest.approx(3e200, rel=1e-12)
    np.testing.assert_allclose(pen.grad_target(t, rho), [2.0, -1.0], rtol=1e-12)


def test_tiny_eps_gives_finite_derivatives_at_zero():
    # any finite ε > 0 is accepted; ε² underflows for ε < 1.5e-162, which must not produce NaN
    pen = dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=1e-200)
    rho = np.zeros(2)
    t = np.array([0.0, 1.0])
    g = pen.grad_target(t, rho)
    h = pen.hessian_diag(t, rho)
    assert np.isfinite(g).all() and np.isfinite(h).all()
    np.testing.assert_allclose(g, [0.0, 1.0], rtol=1e-12)
    assert pen.value(t, rho) == pytest.approx(1.0 + 2e-200, rel=1e-12)


# --------------------------------------------------------------------------- fused value, gradient, diagonal


def test_value_grad_diag_equals_the_three_calls(prob):
    pen, t, rho = prob["pen"], prob["t"], prob["rho"]
    val, g, d = pen.value_grad_diag(t, rho)
    assert val == pen.value(t, rho)
    np.testing.assert_array_equal(g, pen.grad_target(t, rho))
    np.testing.assert_array_equal(d, pen.hessian_diag(t, rho))
    assert val == pytest.approx(nest_value(t, *_ref(prob)), rel=REF_TOL)


@pytest.mark.parametrize("n_rows", [1, 1023, 1024, 2500])  # row blocks of 1024: ragged and exact
def test_value_grad_diag_into_buffers_across_row_blocks(n_rows):
    rng = np.random.default_rng(n_rows)
    pen = dp.NestedPrefixPenalty([2, 5, 7], [1.0, 0.5, 0.0], eps=0.05, latent_dim=7)
    rho = rng.uniform(-1, 1, 3)
    t = rng.standard_normal(n_rows * 7)
    g_buf, d_buf = np.full_like(t, np.nan), np.full_like(t, np.nan)
    val, g, d = pen.value_grad_diag(t, rho, out_grad=g_buf, out_diag=d_buf)
    assert g is g_buf and d is d_buf
    assert val == pen.value(t, rho)
    np.testing.assert_array_equal(g, pen.grad_target(t, rho))
    np.testing.assert_array_equal(d, pen.hessian_diag(t, rho))


def test_value_grad_diag_overflowing_and_non_finite_rows():
    pen = dp.NestedPrefixPenalty([2, 4], [1.0, 2.0], eps=1e-3)
    rng = np.random.default_rng(0)
    t = rng.standard_normal(4 * 1500)
    t[5], t[4 * 1400 + 1] = 1e200, -3e160  # t² overflows: the hypot path
    val, g, d = pen.value_grad_diag(t, np.zeros(2))
    assert np.isfinite(val) and np.isfinite(g).all() and np.isfinite(d).all()
    assert val == pytest.approx(pen.value(t, np.zeros(2)), rel=1e-15)
    np.testing.assert_allclose(g, pen.grad_target(t, np.zeros(2)), rtol=1e-15, atol=0)
    np.testing.assert_allclose(d, pen.hessian_diag(t, np.zeros(2)), rtol=1e-15, atol=0)
    t[4 * 1100 + 2] = np.nan
    with pytest.raises(dp.errors.InvalidArgumentError, match=r"t must be finite, but t\[4402\] = nan"):
        pen.value_grad_diag(t, np.zeros(2))


def test_value_grad_diag_tiny_eps():
    pen = dp.NestedPrefixPenalty([3], [1.0], eps=1e-200)
    t = np.array([0.0, 1.0, -2.0])
    val, g, d = pen.value_grad_diag(t, np.zeros(1))
    assert val == pen.value(t, np.zeros(1))
    np.testing.assert_array_equal(g, pen.grad_target(t, np.zeros(1)))
    np.testing.assert_array_equal(d, pen.hessian_diag(t, np.zeros(1)))


@pytest.mark.parametrize("bad", ["f32", "short", "alias_t", "readonly", "same"])
def test_value_grad_diag_bad_buffers(bad):
    pen = dp.NestedPrefixPenalty([2], [1.0], eps=0.1)
    t = np.arange(6.0)
    g, d = np.empty(6), np.empty(6)
    if bad == "f32":
        g = np.empty(6, dtype=np.float32)
    elif bad == "short":
        d = np.empty(5)
    elif bad == "alias_t":
        g = t
    elif bad == "readonly":
        g.setflags(write=False)
    else:
        d = g
    with pytest.raises(dp.errors.InvalidArgumentError, match="out_grad|out_diag"):
        pen.value_grad_diag(t, np.zeros(1), out_grad=g, out_diag=d)
