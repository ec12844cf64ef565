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
    pen, beta, rho, rhs = _problem(seed=3, spread=1.5)
    counts = {pc: newton_step(pen, beta, rho, rhs, damping=1e-3, tol=1e-8, maxiter=2000, precond=pc)
              for pc in ("none", "jacobi", "block")}
    assert all(r.converged for r in counts.values())
    assert counts["block"].iterations < counts["none"].iterations
    assert counts["block"].iterations <= counts["jacobi"].iterations
    want = _dense_solve(pen, beta, rho, rhs, 1e-3)
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
