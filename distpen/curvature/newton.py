"""Matrix-free preconditioned conjugate gradients on ``(H_GN + damping·I) x = rhs`` on the cluster."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .._broadcast import BROADCASTS
from .._validation import check_finite_scalar, check_positive_int, check_vector
from .._workers import kernel_threads, threads_per_task
from ..errors import InvalidArgumentError
from ..penalties import NestedPrefixPenalty
from ._common import _client, check_penalty
from ._vectors import as_vector_source
from .evaluate import evaluate
from .plan import DecoderPlan

__all__ = ["NewtonResult", "newton_step", "newton_recorder", "save_newton_result", "PRECONDITIONERS"]

PRECONDITIONERS = ("none", "jacobi", "block")
#: preconditioners up to this size are gathered to the client and applied there
CLIENT_PRECOND_BYTES = 1 << 30


@dataclass
class NewtonResult:
    """Outcome of :func:`newton_step`."""

    x: np.ndarray
    residuals: list = field(default_factory=list)  # ‖r_i‖ / ‖rhs‖, starting with 1.0
    iterations: int = 0
    converged: bool = False
    precond: str = "block"
    seconds: float = 0.0


def _precond_part(r, pen, t, rho, precond: str, damping: float, threads: int):
    """Worker task: the preconditioner of a range's atoms — ``1/(diag + δ)`` or ``(S_a + δI)⁻¹``."""
    with kernel_threads(threads):
        if precond == "jacobi":
            d = pen._rows("psd_majorizer_diag", t, rho, None, r.lo, r.hi)
            return r.index, 1.0 / (d + damping)
        S = pen._weighted_grams(t, rho, np.arange(r.lo, r.hi))
        S += damping * np.eye(S.shape[1])[None, :, :]
        return r.index, np.linalg.inv(S)  # batched: (I ⊗ (S_a + δI))⁻¹ = I ⊗ (S_a + δI)⁻¹


def _matvec_part(r, pen, t, x, rho, damping: float, threads: int):
    """Worker task: the range's rows of ``(H_GN + δI) x`` (penalty, ``t`` and ``x`` are on the worker)."""
    with kernel_threads(threads):
        y = pen._rows("psd_majorizer_hvp", t, rho, x, r.lo, r.hi)
    y += damping * x[r.c0:r.c1]
    return r.index, y


def _apply_precond_part(r, pen, pre, z):
    _, m = pre
    if m.ndim == 3:
        return r.index, pen.layout.block_matmul(z, m, np.arange(r.lo, r.hi))
    return r.index, m * z


def newton_step(penalty, t, rho, rhs, *, damping: float, tol: float = 1e-8, maxiter: int = 200,
                precond: str = "block", n_tasks: int | None = None, callback=None) -> NewtonResult:
    """Solve ``(H_GN + damping·I) x = rhs`` by matrix-free preconditioned conjugate gradients.

    Products with ``H_GN`` run on the cluster over owner-computes parts whose decoder rows stay in
    worker memory across iterations; vectors live on the client.

    Parameters
    ----------
    penalty : DecoderIncoherencePenalty or NestedPrefixPenalty
    t : array of shape (n,)
    rho : array of shape (penalty.rho_count,)
    rhs : array of shape (n,)
    damping : float
        > 0; makes the system positive definite.
    tol : float
        Stop when ``‖r‖ ≤ tol·‖rhs‖``.
    maxiter : int
    precond : {"none", "jacobi", "block"}
        Identity, the closed-form diagonal, or one ``p × p`` inverse per atom, ``(S_a + δI)⁻¹``.
    callback : callable, optional
        Called as ``callback(iteration, relative_residual)``.

    Returns
    -------
    NewtonResult
        ``x``, the residual history, the iteration count and whether it converged.

    Raises
    ------
    InvalidArgumentError
        On a non-positive damping or tol, an unknown preconditioner, or vectors of the wrong size.
    """
    damping = check_finite_scalar(damping, "damping", positive=True)
    tol = check_finite_scalar(tol, "tol", positive=True)
    maxiter = check_positive_int(maxiter, "maxiter")
    if precond not in PRECONDITIONERS:
        raise InvalidArgumentError(f"precond must be one of {PRECONDITIONERS}, got {precond!r}")
    t0 = time.perf_counter()
    check_penalty(penalty)
    if isinstance(penalty, NestedPrefixPenalty):
        return _newton_nested(penalty, t, rho, rhs, damping, precond, t0)
    pen = penalty
    rho = pen._check_rho(rho)
    n = pen.n_coef
    b = check_vector(rhs, "rhs", length=n, what="the same length as t")
    t_src, t_np = as_vector_source(t, n, "t")
    if t_np is None:  # Zarr or dask: PCG keeps n-vectors on the client anyway
        t_np = check_vector(t_src.read_all(), "t", length=n)
    client = _client()
    threads = threads_per_task(client)
    n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    ranges = DecoderPlan.balanced(pen, n_tasks or 2 * n_threads).ranges  # atom-aligned ranges
    # the penalty and t travel to every worker once; each iteration ships only x
    pen_f = BROADCASTS.penalty(client, pen)
    t_f = BROADCASTS.array(client, "t", t_np)
    pre_f = []
    if precond != "none":
        pre_f = [client.submit(_precond_part, r, pen_f, t_f, rho, precond, damping, threads, pure=False)
                 for r in ranges]
    # the preconditioner is applied on the client when it is small enough (one round trip per
    # iteration instead of two); otherwise by the workers that hold it
    local_pre = None
    if precond != "none":
        p = pen.p_out
        size = n * 8 if precond == "jacobi" else pen.k_atoms * p * p * 8
        if size <= CLIENT_PRECOND_BYTES:
            got = dict(client.gather(pre_f))
            local_pre = np.concatenate([got[i].reshape(-1) for i in range(len(ranges))])
            if precond == "block":
                local_pre = local_pre.reshape(pen.k_atoms, p, p)
            client.cancel(pre_f)
            pre_f = []

    def assemble(futs):
        out = np.empty(n)
        for idx, val in client.gather(futs):
            out[ranges[idx].c0:ranges[idx].c1] = val
        return out

    def matvec(x):
        xf = client.scatter(x, broadcast=True, hash=False)
        return assemble([client.submit(_matvec_part, r, pen_f, t_f, xf, rho, damping, threads, pure=False)
                         for r in ranges])

    def apply_m(r):
        if precond == "none":
            return r.copy()
        if local_pre is not None:
            return pen.layout.block_matmul(r, local_pre) if precond == "block" else local_pre * r
        return assemble([client.submit(_apply_precond_part, rg, pen_f, pf, r[rg.c0:rg.c1], pure=False)
                         for rg, pf in zip(ranges, pre_f)])

    try:
        return _pcg(matvec, apply_m, b, tol, maxiter, precond, callback, t0)
    finally:
        client.cancel([pen_f, t_f, *pre_f])


def _pcg(matvec, apply_m, b, tol, maxiter, precond, callback, t0) -> NewtonResult:
    bnorm = float(np.linalg.norm(b))
    x = np.zeros_like(b)
    if bnorm == 0.0:
        return NewtonResult(x, [0.0], 0, True, precond, time.perf_counter() - t0)
    r = b.copy()
    z = apply_m(r)
    p = z.copy()
    rz = float(np.dot(r, z))
    residuals = [1.0]
    converged = False
    it = 0
    for it in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = float(np.dot(p, Ap))
        if not pAp > 0 or not math.isfinite(pAp):
            break
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        rel = float(np.linalg.norm(r)) / bnorm
        residuals.append(rel)
        if callback is not None:
            callback(it, rel)
        if rel <= tol:
            converged = True
            break
        z = apply_m(r)
        rz_new = float(np.dot(r, z))
        p = z + (rz_new / rz) * p
        rz = rz_new
    return NewtonResult(x, residuals, it, converged, precond, time.perf_counter() - t0)


def _newton_nested(pen, t, rho, rhs, damping, precond, t0) -> NewtonResult:
    """The nested majorizer is diagonal: one distributed diagonal, one exact division."""
    res = evaluate(pen, t, rho, ops=("hessian_diag",))
    d = np.asarray(res["hessian_diag"], dtype=np.float64).ravel()
    b = check_vector(rhs, "rhs", length=d.shape[0], what="the same length as t")
    x = b / (d + damping)
    bnorm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm((d + damping) * x - b)) / bnorm if bnorm else 0.0
    return NewtonResult(x, [1.0, rel], 1, True, precond, time.perf_counter() - t0)


def newton_recorder(out, n: int, *, every: float = 0.5):
    """A ``callback`` for :func:`newton_step` that records the residual history in the run store
    ``out`` while the solve runs (stage ``newton``), so a dashboard can plot it live."""
    from ..store import RunStore

    job = RunStore(out).begin_job("newton", {"kind": "newton_step", "n": int(n)}, ["x"], overwrite=True)
    history = [1.0]
    last = [0.0]

    def callback(it: int, rel: float) -> None:
        history.append(float(rel))
        now = time.perf_counter()
        if now - last[0] >= every:
            job.update_progress(phase="pcg", iterations=int(it), residuals=list(history))
            last[0] = now

    return callback


def save_newton_result(out, result: NewtonResult, *, spec: dict | None = None) -> None:
    """Write ``result`` into the run store ``out``: ``newton_x`` (Zarr) and the stage ``newton``
    (manifest with the residual history in its progress), so dashboards can plot it."""
    import zarr

    from ..store import RunStore

    store = RunStore(out)
    job = store.begin_job("newton", spec or {"kind": "newton_step", "n": int(result.x.shape[0])}, ["x"],
                          overwrite=True)
    group = zarr.open_group(store.path, mode="a")
    n = result.x.shape[0]
    x = group.create_array("newton_x", shape=(n,), chunks=(min(n, 1 << 20),), dtype="f8", fill_value=0.0,
                           overwrite=True)
    x[:] = result.x
    job.mark_done("x")
    job.finish(residuals=[float(r) for r in result.residuals], iterations=int(result.iterations),
               converged=bool(result.converged), precond=result.precond, seconds=float(result.seconds))
