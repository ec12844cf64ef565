"""Dask plans: penalty evaluation and Gauss-Newton curvature over atom ranges and tiles (DESIGN §3).

The math stays in the penalty classes: every task rebuilds a *local* penalty over the atoms its
work touches (``DecoderIncoherencePenalty.with_pairs`` on renumbered pairs) and calls its methods.

Decoder incoherence — **owner computes**. Atoms are cut into contiguous ranges of balanced cost
(Σ over each atom's pairs of ``M_a·M_b·p_out``). The task owning a range receives the pairs that
touch it, reads the decoder blocks of those pairs' atoms, and computes the rows of its own atoms
of every vector result (so each output chunk is written by exactly one task, with no shuffle) and
the value of the pairs whose ``j`` it owns (so values tree-sum to the total).

Nested prefix — a row-chunked ``dask.array`` map: value and ρ-gradient are per-chunk sums
tree-reduced with ``split_every``; vector results are chunk-aligned maps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._alloc import zeros
from ._chunkio import sweep_temporaries, write_chunk
from ._broadcast import BROADCASTS
from ._sources import VectorSource, as_vector_source, is_dask_array, is_zarr_array
from ._validation import check_finite_scalar, check_positive_int
from ._workers import kernel_threads, threads_per_task
from .errors import InvalidArgumentError, ShapeMismatchError
from .pairs import PairTable
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty, Penalty

__all__ = ["OPS", "evaluate", "DecoderPlan", "partition_atoms"]

OPS = ("value", "grad", "grad_rho", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
SCALAR_OPS = ("value", "grad_rho")
VECTOR_OPS = ("grad", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
PROBE_OPS = ("hvp", "psd_majorizer_hvp")
#: results up to this many bytes come back as numpy when no ``out`` is given
NUMPY_RESULT_LIMIT = 2 * 2**30
#: pair tables up to this size are scattered whole to the workers (with a numpy ``t``)
SHARED_PAIRS_LIMIT = 2**30


def _client():
    from .cluster import get_client

    return get_client()


def check_penalty(penalty) -> None:
    """Refuse anything but the two penalties the distributed layer knows."""
    if not isinstance(penalty, (DecoderIncoherencePenalty, NestedPrefixPenalty)):
        raise InvalidArgumentError(
            f"penalty must be a DecoderIncoherencePenalty or NestedPrefixPenalty, got {type(penalty).__name__}"
        )


def check_ops(ops, v) -> tuple[str, ...]:
    """Validate the requested operations (and that ``v`` is there when a product is asked for)."""
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    if not ops:
        raise InvalidArgumentError(f"ops is empty; expected some of {OPS}")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise InvalidArgumentError(f"unknown op {unknown[0]!r} in ops; expected names from {OPS}")
    if v is None and any(o in PROBE_OPS for o in ops):
        raise InvalidArgumentError(
            f"ops {[o for o in ops if o in PROBE_OPS]} need a probe vector: pass v= of the same length as t"
        )
    return tuple(dict.fromkeys(ops))


# --------------------------------------------------------------------------- partitioning
def atom_costs(pen: DecoderIncoherencePenalty) -> np.ndarray:
    """Work of owning each atom: ``M_a·p·(1 + Σ_{b~a} M_b)``."""
    m = pen.block_sizes.astype(np.float64)
    pairs = pen.pairs
    partner_rows = (np.bincount(pairs.j, weights=m[pairs.k], minlength=pen.k_atoms)
                    + np.bincount(pairs.k, weights=m[pairs.j], minlength=pen.k_atoms))
    return m * pen.p_out * (1.0 + partner_rows)


def partition_atoms(pen: DecoderIncoherencePenalty, n_parts: int) -> np.ndarray:
    """Cut atoms into at most ``n_parts`` contiguous ranges of balanced cost; returns the ``n+1`` atom bounds."""
    K = pen.k_atoms
    n_parts = max(1, min(int(n_parts), K))
    cost = np.cumsum(atom_costs(pen))
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    return np.unique(np.concatenate([[0], np.clip(cuts, 1, K), [K]])).astype(np.int64)


def chunk_aligned_bounds(pen: DecoderIncoherencePenalty, chunk: int, n_parts: int) -> np.ndarray:
    """Coefficient bounds that are multiples of ``chunk`` (Zarr chunk edges), balanced by cost."""
    n = pen.n_coef
    n_chunks = -(-n // chunk)
    n_parts = max(1, min(int(n_parts), n_chunks))
    # cost of each Zarr chunk: cost of the atoms starting in it
    starts = pen.layout.offsets[:-1]
    per_chunk = np.bincount(starts // chunk, weights=atom_costs(pen), minlength=n_chunks)
    cost = np.cumsum(per_chunk) + np.arange(1, n_chunks + 1)  # never zero-cost chunks
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    chunk_edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_chunks), [n_chunks]]))
    return np.minimum(chunk_edges.astype(np.int64) * chunk, n)


class _Range(NamedTuple):
    """One part of an owner-computes split, in global numbering."""

    index: int
    lo: int      # owned atoms [lo, hi): their rows of every vector result
    hi: int
    vlo: int     # value atoms [vlo, vhi): the pairs whose j lies here count towards the value
    vhi: int
    c0: int      # the coefficient range [c0, c1) this part writes
    c1: int

    @property
    def trim(self) -> tuple[int, int]:
        return self.c0 - self.row0, self.c1 - self.row0

    row0: int = 0  # first coefficient of atom lo


@dataclass
class _Part:
    """A part made self-contained for a worker that holds neither ``t`` nor the pairs: the pairs
    touching its atoms, renumbered onto the atoms they touch, and where to read those atoms' blocks."""

    index: int
    c0: int
    c1: int
    local: DecoderIncoherencePenalty  # penalty over the local atoms, pairs renumbered
    starts: np.ndarray           # global offsets of the local atoms' blocks (for reading t, v)
    lengths: np.ndarray
    out_atoms: tuple[int, int]   # local ids of the owned atoms
    value_atoms: tuple[int, int]
    trim: tuple[int, int]        # slice of the owned rows that falls in [c0, c1)
    atoms: np.ndarray = field(repr=False, default=None)  # global ids of the local atoms


class DecoderPlan:
    """The owner-computes split of a decoder penalty into parts (see the module docstring).

    Parameters
    ----------
    pen : DecoderIncoherencePenalty
    bounds : array of int
        Coefficient bounds ``0 = c_0 < … < c_n = n_coef`` of the parts.

    ``ranges`` describe the parts in global numbering (for workers that hold the whole penalty and
    ``t``); ``parts`` (built on first use) are self-contained for workers that read ``t`` from Zarr.
    """

    def __init__(self, pen: DecoderIncoherencePenalty, bounds: np.ndarray):
        self.pen = pen
        self.bounds = np.asarray(bounds, dtype=np.int64)
        off = pen.layout.offsets
        c0, c1 = self.bounds[:-1], self.bounds[1:]
        lo = np.searchsorted(off, c0, side="right") - 1
        hi = np.searchsorted(off, c1, side="left")
        vlo = np.searchsorted(off[:-1], c0, side="left")
        vhi = np.searchsorted(off[:-1], c1, side="left")
        self.ranges = [_Range(i, int(lo[i]), int(hi[i]), int(vlo[i]), int(vhi[i]), int(c0[i]), int(c1[i]),
                              int(off[lo[i]])) for i in range(c0.shape[0])]
        self._parts = None

    @classmethod
    def balanced(cls, pen, n_parts: int, chunk: int | None = None) -> "DecoderPlan":
        if chunk is None:
            atoms = partition_atoms(pen, n_parts)
            return cls(pen, pen.layout.offsets[atoms])
        return cls(pen, chunk_aligned_bounds(pen, chunk, n_parts))

    @property
    def parts(self) -> list[_Part]:
        if self._parts is None:
            perm_k = np.argsort(self.pen.pairs.k, kind="stable")
            k_sorted = self.pen.pairs.k[perm_k]
            self._parts = [self._make_part(r, perm_k, k_sorted) for r in self.ranges]
        return self._parts

    def _make_part(self, r: _Range, perm_k, k_sorted) -> _Part:
        pen, lay, pairs = self.pen, self.pen.layout, self.pen.pairs
        off = lay.offsets
        lo, hi = r.lo, r.hi
        # pairs touching [lo, hi): j in range (a contiguous slice) or k in range with j before it
        q0, q1 = np.searchsorted(pairs.j, [lo, hi])
        a, b = np.searchsorted(k_sorted, [lo, hi])
        from_k = perm_k[a:b]
        from_k = from_k[pairs.j[from_k] < lo]
        idx = np.concatenate([np.arange(q0, q1), np.sort(from_k)])
        idx.sort()
        sub = PairTable(pairs.j[idx], pairs.k[idx], pairs.w[idx], pairs.k_atoms, _trusted=True)
        atoms = np.union1d(sub.atoms(), np.arange(lo, hi, dtype=np.int64))
        if atoms.shape[0] < 2:  # a layout needs two atoms; add a neighbour that plays no part
            atoms = np.union1d(atoms, [0 if atoms[0] != 0 else 1])
        local_pairs, _ = sub.restrict(atoms)
        local = pen.with_pairs(local_pairs, lay.subset(atoms))
        llo = int(np.searchsorted(atoms, lo))
        lvlo, lvhi = (int(x) for x in np.searchsorted(atoms, [r.vlo, r.vhi]))
        return _Part(r.index, r.c0, r.c1, local, off[atoms].copy(), lay.block_sizes[atoms] * lay.p_out,
                     (llo, llo + (hi - lo)), (lvlo, lvhi), r.trim, atoms)

    def __len__(self) -> int:
        return len(self.ranges)


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


def shared_mode(pen: DecoderIncoherencePenalty, *sources) -> bool:
    """Whether workers should hold the whole penalty and ``t`` (numpy inputs, pairs ≤ 1 GiB)."""
    return all(s is None or s.kind == "numpy" for s in sources) and 24 * len(pen.pairs) <= SHARED_PAIRS_LIMIT


def _sum_tree(values, split_every: int = 8):
    """Deterministic pairwise tree sum (fixed order) of floats or equal-shape arrays."""
    vals = list(values)
    if not vals:
        return 0.0
    while len(vals) > 1:
        vals = [math.fsum(vals[i:i + split_every]) if np.isscalar(vals[i])
                else np.sum(vals[i:i + split_every], axis=0) for i in range(0, len(vals), split_every)]
    return vals[0]


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


def _open_out_group(out):
    import zarr

    if out is None:
        return None
    if isinstance(out, zarr.Group):
        return out
    return zarr.open_group(str(out), mode="a")


def _evaluate_decoder(pen, t, rho, ops, v, out, n_tasks, chunk, split_every, progress, overwrite=False):
    import zarr

    from .store import RunStore

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


def _spill_path(group, name: str) -> str:
    import os

    store_path = getattr(group.store, "root", None)
    if store_path is None:
        return None
    return os.path.join(str(store_path), group.path, f"_input_{name}")


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

    from .store import RunStore

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


# --------------------------------------------------------------------------- Gauss-Newton assembly
def _atom_tile_spans(offsets: np.ndarray, tile: int):
    """First and last tile index each atom's coefficient range touches."""
    return offsets[:-1] // tile, (offsets[1:] - 1) // tile


def tile_work(pen: DecoderIncoherencePenalty, tile: int):
    """The non-empty tiles of ``H_GN`` and what contributes to each.

    Returns ``(keys, pair_ptr, pair_ids, diag_ptr, diag_atoms)``: tile ``keys[i] = I·n_tiles + J``
    receives the pairs ``pair_ids[pair_ptr[i]:pair_ptr[i+1]]`` (either orientation of their
    off-diagonal blocks meets it) and the diagonal blocks of ``diag_atoms[diag_ptr[i]:diag_ptr[i+1]]``.
    """
    off = pen.layout.offsets
    n_tiles = -(-pen.n_coef // tile)
    t0, t1 = _atom_tile_spans(off, tile)
    pj, pk = pen.pairs.j, pen.pairs.k
    nI = t1[pj] - t0[pj] + 1
    nJ = t1[pk] - t0[pk] + 1
    count = nI * nJ
    total = int(count.sum())
    q = np.repeat(np.arange(pj.shape[0], dtype=np.int64), count)
    first = np.repeat(np.cumsum(count) - count, count)
    within = np.arange(total, dtype=np.int64) - first
    I = t0[pj][q] + within // nJ[q]
    J = t0[pk][q] + within % nJ[q]
    keys = np.concatenate([I * n_tiles + J, J * n_tiles + I])
    qq = np.concatenate([q, q])
    both = np.unique(keys * max(1, pj.shape[0]) + qq)  # dedupe (tile, pair), sort by tile
    pkeys, pids = both // max(1, pj.shape[0]), both % max(1, pj.shape[0])
    # diagonal blocks I ⊗ S_a: atoms with at least one partner, on every tile (I, J) with I and J
    # in the atom's own tile span (a block that straddles a tile edge reaches off-diagonal tiles)
    deg = pen.pairs.degree()
    active = np.flatnonzero(deg > 0)
    dn = t1[active] - t0[active] + 1
    dcount = dn * dn
    da_ = np.repeat(active, dcount)
    dfirst = np.repeat(np.cumsum(dcount) - dcount, dcount)
    dwithin = np.arange(int(dcount.sum()), dtype=np.int64) - dfirst
    dspan = np.repeat(dn, dcount)
    dI = t0[da_] + dwithin // dspan
    dJ = t0[da_] + dwithin % dspan
    dkeys = dI * n_tiles + dJ
    order = np.lexsort((da_, dkeys))
    dkeys, da_ = dkeys[order], da_[order]
    all_keys = np.union1d(pkeys, dkeys)
    pair_ptr = np.searchsorted(pkeys, np.concatenate([all_keys, [np.iinfo(np.int64).max]]))
    diag_ptr = np.searchsorted(dkeys, np.concatenate([all_keys, [np.iinfo(np.int64).max]]))
    return all_keys, pair_ptr, pids, diag_ptr, da_


@dataclass
class _TileTask:
    """One tile of ``H_GN``: rows ``[r0, r1)``, columns ``[c0, c1)``."""

    key: int
    r0: int
    r1: int
    c0: int
    c1: int
    local: DecoderIncoherencePenalty
    starts: np.ndarray
    lengths: np.ndarray
    local_r0: int
    local_c0: int
    diag_global: np.ndarray  # atoms whose diagonal blocks meet the tile (global ids, for reading S)
    diag_local: np.ndarray


def _make_tile_task(pen, key, n_tiles, tile, pair_ids, diag_atoms) -> _TileTask:
    lay, pairs = pen.layout, pen.pairs
    off = lay.offsets
    I, J = divmod(int(key), n_tiles)
    r0, r1 = I * tile, min((I + 1) * tile, pen.n_coef)
    c0, c1 = J * tile, min((J + 1) * tile, pen.n_coef)
    row_atoms = np.arange(np.searchsorted(off, r0, "right") - 1, np.searchsorted(off, r1, "left"))
    col_atoms = np.arange(np.searchsorted(off, c0, "right") - 1, np.searchsorted(off, c1, "left"))
    sub = PairTable(pairs.j[pair_ids], pairs.k[pair_ids], pairs.w[pair_ids], pairs.k_atoms, _trusted=True)
    atoms = np.union1d(np.union1d(sub.atoms(), diag_atoms), np.union1d(row_atoms, col_atoms)).astype(np.int64)
    if atoms.shape[0] < 2:
        atoms = np.union1d(atoms, [0 if atoms[0] != 0 else 1])
    local_pairs, _ = sub.restrict(atoms)
    local = pen.with_pairs(local_pairs, lay.subset(atoms))
    loff = local.layout.offsets
    lr = int(np.searchsorted(atoms, row_atoms[0]))
    lc = int(np.searchsorted(atoms, col_atoms[0]))
    local_r0 = r0 - int(off[row_atoms[0]]) + int(loff[lr])
    local_c0 = c0 - int(off[col_atoms[0]]) + int(loff[lc])
    return _TileTask(int(key), r0, r1, c0, c1, local, off[atoms].copy(), lay.block_sizes[atoms] * lay.p_out,
                     local_r0, local_c0, np.asarray(diag_atoms, dtype=np.int64),
                     np.searchsorted(atoms, diag_atoms).astype(np.int64))


def _tile_unit(key: int, n_tiles: int) -> tuple[str, str]:
    I, J = divmod(int(key), n_tiles)
    return f"H.{I}.{J}", f"H/c/{I}/{J}"


#: a tile batch reads its diagonal blocks S_a at once when they take at most this many bytes
_S_BATCH_BYTES = 256 * 2**20


def _run_tiles(tasks, n_tiles, t_src, t_payload, rho, scale, S_array, H, threads, job=None, fail_keys=()):
    """Worker task: compute and write a batch of tiles, marking each complete right after its write.

    Returns ``[(key, written, frobenius norm)]``. A tile whose every entry is zero is not written.
    """
    out = []
    p = S_array.shape[1]
    # one tile buffer for the batch: its pages are faulted in once, not once per tile
    size = max(((t.r1 - t.r0) * (t.c1 - t.c0) for t in tasks), default=0)
    buf = zeros(size)
    # the batch's diagonal blocks S_a, read in one pass over their Zarr chunks (not once per tile)
    want = np.unique(np.concatenate([t.diag_global for t in tasks] or [np.zeros(0, dtype=np.int64)]))
    S_batch = None
    if 0 < want.shape[0] * p * p * 8 <= _S_BATCH_BYTES:
        S_batch = np.asarray(S_array.oindex[want, :, :], dtype=np.float64)
    with kernel_threads(threads):
        for task in tasks:
            if task.key in fail_keys:  # test hook: an injected fault
                raise RuntimeError(f"injected fault on tile {divmod(task.key, n_tiles)}")
            t_local = t_src.read_ranges(task.starts, task.lengths, t_payload)
            block = buf[:(task.r1 - task.r0) * (task.c1 - task.c0)].reshape(task.r1 - task.r0, task.c1 - task.c0)
            block.fill(0.0)
            if task.diag_global.shape[0] and S_batch is not None:
                S = S_batch[np.searchsorted(want, task.diag_global)]
            elif task.diag_global.shape[0]:
                S = np.asarray(S_array.oindex[task.diag_global, :, :], dtype=np.float64)
            else:
                S = np.zeros((0, p, p))
            task.local.accumulate_psd_majorizer_tile(t_local, rho, scale, block, task.local_r0,
                                                     task.local_c0, grams=(task.diag_local, S))
            norm = float(np.linalg.norm(block))
            written = norm > 0
            if written:
                write_chunk(H, divmod(task.key, n_tiles), block)
            if job is not None:
                unit, rel = _tile_unit(task.key, n_tiles)
                job.mark_done(unit, outputs=[rel] if written else [], info={"norm": norm, "written": written})
            out.append((task.key, written, norm))
    return out


def _store_grams(S_array, g0: int, S: np.ndarray, job) -> None:
    S_array[g0:g0 + S.shape[0]] = S
    if job is not None:
        apc = S_array.chunks[0]
        for c in range(g0 // apc, -(-(g0 + S.shape[0]) // apc)):
            job.mark_done(f"S.{c}", outputs=[])


def _run_grams(part: _Part, t_src, t_payload, rho, threads, S_array, job=None):
    """Worker task (Zarr ``t``): ``s·S_a`` of a part's owned atoms into ``S`` (atom-aligned parts)."""
    with kernel_threads(threads):
        t_local = t_src.read_ranges(part.starts, part.lengths, t_payload)
        lo, hi = part.out_atoms
        S = part.local.weighted_grams(t_local, rho, atoms=np.arange(lo, hi))
    _store_grams(S_array, int(part.atoms[lo]), S, job)
    return part.index


def _run_grams_shared(r: _Range, pen, t, rho, threads, S_array, job=None):
    """Worker task (numpy ``t`` and the penalty on the worker): ``s·S_a`` of the range's atoms into ``S``."""
    with kernel_threads(threads):
        S = pen._weighted_grams(t, rho, np.arange(r.lo, r.hi))
    _store_grams(S_array, r.lo, S, job)
    return r.index


def _atom_aligned_bounds(pen, n_parts: int, atoms_per_chunk: int) -> np.ndarray:
    """Atom bounds that are multiples of ``atoms_per_chunk`` (Zarr chunk edges of ``S``), cost-balanced."""
    K = pen.k_atoms
    n_chunks = -(-K // atoms_per_chunk)
    per_chunk = np.bincount(np.arange(K) // atoms_per_chunk, weights=atom_costs(pen), minlength=n_chunks)
    cost = np.cumsum(per_chunk) + np.arange(1, n_chunks + 1)
    n_parts = max(1, min(int(n_parts), n_chunks))
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_chunks), [n_chunks]]))
    return np.minimum(edges.astype(np.int64) * atoms_per_chunk, K)


def _tile_codecs(pen: DecoderIncoherencePenalty, tile: int, n_tiles_touched: int, compressors):
    """Codecs of ``H``: the caller's, or (``"auto"``) none for mostly non-zero tiles, fast zstd otherwise."""
    if not (isinstance(compressors, str) and compressors == "auto"):
        return compressors
    from zarr.codecs import ZstdCodec

    m = pen.block_sizes.astype(np.float64) * pen.p_out
    pairs = pen.pairs
    filled = 2.0 * float(np.sum(m[pairs.j] * m[pairs.k])) + float(np.sum(m[pairs.degree() > 0] * pen.p_out))
    density = filled / max(1.0, float(n_tiles_touched) * tile * tile)
    return None if density > 0.5 else ZstdCodec(level=1)


def default_tile(pen: Penalty, n: int) -> int:
    """A square tile of at most 2048² float64 (32 MiB) that holds at least one full decoder block."""
    block = pen.layout.max_block * pen.p_out if isinstance(pen, DecoderIncoherencePenalty) else 1
    return int(min(n, max(2048, block)))


def input_identity(x, name: str) -> dict:
    """JSON identity of an input for a job spec: Zarr path/shape/chunks, or a digest of numpy data."""
    import hashlib

    if is_zarr_array(x):
        root = getattr(x.store, "root", None)
        return {"kind": "zarr", "path": None if root is None else str(root), "array": x.path,
                "shape": list(x.shape), "chunks": list(x.chunks), "dtype": str(x.dtype)}
    if is_dask_array(x):
        return {"kind": "dask", "name": x.name, "shape": list(x.shape)}
    arr = np.ascontiguousarray(np.asarray(x))
    return {"kind": "numpy", "shape": list(arr.shape), "dtype": str(arr.dtype),
            "blake2b": hashlib.blake2b(arr.view(np.uint8).ravel(), digest_size=16).hexdigest()}


def pairs_identity(pairs: PairTable) -> dict:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for arr in (pairs.j, pairs.k, pairs.w):
        h.update(np.ascontiguousarray(arr).view(np.uint8).ravel())
    return {"n_pairs": len(pairs), "k_atoms": pairs.k_atoms, "blake2b": h.hexdigest()}


def _executing_keys(dask_worker) -> list:
    state = getattr(dask_worker, "state", None)
    executing = getattr(state, "executing", ()) if state is not None else ()
    return [getattr(ts, "key", ts) for ts in executing]


def _quiesce(futures, timeout: float = 120.0) -> None:
    """Wait until no worker still executes one of ``futures`` (a cancelled task that was already
    running goes on until it returns, unknown to the scheduler), so the store is quiet when an
    error surfaces."""
    if not futures:
        return
    client = futures[0].client
    keys = {f.key for f in futures}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = {k for ks in client.run(_executing_keys).values() for k in ks}
        except Exception:  # noqa: BLE001 - best effort; the original error is what matters
            return
        if not running & keys:
            return
        time.sleep(0.05)


class _Tracker:
    """Client side of a job: progress into the store as futures finish, failures recorded."""

    def __init__(self, job, stage_label: str, total: int, progress=None, every: float = 0.5):
        self.job, self.label, self.total, self.cb = job, stage_label, total, progress
        self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.every = every

    def step(self, n: int = 1, **fields):
        self.done += n
        now = time.perf_counter()
        if self.cb is not None:
            self.cb(self.label, self.done, self.total)
        if self.job is not None and (now - self.last >= self.every or self.done == self.total):
            elapsed = now - self.t0
            self.job.update_progress(phase=self.label, phase_done=self.done, phase_total=self.total,
                                     units_done=len(self.job.done()), elapsed_s=elapsed,
                                     units_per_s=self.done / elapsed if elapsed > 0 else None, **fields)
            self.last = now

    def gather(self, futures, on_result=None):
        from distributed import as_completed

        try:
            for fut in as_completed(futures):
                res = fut.result()
                if on_result is not None:
                    on_result(res)
                self.step()
        except Exception as exc:
            for f in futures:
                f.cancel()
            _quiesce(futures)
            if self.job is not None:
                self.job.fail(f"{type(exc).__name__}: {exc}")
                note = (f"; completed units are kept in {self.job.store.path}: re-run the same call "
                        "to compute only the missing ones")
                if hasattr(exc, "add_note"):
                    exc.add_note(note)
            raise


def assemble_majorizer(penalty: Penalty, t, rho, out, *, scale: float = 1.0, tile: int | None = None,
                       format: str = "tiles", overwrite: bool = False, tiles_per_task: int | None = None,
                       compressors="auto", progress=None, _fail_tiles=()):
    """Assemble ``scale·H_GN`` out of core, as square tiles of an ``n × n`` Zarr array.

    Parameters
    ----------
    penalty : DecoderIncoherencePenalty or NestedPrefixPenalty
    t : array of shape (n,) — numpy, dask or zarr
    rho : array of shape (penalty.rho_count,)
    out : str or zarr.Group
        The run store receiving ``H`` (``n × n``, chunks ``tile × tile``; only tiles with a
        contribution are written) and ``S`` (``K × p × p``: each atom's diagonal block ``s·S_a``),
        with a manifest so an interrupted assembly resumes where it stopped.
    scale : float
    tile : int, optional
        Tile edge; the returned array's chunk shape is ``(tile, tile)``.
    format : {"tiles", "factored"}
        ``"factored"`` writes ``S``, the pairs and the decoder only, and returns a
        :class:`FactoredMajorizer` whose ``matvec`` reproduces ``scale·H_GN v``.
    overwrite : bool
        Replace a different job already in ``out`` (otherwise refused).
    compressors : "auto", None or Zarr codecs
        Codecs of ``H``. ``"auto"``: none when the written tiles are expected to be mostly
        non-zero (compressing dense float64 costs more time than it saves bytes), fast zstd
        (level 1) when they are mostly zeros.

    Returns
    -------
    zarr.Array of shape (n, n), or FactoredMajorizer

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        Before any work: a non-positive tile, a ``t`` of the wrong size, bad ρ or scale, an unknown format.
    StoreConflictError
        ``out`` holds a different job and ``overwrite`` is False.
    """
    import zarr

    from .store import RunStore

    if format not in ("tiles", "factored"):
        raise InvalidArgumentError(f"format must be 'tiles' or 'factored', got {format!r}")
    scale = check_finite_scalar(scale, "scale")
    if tile is not None:
        tile = check_positive_int(tile, "tile")
    if out is None:
        raise InvalidArgumentError("out is required: a directory (run store) to receive the tiles")
    check_penalty(penalty)
    if isinstance(penalty, NestedPrefixPenalty):
        return _assemble_nested(penalty, t, rho, out, scale, tile, format, overwrite)
    pen = penalty
    rho = pen._check_rho(rho)
    n = pen.n_coef
    tile = default_tile(pen, n) if tile is None else min(tile, n)
    client = _client()
    store = RunStore(out)
    p = pen.p_out
    apc = max(1, min(pen.k_atoms, (4 * 2**20) // (8 * p * p)))
    n_s_chunks = -(-pen.k_atoms // apc)
    n_tiles = -(-n // tile)
    if format == "tiles":
        keys, pair_ptr, pair_ids, diag_ptr, diag_atoms = tile_work(pen, tile)
    else:
        keys = np.zeros(0, dtype=np.int64)
    units = [f"S.{c}" for c in range(n_s_chunks)] + [_tile_unit(k, n_tiles)[0] for k in keys]
    spec = {"kind": "assemble_majorizer", "format": format, "penalty": pen.to_spec(),
            "pairs": pairs_identity(pen.pairs), "t": input_identity(t, "t"),
            "rho": [float(x) for x in rho], "scale": scale, "tile": tile, "n": n}
    # validate t before any work (and before the store is touched)
    t_src, _ = as_vector_source(t, n, "t", client=None)
    job = store.begin_job("assembly", spec, units, overwrite=overwrite)
    done = job.done()
    group = zarr.open_group(store.path, mode="a")
    fresh = not done
    if fresh or "S" not in group:
        S_array = group.create_array("S", shape=(pen.k_atoms, p, p), chunks=(apc, p, p), dtype="f8",
                                     fill_value=0.0, overwrite=True)
    else:
        S_array = group["S"]
    if t_src.kind == "numpy":
        t_src, _ = as_vector_source(t, n, "t", client=client)
    threads = threads_per_task(client)
    n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    t_start = time.perf_counter()

    # stage 1: the diagonal blocks s·S_a, atom-aligned to S's chunks
    atom_edges = _atom_aligned_bounds(pen, 4 * n_threads, apc)
    # S chunks whose atoms have no partner stay at the fill value 0: nothing to compute or write
    active = np.concatenate([[0], np.cumsum(pen.pairs.degree() > 0)])
    for c in range(n_s_chunks):
        a, b = c * apc, min(pen.k_atoms, (c + 1) * apc)
        if active[b] == active[a] and f"S.{c}" not in done:
            job.mark_done(f"S.{c}", outputs=[], info={"empty": True})
    done = job.done()
    pending_parts = [i for i, (a, b) in enumerate(zip(atom_edges[:-1], atom_edges[1:]))
                     if any(f"S.{c}" not in done for c in range(a // apc, -(-b // apc)))]
    if pending_parts:
        plan = DecoderPlan(pen, pen.layout.offsets[atom_edges])
        if shared_mode(pen, t_src):
            pen_f = BROADCASTS.penalty(client, pen)
            futs = [client.submit(_run_grams_shared, plan.ranges[i], pen_f, t_src.payload, rho, threads,
                                  S_array, job, pure=False) for i in pending_parts]
        else:
            futs = [client.submit(_run_grams, plan.parts[i], t_src.meta(), t_src.task_payload(), rho, threads,
                                  S_array, job, pure=False) for i in pending_parts]
        _Tracker(job, "grams", len(futs), progress).gather(futs)
    if format == "factored":
        fm = FactoredMajorizer.write(group, pen, t_src, rho, scale)
        job.finish(seconds=time.perf_counter() - t_start)
        return fm

    # stage 2: tiles, each written by exactly one task; only the missing ones on a re-run
    if not fresh:  # a resumed job: drop what writers killed mid-write left behind
        sweep_temporaries(_child_path(group, "H"))
    if fresh or "H" not in group:
        H = group.create_array("H", shape=(n, n), chunks=(tile, tile), dtype="f8", fill_value=0.0,
                               overwrite=True, compressors=_tile_codecs(pen, tile, keys.shape[0], compressors))
    else:
        H = group["H"]
    todo = [i for i in range(keys.shape[0]) if _tile_unit(keys[i], n_tiles)[0] not in done]
    tasks = [_make_tile_task(pen, keys[i], n_tiles, tile, pair_ids[pair_ptr[i]:pair_ptr[i + 1]],
                             diag_atoms[diag_ptr[i]:diag_ptr[i + 1]]) for i in todo]
    per = tiles_per_task or max(1, -(-len(tasks) // (8 * n_threads)))
    batches = [tasks[i:i + per] for i in range(0, len(tasks), per)]
    fail = frozenset(int(k) for k in _fail_tiles)
    futs = [client.submit(_run_tiles, b, n_tiles, t_src.meta(), t_src.task_payload(), rho, scale, S_array, H,
                          threads, job, fail, pure=False) for b in batches]
    stats = {"computed": 0, "written": 0, "bytes": 0}

    def on_result(res):
        stats["computed"] += len(res)
        stats["written"] += sum(1 for _, w, _ in res if w)

    tracker = _Tracker(job, "tiles", len(futs), progress)
    tracker.gather(futs, on_result)
    markers = job.markers()
    written_total = sum(1 for u, m in markers.items() if u.startswith("H.") and m["info"].get("written"))
    seconds = time.perf_counter() - t_start
    H.attrs.update({"tiles_written": int(written_total), "tiles_total": int(n_tiles * n_tiles),
                    "tiles_computed_this_run": stats["computed"], "scale": scale, "tile": tile})
    job.finish(tiles_computed=stats["computed"], tiles_written=written_total, seconds=seconds)
    return H


def _owned_offdiag(part: _Part, t_src, t_payload, v_src, v_payload, S_array, rho, scale, threads):
    """Worker task: a part's rows of ``scale·H_GN v`` from the stored ``s·S_a`` and the pairs."""
    with kernel_threads(threads):
        t_local = t_src.read_ranges(part.starts, part.lengths, t_payload)
        v_local = v_src.read_ranges(part.starts, part.lengths, v_payload)
        res = part.local.evaluate_owned(t_local, rho, ("psd_majorizer_offdiag_hvp",), v_local,
                                        out_atoms=part.out_atoms)
        lo, hi = part.out_atoms
        loff = part.local.layout.offsets
        g = part.atoms[lo:hi]
        S = np.asarray(S_array.oindex[g, :, :], dtype=np.float64)
        diag = part.local.layout.block_matmul(v_local[loff[lo]:loff[hi]], S, np.arange(lo, hi))
    a, b = part.trim
    return part.index, scale * (res["psd_majorizer_offdiag_hvp"] + diag)[a:b]


class FactoredMajorizer:
    """``H_GN`` in factored form: per-atom diagonal blocks ``s·S_a`` (``K × p × p``), the pairs and the decoder.

    ``matvec(v)`` reproduces ``scale·H_GN v`` exactly, on the cluster; the storage is
    ``K·p²`` numbers plus the pairs, the compact form for very large K.
    """

    def __init__(self, group):
        import zarr

        self.group = group if isinstance(group, zarr.Group) else zarr.open_group(str(group), mode="r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != "distpen.FactoredMajorizer":
            raise InvalidArgumentError(f"{group!r} does not hold a factored majorizer")
        from .penalties import penalty_from_spec

        self.pairs = PairTable.open(_child_path(self.group, "pairs"), validate=False)
        self.penalty = penalty_from_spec(attrs["penalty"], self.pairs)
        self.rho = np.asarray(attrs["rho"], dtype=np.float64)
        self.scale = float(attrs["scale"])
        self.S = self.group["S"]
        self.beta = self.group["beta"]

    @classmethod
    def write(cls, group, pen, t_src, rho, scale) -> "FactoredMajorizer":
        n = pen.n_coef
        beta = group.create_array("beta", shape=(n,), chunks=(min(n, 1 << 20),), dtype="f8",
                                  fill_value=0.0, overwrite=True)
        if t_src.kind == "numpy":
            beta[:] = t_src.read_all() if not hasattr(t_src.payload, "result") else t_src.payload.result()
        else:
            import dask.array as da

            da.from_zarr(t_src.payload).astype("f8").reshape(-1).rechunk(beta.chunks).store(beta, lock=False)
        pen.pairs.save(_child_path(group, "pairs"))
        group.attrs.update({"format": "distpen.FactoredMajorizer", "penalty": pen.to_spec(),
                            "rho": [float(x) for x in rho], "scale": float(scale), "n": n})
        return cls(group)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.penalty.n_coef
        return (n, n)

    def matvec(self, v, *, n_tasks: int | None = None) -> np.ndarray:
        """``scale·H_GN v`` (numpy in, numpy out), computed on the cluster."""
        client = _client()
        pen = self.penalty
        n = pen.n_coef
        v_src, _ = as_vector_source(v, n, "v", client=client)
        t_src = VectorSource("zarr", self.beta, n)
        threads = threads_per_task(client)
        n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        plan = DecoderPlan.balanced(pen, n_tasks or 4 * n_threads)
        futs = [client.submit(_owned_offdiag, part, t_src.meta(), None, v_src.meta(), v_src.task_payload(),
                              self.S, self.rho, self.scale, threads, pure=False) for part in plan.parts]
        out = [None] * len(futs)
        for idx, val in client.gather(futs):
            out[idx] = val
        return np.concatenate(out)


def _child_path(group, name: str) -> str:
    import os

    root = getattr(group.store, "root", None)
    if root is None:
        raise InvalidArgumentError("a factored majorizer needs a local directory store")
    return os.path.join(str(root), group.path, name)


def _write_diag_tile(H, i0: int, diag: np.ndarray, job=None, unit=None, rel=None):
    block = np.zeros((diag.shape[0], diag.shape[0]))
    np.fill_diagonal(block, diag)
    H[i0:i0 + diag.shape[0], i0:i0 + diag.shape[0]] = block
    if job is not None:
        job.mark_done(unit, outputs=[rel], info={"written": True, "norm": float(np.linalg.norm(diag))})
    return i0


def _assemble_nested(pen, t, rho, out, scale, tile, format, overwrite=False):
    """The nested penalty's majorizer is diagonal (``hessian_diag``): only diagonal tiles are written."""
    import zarr

    from .store import RunStore

    if format != "tiles":
        raise InvalidArgumentError("the nested penalty's majorizer is diagonal; use format='tiles'")
    rho = pen._check_rho(rho)
    store = RunStore(out)
    res = evaluate(pen, t, rho, ops=("hessian_diag",))
    d = np.asarray(res["hessian_diag"]).ravel() * scale
    n = d.shape[0]
    tile = min(n, tile or 2048)
    n_tiles = -(-n // tile)
    units = [f"H.{i}.{i}" for i in range(n_tiles)]
    spec = {"kind": "assemble_majorizer", "format": format, "penalty": pen.to_spec(),
            "t": input_identity(t, "t"), "rho": [float(x) for x in rho], "scale": scale, "tile": tile, "n": n}
    job = store.begin_job("assembly", spec, units, overwrite=overwrite)
    done = job.done()
    group = zarr.open_group(store.path, mode="a")
    if not done or "H" not in group:
        H = group.create_array("H", shape=(n, n), chunks=(tile, tile), dtype="f8", fill_value=0.0,
                               overwrite=True)
    else:
        H = group["H"]
    client = _client()
    futs = [client.submit(_write_diag_tile, H, i * tile, d[i * tile:(i + 1) * tile], job, f"H.{i}.{i}",
                          f"H/c/{i}/{i}", pure=False) for i in range(n_tiles) if f"H.{i}.{i}" not in done]
    _Tracker(job, "tiles", len(futs)).gather(futs)
    H.attrs.update({"tiles_written": n_tiles, "tiles_total": n_tiles * n_tiles, "scale": scale, "tile": tile})
    job.finish(tiles_written=n_tiles)
    return H
