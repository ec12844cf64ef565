"""Preconditioned conjugate gradients whose vectors live on the workers.

The client-side PCG of :func:`~distpen.curvature.newton.newton_step` ships the search direction to
every worker and gathers the product back on every iteration: at ``n`` coefficients that is
``2·8n`` bytes through one process per iteration, and the client holds every vector. Here each
part of an owner-computes split (:class:`~distpen.curvature.plan.DecoderPlan`, atom-aligned, one
part per worker by default) keeps its rows of ``x``, ``r``, ``z``, ``p``, ``q = A p`` and its
preconditioner in the memory of the worker it is pinned to, in a per-process registry
(:data:`_STATE`). One iteration is three small tasks per part, each depending directly on the
previous step's tasks of every part, so the client is not on the critical path:

1. ``direction`` (depends on every part's previous ``update``): ``β`` and the stopping test from
   their dot products, then ``p_i = z_i + β p_i``; its result is ``p_i`` itself, which the matvec
   tasks of the other parts take as dependencies, so the scheduler moves it worker to worker;
2. ``matvec``: ``q_i = (H_GN + δI + E) p`` for the part's rows, from the full ``p`` assembled from
   the parts; returns ``⟨p_i, q_i⟩``;
3. ``update`` (depends on every ``matvec``): ``α`` from their dot products, ``x_i += α p_i``,
   ``r_i −= α q_i``, ``z_i = M_i r_i``; returns ``(⟨r_i, r_i⟩, ⟨r_i, z_i⟩)``.

Every part sums the same numbers in the same order (``math.fsum``), so all take the same ``α``,
``β`` and decision to stop. The client submits :data:`AHEAD` iterations ahead and reads each
iteration's update results (scalars only) for the residual history, the callback and the end;
iterations submitted past the end see the same residual and do nothing. The preconditioners are block-diagonal by atom, so ``M_i`` is local.
A part whose worker died cannot be recovered (its vectors were nowhere else): every wait checks
the pinned workers are still there, and a task that finds its state missing raises; both end the
solve with :class:`~distpen.errors.WorkerLostError` naming the part and worker, and the call can
be re-run. The state of a solve is dropped on every worker when it ends, however it ends.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import numpy as np

from .._workers import kernel_threads
from ..cluster import _workers
from ..errors import WorkerLostError
from ._pcg import NewtonResult, _extra_rows, _precond_part

__all__ = ["resident_pcg"]

#: per-process registry of the parts this worker holds: (solve id, part index) → state dict
_STATE: dict = {}
_STATE_LOCK = threading.Lock()
#: seconds between checks that the pinned workers are alive while waiting on a round
_LIVENESS_EVERY = 1.0
#: seconds a failed gather waits for the scheduler to report a pinned worker gone (see _Solve.gather)
_LOST_GRACE = 10.0
#: iterations submitted ahead of the one the client waits for: the next iterations' tasks depend on
#: this one's results directly, so the client's round trip is off the critical path
AHEAD = 2
#: coefficients of ``b`` per scatter (16 MiB): the client's extra memory while it sends ``b``
RHS_PIECE = 1 << 21


def _state(sid: str, i: int) -> dict:
    st = _STATE.get((sid, i))
    if st is None:
        from distributed import get_worker

        try:
            where = get_worker().address
        except ValueError:
            where = "this process"
        raise WorkerLostError(
            f"part {i} of resident solve {sid[:8]} is not on {where}: its worker was restarted or the task "
            "ran elsewhere; the vectors of that part are lost — re-run newton_step")
    return st


def _apply_precond(st: dict, r: np.ndarray) -> np.ndarray:
    m = st["pre"]
    if m is None:
        return r.copy()
    if m.ndim == 3:
        return st["pen"].layout.block_matmul(r, m, np.arange(st["range"].lo, st["range"].hi))
    return m * r


def _init(sid, i, rng, pen, t, rho, b_i, precond, damping, threads, extra, extra_diag):
    """Store part ``i``'s state (``x = 0``, ``r = b``, ``z = M r``); returns ``(⟨b,b⟩, ⟨r,z⟩)``."""
    pre = None
    if precond != "none":
        pre = _precond_part(rng, pen, t, rho, precond, damping, threads, extra_diag)[1]
    b_i = np.concatenate([np.asarray(x, dtype=np.float64) for x in b_i])  # its pieces, in a new array
    st = {"range": rng, "pen": pen, "t": t, "rho": rho, "damping": float(damping), "threads": int(threads),
          "extra": extra, "pre": pre, "x": np.zeros_like(b_i), "r": b_i, "p": None, "q": None}
    with kernel_threads(threads):
        st["z"] = _apply_precond(st, b_i)
    with _STATE_LOCK:
        _STATE[(sid, i)] = st
    return float(np.dot(b_i, b_i)), float(np.dot(b_i, st["z"]))


def _direction(sid, i, bnorm, tol, *scalars):
    """``p_i = z_i + β p_i``; returns ``p_i``, or None once the solve has stopped.

    ``scalars`` are the previous round's results of every part: ``_init``'s ``(⟨b,b⟩, ⟨r,z⟩)``
    on the first iteration, then ``_update``'s ``(⟨r,r⟩, ⟨r,z⟩)`` (None for a part that stopped,
    ``"breakdown"`` after a non-positive curvature). Every part computes the same ``β`` and the
    same decision to stop (``‖r‖/‖b‖ ≤ tol``) from them, so no client sits between iterations.
    """
    st = _state(sid, i)
    if st.get("stop") or any(x is None or isinstance(x, str) for x in scalars):
        st["stop"] = True
        return None
    rz = math.fsum(x[1] for x in scalars)
    if st["p"] is None:  # the first direction: p = z
        st["rz"], st["p"] = rz, st["z"].copy()
        return st["p"]
    if math.sqrt(math.fsum(x[0] for x in scalars)) / bnorm <= tol:
        st["stop"] = True
        return None
    beta, st["rz"] = rz / st["rz"], rz
    # in place: the last iteration's p_i has reached every matvec (they ran before the updates
    # this task depends on); beta·p + z is the same float as z + beta·p
    p = st["p"]
    p *= beta
    p += st["z"]
    return p


def _matvec(sid, i, *p_parts):
    """``q_i`` = the part's rows of ``(H_GN + δI + E) p``; returns ``⟨p_i, q_i⟩`` (None once stopped)."""
    st = _state(sid, i)
    if st.get("stop") or any(x is None for x in p_parts):
        st["stop"] = True
        return None
    rng, pen = st["range"], st["pen"]
    if len(p_parts) > 1:  # the full p, in a buffer kept across iterations
        n = sum(x.shape[0] for x in p_parts)
        p = st.get("p_full")
        if p is None or p.shape[0] != n:
            p = st["p_full"] = np.empty(n)
        np.concatenate(p_parts, out=p)
    else:
        p = p_parts[0]
    with kernel_threads(st["threads"]):
        q = pen._rows("psd_majorizer_hvp", st["t"], st["rho"], p, rng.lo, rng.hi)
        q += st["damping"] * p[rng.c0:rng.c1]
        extra = st["extra"]
        if extra is not None:
            kind, op = extra
            if kind == "diag":
                q += op[rng.c0:rng.c1] * p[rng.c0:rng.c1]
            elif kind == "penalty":
                pen2, rho2 = op
                q += pen2._rows("psd_majorizer_hvp", st["t"], rho2, p, rng.lo, rng.hi)
            else:
                q += _extra_rows(op, p, rng.c0, rng.c1)
    st["q"] = q
    return float(np.dot(st["p"], q))


def _update(sid, i, *paps):
    """``α = ⟨r,z⟩ / Σ⟨p,q⟩`` (each part sums the same numbers), ``x_i += α p_i``, ``r_i −= α q_i``,
    ``z_i = M_i r_i``; returns ``(⟨r,r⟩, ⟨r,z⟩)``, ``"breakdown"`` when ``⟨p, Hp⟩`` is not
    positive and finite, or None once stopped."""
    st = _state(sid, i)
    if st.get("stop") or any(x is None for x in paps):
        st["stop"] = True
        return None
    pap = math.fsum(paps)
    if not pap > 0 or not math.isfinite(pap):
        st["stop"] = True
        return "breakdown"
    alpha = st["rz"] / pap
    tmp = st.get("tmp")
    if tmp is None:  # a scratch vector kept across iterations
        tmp = st["tmp"] = np.empty_like(st["p"])
    np.multiply(st["p"], alpha, out=tmp)
    st["x"] += tmp
    st["r"] -= np.multiply(st["q"], alpha, out=tmp)
    if st["pre"] is None:  # z = r, no copy: nothing writes r in place before z is read
        st["z"] = st["r"]
    elif st["pre"].ndim == 1:  # Jacobi, into z itself (the direction task has read it)
        np.multiply(st["pre"], st["r"], out=st["z"])
    else:
        with kernel_threads(st["threads"]):
            st["z"] = _apply_precond(st, st["r"])
    return float(np.dot(st["r"], st["r"])), float(np.dot(st["r"], st["z"]))


def _result(sid, i):
    return _state(sid, i)["x"]


def _write_result(sid, i, z):
    """Write part ``i``'s rows of ``x`` into the Zarr array ``z``: the chunks that lie wholly in the
    part, by this worker; returns the rest (at most a piece at each end) as ``[(start, rows)]`` for
    the client to write with its neighbours' pieces, so that every chunk has one writer."""
    st = _state(sid, i)
    c0, c1, x = st["range"].c0, st["range"].c1, st["x"]
    ch, n = z.chunks[0], z.shape[0]
    a = -(-c0 // ch) * ch
    b = c1 if c1 == n else (c1 // ch) * ch  # the last chunk may be short
    if a >= b:
        return [(c0, x)]
    z[a:b] = x[a - c0:b - c0]
    return [(s, v) for s, v in ((c0, x[:a - c0]), (b, x[b - c0:])) if v.size]


def write_pieces(z, pieces) -> None:
    """Write the chunks of ``z`` that ``pieces`` (``(start, rows)`` from several parts) cover
    between them, each chunk whole and once. Raises RuntimeError if a chunk is not fully covered."""
    ch, n = z.chunks[0], z.shape[0]
    bufs, filled = {}, {}
    for start, rows in pieces:
        end = start + rows.shape[0]
        for c in range(start // ch, (end - 1) // ch + 1):
            lo, hi = c * ch, min(n, (c + 1) * ch)
            if c not in bufs:
                bufs[c], filled[c] = np.empty(hi - lo), 0
            a, b = max(lo, start), min(hi, end)
            bufs[c][a - lo:b - lo] = rows[a - start:b - start]
            filled[c] += b - a
    for c in sorted(bufs):
        lo, hi = c * ch, min(n, (c + 1) * ch)
        if filled[c] != hi - lo:
            raise RuntimeError(f"chunk {c} of the Newton result got {filled[c]} of its {hi - lo} rows")
        z[lo:hi] = bufs[c]


def _drop(sid) -> int:
    """Forget every part of solve ``sid`` held by this process (run on every worker at the end)."""
    with _STATE_LOCK:
        keys = [k for k in _STATE if k[0] == sid]
        for k in keys:
            del _STATE[k]
    return len(keys)


def held_parts() -> int:
    """Parts of resident solves this process holds (for tests and diagnostics)."""
    return len(_STATE)


class _Solve:
    """The client side of one resident solve: submits the rounds, sums their scalars, watches the
    pinned workers."""

    def __init__(self, client, ranges, workers):
        self.client, self.ranges, self.workers = client, ranges, workers
        self.sid = uuid.uuid4().hex
        self.n_tasks = 0

    def submit(self, fn, i, *args):
        self.n_tasks += 1  # every task its own key: iterations submitted ahead must not merge
        return self.client.submit(fn, self.sid, i, *args, workers=[self.workers[i]], allow_other_workers=False,
                                  pure=False, key=f"distpen-pcg-{fn.__name__.strip('_')}-{self.sid[:12]}-"
                                                  f"{self.n_tasks}-{i}")

    def gather(self, futs):
        """The futures' results, or :class:`WorkerLostError` if a pinned worker left meanwhile.

        A worker that dies takes its pinned tasks with it: the scheduler forgets them (the futures
        end cancelled) and a direct gather from it fails to connect, possibly before the scheduler
        has dropped the worker. Either failure is therefore a lost worker when one of the pinned
        workers is gone within :data:`_LOST_GRACE` seconds, and itself otherwise."""
        from concurrent.futures import CancelledError

        from distributed import wait

        try:
            while True:
                try:
                    wait(futs, timeout=_LIVENESS_EVERY)
                    break
                except TimeoutError:
                    self.check_workers()
            return self.client.gather(futs, direct=True)   # scalars, straight from the workers
        except (CancelledError, OSError):
            deadline = time.monotonic() + _LOST_GRACE
            while True:
                self.check_workers()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def check_workers(self):
        alive = set(_workers(self.client))
        for i, w in enumerate(self.workers):
            if w not in alive:
                raise WorkerLostError(
                    f"worker {w} holding part {i} of the resident Newton solve (coefficients "
                    f"[{self.ranges[i].c0}, {self.ranges[i].c1})) left the cluster; its vectors are lost — "
                    "re-run newton_step")

    def close(self):
        try:
            self.client.run(_drop, self.sid)
        except Exception:  # noqa: BLE001 - best effort: a lost worker holds nothing any more
            pass


def resident_pcg(client, pen, pen_f, t_f, rho, b, ranges, *, precond, damping, tol, maxiter, threads,
                 extra=None, extra_diag_f=None, callback=None, t0=None, out=None):
    """Solve ``(H_GN + δI + E) x = b`` with the vectors on the workers (see the module docstring).

    ``pen_f``/``t_f`` are the penalty and ``t`` already on every worker; ``ranges`` atom-aligned
    parts (one per worker is best). Returns :class:`~distpen.curvature.newton.NewtonResult`; ``x``
    is gathered to the client at the end, or, with ``out`` (a Zarr array of shape (n,)), written
    into it by the workers (the client writes only the chunks that straddle two parts) and
    ``x`` is ``out``.
    """
    t0 = time.perf_counter() if t0 is None else t0
    bnorm = float(np.linalg.norm(b))
    if bnorm == 0.0:
        if out is not None:
            out[:] = 0.0
        return NewtonResult(np.zeros_like(b) if out is None else out, [0.0], 0, True, precond,
                            time.perf_counter() - t0)
    addrs = sorted(_workers(client))
    workers = [addrs[i % len(addrs)] for i in range(len(ranges))]
    solve = _Solve(client, ranges, workers)
    parts = range(len(ranges))
    b_f = []
    try:
        # each part's slice of b goes straight to its worker, not inside the task graph (at
        # n = 16.8 M distributed warned of a 64 MiB graph, which the scheduler holds and forwards),
        # in pieces of RHS_PIECE coefficients: sending a slice costs the client a copy of it, so
        # whole slices made the client grow with n (+256 MiB at n = 67 M)
        b_f = [[client.scatter(b[c:min(c + RHS_PIECE, r.c1)], workers=[workers[i]], hash=False)
                for c in range(r.c0, r.c1, RHS_PIECE)] for i, r in enumerate(ranges)]
        prev = [solve.submit(_init, i, r, pen_f, t_f, rho, b_f[i], precond, damping, threads, extra,
                             extra_diag_f) for i, r in enumerate(ranges)]
        solve.gather(prev)  # the parts exist (and the preconditioners are built) before iterating
        for f in (f for fs in b_f for f in fs):  # each part holds its own copy now
            f.release()
        b_f = []
        residuals, converged, it = [1.0], False, 0
        rounds = {}  # iteration → its update futures, submitted up to AHEAD iterations early

        def submit(k, scalars):
            dirs = [solve.submit(_direction, i, bnorm, tol, *scalars) for i in parts]
            mv = [solve.submit(_matvec, i, *dirs) for i in parts]
            rounds[k] = [solve.submit(_update, i, *mv) for i in parts]

        submit(1, prev)
        for k in range(2, min(maxiter, AHEAD) + 1):
            submit(k, rounds[k - 1])
        for it in range(1, maxiter + 1):
            got = solve.gather(rounds[it])
            if it + AHEAD <= maxiter:
                submit(it + AHEAD, rounds[it + AHEAD - 1])
            del rounds[it]
            if any(g is None or isinstance(g, str) for g in got):  # breakdown: x as it was
                break
            rel = math.sqrt(math.fsum(g[0] for g in got)) / bnorm
            residuals.append(rel)
            if callback is not None:
                callback(it, rel)
            if rel <= tol:
                converged = True
                break
        # iterations submitted past the end stop themselves (they see the same residual); wait for
        # them so that x is read after they have run
        solve.gather([f for fs in rounds.values() for f in fs])
        rounds.clear()
        if out is not None:
            write_pieces(out, [pc for got in solve.gather([solve.submit(_write_result, i, out) for i in parts])
                               for pc in got])
            x = out
        else:
            got = solve.gather([solve.submit(_result, i) for i in parts])
            x = np.concatenate(got) if len(got) > 1 else np.asarray(got[0])
        return NewtonResult(x, residuals, it, converged, precond, time.perf_counter() - t0)
    finally:
        for f in (f for fs in b_f for f in fs):
            f.release()
        solve.close()
