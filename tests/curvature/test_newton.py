"""newton_step: preconditioned CG on (H_GN + damping·I) x = rhs against a dense solve."""

from __future__ import annotations

import numpy as np
import pytest

import distpen as dp
from distpen.cli.demo import synthetic_decoder_problem
from distpen.curvature.newton import newton_step
from distpen.errors import InvalidArgumentError, ShapeMismatchError


def _problem(seed=0, K=30, p=5, n_pairs=90, spread=0.0):
    bs, pairs, beta = synthetic_decoder_problem(K, p, n_pairs, max_block=3, seed=seed)
    rng = np.random.default_rng(seed)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, bs, p, 1.0, learnable_weight=True)
    if spread:
        # atoms of wildly different scales and anisotropic columns: an ill-conditioned H_GN
        lay = pen.layout
        atom_scale = 10.0 ** rng.uniform(-spread, spread, K)
        col_scale = 10.0 ** rng.uniform(-spread / 2, spread / 2, p)
        rows = lay.rows(beta.copy())
        atom_of_row = np.repeat(np.arange(K), lay.block_sizes)
        beta = (rows * atom_scale[atom_of_row, None] * col_scale[None, :]).ravel()
    rho = np.array([0.2])
    rhs = rng.standard_normal(beta.shape[0])
    return pen, beta, rho, rhs


def _dense_solve(pen, beta, rho, rhs, damping):
    n = beta.shape[0]
    H = np.zeros((n, n))
    pen.accumulate_psd_majorizer_dense(beta, rho, 1.0, H)
    return np.linalg.solve(H + damping * np.eye(n), rhs)


@pytest.mark.parametrize("precond", ["none", "jacobi", "block"])
def test_newton_step_matches_dense_solve(client, precond):
    pen, beta, rho, rhs = _problem()
    res = newton_step(pen, beta, rho, rhs, damping=0.05, tol=1e-10, maxiter=500, precond=precond)
    want = _dense_solve(pen, beta, rho, rhs, 0.05)
    assert res.converged
    assert res.residuals[0] == 1.0 and res.residuals[-1] <= 1e-10
    assert len(res.residuals) == res.iterations + 1
    np.testing.assert_allclose(res.x, want, rtol=0, atol=1e-8 * np.abs(want).max())


def test_block_preconditioner_needs_fewer_iterations_when_ill_conditioned(client):
    pen, beta, rho, rhs = _problem(seed=3, spread=1.0)
    counts = {pc: newton_step(pen, beta, rho, rhs, damping=1e-2, tol=1e-8, maxiter=2000, precond=pc)
              for pc in ("none", "jacobi", "block")}
    assert all(r.converged for r in counts.values())
    assert counts["block"].iterations < counts["none"].iterations
    assert counts["block"].iterations <= counts["jacobi"].iterations
    want = _dense_solve(pen, beta, rho, rhs, 1e-2)
    np.testing.assert_allclose(counts["block"].x, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_newton_step_nested_is_exact(client):
    pen = dp.NestedPrefixPenalty([2, 4], [1.0, 0.5], eps=0.1)
    rng = np.random.default_rng(0)
    psi, rhs = rng.standard_normal(40), rng.standard_normal(40)
    res = newton_step(pen, psi, np.zeros(2), rhs, damping=0.5)
    np.testing.assert_allclose(res.x, rhs / (pen.hessian_diag(psi, np.zeros(2)) + 0.5), rtol=1e-14)
    assert res.converged


def test_newton_step_bad_input(client):
    pen, beta, rho, rhs = _problem()
    with pytest.raises(InvalidArgumentError, match="damping must be > 0, got 0.0"):
        newton_step(pen, beta, rho, rhs, damping=0.0)
    with pytest.raises(InvalidArgumentError, match="precond must be one of"):
        newton_step(pen, beta, rho, rhs, damping=1.0, precond="ilu")
    with pytest.raises(ShapeMismatchError, match="rhs has length 3"):
        newton_step(pen, beta, rho, rhs[:3], damping=1.0)
    with pytest.raises(InvalidArgumentError, match="maxiter must be > 0"):
        newton_step(pen, beta, rho, rhs, damping=1.0, maxiter=0)


# ---------------------------------------------------------------------------- a user's own curvature
def _dense(pen, beta, rho):
    n = beta.shape[0]
    H = np.zeros((n, n))
    pen.accumulate_psd_majorizer_dense(beta, rho, 1.0, H)
    return H


class RowsOf:
    """A picklable ``fn(x, c0, c1)``: rows of a dense SPD matrix (a data-fit term's curvature)."""

    def __init__(self, A):
        self.A = A

    def __call__(self, x, c0, c1):
        if self.A.shape == (1, 1):  # a broken operator: one row whatever the range
            return np.zeros(1)
        return self.A[c0:c1] @ x


@pytest.mark.parametrize("precond", ["none", "jacobi", "block"])
def test_extra_diagonal_callable_and_penalty_match_dense_solves(client, precond):
    pen, beta, rho, rhs = _problem(seed=5)
    n = beta.shape[0]
    H = _dense(pen, beta, rho) + 0.2 * np.eye(n)
    rng = np.random.default_rng(1)
    d = rng.uniform(0.0, 3.0, n)
    Q = rng.standard_normal((n, 6))
    A = Q @ Q.T  # PSD, low rank: the kind a data-fit Gauss-Newton term adds
    bs, pairs2, _ = synthetic_decoder_problem(30, 5, 40, max_block=3, seed=5)
    pen2 = dp.DecoderIncoherencePenalty.from_pairs(pairs2, pen.layout.block_sizes, 5, 0.7, normalize="frobenius")
    for extra, E in ((d, np.diag(d)), (RowsOf(A), A), (pen2, _dense(pen2, beta, np.zeros(0)))):
        res = newton_step(pen, beta, rho, rhs, damping=0.2, tol=1e-10, maxiter=800, precond=precond, extra=extra)
        want = np.linalg.solve(H + E, rhs)
        assert res.converged, (type(extra).__name__, res.residuals[-3:])
        np.testing.assert_allclose(res.x, want, rtol=0, atol=1e-7 * np.abs(want).max())


def test_extra_diagonal_speeds_up_jacobi_on_a_dominant_diagonal(client):
    pen, beta, rho, rhs = _problem(seed=6)
    d = 10.0 ** np.random.default_rng(2).uniform(0, 2.5, beta.shape[0])  # a stiff, badly scaled data term
    jac = newton_step(pen, beta, rho, rhs, damping=0.05, tol=1e-8, maxiter=2000, precond="jacobi", extra=d)
    none = newton_step(pen, beta, rho, rhs, damping=0.05, tol=1e-8, maxiter=2000, precond="none", extra=d)
    assert jac.converged and none.converged and 2 * jac.iterations < none.iterations


def test_extra_on_the_nested_penalty_is_exact_and_diagonal_only(client):
    pen = dp.NestedPrefixPenalty([2, 4], [1.0, 0.5], eps=0.1, latent_dim=4)
    t = np.random.default_rng(0).standard_normal(12)
    d = np.linspace(0.0, 2.0, 12)
    rhs = np.ones(12)
    res = newton_step(pen, t, np.zeros(2), rhs, damping=0.1, extra=d)
    np.testing.assert_allclose(res.x, rhs / (pen.hessian_diag(t, np.zeros(2)) + 0.1 + d), rtol=1e-14)
    with pytest.raises(InvalidArgumentError, match="must be a diagonal"):
        newton_step(pen, t, np.zeros(2), rhs, damping=0.1, extra=RowsOf(np.eye(12)))


@pytest.mark.parametrize("extra, match", [
    (np.ones(3), r"extra must be a diagonal \(array of length \d+\)"),
    ("diag", r"extra must be a diagonal"),
    ("negative", r"non-negative diagonal .* extra\[4\] = -1.0"),
    (RowsOf(np.ones((1, 1))), r"extra\(x, \d+, \d+\) returned shape \(1,\); expected \(\d+,\)"),
])
def test_extra_errors_name_the_argument(client, extra, match):
    pen, beta, rho, rhs = _problem()
    if isinstance(extra, str) and extra == "negative":
        extra = np.ones(beta.shape[0])
        extra[4] = -1.0
    with pytest.raises(InvalidArgumentError, match=match):
        newton_step(pen, beta, rho, rhs, damping=0.05, extra=extra)
