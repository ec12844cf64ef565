"""``distpen demo``: every operation of both penalties on a synthetic SAE decoder, checked on the spot."""

from __future__ import annotations

import time

import numpy as np

from .pairs import PairTable
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty

__all__ = ["synthetic_decoder_problem", "run_penalty_demo"]


def synthetic_decoder_problem(k_atoms: int = 512, p_out: int = 64, n_pairs: int = 8_000,
                              max_block: int = 8, seed: int = 0):
    """A random decoder with mixed block sizes and a random, heavy-tailed pair set.

    Returns ``(block_sizes, pairs, beta)``.
    """
    rng = np.random.default_rng(seed)
    block_sizes = rng.integers(1, max_block + 1, size=k_atoms)
    # heavy-tailed partner choice: a few hub atoms co-fire with many others
    popularity = 1.0 / np.arange(1, k_atoms + 1) ** 0.8
    popularity /= popularity.sum()
    j = rng.choice(k_atoms, size=3 * n_pairs, p=popularity)
    k = rng.integers(0, k_atoms, size=3 * n_pairs)
    lo, hi = np.minimum(j, k), np.maximum(j, k)
    keep = lo < hi
    key = np.unique(lo[keep] * k_atoms + hi[keep])[:n_pairs]
    rng.shuffle(key)
    w = rng.exponential(1e-3, size=key.shape[0])
    pairs = PairTable(key // k_atoms, key % k_atoms, w, k_atoms)
    beta = rng.standard_normal(int(block_sizes.sum()) * p_out) / np.sqrt(p_out)
    return block_sizes, pairs, beta


def _timed(fn, *args):
    fn(*args)  # the first call may load compiled kernels; time the second
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _fd_check(value, grad, x, rng, h=1e-5):
    """Relative error of the directional derivative ``gradᵀu`` against a central difference."""
    u = rng.standard_normal(x.shape[0])
    u /= np.linalg.norm(u)
    fd = (value(x + h * u) - value(x - h * u)) / (2 * h)
    an = float(np.dot(grad, u))
    return abs(fd - an) / max(abs(fd), abs(an), 1e-300)


def run_penalty_demo(k_atoms: int = 512, p_out: int = 64, n_pairs: int = 8_000, seed: int = 0,
                     echo=print) -> dict:
    """Evaluate every operation of both penalties, check gradients by finite differences, print a summary.

    Returns a dict of results (timings in seconds, FD errors) so callers and tests can inspect it.
    """
    rng = np.random.default_rng(seed + 1)
    block_sizes, pairs, beta = synthetic_decoder_problem(k_atoms, p_out, n_pairs, seed=seed)
    pen = DecoderIncoherencePenalty.from_pairs(pairs, block_sizes, p_out, weight=10.0,
                                               learnable_weight=True)
    rho = np.array([0.25])
    v = rng.standard_normal(beta.shape[0])
    rows = []
    results = {"decoder": {}, "nested": {}}
    ops = [("value", pen.value, (beta, rho)), ("grad_target", pen.grad_target, (beta, rho)),
           ("grad_rho", pen.grad_rho, (beta, rho)), ("hvp", pen.hvp, (beta, rho, v)),
           ("psd_majorizer_hvp", pen.psd_majorizer_hvp, (beta, rho, v)),
           ("psd_majorizer_diag", pen.psd_majorizer_diag, (beta, rho)),
           ("hessian_diag", pen.hessian_diag, (beta, rho))]
    for name, fn, args in ops:
        out, dt = _timed(fn, *args)
        results["decoder"][name] = dt
        rows.append(("decoder", name, dt, _summary(out)))
    g = pen.grad_target(beta, rho)
    fd_beta = _fd_check(lambda x: pen.value(x, rho), g, beta, rng)
    fd_rho = abs(pen.grad_rho(beta, rho)[0]
                 - (pen.value(beta, rho + 1e-6) - pen.value(beta, rho - 1e-6)) / 2e-6) / abs(pen.value(beta, rho))
    hv = pen.hvp(beta, rho, v)
    fd_hvp = np.linalg.norm((pen.grad_target(beta + 1e-6 * v, rho) - pen.grad_target(beta - 1e-6 * v, rho)) / 2e-6 - hv) \
        / np.linalg.norm(hv)

    # nested prefix penalty on a latent code of the same width as the decoder has atoms
    n_rows = 2_000
    prefixes = np.array([k_atoms // 8, k_atoms // 4, k_atoms // 2, k_atoms])
    nested = NestedPrefixPenalty(prefixes, [1.0, 0.5, 0.25, 0.125], eps=1e-3, latent_dim=k_atoms)
    psi = rng.standard_normal(n_rows * k_atoms) * (rng.random(n_rows * k_atoms) < 0.05)
    nrho = np.zeros(4)
    vn = rng.standard_normal(psi.shape[0])
    nops = [("value", nested.value, (psi, nrho)), ("grad_target", nested.grad_target, (psi, nrho)),
            ("grad_rho", nested.grad_rho, (psi, nrho)), ("hvp", nested.hvp, (psi, nrho, vn)),
            ("psd_majorizer_hvp", nested.psd_majorizer_hvp, (psi, nrho, vn)),
            ("psd_majorizer_diag", nested.psd_majorizer_diag, (psi, nrho)),
            ("hessian_diag", nested.hessian_diag, (psi, nrho))]
    for name, fn, args in nops:
        out, dt = _timed(fn, *args)
        results["nested"][name] = dt
        rows.append(("nested", name, dt, _summary(out)))
    fd_psi = _fd_check(lambda x: nested.value(x, nrho), nested.grad_target(psi, nrho), psi, rng)

    results["fd"] = {"decoder_grad": fd_beta, "decoder_grad_rho": fd_rho, "decoder_hvp": fd_hvp,
                     "nested_grad": fd_psi}
    echo(f"distpen demo — decoder: K = {k_atoms} atoms, block sizes {block_sizes.min()}–{block_sizes.max()} "
         f"rows, p_out = {p_out}, β = {beta.shape[0]:,} coefficients, {len(pairs):,} pairs")
    echo(f"               nested:  {n_rows:,} rows × F = {k_atoms}, prefixes {prefixes.tolist()}")
    echo("")
    echo(f"{'penalty':<9} {'operation':<20} {'time':>10}  result")
    for pen_name, name, dt, summ in rows:
        echo(f"{pen_name:<9} {name:<20} {dt * 1e3:>8.2f} ms  {summ}")
    echo("")
    echo("finite-difference checks (relative error):")
    for name, err in results["fd"].items():
        echo(f"  {name:<18} {err:.2e}  {'ok' if err < 1e-5 else 'FAILED'}")
    results["ok"] = all(err < 1e-5 for err in results["fd"].values())
    return results


def _summary(out) -> str:
    if out is None:
        return "None (not available in closed form)"
    if isinstance(out, float):
        return f"{out:.6g}"
    out = np.asarray(out)
    return f"shape {out.shape}, ‖·‖ = {np.linalg.norm(out):.6g}"
