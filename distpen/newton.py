"""Matrix-free preconditioned conjugate gradients on ``(H_GN + damping·I) x = rhs`` on the cluster."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ._sources import as_vector_source
from ._validation import check_finite_scalar, check_positive_int, check_vector
from ._workers import kernel_threads, threads_per_task
from .assembly import DecoderPlan, _client, _Part, evaluate
from .errors import InvalidArgumentError
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty

__all__ = ["NewtonResult", "newton_step", "PRECONDITIONERS"]

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


class _Loaded:
    """A part with its decoder rows and preconditioner kept in worker memory across iterations."""

    def __init__(self, part: _Part, t_local: np.ndarray, precond, damping: float):
        self.part = part
        self.t_local = t_local
        self.damping = damping
        self.precond = precond  # None, or diag (owned rows), or block inverses (owned atoms, p, p)


def _load(part, t_src, t_payload, rho, precond, damping, threads):
    with kernel_threads(threads):
        t_local = t_src.read_ranges(part.starts, part.lengths, t_payload)
        lo, hi = part.out_atoms
        pre = None
        if precond == "jacobi":
            d = part.local.evaluate_owned(t_local, rho, ("psd_majorizer_diag",), out_atoms=(lo, hi))
            pre = 1.0 / (d["psd_majorizer_diag"] + damping)
        elif precond == "block":
            S = part.local.weighted_grams(t_local, rho, atoms=np.arange(lo, hi))
            S += damping * np.eye(S.shape[1])[None, :, :]
            pre = np.linalg.inv(S)  # batched: (I ⊗ (S_a + δI))⁻¹ = I ⊗ (S_a + δI)⁻¹
    return _Loaded(part, t_local, pre, damping)


def _matvec(loaded: _Loaded, x_payload, rho, threads):
    part = loaded.part
    with kernel_threads(threads):
        x_local = x_payload[_local_index(part)]
        res = part.local.evaluate_owned(loaded.t_local, rho, ("psd_majorizer_hvp",), x_local,
                                        out_atoms=part.out_atoms)
    a, b = part.trim
    lo, hi = part.out_atoms
    loff = part.local.layout.offsets
    owned_x = x_local[loff[lo]:loff[hi]]
    return part.index, (res["psd_majorizer_hvp"] + loaded.damping * owned_x)[a:b]


def _apply_precond(loaded: _Loaded, r_owned: np.ndarray):
    part = loaded.part
    lo, hi = part.out_atoms
    if isinstance(loaded.precond, np.ndarray) and loaded.precond.ndim == 3:
        z = part.local.layout.block_matmul(r_owned, loaded.precond, np.arange(lo, hi))
    else:
        z = loaded.precond * r_owned
    return part.index, z


def _get_precond(loaded: _Loaded):
    return loaded.part.index, loaded.precond


def _local_index(part: _Part) -> np.ndarray:
    from .layout import _ranges

    return _ranges(part.starts, part.starts + part.lengths)


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
    if isinstance(penalty, NestedPrefixPenalty):
        return _newton_nested(penalty, t, rho, rhs, damping, precond, t0)
    if not isinstance(penalty, DecoderIncoherencePenalty):
        raise InvalidArgumentError(
            f"penalty must be a DecoderIncoherencePenalty or NestedPrefixPenalty, got {type(penalty).__name__}"
        )
    pen = penalty
    rho = pen._check_rho(rho)
    n = pen.n_coef
    b = check_vector(rhs, "rhs", length=n, what="the same length as t")
    client = _client()
    t_src, _ = as_vector_source(t, n, "t", client=client)
    threads = threads_per_task(client)
    n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    plan = DecoderPlan.balanced(pen, n_tasks or 2 * n_threads)
    loaded = [client.submit(_load, part, t_src.meta(), t_src.task_payload(), rho,
                            None if precond == "none" else precond, damping, threads, pure=False)
              for part in plan.parts]
    bounds = plan.bounds

    def matvec(x):
        xf = client.scatter(x, broadcast=True, hash=False)
        futs = [client.submit(_matvec, L, xf, rho, threads, pure=False) for L in loaded]
        out = np.empty(n)
        for idx, val in client.gather(futs):
            out[bounds[idx]:bounds[idx + 1]] = val
        return out

    # the preconditioner is applied on the client when it is small enough (one round trip per
    # iteration instead of two); otherwise by the parts that hold it
    local_pre = None
    if precond != "none":
        p = pen.p_out
        size = n * 8 if precond == "jacobi" else pen.k_atoms * p * p * 8
        if size <= CLIENT_PRECOND_BYTES:
            got = dict(client.gather([client.submit(_get_precond, L, pure=False) for L in loaded]))
            local_pre = np.concatenate([got[i].reshape(-1) for i in range(len(loaded))])
            if precond == "block":
                local_pre = local_pre.reshape(pen.k_atoms, p, p)

    def apply_m(r):
        if precond == "none":
            return r.copy()
        if local_pre is not None:
            return pen.layout.block_matmul(r, local_pre) if precond == "block" else local_pre * r
        futs = [client.submit(_apply_precond, L, r[bounds[i]:bounds[i + 1]], pure=False)
                for i, L in enumerate(loaded)]
        out = np.empty(n)
        for idx, val in client.gather(futs):
            out[bounds[idx]:bounds[idx + 1]] = val
        return out

    try:
        return _pcg(matvec, apply_m, b, tol, maxiter, precond, callback, t0)
    finally:
        client.cancel(loaded)


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
    from .store import RunStore

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

    from .store import RunStore

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
