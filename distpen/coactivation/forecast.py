"""``plan_coactivation``: what a co-activation job will do on a given cluster, and how long it takes.

The forecast uses the same parameter choice as the job (:func:`.plan.choose_parameters` and
:func:`.plan._group_tiles`), so its tile, row chunk, ``split_every`` and tile groups are the ones the
job runs with. Its time model, for top-k gates with ``k`` slots per token (``U = k(k+1)/2`` pair
updates per token, all slots used), ``N`` tokens, ``G`` tile groups and ``W`` workers::

    core-seconds = N·U·t_pair(accumulator bytes of a group)      every pair update lands once
                 + G·N·k·t_slot                                   each group pass walks every slot
                 + N·k·t_read · (passes that miss the chunk cache)
                 + B·t_zero                                       every accumulator byte first touched
                 + B·(t_write_empty + f·(t_write_full − t_write_empty))        every tile written
    wall         = streaming: the groups' costs handed out in order to whichever of the
                   W × threads task slots is free first; otherwise core-seconds / (W × threads)

where ``B`` is the accumulator bytes of all tiles and ``f = 1 − exp(−2·N·U / K²)`` the expected
fraction of a tile's pairs that ever co-fire (an empty tile compresses to nothing, a full one is
encoded at the full rate); with per-core rates measured on this machine by :func:`calibrate`
(``distpen plan --calibrate``) or the defaults below (measured on the 2-core machine the project
is developed on). ``t_pair`` grows with the accumulators a pass keeps: it is interpolated
(log-log) between a cache-resident tile and a group of many tiles. Dense gates use the nonzero
fraction ``density`` as ``k = density·K``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .._validation import check_finite_scalar, check_positive_int
from ..errors import InvalidArgumentError
from .plan import _MIN_STREAM_GROUPS, _group_tiles, _partial_bytes, _tiles, choose_parameters

__all__ = ["CoactivationPlan", "plan_coactivation", "plan_atom_major", "calibrate", "DEFAULT_RATES"]

#: per-core rates (seconds) measured here: a pair update into one 1024² tile (16 MiB, in cache) and
#: into a group of 64 such tiles (1 GiB, far outside it; since 2026-12-03 ``calibrate`` shapes it as
#: the job's groups, whose first block rows reach every block: 1.6e-8 on that day's host, which
#: measured 1.2e-8 for a square group); walking one slot in a group pass; reading and validating one
#: top-k slot from Zarr (decode + sparse rows)
DEFAULT_RATES = {"t_pair_small": 4.0e-9, "t_pair_large": 2.2e-8, "bytes_small": 16 * 2**20,
                 "bytes_large": 2**30, "t_slot": 2.0e-9, "t_read": 3.0e-8,
                 # per accumulator byte: zeroing a fresh one (first touch), and encoding and writing a
                 # tile with the store's codecs when every pair has co-fired / none has
                 "t_zero": 2.0e-10, "t_write_full": 1.8e-9, "t_write_empty": 4.0e-10,
                 # atom-major decomposition, per entry: sorting a chunk's entries by block and writing
                 # them (the copy), and reading a task's blocks back and rebuilding their rows
                 # (measured by ``calibrate`` on 2026-12-04: 1.3e-8 and 6.9-7.2e-9)
                 "t_transpose": 1.3e-8, "t_sort": 7.2e-9}


class _Stand:
    """What the parameter choice needs to know of gates that do not exist yet."""

    def __init__(self, n_tokens, k_atoms, form, width, dtype="float32", hint=None):
        self.n_tokens, self.k_atoms, self.form, self._width, self.dtype = n_tokens, k_atoms, form, width, dtype
        self._hint = hint

    def row_width(self):
        return self._width

    def row_chunk_hint(self):
        return self._hint


@dataclass
class CoactivationPlan:
    """A forecast of a co-activation job (see the module docstring for the model)."""

    n_tokens: int
    k_atoms: int
    slots_per_token: float
    n_workers: int
    threads_per_worker: int
    memory_limit: int
    tile: int
    row_chunk: int
    split_every: int
    n_tiles: int
    n_groups: int
    tiles_per_group: list = field(default_factory=list)
    streaming: bool = True
    accumulator_bytes_per_task: int = 0
    bytes_read_per_worker: float = 0.0
    pair_updates: float = 0.0
    predicted_s: float = 0.0
    breakdown_s: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        gib = 2.0**30
        lines = [
            f"co-activation plan: N = {self.n_tokens:,} tokens, K = {self.k_atoms:,} latents, "
            f"{self.slots_per_token:g} active per token; {self.n_workers} workers × {self.threads_per_worker} "
            f"thread(s), {self.memory_limit / gib:.1f} GiB each",
            f"  tile {self.tile} → {self.n_tiles} tiles in {self.n_groups} groups "
            f"({min(self.tiles_per_group, default=0)}–{max(self.tiles_per_group, default=0)} tiles each); "
            f"row_chunk {self.row_chunk:,}, split_every {self.split_every} "
            f"({'one streaming task per group' if self.streaming else 'a reduction tree per group'})",
            f"  accumulators per task {self.accumulator_bytes_per_task / gib:.2f} GiB; "
            f"gates read per worker {self.bytes_read_per_worker / gib:.1f} GiB; "
            f"{self.pair_updates:.3g} pair updates",
            f"  predicted {self.predicted_s:,.0f} s ({self.n_tokens / max(self.predicted_s, 1e-9):,.0f} tokens/s): "
            + ", ".join(f"{k} {v:,.0f} s" for k, v in self.breakdown_s.items()),
        ]
        return "\n".join(lines)


def _t_pair(rates: dict, nbytes: float) -> float:
    a, b = rates["bytes_small"], rates["bytes_large"]
    ya, yb = rates["t_pair_small"], rates["t_pair_large"]
    x = min(max(nbytes, a), b)
    f = math.log(x / a) / math.log(b / a)
    return math.exp(math.log(ya) + f * (math.log(yb) - math.log(ya)))


def plan_coactivation(n_tokens: int, k_atoms: int, *, topk: int | None = None, density: float | None = None,
                      n_workers: int = 2, memory_limit: int = 8 * 2**30, threads_per_worker: int = 1,
                      tile: int | None = None, row_chunk: int | None = None, split_every: int | None = None,
                      stored_chunk: int | None = None, rates: dict | None = None) -> CoactivationPlan:
    """Forecast a co-activation job: its tile groups, memory, bytes read and time.

    Parameters
    ----------
    n_tokens, k_atoms : int
    topk : int, optional
        Active slots per token (top-k gates); or
    density : float in (0, 1], optional
        Nonzero fraction (dense gates).
    n_workers, memory_limit, threads_per_worker
        The cluster (``memory_limit`` in bytes, per worker).
    tile, row_chunk, split_every : optional
        As for :func:`~distpen.coactivation.coactivation_stats` (defaults as it chooses them).
    stored_chunk : int, optional
        Rows per stored chunk of the gates (the job aligns its row chunks to them).
    rates : dict, optional
        Per-core rates from :func:`calibrate` (default :data:`DEFAULT_RATES`).

    Returns
    -------
    CoactivationPlan

    Examples
    --------
    >>> print(plan_coactivation(10**8, 32768, topk=32, n_workers=2, memory_limit=12 * 2**30))  # doctest: +SKIP
    """
    N = check_positive_int(n_tokens, "n_tokens")
    K = check_positive_int(k_atoms, "k_atoms")
    if (topk is None) == (density is None):
        raise InvalidArgumentError("give exactly one of topk (top-k gates) or density (dense gates)")
    if topk is not None:
        k = check_positive_int(topk, "topk")
        if k > K:
            raise InvalidArgumentError(f"topk = {k} exceeds k_atoms = {K}")
        gates = _Stand(N, K, "topk", k, hint=stored_chunk)
        slots = float(k)
    else:
        density = check_finite_scalar(density, "density", positive=True)
        if density > 1:
            raise InvalidArgumentError(f"density must lie in (0, 1], got {density}")
        gates = _Stand(N, K, "dense", K, hint=stored_chunk)
        slots = density * K
    W = check_positive_int(n_workers, "n_workers")
    thr = check_positive_int(threads_per_worker, "threads_per_worker")
    mem = check_positive_int(memory_limit, "memory_limit")
    rates = {**DEFAULT_RATES, **(rates or {})}
    sparse = topk is not None or density <= 0.05
    prm = choose_parameters(mem, gates, row_chunk, tile, split_every, sparse)
    T, nb = prm["tile"], prm["n_blocks"]
    tiles = _tiles(nb)
    groups = _group_tiles(tiles, T, mem, prm["fan_in"], _MIN_STREAM_GROUPS if prm["streaming"] else 1,
                          W if prm["streaming"] else 1)
    G = len(groups)
    sizes = [len(g) for g in groups]
    acc = max(sizes) * _partial_bytes(T)
    U = slots * (slots + 1) / 2.0
    bytes_per_slot = 8.0  # int32 index + float32 value (top-k); dense rows are read as such
    gate_bytes = N * (slots * bytes_per_slot if topk is not None else K * 4.0)
    # the chunk cache (1/8 of a worker's memory) keeps what a worker read for its later groups
    cache = mem / 8.0 if G > 1 and prm["streaming"] else 0.0
    groups_per_worker = math.ceil(G / W)
    miss = 1.0 if cache >= gate_bytes else groups_per_worker - (groups_per_worker - 1) * (cache / gate_bytes)
    read_per_worker = gate_bytes * max(1.0, miss)
    pair_s = N * U * _t_pair(rates, acc)
    slot_s = G * N * slots * rates["t_slot"]
    read_s = W * max(1.0, miss) * N * slots * rates["t_read"]
    per_tile = _per_tile_s(rates, T, N * U, K)
    tile_s = len(tiles) * per_tile
    total = pair_s + slot_s + read_s + tile_s
    if prm["streaming"]:  # one task per group, handed out in order to whichever slot is free first
        costs = [n / max(1, sum(sizes)) * pair_s + (slot_s + read_s) / G + n * per_tile for n in sizes]
        wall = _schedule(costs, W * thr)
    else:  # a group's leaves spread over every worker
        wall = total / (W * thr)
    return CoactivationPlan(
        n_tokens=N, k_atoms=K, slots_per_token=slots, n_workers=W, threads_per_worker=thr, memory_limit=mem,
        tile=T, row_chunk=prm["row_chunk"], split_every=prm["split_every"], n_tiles=len(tiles), n_groups=G,
        tiles_per_group=sizes, streaming=prm["streaming"], accumulator_bytes_per_task=int(acc),
        bytes_read_per_worker=float(read_per_worker), pair_updates=float(N * U), predicted_s=float(wall),
        breakdown_s={"pair updates": pair_s / (W * thr), "group passes": slot_s / (W * thr),
                     "reads": read_s / (W * thr), "tile zeroing and writes": tile_s / (W * thr)},
        rates=rates)


def _per_tile_s(rates: dict, tile: int, pair_updates: float, k_atoms: int) -> float:
    """Seconds to zero, encode and write one tile: ``f = 1 − exp(−2·N·U / K²)`` of its pairs co-fire."""
    fill = -math.expm1(-pair_updates / max(1.0, k_atoms * k_atoms / 2.0))
    return float(_partial_bytes(tile)) * (rates["t_zero"] + rates["t_write_empty"]
                                          + fill * (rates["t_write_full"] - rates["t_write_empty"]))


def _schedule(costs, slots: int) -> float:
    """Wall time of tasks handed out in order to whichever of ``slots`` (one a core) is free first."""
    free = [0.0] * max(1, slots)
    for c in costs:
        free[free.index(min(free))] += c
    return max(free)


#: block rows and columns of the span of :func:`calibrate`'s large group (the job's at K = 32 768)
_LARGE_SIDE = 32


def calibrate(*, rows: int = 40_000, k: int = 32, tile: int = 1024, large_tiles: int = 64, seed: int = 0) -> dict:
    """Measure the per-core rates of :data:`DEFAULT_RATES` on this machine (one thread, a few seconds).

    Scatters synthetic top-k rows with the job's own kernel into one tile, and into a group shaped
    as the job shapes one: the first ``large_tiles`` tiles in row-major order over 32 blocks, so
    that its first block rows reach every block (a group's cost per pair update grows with the
    width of its rows, not only with its bytes: here a square group of 66 tiles measured 11.7 ns an
    update, this one 16.8 ns). Times building validated sparse rows from top-k arrays, a
    pass over rows outside a group, first-touching a fresh accumulator, and writing a full and an
    empty tile with the statistics store's codecs.
    """
    from threadpoolctl import threadpool_limits

    from .._workers import kernel_threads
    from . import _kernels as ker

    rng = np.random.default_rng(seed)

    def rows_over(span):
        idx = np.argsort(rng.random((rows, span)), axis=1)[:, :k].astype(np.int32)
        return idx, rng.uniform(0.1, 1.0, (rows, k)).astype(np.float32)

    out = {}
    with threadpool_limits(1), kernel_threads(1):
        for name in ("small", "large"):
            if name == "small":  # one tile, every atom of every row in it
                n_side = 1
                local = [(0, 0)]
                idx, val = rows_over(tile)
            else:  # a group as the job makes one: the first large_tiles tiles in row-major order over
                # _LARGE_SIDE blocks, so its first block rows reach every block (rows as wide as the
                # job's, whose cost grows with them); 8× the rows, one atom per block of each
                n_side = _LARGE_SIDE
                local = [(i, j) for i in range(n_side) for j in range(i, n_side)][:large_tiles]
                blocks = np.argsort(rng.random((8 * rows, n_side)), axis=1)[:, :min(k, n_side)]
                idx = (blocks * tile + rng.integers(0, tile, blocks.shape)).astype(np.int32)
                val = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
            span = n_side * tile
            csr = ker.topk_block_csr(idx, val, 0, span, span)
            part = ker.new_partial(len(local), tile, 0, cnt_dtype=np.int32)
            ws = ker.ScatterWorkspace()
            ker.scatter_group(csr, 0, tile, n_side, local, range(len(local)), part["sum"], part["cnt"], ws)
            part["cnt"][:] = 0
            t0 = time.perf_counter()
            ker.scatter_group(csr, 0, tile, n_side, local, range(len(local)), part["sum"], part["cnt"], ws)
            dt = time.perf_counter() - t0
            out[f"t_pair_{name}"] = dt / max(1, int(part["cnt"].sum(dtype=np.int64)))  # the updates done
            out[f"bytes_{name}"] = float(len(local) * _partial_bytes(tile))
            if name == "small":  # read top-k chunks from Zarr (zstd, as synth_gates writes) into sparse rows
                import zarr

                store = zarr.storage.MemoryStore()
                g = zarr.open_group(store, mode="w")
                zi = g.create_array("i", shape=idx.shape, chunks=idx.shape, dtype=idx.dtype)
                zv = g.create_array("v", shape=val.shape, chunks=val.shape, dtype=val.dtype)
                zi[:], zv[:] = idx, val
                t0 = time.perf_counter()
                ker.topk_block_csr(np.asarray(zi[:]), np.asarray(zv[:]), 0, span, span)
                out["t_read"] = (time.perf_counter() - t0) / (rows * k)
                # a pass over rows whose atoms all lie outside the group's span. It takes the bucket
                # kernel, which the scatter above (the per-tile kernel, for rows this dense) has not
                # run: a first, untimed call compiles it where numba's cache is empty (a fresh
                # install: 1.3 s, which made t_slot 1e-6 and the forecast 14× too long)
                for _ in range(2):  # the second call is timed
                    t0 = time.perf_counter()
                    ker.scatter_group(csr, span, tile, 1, [(0, 0)], [0], part["sum"][:1], part["cnt"][:1], ws)
                out["t_slot"] = max((time.perf_counter() - t0) / (rows * k), 1e-10)  # the timed call's
            else:  # the atom-major copy of these rows, then a task's read of 8 of its 32 blocks
                out.update(_copy_rates(csr, tile, n_side, ws))
            del part
        out.update(_tile_rates(tile, rng))
    return out


def _copy_rates(csr, tile: int, n_blocks: int, ws) -> dict:
    """Seconds per entry: sorting sparse rows by block and writing them as a copy file
    (``t_transpose``), and reading a task's blocks back and rebuilding their rows (``t_sort``);
    the file is read from the page cache, as a worker reads what it wrote."""
    import shutil
    import tempfile

    from . import atom_major as am

    root = tempfile.mkdtemp(prefix="distpen-calibrate-")
    try:
        n_rows = len(csr[0]) - 1
        path = am.copy_path(root, 0, n_rows)
        ranges = [(0, n_blocks // 8), (n_blocks // 2, n_blocks // 2 + n_blocks // 8)]
        am.write_copy(path, csr, tile, n_blocks, ws)  # untimed: compiles where numba's cache is empty
        am.read_chunk(path, n_rows, ranges, ws)
        os.remove(path)
        t0 = time.perf_counter()
        entries = am.write_copy(path, csr, tile, n_blocks, ws)
        t_transpose = (time.perf_counter() - t0) / max(1, entries)
        t0 = time.perf_counter()
        got = am.read_chunk(path, n_rows, ranges, ws)
        t_sort = (time.perf_counter() - t0) / max(1, int(got[0][-1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"t_transpose": t_transpose, "t_sort": t_sort}


def _tile_rates(tile: int, rng) -> dict:
    """Seconds per accumulator byte: first touch of a fresh one, and a tile written (``write_chunk``
    into a local store laid out as the job's) with every pair co-fired / with none."""
    import shutil
    import tempfile

    import zarr

    from .._chunkio import write_chunk
    from ._store import _stats_codecs

    tile_b = _partial_bytes(tile)
    n = max(1, (64 * 2**20) // tile_b) * tile_b // 8
    t0 = time.perf_counter()
    a = np.empty(n)
    a[:] = 0.0
    t_zero = (time.perf_counter() - t0) / (8 * n)
    del a
    root = tempfile.mkdtemp(prefix="distpen-calibrate-")
    try:
        g = zarr.open_group(root, mode="w")
        arrs = {name: g.create_array(name, shape=(tile, 2 * tile), chunks=(tile, tile), dtype=dt, fill_value=0,
                                     compressors=_stats_codecs(name))
                for name, dt in (("pair_sum", "float64"), ("pair_count", "int64"))}
        cnt = rng.poisson(8.0, (tile, tile)).astype(np.int64)
        full = {"pair_sum": cnt * rng.uniform(0.1, 1.0, (tile, tile)), "pair_count": cnt}
        sparse = {name: np.zeros_like(b) for name, b in full.items()}
        sparse["pair_count"].ravel()[:: 997] = 1
        sparse["pair_sum"].ravel()[:: 997] = 0.5
        rates = {}
        for key, blocks, col in (("t_write_full", full, 0), ("t_write_empty", sparse, 1)):
            t0 = time.perf_counter()
            for name, b in blocks.items():
                write_chunk(arrs[name], (0, col), b)
            rates[key] = (time.perf_counter() - t0) / tile_b
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"t_zero": t_zero, **rates}


def plan_atom_major(n_tokens: int, k_atoms: int, *, topk: int, n_workers: int, memory_limit: int,
                    threads_per_worker: int = 1, tile: int = 1024, row_chunk: int | None = None,
                    rates: dict | None = None) -> dict:
    """Forecast the 2-D decomposition over an atom-major copy of top-k gates (``decomposition="atoms"``).

    The copy (:mod:`.atom_major`: each chunk's entries by atom block, 12 bytes an entry for
    float32 gates) is written once: every slot read (``t_read``) and sorted by block and written
    (``t_transpose``). A task owns a square of ``side × side`` atom blocks whose accumulators fit
    its memory budget (:func:`.atom_major.default_side`), reads only the entries of the latents in
    its one or two block ranges and rebuilds their rows (``t_sort`` an entry read), and scatters
    their pair products at the rate of its accumulators' size, so no worker reads the corpus once
    per group. Returns the forecast as a dict, with the row-major plan's prediction beside it.
    """
    from .atom_major import default_side, square_groups

    rates = {**DEFAULT_RATES, **(rates or {})}
    row = plan_coactivation(n_tokens, k_atoms, topk=topk, n_workers=n_workers, memory_limit=memory_limit,
                            threads_per_worker=threads_per_worker, tile=tile, row_chunk=row_chunk, rates=rates)
    N, K, k, W, thr = row.n_tokens, row.k_atoms, float(topk), row.n_workers, row.threads_per_worker
    T = row.tile
    nb = math.ceil(K / T)
    s = default_side(memory_limit, T, nb)
    squares = square_groups(_tiles(nb), nb, s)
    n_tasks = len(squares)
    entries = N * k
    U = k * (k + 1) / 2.0
    acc = max(len(t) for t, _ in squares) * _partial_bytes(T)
    t_pair = _t_pair(rates, acc)
    per_tile = _per_tile_s(rates, T, N * U, K)
    n_tiles = nb * (nb + 1) // 2
    # every entry is read once and written by block; a task reads its blocks' share of them, rebuilds
    # their rows and scatters its tiles' share of the pair updates (top-k atoms spread evenly)
    copy_s = entries * (rates["t_read"] + rates["t_transpose"])
    costs, read_entries = [], 0.0
    for tiles, ranges in squares:
        e = entries * sum(b1 - b0 for b0, b1 in ranges) / nb
        read_entries += e
        costs.append(e * (rates["t_sort"] + rates["t_slot"]) + N * U * len(tiles) / n_tiles * t_pair
                     + len(tiles) * per_tile)
    wall = copy_s / (W * thr) + _schedule(costs, W * thr)
    read_s = read_entries * (rates["t_sort"] + rates["t_slot"])
    pair_s, tile_s = N * U * t_pair, n_tiles * per_tile
    return {"tile": T, "blocks_per_side": s, "n_tasks": n_tasks, "accumulator_bytes_per_task": acc,
            "copy_bytes": entries * 12.0, "bytes_read_per_worker": read_entries * 12.0 / W,
            "predicted_s": wall, "breakdown_s": {"copy": copy_s / (W * thr), "task reads": read_s / (W * thr),
                                                 "pair updates": pair_s / (W * thr),
                                                 "tile zeroing and writes": tile_s / (W * thr)},
            "row_major_predicted_s": row.predicted_s,
            "row_major_bytes_read_per_worker": row.bytes_read_per_worker,
            "speedup": row.predicted_s / wall if wall > 0 else math.inf}
