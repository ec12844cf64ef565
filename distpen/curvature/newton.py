"""Matrix-free preconditioned conjugate gradients on ``(H_GN + damping·I) x = rhs`` on the cluster."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from .._broadcast import BROADCASTS
from .._validation import check_finite_scalar, check_positive_int, check_vector
from .._workers import kernel_threads, threads_per_task
from ..cluster import _workers
from ..errors import InvalidArgumentError
from ..penalties import NestedPrefixPenalty
from ._common import _client, check_penalty
from ._vectors import as_vector_source
from .evaluate import evaluate
from ._pcg import NewtonResult, _extra_rows, _precond_part
from .plan import DecoderPlan

__all__ = ["NewtonResult", "newton_step", "newton_recorder", "save_newton_result", "PRECONDITIONERS"]

PRECONDITIONERS = ("none", "jacobi", "block")
#: preconditioners up to this size are gathered to the client and applied there
CLIENT_PRECOND_BYTES = 1 << 30


def _matvec_part(r, pen, t, x, rho, damping: float, threads: int, extra=None):
    """Worker task: the range's rows of ``(H_GN + δI + E) x`` (penalty, ``t`` and ``x`` are on the
    worker); ``extra`` is ``("diag", d)`` or ``("rows", fn)`` (see :func:`_check_extra`)."""
    with kernel_threads(threads):
        y = pen._rows("psd_majorizer_hvp", t, rho, x, r.lo, r.hi)
        y += damping * x[r.c0:r.c1]
        if extra is not None:
            kind, op = extra
            if kind == "diag":
                y += op[r.c0:r.c1] * x[r.c0:r.c1]
            else:
                y += _extra_rows(op, x, r.c0, r.c1)
    return r.index, y


def _check_extra(extra, n: int, t, client):
    """Normalise ``newton_step``'s ``extra``: ``(kind, operator, diagonal or None)``.

    kinds: ``"diag"`` (a non-negative vector of length ``n``), ``"rows"`` (a callable
    ``fn(x, c0, c1)`` returning rows ``[c0, c1)`` of ``E·x``, run on the workers), ``"penalty"``
    (``(penalty, rho)`` or a penalty: its Gauss-Newton product at the same ``t``).
    """
    from ..penalties import Penalty

    if extra is None:
        return None, None, None
    if isinstance(extra, tuple) and len(extra) == 2 and isinstance(extra[0], Penalty):
        pen2, rho2 = extra
    elif isinstance(extra, Penalty):
        pen2, rho2 = extra, np.zeros(extra.rho_count)
    else:
        pen2 = None
    if pen2 is not None:
        check_penalty(pen2)
        rho2 = pen2._check_rho(rho2)
        n2 = pen2.n_coef if hasattr(pen2, "n_coef") else None
        if n2 is not None and n2 != n:
            raise InvalidArgumentError(
                f"extra penalty acts on {n2} coefficients but t has {n}; pass a penalty over the same vector")
        diag = np.asarray(evaluate(pen2, t, rho2, ops=("psd_majorizer_diag",))["psd_majorizer_diag"],
                          dtype=np.float64).ravel()
        if diag.shape[0] != n:
            raise InvalidArgumentError(
                f"extra penalty acts on {diag.shape[0]} coefficients but t has {n}; pass a penalty over the same vector")
        return "penalty", (pen2, rho2), diag
    if callable(extra):
        return "rows", extra, None
    try:
        d = check_vector(extra, "extra", length=n, what="the length of t (a diagonal)")
    except (InvalidArgumentError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"extra must be a diagonal (array of length {n}), a penalty or (penalty, rho), or a callable "
            f"fn(x, c0, c1) -> rows [c0, c1) of E·x; got {type(extra).__name__}: {exc}") from None
    if (d < 0).any():
        i = int(np.flatnonzero(d < 0)[0])
        raise InvalidArgumentError(f"extra must be a non-negative diagonal (a PSD operator), but extra[{i}] = {float(d[i])!r}")
    return "diag", d, d


def _apply_precond_part(r, pen, pre, z):
    _, m = pre
    if m.ndim == 3:
        return r.index, pen.layout.block_matmul(z, m, np.arange(r.lo, r.hi))
    return r.index, m * z


def newton_step(penalty, t, rho, rhs, *, damping: float, tol: float = 1e-8, maxiter: int = 200,
                precond: str = "block", n_tasks: int | None = None, callback=None, extra=None,
                vectors: str = "workers", out=None, chunk: int | None = None) -> NewtonResult:
    """Solve ``(H_GN + damping·I + E) x = rhs`` by matrix-free preconditioned conjugate gradients.

    Products with ``H_GN`` run on the cluster over owner-computes parts whose decoder rows stay in
    worker memory across iterations. By default the PCG vectors (``x``, ``r``, ``z``, ``p``) and
    the preconditioner live on the workers too, partitioned like the products, and only scalars
    pass through the client per iteration (:mod:`distpen.curvature.resident`).

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
    extra : optional
        A user's own curvature ``E`` (symmetric PSD, e.g. a data-fit term's) added to the system:

        * an array of shape (n,): a non-negative diagonal;
        * a penalty, or ``(penalty, rho)``, over the same ``t``: its Gauss-Newton product;
        * a callable ``fn(x, c0, c1) -> array of shape (c1 - c0,)``: rows ``[c0, c1)`` of ``E·x``
          for the full vector ``x``; it runs on the workers (it must pickle), once per owner range
          and iteration, and must not depend on anything but its arguments.

        Jacobi adds ``E``'s diagonal when it is known (a diagonal or a penalty); the block
        preconditioner adds, per atom, the mean of that diagonal over the atom's rows.
    vectors : {"workers", "client"}
        Where the PCG vectors live: on the workers (default; ``n_tasks`` parts, default one per
        worker), or on the client, which ships the direction to every worker and gathers the
        product each iteration (``n_tasks`` default: two per worker thread). An extra penalty of
        another layout always takes the client path.
    out : str or os.PathLike, optional
        A run store: ``x`` goes into its Zarr array ``newton_x`` and the solve is its stage
        ``newton`` (the residual history in its progress while it runs, as :func:`newton_recorder`
        records it; status ``done`` with iterations and residuals at the end, ``failed`` if the
        solve raised; a new solve replaces the previous one). With ``vectors="workers"`` each worker
        writes the chunks that lie in its part and the client only the chunks two parts share, so
        ``x`` never gathers on the client.
    chunk : int, optional
        Chunk length of ``newton_x`` (default ``min(n, 2**20)``); only with ``out``.

    Returns
    -------
    NewtonResult
        ``x`` (numpy, or the Zarr array ``newton_x`` with ``out``), the residual history, the
        iteration count and whether it converged.

    Raises
    ------
    InvalidArgumentError
        On a non-positive damping or tol, an unknown preconditioner, or vectors of the wrong size.
    WorkerLostError
        A worker holding part of the solve's vectors (``vectors="workers"``) left the cluster; re-run.
    """
    damping = check_finite_scalar(damping, "damping", positive=True)
    tol = check_finite_scalar(tol, "tol", positive=True)
    maxiter = check_positive_int(maxiter, "maxiter")
    if precond not in PRECONDITIONERS:
        raise InvalidArgumentError(f"precond must be one of {PRECONDITIONERS}, got {precond!r}")
    if vectors not in ("workers", "client"):
        raise InvalidArgumentError(f"vectors must be 'workers' or 'client', got {vectors!r}")
    if chunk is not None:
        if out is None:
            raise InvalidArgumentError("chunk is the chunk length of the result in out=; pass out= too")
        chunk = check_positive_int(chunk, "chunk")
    result = _Result(out, chunk, callback) if out is not None else None
    try:
        res = _newton_step(penalty, t, rho, rhs, damping, tol, maxiter, precond, n_tasks,
                           callback if result is None else result.callback, extra, vectors, result)
    except BaseException as e:
        if result is not None:
            result.fail(e)
        raise
    return res if result is None else result.finish(res)


class _Result:
    """Where ``newton_step(out=...)`` puts its solve: the run store's stage ``newton`` (unit ``x``)
    and its array ``newton_x``. Opened by :meth:`open` once the inputs are checked."""

    def __init__(self, out, chunk, callback=None, every: float = 0.5):
        self.out, self.chunk, self.user_callback, self.every = out, chunk, callback, every
        self.job = self.z = None
        self.history, self.last = [1.0], 0.0

    def begin(self, n: int) -> None:
        """Begin the stage afresh (the unit ``x`` pending), without its array."""
        from ..store import RunStore

        self.job = RunStore(self.out).begin_job("newton", {"kind": "newton_step", "n": int(n)}, ["x"],
                                                overwrite=True)
        self.job.clear("x")  # written afresh: an interrupted write leaves the unit pending
        self.job.update_progress(phase="pcg", iterations=0, residuals=[1.0])

    def open(self, n: int):
        import zarr

        self.begin(n)
        group = zarr.open_group(self.job.store.path, mode="a")
        self.z = group.create_array("newton_x", shape=(n,), chunks=(max(1, min(n, self.chunk or 1 << 20)),),
                                    dtype="f8", fill_value=0.0, overwrite=True)
        return self.z

    def callback(self, it: int, rel: float) -> None:
        self.history.append(float(rel))
        now = time.perf_counter()
        if self.job is not None and now - self.last >= self.every:
            self.job.update_progress(phase="pcg", iterations=int(it), residuals=list(self.history))
            self.last = now
        if self.user_callback is not None:
            self.user_callback(it, rel)

    def finish(self, res: NewtonResult) -> NewtonResult:
        if self.z is None:
            self.open(int(np.asarray(res.x).shape[0]))
        if res.x is not self.z:  # solved on the client: it writes x, chunk by chunk
            ch = self.z.chunks[0]
            for a in range(0, self.z.shape[0], ch):
                self.z[a:a + ch] = res.x[a:a + ch]
        self.job.mark_done("x")
        self.job.finish(residuals=[float(r) for r in res.residuals], iterations=int(res.iterations),
                        converged=bool(res.converged), precond=res.precond, seconds=float(res.seconds))
        return replace(res, x=self.z)

    def fail(self, error: BaseException) -> None:
        if self.job is not None:
            self.job.fail(f"{type(error).__name__}: {error}")


def _newton_step(penalty, t, rho, rhs, damping, tol, maxiter, precond, n_tasks, callback, extra, vectors,
                 result) -> NewtonResult:
    t0 = time.perf_counter()
    check_penalty(penalty)
    if isinstance(penalty, NestedPrefixPenalty):
        if extra is not None and (callable(extra) or not hasattr(extra, "__len__") or isinstance(extra, tuple)):
            raise InvalidArgumentError(
                "extra with a NestedPrefixPenalty must be a diagonal (array of length n): its system is "
                f"diagonal and solved exactly; got {type(extra).__name__}")
        return _newton_nested(penalty, t, rho, rhs, damping, precond, t0, extra)
    pen = penalty
    rho = pen._check_rho(rho)
    n = pen.n_coef
    b = check_vector(rhs, "rhs", length=n, what="the same length as t")
    t_src, t_np = as_vector_source(t, n, "t")
    if t_np is None:  # Zarr or dask: PCG keeps n-vectors on the client anyway
        t_np = check_vector(t_src.read_all(), "t", length=n)
    client = _client()
    kind, extra_op, extra_diag = _check_extra(extra, n, t, client)
    out_z = None if result is None else result.open(n)  # the inputs are checked: the store may start
    threads = threads_per_task(client)
    workers = _workers(client)
    n_threads = sum(w.get("nthreads", 1) for w in workers.values())
    # the penalty and t travel to every worker once; each iteration ships only x
    pen_f = BROADCASTS.penalty(client, pen)
    t_f = BROADCASTS.array(client, "t", t_np)
    if vectors == "workers" and (kind != "penalty" or _same_layout(pen, extra_op[0])):
        from .resident import resident_pcg

        # one part per worker, each running the kernels on its worker's threads
        per_worker = max(1, n_threads // max(1, len(workers)))
        ranges = DecoderPlan.balanced(pen, n_tasks or len(workers)).ranges
        # this solve's own futures, with unique keys (hash=False), released when it ends
        diag_f = None if extra_diag is None or precond == "none" else \
            client.scatter(extra_diag, broadcast=True, hash=False)
        op = None
        if kind == "diag":
            op = ("diag", client.scatter(extra_op, broadcast=True, hash=False))
        elif kind is not None:
            op = (kind, extra_op)
        try:
            return resident_pcg(client, pen, pen_f, t_f, rho, b, ranges, precond=precond, damping=damping, tol=tol,
                                maxiter=maxiter, threads=threads * per_worker if n_tasks is None else threads,
                                extra=op, extra_diag_f=diag_f, callback=callback, t0=t0, out=out_z)
        finally:
            _release(diag_f, op[1] if kind == "diag" else None)
    ranges = DecoderPlan.balanced(pen, n_tasks or 2 * n_threads).ranges  # atom-aligned ranges
    pre_f = []
    diag_f = None if extra_diag is None or precond == "none" else \
        client.scatter(extra_diag, broadcast=True, hash=False)  # this solve's own: released at the end
    if precond != "none":
        pre_f = [client.submit(_precond_part, r, pen_f, t_f, rho, precond, damping, threads, diag_f, pure=False)
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
            _release(*pre_f)
            pre_f = []

    def assemble(futs):
        out = np.empty(n)
        for idx, val in client.gather(futs):
            out[ranges[idx].c0:ranges[idx].c1] = val
        return out

    worker_extra = None
    if kind == "diag":
        worker_extra = ("diag", client.scatter(extra_op, broadcast=True, hash=False))
    elif kind == "rows":
        worker_extra = ("rows", extra_op)

    def matvec(x):
        xf = client.scatter(x, broadcast=True, hash=False)
        y = assemble([client.submit(_matvec_part, r, pen_f, t_f, xf, rho, damping, threads, worker_extra,
                                    pure=False) for r in ranges])
        if kind == "penalty":
            pen2, rho2 = extra_op
            y += np.asarray(evaluate(pen2, t, rho2, ops=("psd_majorizer_hvp",), v=x)
                            ["psd_majorizer_hvp"], dtype=np.float64).ravel()
        return y

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
        # release, never cancel: pen_f and t_f stay in BROADCASTS for the next call, and a cancel (which
        # reaches the scheduler later) would take them from under a solve that reuses them meanwhile
        _release(*pre_f, diag_f, worker_extra[1] if kind == "diag" else None)


def _release(*futures) -> None:
    """Drop this call's references to ``futures`` (None skipped); the scheduler forgets them once no
    task needs them."""
    for f in futures:
        if f is not None:
            f.release()


def _same_layout(pen, other) -> bool:
    """True when ``other`` is a decoder penalty over the same blocks (its rows split like ``pen``'s)."""
    from ..penalties import DecoderIncoherencePenalty

    return (isinstance(other, DecoderIncoherencePenalty) and other.layout.p_out == pen.layout.p_out
            and np.array_equal(other.layout.block_sizes, pen.layout.block_sizes))


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


def _newton_nested(pen, t, rho, rhs, damping, precond, t0, extra=None) -> NewtonResult:
    """The nested majorizer is diagonal: one distributed diagonal, one exact division."""
    res = evaluate(pen, t, rho, ops=("hessian_diag",))
    d = np.asarray(res["hessian_diag"], dtype=np.float64).ravel()
    if extra is not None:
        d = d + _check_extra(extra, d.shape[0], t, None)[1]
    b = check_vector(rhs, "rhs", length=d.shape[0], what="the same length as t")
    x = b / (d + damping)
    bnorm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm((d + damping) * x - b)) / bnorm if bnorm else 0.0
    return NewtonResult(x, [1.0, rel], 1, True, precond, time.perf_counter() - t0)


def newton_recorder(out, n: int, *, every: float = 0.5):
    """A ``callback`` for :func:`newton_step` that records the residual history in the run store
    ``out`` while the solve runs (stage ``newton``), so a dashboard can plot it live."""
    rec = _Result(out, None, every=every)
    rec.begin(n)
    return rec.callback


def save_newton_result(out, result: NewtonResult) -> None:
    """Write ``result`` into the run store ``out``: ``newton_x`` (Zarr) and the stage ``newton``
    (manifest with the residual history in its progress), so dashboards can plot it.
    ``newton_step(..., out=out)`` does the same while it solves."""
    _Result(out, None).finish(result)
