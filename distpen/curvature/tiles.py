"""``assemble_majorizer``: the Gauss-Newton majorizer written as ``n × n`` Zarr tiles.

Only the tiles some pair (or diagonal block) touches are written, each by one task, so bytes on
disk follow the pair structure, not ``n²``. Diagonal blocks ``I ⊗ S_a`` come from per-atom Grams
``S_a`` computed by the owners of atom ranges; off-diagonal blocks from the pairs themselves.
``format="factored"`` returns a :class:`~distpen.curvature.factored.FactoredMajorizer` instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._alloc import zeros
from .._broadcast import BROADCASTS
from .._chunkio import sweep_temporaries, write_chunk
from .._validation import check_finite_scalar, check_positive_int
from .._workers import kernel_threads, threads_per_task
from ..errors import InvalidArgumentError
from ..pairs import PairTable
from ..penalties import DecoderIncoherencePenalty, NestedPrefixPenalty, Penalty
from ._common import _child_path, _client, _Tracker, check_penalty, input_identity, pairs_identity
from ._vectors import as_vector_source
from .evaluate import evaluate
from .factored import FactoredMajorizer
from .plan import DecoderPlan, _atom_aligned_bounds, _Part, _Range, shared_mode

__all__ = ["assemble_majorizer", "tile_work", "default_tile"]


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

    from ..store import RunStore

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

    from ..store import RunStore

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
