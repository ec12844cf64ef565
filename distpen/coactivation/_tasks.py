"""Worker tasks of a co-activation job: leaves, the combine step, the tile writer, the chunk cache.

A leaf (:func:`_leaf`) reads its row chunks one at a time, validates them and adds each chunk's
contribution to its group's accumulators with the kernel the chunk's density calls for (see
:mod:`distpen.coactivation._kernels`); :func:`_combine` adds partials; :func:`_finalize` writes a
group's tiles, each followed by its completion marker (one writer per chunk).
:func:`_leaf_and_finalize` is the streaming task of a group that reads every row chunk itself.

Workers keep the validated sparse rows of the chunks they read in a per-process cache
(:func:`_cached_chunk`) while a job runs, and pooled buffers between tasks; both are dropped when
the job ends (:func:`_release_buffers`).

A leaf publishes the rows it has done, at most once per ``plan["progress"]`` interval, as a worker
event (:class:`_RowReporter`), so the client's progress moves while one long streaming task runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np

from .._alloc import POOL
from .._chunkio import read_rows, write_chunk
from . import _kernels as ker
from . import atom_major as am
from .plan import _unit


# ============================================================================ tasks (run on workers)
class _RowReporter:
    """Publishes ``{"key": task key, "rows": rows done}`` on the event topic of ``plan["progress"]``
    (``(topic, seconds)``) at most once per interval. Outside a Dask worker it does nothing."""

    def __init__(self, plan: dict):
        self.worker = None
        spec = plan.get("progress")
        if not spec:
            return
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:  # run in-process (tests, the local path)
            return
        self.worker, self.topic, self.every = worker, spec[0], float(spec[1])
        self.key = str(worker.get_current_task())
        self.last = time.monotonic()

    def rows(self, n: int) -> None:
        if self.worker is None:
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.worker.log_event(self.topic, {"key": self.key, "rows": int(n)})


def _slice(data, base, r0, r1, c0=None, c1=None):
    """Rows ``[r0, r1)`` (columns ``[c0, c1)``) of a source whose row 0 is row ``base``, as numpy.

    Local Zarr arrays are decoded straight from their chunk files (:mod:`distpen._chunkio`).
    """
    return read_rows(data, r0 - base, r1 - base, c0, c1)


def _leaf(plan: dict, chunks: list, buffer=None, ws=None) -> dict:
    """Partial statistics of one group of tiles over a few row chunks (read one at a time).

    The group's atoms lie in the span of blocks ``plan["span"]``; each row chunk is read once for
    that span, validated, and every tile of the group is accumulated with the route its measured
    density calls for (top-k gates always scatter). ``buffer`` (raw bytes for the partial) and
    ``ws`` (a :class:`~distpen.coactivation._kernels.ScatterWorkspace`) let a caller reuse memory;
    without ``ws`` the task borrows one of the worker's (:data:`_WORKSPACES`), so the leaves of a
    tree-reduced job do not fault in fresh kernel buffers each.
    """
    cap = plan.get("scatter_pairs", ker.SCATTER_BUFFER_PAIRS)
    if ws is not None:
        return _leaf_into(plan, chunks, buffer, ws if ws.cap == cap else ker.ScatterWorkspace(cap))
    with _borrowed_workspace(cap) as ws:
        return _leaf_into(plan, chunks, buffer, ws)


def _leaf_into(plan: dict, chunks: list, buffer, ws) -> dict:
    """:func:`_leaf` with its workspace."""
    from threadpoolctl import threadpool_limits

    T, K = plan["tile"], plan["k_atoms"]
    tiles, diag_blocks = plan["tiles"], plan["diag_blocks"]
    b_lo, b_hi = plan["span"]
    lo, hi = b_lo * T, min(K, b_hi * T)
    n_span = b_hi - b_lo
    local = [(i - b_lo, j - b_lo) for i, j in tiles]
    part = ker.new_partial(len(tiles), T, len(diag_blocks), buffer, plan.get("cnt_dtype", "int64"))
    part["routes"] = np.zeros(2, dtype=np.int64)  # (scatter, blas) decisions
    # dense gates: per-atom vectors of the whole span, accumulated by the validating scan
    col_fire = np.zeros(hi - lo, dtype=np.int64)
    col_gsum, col_gsq = np.zeros(hi - lo), np.zeros(hi - lo)
    # runs [d0, d1) of diagonal blocks with consecutive block numbers (their vectors are contiguous)
    diag_runs = []
    for d, b in enumerate(diag_blocks):
        if diag_runs and diag_blocks[diag_runs[-1][1] - 1] == b - 1:
            diag_runs[-1][1] = d + 1
        else:
            diag_runs.append([d, d + 1])
    reporter = _RowReporter(plan)
    with threadpool_limits(limits=1):
        for r0, r1, data, base in chunks:
            reporter.rows(part["rows"])
            rows = (r0, r1)
            if plan["form"] == "dense" and plan.get("cache_key") is not None:
                cached = _dense_chunk(plan, data, base, r0, r1, ws)
                if cached is not None:  # a sparse chunk: the scatter route, whatever the tile
                    ker.csr_vector_stats(cached, lo, hi, col_fire, col_gsum, col_gsq)
                    ker.scatter_group(cached, lo, T, n_span, local, range(len(local)), part["sum"], part["cnt"], ws)
                    part["routes"][0] += len(local)
                    part["rows"] += r1 - r0
                    continue
            if plan["form"] == "dense":
                x = _dense_block(plan, data, base, r0, r1, lo, hi)
                nnz, csr = ker.dense_scan_stats(x, T, col_fire, col_gsum, col_gsq, r0, lo, rows, workspace=ws)
                scatter, blas = [], []
                for s, (i, j) in enumerate(local):
                    ni = min(K, lo + (i + 1) * T) - (lo + i * T)
                    nj = min(K, lo + (j + 1) * T) - (lo + j * T)
                    route = ker.choose_route(nnz[:, i], None if i == j else nnz[:, j], ni, nj)
                    (scatter if route == "scatter" else blas).append(s)
                part["routes"] += (len(scatter), len(blas))
                if scatter:
                    if csr is None:  # too dense to have been built by the scan
                        csr = ker.dense_to_csr(x, lo, nnz.sum(axis=1))
                    ker.scatter_group(csr, lo, T, n_span, [local[s] for s in scatter], scatter,
                                      part["sum"], part["cnt"], ws)
                    del csr
                conv = {}
                bits = ker.fire_bits(x) if blas else None  # every atom of the span, once
                for s in blas:
                    i, j = local[s]
                    for b in {i, j}:
                        if b not in conv:
                            c0, c1 = b * T, min(hi - lo, (b + 1) * T)
                            xb = ws.get(f"blas_x64_{len(conv)}", (r1 - r0) * (c1 - c0), np.float64)
                            xb = xb.reshape(r1 - r0, c1 - c0)  # reused by the next chunks
                            np.copyto(xb, x[:, c0:c1])
                            conv[b] = (xb, bits[c0:c1])
                    if i == j:
                        ker.blas_tile(conv[i][0], conv[i][1], None, None, part["sum"][s], part["cnt"][s])
                    else:
                        ker.blas_tile(conv[i][0], conv[i][1], conv[j][0], conv[j][1], part["sum"][s], part["cnt"][s])
                del x, conv, bits
            else:
                if "copy" in plan:  # the chunk's atom-major copy: only the task's blocks are read
                    csr = am.read_chunk(data, r1 - r0, plan["copy"]["ranges"], ws)
                elif plan["form"] == "topk":
                    csr = _topk_chunk(plan, data, base, r0, r1, lo, hi, ws)
                else:
                    csr = _sparse_chunk(plan, data, r0, r1, lo, hi, ws)
                for d0, d1 in diag_runs:  # one pass over the rows per run of consecutive diagonal blocks
                    b0, b1 = diag_blocks[d0], diag_blocks[d1 - 1] + 1
                    ker.csr_vector_stats(csr, b0 * T, min(K, b1 * T), part["fire"][d0:d1].reshape(-1),
                                         part["gsum"][d0:d1].reshape(-1), part["gsq"][d0:d1].reshape(-1))
                ker.scatter_group(csr, lo, T, n_span, local, range(len(local)), part["sum"], part["cnt"], ws)
                part["routes"][0] += len(local)
            part["rows"] += r1 - r0
    if plan["form"] == "dense":
        for d, b in enumerate(diag_blocks):
            c0, c1 = b * T - lo, min(K, (b + 1) * T) - lo
            part["fire"][d][:c1 - c0] = col_fire[c0:c1]
            part["gsum"][d][:c1 - c0] = col_gsum[c0:c1]
            part["gsq"][d][:c1 - c0] = col_gsq[c0:c1]
    return part


def _combine(*parts) -> dict:
    return ker.combine_partials(list(parts))


def _cached_chunk(key, need: int, budget: int, build):
    """This worker's chunk cache (first come, never evicted, until the job ends).

    Returns the cached value of ``key``, or ``build(keep)``'s first result. ``need`` bytes (an upper
    bound) are reserved before building when they fit ``budget``; ``build`` is told whether they
    were (``keep``) and returns ``(value, stored)``: ``stored`` (arrays, or a marker string) is
    cached under ``key`` when it is not None. The reservation is given back whatever ``build``
    does, an error included.
    """
    hit = _CHUNKS.get(key)
    if hit is not None:
        return hit
    with _CHUNKS_LOCK:
        keep = _CHUNKS_USED[0] + need <= budget
        if keep:
            _CHUNKS_USED[0] += need
    try:
        value, stored = build(keep)
    finally:
        if keep:
            with _CHUNKS_LOCK:
                _CHUNKS_USED[0] -= need
    if keep and stored is not None:
        with _CHUNKS_LOCK:
            _CHUNKS_USED[0] += 0 if isinstance(stored, str) else sum(_held_bytes(x) for x in stored)
            _CHUNKS[key] = stored
    return value


def _held_bytes(x: np.ndarray) -> int:
    """Bytes an array keeps alive (its base's, for a view)."""
    return (x.base if isinstance(x.base, np.ndarray) else x).nbytes


def _topk_chunk(plan: dict, data, base, r0: int, r1: int, lo: int, hi: int, ws):
    """Validated sparse rows of a top-k row chunk: from this worker's chunk cache, or read.

    Every tile group reads every row chunk, so a worker that runs several groups of a job keeps
    the chunks it reads — all atoms, validated and sorted — while they fit ``plan["cache_bytes"]``
    (first come, never evicted: groups read the chunks in the same order, so keeping the first
    ones is what gives hits). The cache lives until the job ends (:func:`_release_buffers`).
    A cached chunk holds every atom; the scatter kernel ignores the ones outside the group's span.
    """
    K = plan["k_atoms"]
    (idata, vdata), (ibase, vbase) = data, base

    def build(keep):
        idx = _slice(idata, ibase, r0, r1)
        val = _slice(vdata, vbase, r0, r1)
        thr = _threshold(plan)
        if keep:  # fresh arrays sized by the slots, kept as they are (empty slots are few)
            csr = ker.topk_block_csr(idx, val, 0, K, K, row0=r0, rows=(r0, r1), threshold=thr)
            return csr, csr
        return ker.topk_block_csr(idx, val, lo, hi, K, row0=r0, rows=(r0, r1), workspace=ws,
                                  threshold=thr), None

    if plan.get("cache_key") is None:
        return build(False)[0]
    n_slots = (r1 - r0) * _row_width(idata)
    cdt, vdt = ker.csr_dtypes(K, vdata.dtype)
    need = n_slots * (np.dtype(cdt).itemsize + np.dtype(vdt).itemsize) + 8 * (r1 - r0 + 1)
    return _cached_chunk((plan["cache_key"], r0, r1), need, plan.get("cache_bytes", 0), build)


def _threshold(plan: dict) -> tuple:
    """The kernels' firing threshold of the job (``plan["threshold"]``: see ``check_fire_threshold``)."""
    return ker.threshold_args(plan.get("threshold"))


def _dense_block(plan: dict, data, base, r0: int, r1: int, lo: int, hi: int) -> np.ndarray:
    """Atoms ``[lo, hi)`` of a dense row chunk, C-contiguous, with the firing threshold applied
    (on a copy: the input may be a worker's shared array). A relative threshold is taken over
    every atom of a row, so the whole rows are read for it."""
    thr = plan.get("threshold")
    if thr is None:
        return np.ascontiguousarray(_slice(data, base, r0, r1, lo, hi))
    args = ker.threshold_args(thr)
    if args[0] == ker.THR_RELATIVE:
        full = _slice(data, base, r0, r1)
        row_max = ker.dense_row_max(np.ascontiguousarray(full))
        x = np.array(full[:, lo:hi], order="C", copy=True)
    else:
        row_max = None
        x = np.array(_slice(data, base, r0, r1, lo, hi), order="C", copy=True)
    return ker.dense_threshold(x, lo, args, row_max, row0=r0, rows=(r0, r1))


def _sparse_chunk(plan: dict, source, r0: int, r1: int, lo: int, hi: int, ws):
    """Validated sparse rows of a CSR-form row chunk (``source.csr_rows``), sorted by atom, with the
    firing threshold applied: from this worker's chunk cache, or read (see :func:`_topk_chunk`)."""
    K = plan["k_atoms"]
    thr = _threshold(plan)

    def build(keep):
        ip, ind, val = source.csr_rows(r0, r1)
        if keep:
            csr = ker.sparse_block_csr(ip, ind, val, 0, K, K, row0=r0, rows=(r0, r1), threshold=thr)
            csr = tuple(np.array(a) for a in csr)  # trimmed copies: the cache keeps only these
            return csr, csr
        return ker.sparse_block_csr(ip, ind, val, lo, hi, K, row0=r0, rows=(r0, r1), workspace=ws,
                                    threshold=thr), None

    if plan.get("cache_key") is None:
        return build(False)[0]
    cdt, vdt = ker.csr_dtypes(K, source.dtype)
    need = (r1 - r0) * source.row_width() * (np.dtype(cdt).itemsize + np.dtype(vdt).itemsize) + 8 * (r1 - r0 + 1)
    return _cached_chunk((plan["cache_key"], r0, r1), need, plan.get("cache_bytes", 0), build)


def _row_width(arr) -> int:
    return int(arr.shape[1]) if len(arr.shape) > 1 else 1


def _dense_chunk(plan: dict, data, base, r0: int, r1: int, ws):
    """Validated sparse rows (every atom) of a dense row chunk, or None when the chunk holds more
    than 12.5% non-zeros (the caller then takes the per-tile routes).

    From this worker's chunk cache, or read — and kept while the cache has room (see
    :func:`_topk_chunk`); otherwise built in ``ws``. Whether a chunk is sparse depends on its data
    only, never on the cache, so the kernels (and the bits of the sums) do not depend on which
    worker ran which group.
    """
    K = plan["k_atoms"]

    def build(keep):
        x = _dense_block(plan, data, base, r0, r1, 0, K)
        scratch = (np.zeros(K, dtype=np.int64), np.zeros(K), np.zeros(K))  # vectors come from the rows
        _, csr = ker.dense_scan_stats(x, K, *scratch, r0, 0, (r0, r1), workspace=ws)
        if not keep:
            return csr, None
        if csr is None:
            return None, "dense"  # remembered: the next group skips straight to its routes
        csr = tuple(a.copy() for a in csr)  # out of the workspace, trimmed
        return csr, csr

    cdt, vdt = ker.csr_dtypes(K, data.dtype)
    entry = np.dtype(cdt).itemsize + np.dtype(vdt).itemsize
    need = int(entry * (r1 - r0) * K * 0.125) + 8 * (r1 - r0 + 1)  # at most
    got = _cached_chunk((plan["cache_key"], r0, r1), need, plan.get("cache_bytes", 0), build)
    return None if isinstance(got, str) else got


#: per-worker cache of validated row chunks of the running job (see _cached_chunk)
_CHUNKS: dict = {}
_CHUNKS_USED = [0]
_CHUNKS_LOCK = threading.Lock()


def _leaf_and_finalize(plan: dict, chunks: list, out: str, job, fail_units=()) -> dict:
    """A group's only leaf: accumulate every row chunk, then write the tiles.

    No array leaves the task, so the accumulators and kernel buffers come from the worker's
    :data:`~distpen._alloc.POOL` and go back to it: the next group reuses pages already faulted
    in instead of faulting in ``16·tile²`` bytes per tile again.
    """
    T = plan["tile"]
    need = ker.partial_nbytes(len(plan["tiles"]), T, len(plan["diag_blocks"]), plan.get("cnt_dtype", "int64"))
    buf = POOL.take(need)
    try:
        part = _leaf(plan, chunks, buf)  # with one of the worker's pooled workspaces
        return _finalize(part, plan, out, job, fail_units)
    finally:
        POOL.give(buf)


def _copy_chunk(plan: dict, n_blocks: int, chunk: tuple, path: str) -> dict:
    """Write the atom-major copy of one row chunk (see :mod:`.atom_major`) unless it exists.

    The chunk is read whole, validated and thresholded as a row-major task reads it, so the copy
    holds exactly the entries every tile of the job sees.
    """
    from threadpoolctl import threadpool_limits

    r0, r1, data, base = chunk
    if os.path.exists(path):  # an earlier run (or a retried task) wrote it
        return {"rows": r1 - r0, "entries": None}
    K = plan["k_atoms"]
    with _borrowed_workspace() as ws, threadpool_limits(limits=1):
        if plan["form"] == "topk":
            csr = _topk_chunk(plan, data, base, r0, r1, 0, K, ws)
        else:
            csr = _sparse_chunk(plan, data, r0, r1, 0, K, ws)
        n = am.write_copy(path, csr, plan["tile"], n_blocks, ws)
    return {"rows": r1 - r0, "entries": n}


def _release_worker_buffers(client) -> None:
    """Ask every worker to drop its pooled buffers; a worker that cannot answer is skipped."""
    try:
        client.run(_release_buffers)
    except Exception:  # noqa: BLE001 - best effort: a lost worker has no buffers left anyway
        pass


#: kernel workspaces kept by a worker process between its tasks (list ops are atomic)
_WORKSPACES: list = []


@contextlib.contextmanager
def _borrowed_workspace(cap: int | None = None):
    """One of this worker's pooled kernel workspaces, given back when the block ends: the next task
    reuses pages already faulted in. A fresh one when none is free or the pooled one's scatter
    capacity is not ``cap`` (any capacity when ``cap`` is None)."""
    ws = _WORKSPACES.pop() if _WORKSPACES else None
    if ws is None or (cap is not None and ws.cap != cap):
        ws = ker.ScatterWorkspace() if cap is None else ker.ScatterWorkspace(cap)
    try:
        yield ws
    finally:
        _WORKSPACES.append(ws)


def _release_buffers() -> int:
    """Drop the pooled buffers and cached chunks of this process (run on every worker when a job ends)."""
    _WORKSPACES.clear()
    with _CHUNKS_LOCK:
        n = _CHUNKS_USED[0]
        _CHUNKS.clear()
        _CHUNKS_USED[0] = 0
    return n + POOL.clear()


#: threads that encode and write a group's tiles: one tile's direct write waits on the disk while
#: the next one is encoded
_FINALIZE_THREADS = 2


def _finalize(part: dict, plan: dict, out: str, job, fail_units=()) -> dict:
    """Write the group's tiles (and the vectors of its diagonal blocks), each followed by its marker.

    Tiles are written by :data:`_FINALIZE_THREADS` threads; every tile's marker follows its own
    chunks, and the task returns (or raises the first error) only when every write has ended.
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    T, K = plan["tile"], plan["k_atoms"]
    group = zarr.open_group(out, mode="r+")
    arrs = {name: group[name] for name in ("pair_sum", "pair_count", "fire_count", "gate_sum", "gate_sq_sum")}
    diag_pos = {b: d for d, b in enumerate(plan["diag_blocks"])}
    convert = part["cnt"].dtype != np.int64
    buffers = queue.SimpleQueue()  # int64 buffers that convert a tile's counts (one per thread)
    for _ in range(_FINALIZE_THREADS if convert else 0):
        buffers.put(np.empty((T, T), dtype=np.int64))

    def one(s, i, j):
        i0, i1 = i * T, min(K, (i + 1) * T)
        j0, j1 = j * T, min(K, (j + 1) * T)
        ps = part["sum"][s][:i1 - i0, :j1 - j0]
        pc = part["cnt"][s][:i1 - i0, :j1 - j0]
        buf = buffers.get() if convert else None
        try:
            if convert:
                wide = buf[:i1 - i0, :j1 - j0]
            if i == j:
                ps = ker.symmetrise_diag(ps, out=ps)  # in place: the partial is spent
                pc = ker.symmetrise_diag(pc, out=wide if convert else pc)
            elif convert:
                np.copyto(wide, pc)
                pc = wide
            outputs = []
            if i == j:
                d = diag_pos[i]
                n = i1 - i0
                for name, key in (("fire_count", "fire"), ("gate_sum", "gsum"), ("gate_sq_sum", "gsq")):
                    arrs[name][i0:i1] = part[key][d][:n]
                    outputs.append(f"{name}/" + arrs[name].metadata.chunk_key_encoding.encode_chunk_key((i,)))
            nonzero = bool(pc.any() or ps.any())
            write_chunk(arrs["pair_sum"], (i, j), ps)
            write_chunk(arrs["pair_count"], (i, j), pc)
        finally:
            if convert:
                buffers.put(buf)
        for name in ("pair_sum", "pair_count"):
            outputs.append(f"{name}/" + arrs[name].metadata.chunk_key_encoding.encode_chunk_key((i, j)))
        outputs = [o for o in outputs if os.path.exists(os.path.join(out, o))]
        unit = _unit(i, j)
        if unit in fail_units:  # test hook: a crash after the chunk write, before the marker
            raise RuntimeError(f"injected fault after writing tile {unit}")
        job.mark_done(unit, outputs, info={"nonzero": nonzero, "rows": int(part["rows"])})
        return unit

    with ThreadPoolExecutor(_FINALIZE_THREADS, thread_name_prefix="distpen-finalize") as pool:
        futures = [pool.submit(one, s, i, j) for s, (i, j) in enumerate(plan["tiles"])]
    # the pool has waited for every write: report the first error, or the units in tile order
    written = [f.result() for f in futures]
    return {"units": written, "rows": int(part["rows"]), "routes": part["routes"].tolist()}
