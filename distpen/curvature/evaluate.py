"""``evaluate``: penalty operations on a Dask cluster, equal to the in-memory penalty's.

The math stays in the penalty classes: every task calls the methods of a penalty (for the decoder,
a *local* penalty over the atoms of its part, see :mod:`.plan`).

* Decoder incoherence — owner computes over atom ranges; scalar results tree-sum, vector results
  are written by their owners (numpy, or Zarr arrays in ``out``).
* Nested prefix — a row-chunked ``dask.array`` map: value and ρ-gradient are per-chunk sums
  tree-reduced with ``split_every``; vector results are chunk-aligned maps.
"""

from __future__ import annotations

import time

import numpy as np

from .._broadcast import BROADCASTS
from .._validation import check_positive_int
from .._workers import kernel_threads, threads_per_task
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..penalties import DecoderIncoherencePenalty, Penalty
from ._common import (NUMPY_RESULT_LIMIT, PROBE_OPS, SCALAR_OPS, VECTOR_OPS, _client, _spill_path, _sum_tree,
                      _Tracker, check_ops, check_penalty, input_identity, pairs_identity)
from ._vectors import VectorSource, as_vector_source, is_dask_array, is_zarr_array
from .plan import DecoderPlan, _Part, _Range, shared_mode

__all__ = ["evaluate"]


def _finish_part(index, c0, c1, trim, res, writers, job):
    """Trim a part's owned rows to ``[c0, c1)``, write them (one writer per chunk) and mark the part."""
    a, b = trim
    out = {}
    for name, val in res.items():
        if name in VECTOR_OPS and val is not None:
            val = val[a:b]
            if writers is not None and name in writers:
                writers[name][c0:c1] = val
                val = None
        out[name] = val
    if job is not None:
        scalars = {k: (float(v) if k == "value" else [float(x) for x in v])
                   for k, v in out.items() if k in SCALAR_OPS}
        job.mark_done(f"P.{index}", outputs=[], info=scalars)
    return index, out


def _run_part(part: _Part, t_src: VectorSource, t_payload, v_src, v_payload, rho, ops, threads,
              writers=None, job=None):
    """Worker task (Zarr ``t``): read the blocks the part's pairs touch, run its local penalty.

    With ``writers`` the vector results go straight into their Zarr arrays (chunk-aligned: this
    part is the only writer of its chunks) and, with ``job``, the part is marked complete with its
    scalar partials in the marker, so a resumed job sums them without recomputing.
    """
    with kernel_threads(threads):
        t_local = t_src.read_ranges(part.starts, part.lengths, t_payload)
        v_local = None if v_src is None else v_src.read_ranges(part.starts, part.lengths, v_payload)
        res = part.local.evaluate_owned(t_local, rho, ops, v_local, out_atoms=part.out_atoms,
                                        value_atoms=part.value_atoms)
    return _finish_part(part.index, part.c0, part.c1, part.trim, res, writers, job)


def _run_shared(r: _Range, pen: DecoderIncoherencePenalty, t, v, rho, ops, threads, writers=None, job=None):
    """Worker task (numpy ``t``): the whole penalty and ``t`` are already on the worker (scattered
    once); compute the owned rows in place, no copy of ``t``."""
    with kernel_threads(threads):
        res = pen.evaluate_owned(t, rho, ops, v, out_atoms=(r.lo, r.hi), value_atoms=(r.vlo, r.vhi),
                                 _validated=True)
    return _finish_part(r.index, r.c0, r.c1, r.trim, res, writers, job)


# --------------------------------------------------------------------------- evaluate
def evaluate(penalty: Penalty, t, rho, *, ops=("value", "grad"), v=None, out=None, n_tasks=None,
             chunk=None, row_chunk=None, split_every=None, overwrite=False, progress=None) -> dict:
    """Evaluate penalty operations on the Dask cluster.

    Parameters
    ----------
    penalty : DecoderIncoherencePenalty or NestedPrefixPenalty
    t : array of shape (n,) — numpy, dask or zarr (the nested penalty also takes ``(n_rows, F)``)
    rho : array of shape (penalty.rho_count,)
    ops : sequence of str
        From ``value, grad, grad_rho, hvp, psd_majorizer_hvp, psd_majorizer_diag, hessian_diag``.
    v : array like ``t``, optional
        Probe vector, required by ``hvp`` and ``psd_majorizer_hvp``.
    out : str or zarr.Group, optional
        Where vector results are written as Zarr arrays (one per op). Without it they come back
        as numpy arrays.
    n_tasks : int, optional
        Number of decoder parts (default: 4 per worker thread).
    chunk : int, optional
        Zarr chunk length of vector outputs (decoder) — parts are aligned to it.
    row_chunk : int, optional
        Rows per chunk of the nested penalty's target.
    split_every : int, optional
        Fan-in of the tree reductions.
    overwrite : bool
        Replace a different job already in ``out`` (otherwise refused); the same job resumes.

    Returns
    -------
    dict
        Keyed by op name: floats for ``value``, numpy arrays for ``grad_rho``, numpy or Zarr
        arrays for vector ops (``None`` for the decoder's ``hessian_diag``).

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        Before any work: unknown op, missing ``v``, ``t``/``v`` of the wrong size, bad ρ.

    Notes
    -----
    With numpy inputs the decoder penalty and ``t`` (and ``v``) are broadcast to every worker, and
    kept there after the call: the next call with the same penalty object and an equal ``t``
    reuses them instead of sending them again (``t`` is compared by value, so changing it in
    place is safe). Workers therefore hold one copy of the last penalty, ``t`` and ``v`` between
    calls; ``distpen._broadcast.BROADCASTS.clear()`` drops them.

    Examples
    --------
    >>> res = dp.evaluate(pen, beta, rho, ops=("value", "grad"))   # doctest: +SKIP
    """
    ops = check_ops(ops, v)
    split_every = 8 if split_every is None else check_positive_int(split_every, "split_every")
    if split_every < 2:
        raise InvalidArgumentError(f"split_every must be ≥ 2, got {split_every}")
    check_penalty(penalty)
    if isinstance(penalty, DecoderIncoherencePenalty):
        return _evaluate_decoder(penalty, t, rho, ops, v, out, n_tasks, chunk, split_every, progress, overwrite)
    return _evaluate_nested(penalty, t, rho, ops, v, out, row_chunk, split_every, overwrite)


def _evaluate_decoder(pen, t, rho, ops, v, out, n_tasks, chunk, split_every, progress, overwrite=False):
    import zarr

    from ..store import RunStore

    rho = pen._check_rho(rho)
    n = pen.n_coef
    vec_ops = [o for o in ops if o in VECTOR_OPS and o != "hessian_diag"]
    if out is None and len(vec_ops) * n * 8 > NUMPY_RESULT_LIMIT:
        raise InvalidArgumentError(
            f"the vector results need {len(vec_ops) * n * 8 / 2**30:.1f} GiB; pass out= to write them to Zarr"
        )
    # validate before any work or any write
    if not is_dask_array(t):
        as_vector_source(t, n, "t")
    if v is not None and any(o in PROBE_OPS for o in ops) and not is_dask_array(v):
        as_vector_source(v, n, "v")
    if n_tasks is not None:
        n_tasks = check_positive_int(n_tasks, "n_tasks")
    if chunk is not None:
        chunk = check_positive_int(chunk, "chunk")
    client = _client()
    job = None
    group = None
    done = set()
    writers = None
    if out is not None:
        chunk = min(n, 1 << 20) if chunk is None else min(chunk, n)
        # a deterministic partition (not tied to the cluster's size) so that a re-run resumes
        n_tasks = min(-(-n // chunk), 64) if n_tasks is None else n_tasks
        spec = {"kind": "evaluate", "ops": list(ops), "penalty": pen.to_spec(), "pairs": pairs_identity(pen.pairs),
                "t": input_identity(t, "t"), "v": None if v is None else input_identity(v, "v"),
                "rho": [float(x) for x in rho], "chunk": chunk, "n_tasks": n_tasks, "n": n}
        plan = DecoderPlan.balanced(pen, n_tasks, chunk=chunk)
        store = RunStore(out)
        job = store.begin_job("evaluate", spec, [f"P.{i}" for i in range(len(plan))], overwrite=overwrite)
        done = job.done()
        group = zarr.open_group(store.path, mode="a")
        writers = {}
        for name in vec_ops:
            if done and name in group:
                writers[name] = group[name]
            else:
                writers[name] = group.create_array(name, shape=(n,), chunks=(chunk,), dtype="f8",
                                                   fill_value=0.0, overwrite=True)
    else:
        n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        plan = DecoderPlan.balanced(pen, 4 * max(1, n_threads) if n_tasks is None else n_tasks)
    t_src, _ = as_vector_source(t, n, "t", client=client,
                                spill_path=None if group is None else _spill_path(group, "t"))
    v_src = None
    if v is not None and any(o in PROBE_OPS for o in ops):
        v_src, _ = as_vector_source(v, n, "v", client=client,
                                    spill_path=None if group is None else _spill_path(group, "v"))
    threads = threads_per_task(client)
    t0 = time.perf_counter()
    results = [None] * len(plan)
    if job is not None:
        for unit, m in job.markers().items():
            results[int(unit.split(".")[1])] = {k: (np.asarray(val) if k == "grad_rho" else val)
                                                 for k, val in m["info"].items()}
    if shared_mode(pen, t_src, v_src):
        pen_f = BROADCASTS.penalty(client, pen)
        futures = [client.submit(_run_shared, r, pen_f, t_src.payload, None if v_src is None else v_src.payload,
                                 rho, ops, threads, writers, job, pure=False)
                   for r in plan.ranges if results[r.index] is None]
    else:
        futures = [client.submit(_run_part, part, t_src.meta(), t_src.task_payload(),
                                 None if v_src is None else v_src.meta(),
                                 None if v_src is None else v_src.task_payload(), rho, ops, threads, writers,
                                 job, pure=False)
                   for part in plan.parts if results[part.index] is None]

    # numpy vector results: each part's rows are copied into place as it arrives (overlapping the
    # other parts' work) instead of one concatenation of every part at the end
    dest = {name: np.empty(n) for name in vec_ops} if writers is None else {}
    bounds = [(r.c0, r.c1) for r in plan.ranges]

    def on_result(res):
        i, part = res
        for name, arr in dest.items():
            c0, c1 = bounds[i]
            arr[c0:c1] = part.pop(name)
        results[i] = part

    _Tracker(job, "evaluate", len(futures), progress).gather(futures, on_result)
    res = _combine(results, ops, writers or dest, split_every, n)
    if job is not None:
        job.finish(seconds=time.perf_counter() - t0, parts_computed=len(futures), value=res.get("value"))
    return res


def _combine(results, ops, writers, split_every, n):
    res = {}
    for name in ops:
        if name in ("value", "grad_rho"):
            res[name] = _sum_tree([r[name] for r in results], split_every)
            if name == "value":
                res[name] = float(res[name])
            else:
                res[name] = np.asarray(res[name], dtype=np.float64).reshape(-1)
        elif name == "hessian_diag":
            res[name] = None
        elif writers is not None and name in writers:
            res[name] = writers[name]
        else:
            res[name] = np.concatenate([r[name] for r in results]) if results else np.zeros(n)
    return res


# --------------------------------------------------------------------------- nested prefix
def _nested_value_block(block, pen, rho):
    return np.array([pen.value(np.ascontiguousarray(block).ravel(), rho)])


def _nested_grad_rho_block(block, pen, rho):
    return pen.grad_rho(np.ascontiguousarray(block).ravel(), rho)[None, :]


def _nested_vector_block(block, pen, rho, op):
    flat = np.ascontiguousarray(block).ravel()
    if op == "grad":
        return pen.grad_target(flat, rho).reshape(block.shape)
    return pen.hessian_diag(flat, rho).reshape(block.shape)


def _nested_probe_block(block, vblock, pen, rho, op):
    flat = np.ascontiguousarray(block).ravel()
    vflat = np.ascontiguousarray(vblock).ravel()
    fn = pen.hvp if op == "hvp" else pen.psd_majorizer_hvp
    return fn(flat, rho, vflat).reshape(block.shape)


def _nested_as_dask(x, pen, name, row_chunk):
    import dask.array as da

    F = pen.latent_dim
    if is_zarr_array(x):
        arr = da.from_zarr(x)
    elif is_dask_array(x):
        arr = x
    else:
        arr = pen._check_target(x, name)
    size = int(np.prod(arr.shape))
    if arr.ndim == 1:
        if size == 0 or size % F:
            raise ShapeMismatchError(
                f"{name} has {size} entries, not a positive multiple of latent_dim = {F}; "
                "the target is n_rows × latent_dim, row-major"
            )
        arr = arr.reshape(size // F, F) if not isinstance(arr, np.ndarray) else arr.reshape(-1, F)
    elif arr.ndim != 2 or arr.shape[1] != F:
        raise ShapeMismatchError(f"{name} has shape {arr.shape}; expected (n_rows, {F}) or a flat vector")
    if arr.dtype.kind not in "fiu":
        raise InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected a real float array")
    if row_chunk is None:
        row_chunk = max(1, (32 * 2**20) // (8 * F))
    if isinstance(arr, np.ndarray):
        arr = da.from_array(arr, chunks=(row_chunk, F))
    else:
        arr = arr.astype(np.float64).rechunk((row_chunk, F))
    return arr


def _evaluate_nested(pen, t, rho, ops, v, out, row_chunk, split_every, overwrite=False):
    import dask
    import dask.array as da
    import zarr

    from ..store import RunStore

    rho = pen._check_rho(rho)
    if row_chunk is not None:
        row_chunk = check_positive_int(row_chunk, "row_chunk")
    numpy_in = not (is_zarr_array(t) or is_dask_array(t))
    T = _nested_as_dask(t, pen, "t", row_chunk)
    V = None
    if any(o in PROBE_OPS for o in ops):
        V = _nested_as_dask(v, pen, "v", T.chunks[0][0])
        if V.shape != T.shape:
            raise ShapeMismatchError(f"v has shape {V.shape}, expected {T.shape} like t")
        V = V.rechunk(T.chunks)
    _client()
    group = job = None
    if out is not None:
        spec = {"kind": "evaluate", "ops": list(ops), "penalty": pen.to_spec(), "t": input_identity(t, "t"),
                "v": None if V is None else input_identity(v, "v"), "rho": [float(x) for x in rho],
                "row_chunk": int(T.chunks[0][0])}
        store = RunStore(out)
        job = store.begin_job("evaluate", spec, ["all"], overwrite=overwrite)
        group = zarr.open_group(store.path, mode="a")
    nb = T.numblocks[0]
    lazy = {}
    if "value" in ops:
        parts = T.map_blocks(_nested_value_block, pen, rho, dtype=np.float64, drop_axis=1,
                             chunks=((1,) * nb,))
        lazy["value"] = parts.sum(split_every=split_every)
    if "grad_rho" in ops:
        parts = T.map_blocks(_nested_grad_rho_block, pen, rho, dtype=np.float64,
                             chunks=((1,) * nb, (pen.rho_count,)))
        lazy["grad_rho"] = parts.sum(axis=0, split_every=split_every)
    vec = {}
    for name in ("grad", "hessian_diag", "psd_majorizer_diag"):
        if name in ops:
            op = "grad" if name == "grad" else "hessian_diag"
            vec[name] = T.map_blocks(_nested_vector_block, pen, rho, op, dtype=np.float64)
    for name in PROBE_OPS:
        if name in ops:
            vec[name] = da.map_blocks(_nested_probe_block, T, V, pen, rho, name, dtype=np.float64)
    res = {}
    if group is not None:
        stores = []
        for name, arr in vec.items():
            z = group.create_array(name, shape=arr.shape, chunks=(arr.chunks[0][0], arr.shape[1]),
                                   dtype="f8", fill_value=0.0, overwrite=True)
            stores.append(arr.store(z, lock=False, compute=False))
            res[name] = z
        try:
            computed = dask.compute(lazy, *stores)[0]
        except Exception as exc:
            job.fail(f"{type(exc).__name__}: {exc}")
            raise
        job.mark_done("all", info={"value": float(computed["value"]) if "value" in computed else None})
        job.finish(value=float(computed["value"]) if "value" in computed else None)
    else:
        computed, vec_np = dask.compute(lazy, vec)
        for name, arr in vec_np.items():
            res[name] = arr.ravel() if numpy_in else arr
    for name in ("value", "grad_rho"):
        if name in computed:
            res[name] = float(computed[name]) if name == "value" else np.asarray(computed[name])
    return {name: res[name] for name in ops}
