"""``collinearity_gate``: select penalised pairs by the collinearity of their decoder blocks, on a cluster.

The overlap of a candidate pair, ``o_jk = ‖B_j B_kᵀ‖²_F / (‖B_j B_jᵀ‖_F ‖B_k B_kᵀ‖_F)``, and its smoothstep
gate are the in-memory kernels of :mod:`distpen.penalties.collinearity`; this module runs them over
chunks of the candidate table and concatenates the chunks in table order, so the result does not
depend on the chunking.

Random candidates touch almost every block, so every task needs nearly the whole decoder. When the
candidates of the call cover most of the span of atoms they touch, each worker keeps that span of
β, and the blocks' Gram norms, for the duration of the call (:mod:`._span`): a Zarr β is decoded
first, by one fill task per worker thread, the workers of a host sharing one copy; a numpy β,
already broadcast, is used in place. The cache holds at most :data:`CACHE_FRACTION` of the worker
memory limit; a span that does not fit, or a call whose candidates touch few blocks, is read task
by task, each task reading only the blocks its pairs touch. The client drops the call's spans on
every worker when the call ends, whether it succeeded or not.
"""

from __future__ import annotations

import math
import secrets
import uuid

import numpy as np

from .._validation import check_positive_int
from .._workers import kernel_threads, threads_per_task
from ..cluster import _workers, n_workers, worker_memory_limit
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..layout import DecoderLayout
from ..pairs import PairTable
from ..penalties.collinearity import check_low, overlap_of, smoothstep_gate
from . import _span
from ._common import _client
from ._vectors import VectorSource, as_vector_source

__all__ = ["collinearity_gate", "DEFAULT_CHUNK_PAIRS", "CACHE_FRACTION"]

#: candidate pairs per task when the caller gives no ``chunk_pairs`` (at least one task per worker)
DEFAULT_CHUNK_PAIRS = 1 << 20

#: fraction of a worker's memory limit that the decoder span of one call may take in its cache
CACHE_FRACTION = 0.25


def _source_identity(t_src: VectorSource) -> tuple:
    """What names the β of a call in a cache key: the Zarr array's location, chunking and dtype, or
    the broadcast future of a numpy β."""
    if t_src.kind == "numpy":
        return ("numpy", getattr(t_src.payload, "key", id(t_src.payload)))
    z = t_src.payload
    store = z.store_path.store
    return ("zarr", type(store).__name__, str(getattr(store, "root", id(store))), z.store_path.path,
            tuple(z.shape), tuple(z.chunks), str(z.dtype))


# ============================================================================ tasks (run on workers)
def _span_overlaps(j, k, t_src, payload, lay: DecoderLayout, plan: dict):
    """The chunk's overlaps from the call's span kept by this worker, or None when it does not fit."""
    a0, a1 = plan["span"]
    lo, hi = int(lay.offsets[a0]), int(lay.offsets[a1])

    def read_whole():
        return _span.Span(_span.read_span(t_src, payload, lo, hi), DecoderLayout(lay.block_sizes[a0:a1], lay.p_out),
                          1, complete=True)

    entry = _span.span_for_task(plan["key"], plan["need"], plan["budget"], read_whole)
    if entry is None:
        return None
    return overlap_of(j - a0, k - a0, entry.t, entry.lay, entry.norms)


def _touched_overlaps(j, k, t_src, payload, lay: DecoderLayout) -> np.ndarray:
    """The chunk's overlaps from the blocks its pairs touch, read by this task.

    When the touched atoms cover most of the span between the first and the last of them, the
    span is read as one slice and its atoms used in place: gathering nearly the whole decoder into
    a compact copy would cost more than the few untouched blocks read along.
    """
    touched = np.zeros(lay.k_atoms, dtype=bool)
    touched[j] = True
    touched[k] = True
    atoms = np.flatnonzero(touched)
    a0, a1 = int(atoms[0]), int(atoms[-1]) + 1
    n_touched = int(np.sum(lay.block_sizes[atoms]))
    if 2 * n_touched >= int(lay.offsets[a1] - lay.offsets[a0]) // lay.p_out and a1 - a0 >= 2:
        t_local = _span.read_span(t_src, payload, int(lay.offsets[a0]), int(lay.offsets[a1]))
        return overlap_of(j - a0, k - a0, t_local, DecoderLayout(lay.block_sizes[a0:a1], lay.p_out))
    if atoms.shape[0] < 2:  # a layout needs two atoms; add one that plays no part
        touched[0 if atoms[0] != 0 else 1] = True
        atoms = np.flatnonzero(touched)
    local = np.cumsum(touched) - 1  # global atom -> position among the touched ones
    t_local = t_src.read_ranges(lay.offsets[atoms], lay.block_sizes[atoms] * lay.p_out, payload)
    return overlap_of(local[j], local[k], t_local, lay.subset(atoms))


def _gate_chunk(j: np.ndarray, k: np.ndarray, t_src: VectorSource, t_payload, block_sizes: np.ndarray,
                p_out: int, threads: int, plan: dict | None = None, fills=None) -> np.ndarray:
    """Worker task: the overlaps of one chunk of candidate pairs, in the chunk's order.

    With a ``plan`` (``{"key", "span": (a0, a1), "need", "budget"}``) the chunk is evaluated on the
    call's span of β kept by this worker (decoded by the fill tasks ``fills`` this task waits for,
    or read by the first task that needs it); without one, or when the span does not fit the
    budget, on the blocks the chunk touches, read by this task.
    """
    lay = DecoderLayout(block_sizes, p_out)
    with kernel_threads(threads):
        if plan is not None:
            o = _span_overlaps(j, k, t_src, t_payload, lay, plan)
            if o is not None:
                return o
        return _touched_overlaps(j, k, t_src, t_payload, lay)


# ============================================================================ client side
def _call_span(pairs: PairTable, lay: DecoderLayout) -> tuple[int, int] | None:
    """``(a0, a1)``, the span of atoms the candidates touch, when they touch at least half its
    coefficients (random candidates do), else None."""
    touched = np.zeros(lay.k_atoms, dtype=bool)
    touched[pairs.j] = True
    touched[pairs.k] = True
    atoms = np.flatnonzero(touched)
    a0, a1 = int(atoms[0]), int(atoms[-1]) + 1
    if 2 * int(np.sum(lay.block_sizes[atoms])) * lay.p_out >= int(lay.offsets[a1] - lay.offsets[a0]):
        return a0, a1
    return None


def _hosts(client) -> dict[str, list[tuple[str, int]]]:
    """The workers of every host: ``{host: [(address, threads), ...]}``."""
    hosts: dict[str, list[tuple[str, int]]] = {}
    for addr, w in sorted(_workers(client).items()):
        hosts.setdefault(w.get("host", addr), []).append((addr, max(1, int(w.get("nthreads", 1)))))
    return hosts


def _submit_fills(client, t_src: VectorSource, lay: DecoderLayout, plan: dict) -> list:
    """One fill task per worker thread, each decoding its part of the span (``_span.fill_part``); the
    workers of a host with several share one segment."""
    a0, a1 = plan["span"]
    lo, hi = int(lay.offsets[a0]), int(lay.offsets[a1])
    z = t_src.payload
    chunk = int(z.chunks[0]) * (int(z.shape[1]) if z.ndim == 2 else 1)  # entries per chunk of the flat β
    share = _span.sharing_enabled()
    fills = []

    def submit(addr, part, bounds, shared):
        fills.append(client.submit(_span.fill_part, plan["key"], plan["need"], plan["budget"], t_src.meta(),
                                   plan["span"], part, bounds, lay.block_sizes, lay.p_out, shared,
                                   workers=[addr], allow_other_workers=True, pure=False))

    for h, workers in enumerate(_hosts(client).values()):
        if share and len(workers) >= 2:  # one segment per host: its threads split the span between them
            shared = {"name": f"{_span.SHARED_PREFIX}{plan['key'][0]}-{h}", "token": secrets.randbits(62) + 1}
            n_parts = min(sum(n for _, n in workers), _span.MAX_PARTS)
            bounds = _span.part_bounds(lo, hi, chunk, n_parts)
            slots = [addr for addr, n in workers for _ in range(n)][:n_parts]
            for part, addr in enumerate(slots):
                submit(addr, part, bounds, shared)
            continue
        for addr, n in workers:  # private copies: each worker's threads split its own
            n_parts = min(n, _span.MAX_PARTS)
            bounds = _span.part_bounds(lo, hi, chunk, n_parts)
            for part in range(n_parts):
                submit(addr, part, bounds, None)
    return fills


def _release_everywhere(client, call: str) -> None:
    """Drop the call's spans on every worker; a worker that cannot answer is skipped."""
    try:
        client.run(_span.release_call, call)
    except Exception:  # noqa: BLE001 - best effort: a lost worker holds nothing any more
        pass


def collinearity_gate(pairs: PairTable, t, block_sizes, p_out: int, *, low: float = 0.5, out=None,
                      chunk_pairs: int | None = None, return_overlap: bool = False, client=None):
    """Keep the candidate pairs whose decoder blocks overlap, weighted by the smoothstep gate.

    For each candidate ``(j, k, w)``: the overlap ``o_jk`` (in [0, 1]; 0 when a block is zero), the
    gate ``g = u²(3 − 2u)`` with ``u = clamp((o − low)/(1 − low), 0, 1)``, and the pair kept with
    weight ``w·g`` when ``g > 0``. See ``docs/design.md`` for where this comes from and how it
    combines with co-activation (gate the pairs co-activation selected).

    Parameters
    ----------
    pairs : PairTable
        Candidate pairs, e.g. from :meth:`~distpen.CoactivationStats.pairs`.
    t : array of shape (Σ block_sizes · p_out,)
        The flat decoder β: numpy, dask or a Zarr array (read by the tasks, block by block).
    block_sizes : array of int, shape (K,)
    p_out : int
    low : float in [0, 1)
        Overlaps at or below ``low`` get gate 0; overlap 1 gets gate 1.
    out : path, optional
        Also write the kept pairs there (:meth:`PairTable.save`) with the arrays ``candidate_j``,
        ``candidate_k`` and ``overlap`` of every candidate, for plotting.
    chunk_pairs : int, optional
        Candidate pairs per task (default :data:`DEFAULT_CHUNK_PAIRS`, at least one task per worker).
        The decoder is decoded once per host and call whatever the chunking (each worker once
        without ``/dev/shm``), unless it exceeds :data:`CACHE_FRACTION` of the worker memory limit
        (then every task reads its blocks).
    return_overlap : bool
        Return ``(kept, overlap)`` instead of ``kept``.
    client : distributed.Client, optional

    Returns
    -------
    PairTable, or (PairTable, ndarray of shape (len(pairs),))

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        Before any work: pairs over other atoms, a ``t`` of the wrong length or not finite, a bad
        ``low`` or ``chunk_pairs``.

    Examples
    --------
    >>> kept = dp.collinearity_gate(stats.pairs(top_m=32), beta, block_sizes, p_out=64)   # doctest: +SKIP
    """
    if not isinstance(pairs, PairTable):
        raise InvalidArgumentError(f"pairs must be a PairTable, got {type(pairs).__name__}")
    low = check_low(low)
    lay = DecoderLayout(block_sizes, p_out)
    if pairs.k_atoms != lay.k_atoms:
        raise ShapeMismatchError(
            f"pairs index k_atoms = {pairs.k_atoms} atoms but block_sizes describe {lay.k_atoms}; "
            "build the pairs over the same atoms as the decoder"
        )
    cp = DEFAULT_CHUNK_PAIRS if chunk_pairs is None else check_positive_int(chunk_pairs, "chunk_pairs")
    client = client or _client()
    t_src, _ = as_vector_source(t, lay.n_coef, "t", client=client)
    n = len(pairs)
    if n == 0:
        kept, overlap = PairTable([], [], [], pairs.k_atoms), np.zeros(0)
    else:
        threads = threads_per_task(client)
        n_chunks = min(n, max(math.ceil(n / cp), n_workers(client)))
        bounds = np.linspace(0, n, n_chunks + 1).astype(np.int64)
        span = _call_span(pairs, lay)
        call = uuid.uuid4().hex
        plan, fills = None, []
        if span is not None:
            n_span = int(lay.offsets[span[1]] - lay.offsets[span[0]])
            plan = {"key": (call,) + _source_identity(t_src), "span": span,
                    "need": 8 * (span[1] - span[0] + 1) + (0 if t_src.kind == "numpy" else 8 * n_span),
                    "budget": int(CACHE_FRACTION * worker_memory_limit(client))}
        sizes = lay.block_sizes
        futs = []
        try:
            if plan is not None and t_src.kind != "numpy" and plan["need"] <= plan["budget"]:
                fills = _submit_fills(client, t_src, lay, plan)
            futs = [client.submit(_gate_chunk, pairs.j[a:b], pairs.k[a:b], t_src.meta(), t_src.task_payload(),
                                  sizes, lay.p_out, threads, plan, fills, pure=False)
                    for a, b in zip(bounds[:-1], bounds[1:])]
            overlap = np.concatenate(client.gather(futs))
        finally:
            for f in futs + fills:
                f.release()
            if plan is not None:
                _release_everywhere(client, call)
        g = smoothstep_gate(overlap, low)
        keep = g > 0
        kept = PairTable(pairs.j[keep], pairs.k[keep], pairs.w[keep] * g[keep], pairs.k_atoms, _trusted=True)
    if out is not None:
        import zarr

        kept.save(out)
        group = zarr.open_group(str(out), mode="r+")
        for name, arr in (("candidate_j", pairs.j), ("candidate_k", pairs.k), ("overlap", overlap)):
            z = group.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 20)),), dtype=arr.dtype,
                                   fill_value=0)
            if n:
                z[:] = arr
        group.attrs.update({"collinearity_low": low})
    return (kept, overlap) if return_overlap else kept
