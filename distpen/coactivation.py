"""Co-activation statistics of SAE gates on a Dask cluster, written to a Zarr run store.

Plan (DESIGN §2.4, §3):

* The ``K × K`` statistics are cut into tiles ``(I, J)``, ``I ≤ J``, of ``tile × tile`` atoms; a tile
  is one Zarr chunk of ``pair_sum`` (float64) and of ``pair_count`` (int64). Tiles still to compute
  are packed into *groups* whose accumulators fit the memory budget of one task.
* For each group the tokens are read by row chunks (``row_chunk`` rows). A leaf task reads
  ``split_every`` consecutive row chunks, one at a time, and adds each chunk's contribution to the
  group's accumulators with the kernel its measured density calls for (see
  :mod:`distpen._coact_kernels`). Leaves are tree-summed with fan-in ``split_every`` (fixed-shape
  partials, no concatenation); the root writes the group's tiles — each tile by exactly this one task
  — then a completion marker per tile. Tiles that stay zero are not stored (fill value 0).
* When the tiles alone make enough groups to keep workers busy (large ``K``), the default
  ``split_every`` covers every row chunk: each group is then one *streaming* task that reads all the
  tokens into one accumulator and writes its tiles itself, so no partial is allocated twice, moved
  between workers or combined, and its buffers are reused from group to group on a worker.
* Peak memory per task is set by ``tile`` and ``row_chunk`` (defaults from the workers' memory
  limit), never by ``N``; at most a few groups are submitted at once, so the scheduler's graph stays
  small whatever ``N × K``.
* The store's manifest (:mod:`distpen.store`) holds the job's inputs and parameters; re-running the
  same job computes only the tiles without a marker. Progress is written to the store while it runs.

Given ``row_chunk`` and ``split_every`` the result is bit-identical on any cluster: every sum has a
fixed order, BLAS runs single-threaded, and no kernel uses fast-math.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections import namedtuple

import numpy as np

from . import _coact_kernels as ker
from ._alloc import POOL
from ._chunkio import read_rows, sweep_temporaries, write_chunk
from ._validation import check_finite_scalar, check_positive_int
from .errors import (GateDataError, InvalidArgumentError, ShapeMismatchError,
                     StoreConflictError, StoreCorruptError)
from .gates import DenseGates, as_gates
from .pairs import PairTable
from .store import RunStore, local_store_path

__all__ = ["coactivation_stats", "open_stats", "merge_stats", "CoactivationStats", "Tile", "MEASURES"]

STAGE = "coactivation"
_FORMAT = "distpen.coactivation"
_FORMAT_VERSION = 1
DEFAULT_SPLIT_EVERY = 4
_MIN_STREAM_GROUPS = 4
#: dense gates at most this dense (sampled) count as sparse for the plan; chunks up to the scan's
#: limit (12.5%) keep their sparse rows in the workers' chunk cache
_SPARSE_DENSITY = 0.05
MAX_DENSE_K = 16384
MEASURES = ("mean", "count", "jaccard", "cosine", "lift")
_TILE_ALIGN = 128
_MAX_DEFAULT_TILE = 1024
_MAX_ROW_CHUNK = 1 << 20
_RESUME_HINT = ("tiles already complete are kept; fix the input and re-run the same command "
                "(same gates, out, row_chunk, tile, split_every) to compute only the missing tiles")

Tile = namedtuple("Tile", ["rows", "cols", "pair_sum", "pair_count"])
Tile.__doc__ = """One block of the symmetric statistics: atom ``rows`` × atom ``cols`` (slices) and
the ``pair_sum`` (float64) and ``pair_count`` (int64) arrays of that block."""


# ============================================================================ parameters
def _check_split_every(split_every) -> int:
    if split_every is None:
        return DEFAULT_SPLIT_EVERY
    se = check_positive_int(split_every, "split_every")
    if se < 2:
        raise InvalidArgumentError(f"split_every must be ≥ 2 (the fan-in of the reduction tree), got {se}")
    return se


def _partial_bytes(tile: int) -> int:
    return 16 * tile * tile


def _fan_in(n_tokens: int, row_chunk: int, split_every: int) -> int:
    """Most partials any task holds at once: a combine's inputs (1 when there is no combine)."""
    n_leaves = math.ceil(math.ceil(n_tokens / row_chunk) / split_every)
    return max(1, min(split_every, n_leaves)) if n_leaves > 1 else 1


def _partial_budget(memory_limit: int, fan_in: int) -> float:
    """Bytes one partial may take: half a worker's memory shared by the ``fan_in`` inputs of a
    combine, its output and the write task's symmetrised copy."""
    return memory_limit / 2 / (fan_in + 2)


def default_tile(memory_limit: int, k_atoms: int, fan_in: int) -> int:
    """Largest tile (multiple of 128, ≤ 1024, ≤ K) whose partial (``16·tile²`` bytes) fits the budget.

    The 1024 cap keeps one tile's accumulators (16 MiB) in a core's share of the cache while pair
    products are scattered into them."""
    t = int(math.sqrt(_partial_budget(memory_limit, fan_in) / 16))
    t = max(_TILE_ALIGN, (t // _TILE_ALIGN) * _TILE_ALIGN)
    return int(min(k_atoms, t, _MAX_DEFAULT_TILE))


def default_row_chunk(memory_limit: int, gates, split_every: int) -> int:
    """Rows per chunk: an eighth of a worker's memory for one chunk and its float64/CSR copies,
    at most ``N / (8·split_every)`` (so that there are at least 8 leaves to share out), aligned to the
    input's chunks. Depends on ``N`` and the memory limit, not on the number of workers."""
    width = gates.row_width()
    per_row = 24 * width if gates.form == "dense" else 40 * width
    rc = max(1, int(memory_limit / 8 / per_row))
    rc = min(rc, max(1, math.ceil(gates.n_tokens / (8 * split_every))), _MAX_ROW_CHUNK)
    hint = gates.row_chunk_hint()
    if hint and rc >= hint:
        rc = (rc // hint) * hint
    elif hint and hint * per_row <= memory_limit / 4:
        rc = hint  # one stored chunk per row chunk: never decompress a chunk twice
    return int(min(rc, gates.n_tokens))


def _tiles(n_blocks: int):
    return [(i, j) for i in range(n_blocks) for j in range(i, n_blocks)]


def _unit(i: int, j: int) -> str:
    return f"{i}.{j}"


def _parse_unit(u: str):
    a, b = u.split(".")
    return int(a), int(b)


# ============================================================================ tasks (run on workers)
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
    ``ws`` (a :class:`~distpen._coact_kernels.ScatterWorkspace`) let a caller reuse memory.
    """
    cap = plan.get("scatter_pairs", ker.SCATTER_BUFFER_PAIRS)
    if ws is None or ws.cap != cap:
        ws = ker.ScatterWorkspace(cap)  # reused by every chunk of this task
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
    with threadpool_limits(limits=1):
        for r0, r1, data, base in chunks:
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
                x = np.ascontiguousarray(_slice(data, base, r0, r1, lo, hi))
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
                for s in blas:
                    i, j = local[s]
                    for b in {i, j}:
                        if b not in conv:
                            xb = x[:, b * T:min(hi - lo, (b + 1) * T)]
                            conv[b] = (np.ascontiguousarray(xb, dtype=np.float64), (xb > 0).astype(np.float32))
                    if i == j:
                        ker.blas_tile(conv[i][0], conv[i][1], None, None, part["sum"][s], part["cnt"][s])
                    else:
                        ker.blas_tile(conv[i][0], conv[i][1], conv[j][0], conv[j][1], part["sum"][s], part["cnt"][s])
                del x, conv
            else:
                csr = _topk_chunk(plan, data, base, r0, r1, lo, hi, ws)
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
        if keep:  # fresh arrays sized by the slots, kept as they are (empty slots are few)
            csr = ker.topk_block_csr(idx, val, 0, K, K, row0=r0, rows=(r0, r1))
            return csr, csr
        return ker.topk_block_csr(idx, val, lo, hi, K, row0=r0, rows=(r0, r1), workspace=ws), None

    if plan.get("cache_key") is None:
        return build(False)[0]
    n_slots = (r1 - r0) * _row_width(idata)
    cdt, vdt = ker.csr_dtypes(K, vdata.dtype)
    need = n_slots * (np.dtype(cdt).itemsize + np.dtype(vdt).itemsize) + 8 * (r1 - r0 + 1)
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
        x = np.ascontiguousarray(_slice(data, base, r0, r1))
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
    cap = plan.get("scatter_pairs", ker.SCATTER_BUFFER_PAIRS)
    ws = _WORKSPACES.pop() if _WORKSPACES else None
    if ws is None or ws.cap != cap:
        ws = ker.ScatterWorkspace(cap)
    try:
        part = _leaf(plan, chunks, buf, ws)
        return _finalize(part, plan, out, job, fail_units)
    finally:
        POOL.give(buf)
        _WORKSPACES.append(ws)


def _release_worker_buffers(client) -> None:
    """Ask every worker to drop its pooled buffers; a worker that cannot answer is skipped."""
    try:
        client.run(_release_buffers)
    except Exception:  # noqa: BLE001 - best effort: a lost worker has no buffers left anyway
        pass


#: kernel workspaces kept by a worker process between streaming tasks (list ops are atomic)
_WORKSPACES: list = []


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


# ============================================================================ planning
def _sources(gates, row_chunk: int, client):
    """Per row chunk: ``(r0, r1, data, base)`` where a task reads ``data[r0-base:r1-base]``.

    Zarr arrays are read by the tasks themselves; numpy arrays are scattered to the workers once;
    dask arrays are rechunked by rows and their blocks passed as dependencies.
    """
    N = gates.n_tokens
    starts = list(range(0, N, row_chunk))
    spans = [(r0, min(N, r0 + row_chunk)) for r0 in starts]

    def one(arr, kind, width):
        if kind == "zarr":
            return [(arr, 0) for _ in spans]
        if kind == "numpy":
            fut = client.scatter(arr, broadcast=False, hash=True)
            return [(fut, 0) for _ in spans]
        rows = (row_chunk,) * (N // row_chunk) + ((N % row_chunk,) if N % row_chunk else ())
        darr = arr.rechunk((rows, (width,)))
        blocks = darr.to_delayed().ravel().tolist()
        return [(blk, r0) for blk, (r0, _) in zip(blocks, spans)]

    if isinstance(gates, DenseGates):
        src = one(gates.array, gates.kind, gates.k_atoms)
        return [(r0, r1, d, b) for (r0, r1), (d, b) in zip(spans, src)]
    isrc = one(gates.indices, gates._ikind, gates.k)
    vsrc = one(gates.values, gates._vkind, gates.k)
    return [(r0, r1, (di, dv), (bi, bv)) for (r0, r1), (di, bi), (dv, bv) in zip(spans, isrc, vsrc)]


def _group_tiles(pending, tile: int, memory_limit: int, fan_in: int, min_groups: int = 1):
    """Consecutive runs of ``pending`` tiles whose accumulators fit one task, of balanced sizes,
    at least ``min_groups`` of them (when there are that many tiles)."""
    if not pending:
        return []
    per_tile = _partial_bytes(tile)
    max_tiles = max(1, int(_partial_budget(memory_limit, fan_in) // per_tile))
    n_groups = max(math.ceil(len(pending) / max_tiles), min(min_groups, len(pending)))
    base, extra = divmod(len(pending), n_groups)  # sizes differ by at most one tile
    bounds = np.cumsum([0] + [base + (g < extra) for g in range(n_groups)])
    return [pending[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def default_split_every(memory_limit: int, k_atoms: int, n_chunks: int, tile: int | None,
                        sparse: bool = False, input_bytes: float = 0.0) -> int:
    """Fan-in of the reduction tree when the caller gives none.

    Each tile group becomes one task that streams every row chunk into its accumulators and writes
    its tiles itself (``split_every`` = the number of row chunks) when there are at least
    :data:`_MIN_STREAM_GROUPS` tiles and either

    * the tiles need that many groups anyway (one accumulator per task), or
    * the gates are sparse (top-k, or dense with at most :data:`_SPARSE_DENSITY` non-zeros) and the
      reduction tree would allocate more than twice the gates' bytes (``input_bytes``) in leaf
      accumulators (``16·tile²`` bytes per tile per leaf): every group then reads the tokens, but
      a worker keeps the sparse rows of the chunks it read (:func:`_topk_chunk`,
      :func:`_dense_chunk`), so re-reading is cheap. (Measured: dense 2% gates 50k × 4096 in 13
      leaves of 160 MB, 4.4 s as a tree against 3.1 s streamed; top-k 10⁶ × 4096 in 2 leaves,
      5.2 s as a tree against 7.6 s streamed.)

    Otherwise row chunks are spread over leaves tree-summed with fan-in :data:`DEFAULT_SPLIT_EVERY`.
    Depends on ``K``, the row chunks, the memory limit and the gates, not on the number of workers.
    """
    if n_chunks <= 1:
        return DEFAULT_SPLIT_EVERY
    T = min(tile, k_atoms) if tile is not None else default_tile(memory_limit, k_atoms, 1)
    nb = math.ceil(k_atoms / T)
    n_tiles = nb * (nb + 1) // 2
    max_tiles = max(1, int(_partial_budget(memory_limit, 1) // _partial_bytes(T)))
    if n_tiles < _MIN_STREAM_GROUPS:
        return DEFAULT_SPLIT_EVERY
    if math.ceil(n_tiles / max_tiles) >= _MIN_STREAM_GROUPS:
        return max(2, n_chunks)
    tree_bytes = math.ceil(n_chunks / DEFAULT_SPLIT_EVERY) * n_tiles * _partial_bytes(T)
    if sparse and tree_bytes > 2 * input_bytes:
        return max(2, n_chunks)
    return DEFAULT_SPLIT_EVERY


def _sample_density(gates, rows: int) -> float:
    """Fraction of non-zero gates in the first ``rows`` tokens (1.0 for top-k: not needed)."""
    if not isinstance(gates, DenseGates):
        return 0.0
    m = max(1, min(rows, gates.n_tokens, 4096))
    x = gates.array[:m]
    x = np.asarray(x.compute() if hasattr(x, "compute") else x)
    return float(np.count_nonzero(x)) / max(1, x.size)


_ARRAYS = ("pair_sum", "pair_count", "fire_count", "gate_sum", "gate_sq_sum")


def _stats_codecs(name: str):
    """Codecs of a statistics array: LZ4, bit-shuffled for the counts.

    Written tiles are the bulk of a job's output (16 bytes per pair of atoms) and the disk is the
    slowest part of a write. Measured on one 1024² tile of a top-k run: ``pair_count`` bit-shuffled
    LZ4 takes 7 ms to 6% of its size (zstd: 17 ms, 6%); ``pair_sum`` plain LZ4 takes 20 ms to 58%
    (zstd: 43 ms, 49%; bit-shuffled LZ4: 25 ms, 87% — shuffling float64 sums spoils the runs of
    zeros). Tiles that are mostly zero shrink to almost nothing either way. The vectors keep
    Zarr's default.
    """
    from zarr.codecs import BloscCodec

    if name == "pair_sum":
        return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    if name == "pair_count":
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return "auto"


def _prepare_store(out: str, spec: dict, units, meta: dict, overwrite: bool):
    """Create (or reopen, to resume) the statistics group and its job; returns ``(group, job)``."""
    import zarr

    store = RunStore(out)
    existing = os.path.exists(out)
    # a run store shared with other stages (a Zarr group) is fine; anything else must be empty
    shared_group = os.path.isfile(os.path.join(out, "zarr.json"))
    if existing and not overwrite:
        old = store.manifest(STAGE) if os.path.isdir(out) else None
        if old is None and not shared_group and (not os.path.isdir(out) or os.listdir(out)):
            raise StoreConflictError(
                f"{out!r} exists and is not a distpen coactivation store; pass overwrite=True "
                "(CLI: --overwrite) to replace it, or choose another output path"
            )
    if overwrite and existing:
        if shared_group:  # replace only this stage's arrays and job, keep the other stages
            for name in _ARRAYS:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            store.reset(STAGE)
        elif os.path.isdir(out):
            shutil.rmtree(out)
        else:
            os.unlink(out)
    job = store.begin_job(STAGE, spec, units, overwrite=overwrite)
    group = zarr.open_group(out, mode="a")
    K, T = meta["k_atoms"], meta["tile"]
    want = {
        "pair_sum": ((K, K), (T, T), "float64"), "pair_count": ((K, K), (T, T), "int64"),
        "fire_count": ((K,), (T,), "int64"), "gate_sum": ((K,), (T,), "float64"),
        "gate_sq_sum": ((K,), (T,), "float64"),
    }
    have = set(group.array_keys())
    for name, (shape, chunks, dtype) in want.items():
        if name in have:
            a = group[name]
            if tuple(a.shape) != shape or tuple(a.chunks) != chunks or str(a.dtype) != dtype:
                raise StoreCorruptError(
                    f"store {out!r}: array {name} has shape {a.shape}, chunks {a.chunks}, dtype {a.dtype}; "
                    f"the manifest's job needs {shape}, {chunks}, {dtype}; re-run with overwrite=True"
                )
        else:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               compressors=_stats_codecs(name))
    group.attrs.update({"format": _FORMAT, "format_version": _FORMAT_VERSION, **meta})
    if job.done():  # a resumed job: drop what writers killed mid-write left behind
        for name in ("pair_sum", "pair_count"):
            sweep_temporaries(os.path.join(out, name))
    return group, job


def coactivation_stats(gates, out, *, row_chunk=None, tile=None, split_every=None, overwrite=False,
                       progress=None, client=None, _units=None, _fail_units=()):
    """Compute the co-activation sufficient statistics of ``gates`` into the Zarr run store ``out``.

    Parameters
    ----------
    gates : DenseGates, TopKGates, path, or array of shape (n_tokens, k_atoms)
        The gates (a plain 2-D float array is taken as dense gates; a path is opened with
        :func:`~distpen.gates.open_gates`).
    out : str or os.PathLike
        The run store (a Zarr group) to write; see :class:`CoactivationStats` for its layout.
    row_chunk : int, optional
        Tokens per row chunk. Default: from the workers' memory limit and ``N``, aligned to the
        input's chunks (when resuming, the stored value).
    tile : int, optional
        Atoms per tile side (one Zarr chunk of ``pair_sum``/``pair_count``); ragged last tile
        allowed. Default: from the workers' memory limit, at most 1024 (when resuming, the stored value).
    split_every : int ≥ 2, optional
        Fan-in of the reduction tree over row chunks; a leaf task reads this many row chunks.
        Default: see :func:`default_split_every` — every row chunk (one streaming task per tile
        group) when ``K`` is large enough for the tile groups alone to keep workers busy, else 4
        (when resuming, the stored value).
    overwrite : bool
        Replace whatever ``out`` holds. Without it, a store holding the same job is resumed (only
        missing tiles are computed) and a different job is refused.
    progress : callable, optional
        Called as ``progress(info)`` while the job runs, with ``info`` the dict written to the
        store's ``progress.json`` (``units_done``, ``units_total``, ``rows_processed``, ``rows_total``...).
    client : distributed.Client, optional
        Default: :func:`distpen.cluster.get_client`.

    Returns
    -------
    CoactivationStats

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError, InvalidDtypeError
        Bad arguments, before any work.
    StoreConflictError
        ``out`` holds a different job (or is not a coactivation store) and ``overwrite`` is False.
    GateDataError
        NaN, ±inf or a negative gate, a repeated or out-of-range top-k index, found while computing;
        names the row and atom. Tiles completed before the error stay valid; re-run to resume.

    Examples
    --------
    >>> g = dp.synth_gates("g.zarr", 100_000, 1024, density=0.02)      # doctest: +SKIP
    >>> st = dp.coactivation_stats(g, "stats.zarr")                     # doctest: +SKIP
    >>> st.pairs(top_m=16, measure="lift")                              # doctest: +SKIP
    """
    from dask.base import tokenize

    from .cluster import get_client, n_workers, worker_memory_limit

    g = as_gates(gates)
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidArgumentError(f"out must be a local path to a Zarr group, got {type(out).__name__}")
    out = local_store_path(out)
    if row_chunk is not None:
        row_chunk = check_positive_int(row_chunk, "row_chunk")
    if tile is not None:
        tile = check_positive_int(tile, "tile")
    se_given = split_every is not None
    se = _check_split_every(split_every)
    N, K = g.n_tokens, g.k_atoms
    inputs = g.input_spec()

    if not overwrite and (row_chunk is None or tile is None or not se_given):
        # resuming: unspecified parameters take the stored job's values
        old = RunStore(out).manifest(STAGE) if os.path.isdir(out) else None
        if old is not None and old.get("spec", {}).get("inputs") == _json_roundtrip(inputs):
            params = old["spec"].get("params", {})
            row_chunk = row_chunk or params.get("row_chunk")
            tile = tile or params.get("tile")
            if not se_given and "split_every" in params:
                se, se_given = params["split_every"], True

    client = client or get_client()
    mem = worker_memory_limit(client)
    rc = min(row_chunk, N) if row_chunk is not None else default_row_chunk(mem, g, se)
    if not se_given:
        sparse = g.form == "topk" or _sample_density(g, rc) <= _SPARSE_DENSITY
        se = default_split_every(mem, K, math.ceil(N / rc), tile, sparse,
                                 float(N) * g.row_width() * (np.dtype(g.dtype).itemsize if g.form == "dense" else 8))
    fan = _fan_in(N, rc, se)
    T = min(tile, K) if tile is not None else default_tile(mem, K, fan)
    nb = math.ceil(K / T)
    all_tiles = _tiles(nb)
    units = [_unit(i, j) for i, j in all_tiles]
    spec = {"kind": "coactivation", "version": _FORMAT_VERSION, "inputs": inputs,
            "n_tokens": N, "k_atoms": K, "params": {"row_chunk": rc, "tile": T, "split_every": se}}
    meta = {"n_tokens": N, "k_atoms": K, "tile": T, "row_chunk": rc, "split_every": se,
            "gates_form": g.form, "gates_dtype": str(g.dtype)}
    _, job = _prepare_store(out, spec, units, meta, overwrite)

    pending = [_parse_unit(u) for u in job.pending()]
    if _units is not None:  # test hook: compute only these tiles (simulates an interrupted job)
        wanted = {tuple(u) if not isinstance(u, str) else _parse_unit(u) for u in _units}
        pending = [t for t in pending if t in wanted]
    streaming = math.ceil(math.ceil(N / rc) / se) == 1
    groups = _group_tiles(pending, T, mem, fan, _MIN_STREAM_GROUPS if streaming else 1)
    # pair products bucketed per scatter pass (12 bytes each): at most 1/10 of a worker's memory
    scatter_pairs = int(max(1 << 16, min(ker.SCATTER_BUFFER_PAIRS, mem // (10 * 12))))
    # when every group reads every chunk, workers keep the sparse rows they read, within 1/8 of memory
    cache_key = job.fingerprint if streaming and len(groups) > 1 else None
    cache_bytes = int(mem // 8)
    chunks = _sources(g, rc, client)
    R = len(chunks)
    n_leaves = math.ceil(R / se)
    n_run = len(pending)
    skipped = len(units) - len(job.pending())
    t_start = time.time()
    state = {"work": 0, "units_done": skipped, "computed": 0, "routes": [0, 0]}

    def report(force=False):
        now = time.time()
        if not force and now - state.get("last", 0) < 0.5:
            return
        state["last"] = now
        elapsed = max(now - t_start, 1e-9)
        rows_processed = state["work"] / n_run if n_run else 0
        info = job.update_progress(
            units_done=state["units_done"], units_total=len(units), units_skipped=skipped,
            units_computed=state["computed"], units_in_run=n_run, rows_processed=int(rows_processed),
            rows_total=N if n_run else 0, elapsed_s=round(elapsed, 3),
            throughput_rows_per_s=round(rows_processed / elapsed, 1),
            routes={"scatter": state["routes"][0], "blas": state["routes"][1]},
            row_chunk=rc, tile=T, split_every=se, n_groups=len(groups), n_leaves_per_group=n_leaves,
        )
        if progress is not None:
            progress(info)

    report(force=True)
    if not groups:
        job.finish()
        report(force=True)
        return CoactivationStats(out)

    import dask
    from distributed import as_completed

    fp = job.fingerprint

    def build(gi, tiles):
        blocks = sorted({b for t in tiles for b in t})
        diag = sorted(i for i, j in tiles if i == j)
        plan = {"tile": T, "k_atoms": K, "tiles": tiles, "span": (blocks[0], blocks[-1] + 1),
                "diag_blocks": diag, "form": g.form, "scatter_pairs": scatter_pairs,
                "cache_key": cache_key, "cache_bytes": cache_bytes,
                "cnt_dtype": np.dtype(ker.count_dtype(N)).name}
        tok = tokenize(fp, tiles, rc, se)
        if n_leaves == 1:  # one task streams every row chunk and writes the tiles itself
            final = dask.delayed(_leaf_and_finalize, pure=True)(
                plan, chunks, out, job, tuple(_fail_units), dask_key_name=f"distpen-coact-stream-{tok}")
            return final, []
        leaves = []
        for b in range(n_leaves):
            part = chunks[b * se:(b + 1) * se]
            leaves.append(dask.delayed(_leaf, pure=True)(plan, part, dask_key_name=f"distpen-coact-leaf-{tok}-{b}"))
        level, layer = leaves, 0
        while len(level) > 1:
            layer += 1
            level = [dask.delayed(_combine, pure=True)(*level[i:i + se],
                                                       dask_key_name=f"distpen-coact-combine-{tok}-{layer}-{i // se}")
                     for i in range(0, len(level), se)]
        final = dask.delayed(_finalize, pure=True)(level[0], plan, out, job, tuple(_fail_units),
                                                   dask_key_name=f"distpen-coact-write-{tok}")
        return final, leaves

    in_flight_max = max(2, 2 * n_workers(client))
    ac = as_completed(with_results=False, loop=client.loop)
    meta_of = {}
    next_group = 0

    def submit(gi):
        tiles = groups[gi]
        final, leaves = build(gi, tiles)
        futs = client.compute([final, *leaves], optimize_graph=False, priority=-gi)
        meta_of[futs[0].key] = ("final", gi, len(tiles), 0)
        for fut, b in zip(futs[1:], range(n_leaves)):
            rows = sum(r1 - r0 for r0, r1, _, _ in chunks[b * se:(b + 1) * se])
            meta_of[fut.key] = ("leaf", gi, len(tiles), rows)
        ac.update(futs)

    try:
        while next_group < len(groups) and next_group < in_flight_max:
            submit(next_group)
            next_group += 1
        for fut in ac:
            kind, gi, n_tiles, rows = meta_of.pop(fut.key)
            if fut.status == "error":
                fut.result()  # raises the task's exception
            if kind == "leaf":
                state["work"] += rows * n_tiles
                fut.release()
                report()
                continue
            res = fut.result()
            fut.release()
            if n_leaves == 1:  # the streaming task did the leaf's work too
                state["work"] += res["rows"] * n_tiles
            state["units_done"] += len(res["units"])
            state["computed"] += len(res["units"])
            state["routes"] = [a + b for a, b in zip(state["routes"], res["routes"])]
            report(force=True)
            if next_group < len(groups):
                submit(next_group)
                next_group += 1
    except BaseException as exc:
        for f in list(ac.futures):
            f.cancel()
        ac.clear()
        done = len(job.done())
        job.fail(f"{type(exc).__name__}: {exc}", units_done=done, units_computed=state["computed"])
        if isinstance(exc, GateDataError):
            raise GateDataError(f"{exc}; job stopped with {done} of {len(units)} tiles complete in "
                                f"{out}: {_RESUME_HINT}") from exc
        raise
    finally:
        _release_worker_buffers(client)
    job.finish(units_computed=state["computed"])
    report(force=True)
    return CoactivationStats(out, allow_incomplete=_units is not None)


def _json_roundtrip(obj):
    import json

    from .store import _canonical

    return json.loads(_canonical(obj))


# ============================================================================ results
class CoactivationStats:
    """Co-activation statistics in a Zarr run store (read side).

    The store holds ``pair_sum`` (float64) and ``pair_count`` (int64) of shape (K, K), chunked by
    ``tile × tile`` and stored only on tiles ``I ≤ J`` (diagonal tiles hold the full symmetric
    block; absent tiles are zero); ``fire_count`` (int64), ``gate_sum`` and ``gate_sq_sum``
    (float64) of shape (K,); the attribute ``n_tokens``; and the job manifest under ``_distpen/``.

    Parameters
    ----------
    path : str or os.PathLike
        A store written by :func:`coactivation_stats` or :func:`merge_stats`.
    allow_incomplete : bool
        Open a store whose job has not finished (missing tiles read as zero).

    Raises
    ------
    InvalidArgumentError
        Nothing at ``path``.
    StoreCorruptError
        Not a statistics store, or (unless ``allow_incomplete``) an unfinished job.
    """

    def __init__(self, path, *, allow_incomplete: bool = False):
        import zarr

        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise InvalidArgumentError(f"no statistics store at {self.path!r}")
        try:
            self._group = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise StoreCorruptError(f"{self.path!r} is not a Zarr group: {exc}") from None
        attrs = dict(self._group.attrs)
        if attrs.get("format") != _FORMAT:
            raise StoreCorruptError(
                f"{self.path!r} is not a coactivation statistics store (format={attrs.get('format')!r})"
            )
        self.n_tokens = int(attrs["n_tokens"])
        self.k_atoms = int(attrs["k_atoms"])
        self.tile_size = int(attrs["tile"])
        self.n_blocks = math.ceil(self.k_atoms / self.tile_size)
        self.attrs = attrs
        self._store = RunStore(self.path)
        self._job = self._store.job(STAGE)
        if not allow_incomplete:
            pending = self._job.pending()
            if pending:
                raise StoreCorruptError(
                    f"statistics store {self.path!r} is incomplete: {len(self._job.units) - len(pending)} of "
                    f"{len(self._job.units)} tiles complete; re-run coactivation_stats with the same "
                    "arguments to finish it (or open with allow_incomplete=True)"
                )
        self._vec = {}

    def __repr__(self) -> str:
        return (f"CoactivationStats({self.path!r}, n_tokens={self.n_tokens}, k_atoms={self.k_atoms}, "
                f"tile={self.tile_size})")

    def __reduce__(self):
        return (_open_trusted, (self.path,))

    @property
    def fingerprint(self) -> str:
        return self._job.fingerprint

    def _vector(self, name):
        if name not in self._vec:
            self._vec[name] = np.asarray(self._group[name][:])
        return self._vec[name]

    @property
    def fire_count(self) -> np.ndarray:
        """array of shape (k_atoms,), int64: tokens where each atom fires (gate > 0)."""
        return self._vector("fire_count")

    @property
    def gate_sum(self) -> np.ndarray:
        """array of shape (k_atoms,), float64: Σ_n g[n, j]."""
        return self._vector("gate_sum")

    @property
    def gate_sq_sum(self) -> np.ndarray:
        """array of shape (k_atoms,), float64: Σ_n g[n, j]²."""
        return self._vector("gate_sq_sum")

    @property
    def pair_sum(self):
        """The stored ``zarr.Array`` of shape (K, K) (upper tiles only)."""
        return self._group["pair_sum"]

    @property
    def pair_count(self):
        """The stored ``zarr.Array`` of shape (K, K) (upper tiles only)."""
        return self._group["pair_count"]

    def _check_block(self, b, name):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < self.n_blocks:
            raise InvalidArgumentError(
                f"tile index {name} = {b!r} out of range; expected an integer in [0, {self.n_blocks}) "
                f"(K = {self.k_atoms}, tile = {self.tile_size})"
            )
        return int(b)

    def tile(self, I, J) -> Tile:
        """The statistics of atom block ``I`` × atom block ``J`` (any order; ``I > J`` is transposed).

        Returns
        -------
        Tile
            ``rows``, ``cols`` (slices of atoms), ``pair_sum`` (float64) and ``pair_count`` (int64)
            of shape (len(rows), len(cols)).
        """
        I, J = self._check_block(I, "I"), self._check_block(J, "J")
        T, K = self.tile_size, self.k_atoms
        rows, cols = slice(I * T, min(K, (I + 1) * T)), slice(J * T, min(K, (J + 1) * T))
        if I <= J:
            ps, pc = self.pair_sum[rows, cols], self.pair_count[rows, cols]
        else:
            ps, pc = self.pair_sum[cols, rows].T, self.pair_count[cols, rows].T
        return Tile(rows, cols, np.ascontiguousarray(ps), np.ascontiguousarray(pc))

    def block(self, r0: int, r1: int, c0: int, c1: int, name: str = "pair_sum") -> np.ndarray:
        """Any rectangle ``[r0, r1) × [c0, c1)`` of the full symmetric matrix ``name``."""
        T = self.tile_size
        arr = self._group[name]
        out = np.zeros((r1 - r0, c1 - c0), dtype=arr.dtype)
        for I in range(r0 // T, (r1 - 1) // T + 1):
            for J in range(c0 // T, (c1 - 1) // T + 1):
                a0, a1 = max(r0, I * T), min(r1, (I + 1) * T)
                b0, b1 = max(c0, J * T), min(c1, (J + 1) * T)
                if I <= J:
                    out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = arr[a0:a1, b0:b1]
                else:
                    out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = arr[b0:b1, a0:a1].T
        return out

    def nonzero_tiles(self) -> list:
        """Tiles ``(I, J)``, ``I ≤ J``, that hold any non-zero statistic."""
        out = []
        markers = self._job.markers()
        for u in self._job.units:
            m = markers.get(u)
            if m is None or m.get("info", {}).get("nonzero", True):
                out.append(_parse_unit(u))
        return out

    def coactivation_dense(self, force: bool = False) -> np.ndarray:
        """The dense ``K × K`` co-activation ``pair_sum / n_tokens`` (symmetric, float64).

        Raises
        ------
        InvalidArgumentError
            If ``K > 16384`` (a 2 GiB+ matrix) and ``force`` is False; use :meth:`pairs` or :meth:`tile`.
        """
        K = self.k_atoms
        if K > MAX_DENSE_K and not force:
            raise InvalidArgumentError(
                f"coactivation_dense: K = {K} > {MAX_DENSE_K} would allocate {8 * K * K / 2**30:.1f} GiB; "
                "use .pairs(...) or .tile(I, J), or pass force=True"
            )
        C = np.zeros((K, K))
        for I, J in self.nonzero_tiles():
            t = self.tile(I, J)
            C[t.rows, t.cols] = t.pair_sum
            if I != J:
                C[t.cols, t.rows] = t.pair_sum.T
        C /= self.n_tokens
        return C

    def pairs(self, threshold=0.0, top_m=None, measure="mean", min_count=0, out=None, *, client=None) -> PairTable:
        """Atom pairs ``(j, k, w)``, ``j < k``, with ``w`` the chosen measure, built tile by tile on the cluster.

        Parameters
        ----------
        threshold : float ≥ 0
            Keep pairs whose measure is strictly greater.
        top_m : int, optional
            Keep a pair only if it is among the ``m`` strongest partners of *either* of its atoms
            (among the pairs passing ``threshold`` and ``min_count``; ties at the m-th value are kept).
        measure : {"mean", "count", "jaccard", "cosine", "lift"}
            ``mean = pair_sum/n_tokens`` (what ``DecoderIncoherencePenalty.from_pairs`` consumes);
            ``count = pair_count``; ``jaccard = pair_count/(fire_j + fire_k − pair_count)``;
            ``cosine = pair_sum/sqrt(gate_sq_sum_j·gate_sq_sum_k)``;
            ``lift = pair_count·n_tokens/(fire_j·fire_k)``. A pair whose denominator is 0 is absent.
        min_count : int ≥ 0
            Keep pairs that co-fire on at least this many tokens.
        out : path, optional
            Also save the table there (:meth:`PairTable.save`).

        Returns
        -------
        PairTable
        """
        from .cluster import get_client

        threshold = check_finite_scalar(threshold, "threshold", nonnegative=True)
        if measure not in MEASURES:
            raise InvalidArgumentError(f"measure must be one of {MEASURES}, got {measure!r}")
        if top_m is not None:
            top_m = check_positive_int(top_m, "top_m")
        min_count = check_positive_int(min_count, "min_count", allow_zero=True)
        from dask.base import tokenize

        client = client or get_client()
        tiles = self.nonzero_tiles()
        opts = (measure, threshold, min_count)
        tok = tokenize(self.path, self.fingerprint, opts, top_m)
        theta = None
        if top_m is not None and tiles:
            futs = client.map(_tile_topm, [self] * len(tiles), tiles, [top_m] * len(tiles),
                              [opts] * len(tiles), key=[f"distpen-pairs-topm-{tok}-{I}-{J}" for I, J in tiles])
            by_block = {}
            for (I, J), f in zip(tiles, futs):
                by_block.setdefault(I, []).append((f, 0))
                if I != J:
                    by_block.setdefault(J, []).append((f, 1))
            blocks = sorted(by_block)
            merged = client.map(_merge_topm, blocks, [by_block[b] for b in blocks], [top_m] * len(blocks),
                                [self.tile_size] * len(blocks), [self.k_atoms] * len(blocks),
                                key=[f"distpen-pairs-theta-{tok}-{b}" for b in blocks])
            theta = np.full(self.k_atoms, -np.inf)
            for b, th in zip(blocks, client.gather(merged)):
                theta[b * self.tile_size:b * self.tile_size + th.shape[0]] = th
            del futs, merged
        if not tiles:
            table = PairTable.empty(self.k_atoms)
        else:
            th_parts = [None if theta is None else (theta[I * self.tile_size:(I + 1) * self.tile_size],
                                                    theta[J * self.tile_size:(J + 1) * self.tile_size])
                        for I, J in tiles]
            futs = client.map(_tile_pairs, [self] * len(tiles), tiles, [opts] * len(tiles), th_parts,
                              key=[f"distpen-pairs-tile-{tok}-{I}-{J}" for I, J in tiles])
            res = client.gather(futs)
            j = np.concatenate([r[0] for r in res])
            k = np.concatenate([r[1] for r in res])
            w = np.concatenate([r[2] for r in res])
            order = np.lexsort((k, j))
            table = PairTable(np.ascontiguousarray(j[order]), np.ascontiguousarray(k[order]),
                              np.ascontiguousarray(w[order]), self.k_atoms, _trusted=True)
        if out is not None:
            table.save(out)
        return table

    # ------------------------------------------------------------------ measure on one tile
    def _tile_measure(self, I, J, measure, threshold, min_count):
        """(values, eligible) of shape (n_I, n_J) for the tile; eligible excludes a == b."""
        t = self.tile(I, J)
        ps, pc = t.pair_sum, t.pair_count
        n = float(self.n_tokens)
        with np.errstate(divide="ignore", invalid="ignore"):
            if measure == "mean":
                M = ps / n
                ok = np.ones(ps.shape, dtype=bool)
            elif measure == "count":
                M = pc.astype(np.float64)
                ok = np.ones(ps.shape, dtype=bool)
            elif measure == "jaccard":
                f = self.fire_count.astype(np.float64)
                den = f[t.rows][:, None] + f[t.cols][None, :] - pc
                ok = den > 0
                M = np.where(ok, pc / np.where(ok, den, 1.0), 0.0)
            elif measure == "cosine":
                q = self.gate_sq_sum
                den = np.sqrt(q[t.rows][:, None] * q[t.cols][None, :])
                ok = den > 0
                M = np.where(ok, ps / np.where(ok, den, 1.0), 0.0)
            else:  # lift
                f = self.fire_count.astype(np.float64)
                den = f[t.rows][:, None] * f[t.cols][None, :]
                ok = den > 0
                M = np.where(ok, pc * n / np.where(ok, den, 1.0), 0.0)
        ok &= (M > threshold) & (pc >= min_count)
        if I == J:
            np.fill_diagonal(ok, False)
        return M, ok


def _open_trusted(path):
    return CoactivationStats(path, allow_incomplete=True)


def _top_values(M, ok, m, axis):
    """The m largest eligible values along ``axis`` (descending, padded with -inf)."""
    V = np.where(ok, M, -np.inf)
    if axis == 0:
        V = V.T
    n, w = V.shape
    if w > m:
        V = -np.partition(-V, m - 1, axis=1)[:, :m]
    V = -np.sort(-V, axis=1)
    if V.shape[1] < m:
        V = np.concatenate([V, np.full((n, m - V.shape[1]), -np.inf)], axis=1)
    return V


def _tile_topm(stats, tile, m, opts):
    I, J = tile
    M, ok = stats._tile_measure(I, J, *opts)
    return _top_values(M, ok, m, 1), (None if I == J else _top_values(M, ok, m, 0))


def _merge_topm(b, parts, m, T, K):
    """θ for atom block ``b``: the m-th largest eligible partner value (-inf if fewer than m)."""
    n = min(K, (b + 1) * T) - b * T
    cands = [p[side] for p, side in parts]
    allv = np.concatenate(cands, axis=1) if cands else np.full((n, m), -np.inf)
    top = _top_values(allv, np.ones(allv.shape, dtype=bool), m, 1)
    return top[:, m - 1]


def _tile_pairs(stats, tile, opts, theta):
    I, J = tile
    M, ok = stats._tile_measure(I, J, *opts)
    if theta is not None:
        th_i, th_j = theta
        ok &= (M >= th_i[:, None]) | (M >= th_j[None, :])
    if I == J:
        ok &= np.triu(np.ones(ok.shape, dtype=bool), 1)
    a, b = np.nonzero(ok)
    T = stats.tile_size
    return (a + I * T).astype(np.int64), (b + J * T).astype(np.int64), M[a, b].astype(np.float64)


def open_stats(path, *, allow_incomplete: bool = False) -> CoactivationStats:
    """Open a statistics store written by :func:`coactivation_stats` or :func:`merge_stats`.

    Examples
    --------
    >>> st = open_stats("stats.zarr")                   # doctest: +SKIP
    >>> st.n_tokens, st.k_atoms, st.fire_count.shape    # doctest: +SKIP
    """
    return CoactivationStats(path, allow_incomplete=allow_incomplete)


# ============================================================================ merge
def _merge_tile(a: CoactivationStats, b: CoactivationStats, out: str, I: int, J: int, T: int, job) -> dict:
    import zarr

    K = a.k_atoms
    group = zarr.open_group(out, mode="r+")
    i0, i1, j0, j1 = I * T, min(K, (I + 1) * T), J * T, min(K, (J + 1) * T)
    outputs = []
    ps = a.block(i0, i1, j0, j1, "pair_sum") + b.block(i0, i1, j0, j1, "pair_sum")
    pc = a.block(i0, i1, j0, j1, "pair_count") + b.block(i0, i1, j0, j1, "pair_count")
    if I == J:
        for name in ("fire_count", "gate_sum", "gate_sq_sum"):
            arr = group[name]
            arr[i0:i1] = np.asarray(a._group[name][i0:i1]) + np.asarray(b._group[name][i0:i1])
            outputs.append(f"{name}/" + arr.metadata.chunk_key_encoding.encode_chunk_key((I,)))
    for name, val in (("pair_sum", ps), ("pair_count", pc)):
        arr = group[name]
        arr[i0:i1, j0:j1] = val
        outputs.append(f"{name}/" + arr.metadata.chunk_key_encoding.encode_chunk_key((I, J)))
    outputs = [o for o in outputs if os.path.exists(os.path.join(out, o))]
    job.mark_done(_unit(I, J), outputs, info={"nonzero": bool(ps.any() or pc.any())})
    return {"unit": _unit(I, J)}


def merge_stats(a, b, out, *, tile=None, overwrite=False, client=None) -> CoactivationStats:
    """Exact merge of the statistics of two disjoint token sets: every sum and count adds.

    Parameters
    ----------
    a, b : CoactivationStats or path
        Statistics over the same atoms (their tile sizes may differ).
    out : path
        The merged store; tile by tile on the cluster, resumable like :func:`coactivation_stats`.
    tile : int, optional
        Tile size of the output (default: ``a``'s).
    overwrite : bool

    Returns
    -------
    CoactivationStats

    Raises
    ------
    ShapeMismatchError
        ``a`` and ``b`` have different ``k_atoms``.
    StoreConflictError
        ``out`` holds another job and ``overwrite`` is False.

    Examples
    --------
    >>> merged = merge_stats("stats-shard0.zarr", "stats-shard1.zarr", "stats-all.zarr")   # doctest: +SKIP
    """
    from distributed import wait

    from .cluster import get_client

    a = a if isinstance(a, CoactivationStats) else open_stats(a)
    b = b if isinstance(b, CoactivationStats) else open_stats(b)
    if a.k_atoms != b.k_atoms:
        raise ShapeMismatchError(
            f"cannot merge statistics over different atoms: a has k_atoms = {a.k_atoms}, b has {b.k_atoms}"
        )
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidArgumentError(f"out must be a local path to a Zarr group, got {type(out).__name__}")
    out = local_store_path(out)
    if out in (a.path, b.path):
        raise InvalidArgumentError(f"merge_stats: out {out!r} must differ from the inputs")
    K = a.k_atoms
    T = min(check_positive_int(tile, "tile"), K) if tile is not None else a.tile_size
    nb = math.ceil(K / T)
    units = [_unit(i, j) for i, j in _tiles(nb)]
    spec = {"kind": "merge", "version": _FORMAT_VERSION, "k_atoms": K, "tile": T,
            "inputs": [{"path": a.path, "fingerprint": a.fingerprint, "n_tokens": a.n_tokens},
                       {"path": b.path, "fingerprint": b.fingerprint, "n_tokens": b.n_tokens}]}
    N = a.n_tokens + b.n_tokens
    meta = {"n_tokens": N, "k_atoms": K, "tile": T, "merged_from": [a.path, b.path]}
    _, job = _prepare_store(out, spec, units, meta, overwrite)
    client = client or get_client()
    pending = [_parse_unit(u) for u in job.pending()]
    futs = [client.submit(_merge_tile, a, b, out, I, J, T, job, key=f"distpen-merge-{job.fingerprint}-{I}-{J}")
            for I, J in pending]
    try:
        wait(futs)
        client.gather(futs)
    except BaseException as exc:
        job.fail(f"{type(exc).__name__}: {exc}")
        raise
    job.finish(units_computed=len(pending))
    return CoactivationStats(out)
