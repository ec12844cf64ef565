"""``coactivation_stats``: the co-activation job on a Dask cluster, from gates to a statistics store.

It validates the gates and parameters, plans tiles and groups (:mod:`.plan`), creates or resumes the
store (:mod:`._store`), submits at most a few tile groups at a time (so the scheduler's graph stays
small whatever ``N × K``), reports progress to the store while tasks run, and returns the
:class:`~distpen.coactivation.stats.CoactivationStats` of the finished store.

Peak memory per task is set by ``tile`` and ``row_chunk``, never by ``N``. Given ``row_chunk`` and
``split_every`` the result is bit-identical on any cluster: every sum has a fixed order, BLAS runs
single-threaded, and no kernel uses fast-math.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
import uuid

import numpy as np

from .._validation import check_positive_int
from ..errors import GateDataError, InvalidArgumentError, StoreError
from ..sources.gates import as_gates
from ..store import RunStore, local_store_path
from . import _kernels as ker
from ._store import _RESUME_HINT, _json_roundtrip, _prepare_store
from . import atom_major as am
from ._tasks import _combine, _copy_chunk, _finalize, _leaf, _leaf_and_finalize, _release_worker_buffers
from .plan import (_check_split_every, check_fire_threshold, choose_parameters, default_row_chunk, _FORMAT_VERSION,
                   _group_tiles, _MIN_STREAM_GROUPS, _parse_unit, _sample_density, _sources, _SPARSE_DENSITY, STAGE,
                   _tiles, _unit)
from .stats import CoactivationStats
from .windows import WindowedGates

#: seconds between the rows-done events of a running task (and between progress writes)
PROGRESS_EVERY = 1.0

__all__ = ["coactivation_stats"]


def coactivation_stats(gates, out, *, row_chunk=None, tile=None, split_every=None, fire_threshold=0.0,
                       window=None, seq_len=None, decomposition=None, overwrite=False, progress=None, client=None,
                       _units=None, _fail_units=(), _progress_every=PROGRESS_EVERY, _side=None):
    """Compute the co-activation sufficient statistics of ``gates`` into the Zarr run store ``out``.

    Parameters
    ----------
    gates : DenseGates, TopKGates, SparseGates, DelphiGates, EncodedGates, path, or array of shape (n_tokens, k_atoms)
        The gates (a plain 2-D float array is taken as dense gates, a ``scipy.sparse`` matrix as
        :class:`~distpen.sources.SparseGates`; a path — a gates store or a delphi latent cache
        directory — is opened with :func:`~distpen.sources.open_gates`).
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
    fire_threshold : float, array of shape (k_atoms,), RelativeThreshold or {"relative": rho}
        A gate at or below its threshold counts as zero for every statistic (``pair_sum``,
        ``pair_count``, ``fire_count``, ``gate_sum``, ``gate_sq_sum``): a scalar for every atom; one
        per atom (e.g. a JumpReLU SAE's ``sae.threshold``); or ``RelativeThreshold(rho)`` (also
        ``{"relative": rho}``), ``rho`` times the token's largest gate. Default 0.0: every
        positive gate fires. Part of the job's identity: a store holding another threshold is
        refused (``StoreConflictError``) unless ``overwrite``.
    window : int, optional
        Count co-occurrence per window of ``window`` consecutive tokens within a sequence instead of
        per token (see :class:`~distpen.coactivation.windows.WindowedGates`): a latent fires in a
        window when it fires on any of its tokens (the threshold is applied per token), its window
        gate is its largest gate there, and every statistic and measure is per window
        (``n_tokens`` of the store is the number of windows). A window never crosses a sequence
        boundary; a ragged last window counts. Part of the job's identity. ``row_chunk`` then
        counts windows, a whole number of sequences.
    seq_len : int, optional
        Tokens per sequence, for ``window``: default the source's own (a delphi cache's context
        length, a SAELens activation cache's ``context_size``); required for other gates.
    decomposition : {"rows", "atoms"}, optional
        How tiles are shared out (see :mod:`~distpen.coactivation.atom_major`). ``"rows"``: tile
        groups, each of which reads every row chunk. ``"atoms"`` (top-k and CSR gates): the gates
        are first copied once, by atom block, into the job's scratch directory, then each task owns
        a square of tiles and reads only its blocks' entries, so the corpus is not read once per
        group; the sums are bit-identical to a streaming ``"rows"`` job's (it streams: one task
        reads every row chunk, so ``split_every`` below the number of row chunks is refused).
        Default: ``"atoms"`` when the forecast (:func:`~distpen.coactivation.forecast.plan_atom_major`,
        default rates) says it is more than twice as fast and the disk under ``out`` can hold the
        copy (12 bytes an entry for float32 gates), else ``"rows"``. Not part of the job's
        identity: a job interrupted under one resumes under the other.
    overwrite : bool
        Replace whatever ``out`` holds. Without it, a store holding the same job is resumed (only
        missing tiles are computed) and a different job is refused.
    progress : callable, optional
        Called as ``progress(info)`` while the job runs, with ``info`` the dict written to the
        store's ``progress.json`` (``units_done``, ``units_total``, ``rows_processed``, ``rows_total``...).
        Both move at least every second while tasks run: each running task reports the rows it has
        done (a worker event), so a long streaming task shows throughput and ETA, not 0 rows.
        The callback may be called from a helper thread of this call.
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

    from ..cluster import get_client, n_workers, worker_memory_limit

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
    if decomposition not in (None, "rows", "atoms"):
        raise InvalidArgumentError(f"decomposition must be 'rows', 'atoms' or None, got {decomposition!r}")
    threshold, threshold_spec = check_fire_threshold(fire_threshold, g.k_atoms)
    if window is not None:  # rows become windows; the threshold is applied per token, by them
        g = WindowedGates(g, window, seq_len, threshold=ker.threshold_args(threshold))
        threshold = None
    elif seq_len is not None:
        raise InvalidArgumentError(f"seq_len = {seq_len} is only used with window= (window co-occurrence)")
    N, K = g.n_tokens, g.k_atoms
    align = int(getattr(g, "row_align", 1) or 1)
    if row_chunk is not None and align > 1 and row_chunk % align and row_chunk < N:
        unit = "windows" if window is not None else "tokens"
        raise InvalidArgumentError(
            f"row_chunk = {row_chunk} is not a whole number of sequences: these gates have "
            f"{align} {unit} per sequence, so row_chunk must be a multiple of {align}"
        )
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
    sparse = None
    if not se_given:  # dense gates: sample the first row chunk's density
        rc0 = min(row_chunk, N) if row_chunk is not None else default_row_chunk(mem, g, se)
        sparse = g.form != "dense" or _sample_density(g, rc0) <= _SPARSE_DENSITY
    prm = choose_parameters(mem, g, row_chunk, tile, se if se_given else None, sparse)
    atoms = _choose_decomposition(decomposition, g, prm, mem, client, out)
    if atoms and not prm["streaming"]:
        if se_given:
            raise InvalidArgumentError(
                f"decomposition='atoms' streams every row chunk through each task, so split_every must "
                f"be at least the number of row chunks ({prm['n_chunks']}), got {se}")
        prm = choose_parameters(mem, g, prm["row_chunk"], tile, max(2, prm["n_chunks"]), sparse)
    rc, se, fan, T, nb = prm["row_chunk"], prm["split_every"], prm["fan_in"], prm["tile"], prm["n_blocks"]
    all_tiles = _tiles(nb)
    units = [_unit(i, j) for i, j in all_tiles]
    params = {"row_chunk": rc, "tile": T, "split_every": se}
    if threshold_spec is not None:  # absent for the default, so earlier stores keep their identity
        params["fire_threshold"] = threshold_spec
    spec = {"kind": "coactivation", "version": _FORMAT_VERSION, "inputs": inputs,
            "n_tokens": N, "k_atoms": K, "params": params}
    meta = {"n_tokens": N, "k_atoms": K, "tile": T, "row_chunk": rc, "split_every": se,
            "gates_form": g.form, "gates_dtype": str(g.dtype),
            "fire_threshold": threshold_spec or {"kind": "scalar", "value": 0.0}}
    if window is not None:
        meta.update(window=g.window, seq_len=g.seq_len, n_source_tokens=g.n_source_tokens)
    _, job = _prepare_store(out, spec, units, meta, overwrite)

    pending = [_parse_unit(u) for u in job.pending()]
    if _units is not None:  # test hook: compute only these tiles (simulates an interrupted job)
        wanted = {tuple(u) if not isinstance(u, str) else _parse_unit(u) for u in _units}
        pending = [t for t in pending if t in wanted]
    streaming = prm["streaming"]
    # streaming: one task per group, so as many groups as keep every worker busy to the end
    if atoms:  # squares of tiles over an atom-major copy (largest first)
        squares = am.square_groups(pending, nb, _side or am.default_side(mem, T, nb))
        groups, group_ranges = [t for t, _ in squares], [r for _, r in squares]
    else:
        groups = _group_tiles(pending, T, mem, fan, _MIN_STREAM_GROUPS if streaming else 1,
                              n_workers(client) if streaming else 1)
    # pair products bucketed per scatter pass (12 bytes each): at most 1/10 of a worker's memory
    scatter_pairs = int(max(1 << 16, min(ker.SCATTER_BUFFER_PAIRS, mem // (10 * 12))))
    # when every group reads every chunk, workers keep the sparse rows they read, within 1/8 of memory
    # (CSR-form sources always: their rows cost a read, a decode or an encode each time)
    reread_costly = g.form == "sparse" or window is not None  # a read, a decode, an encode or a reduction
    cache_key = job.fingerprint if len(groups) > 1 and (streaming or reread_costly) and not atoms else None
    cache_bytes = int(mem // 8)
    scattered = None
    if hasattr(g, "job_source") and groups:
        try:
            # an atom-major job reads each chunk once (its copy), whatever the number of squares
            g, scattered = _prepare_source(g, out, 1 if atoms else len(groups), rc, client)
        except BaseException as exc:
            job.fail(f"{type(exc).__name__}: {exc}")
            raise
    chunks = _sources(g, rc, client, scattered)
    R = len(chunks)
    n_leaves = math.ceil(R / se)
    n_run = len(pending)
    skipped = len(units) - len(job.pending())
    t_start = time.time()
    state = {"work": 0, "units_done": skipped, "computed": 0, "routes": [0, 0], "t0": t_start}
    # rows done by tasks still running (their worker events), times their group's tile count
    running: dict[str, int] = {}
    ended: set[str] = set()
    lock = threading.RLock()

    def report(force=False):
        with lock:
            _report(force)

    def _report(force):
        now = time.time()
        if not force and now - state.get("last", 0) < min(0.5, _progress_every):
            return
        state["last"] = now
        elapsed = max(now - t_start, 1e-9)
        rows_processed = min(N, (state["work"] + sum(running.values())) / n_run) if n_run else 0
        phase = {}
        if atoms:  # two phases, each with its own rows and rate: the copy, then the square tasks
            copying = "copied" in state
            phase = {"phase": "atom-major copy" if copying else "tiles", "phase_done": None, "phase_total": None}
            if copying:
                rows_processed = min(N, state["copied"] + sum(running.values()))
                phase.update(phase_done=int(rows_processed), phase_total=N)
        rate = rows_processed / max(now - state["t0"], 1e-9)
        info = job.update_progress(
            units_done=state["units_done"], units_total=len(units), units_skipped=skipped,
            units_computed=state["computed"], units_in_run=n_run, rows_processed=int(rows_processed),
            rows_total=N if n_run else 0, elapsed_s=round(elapsed, 3),
            throughput_rows_per_s=round(rate, 1),
            routes={"scatter": state["routes"][0], "blas": state["routes"][1]},
            row_chunk=rc, tile=T, split_every=se, n_groups=len(groups), n_leaves_per_group=n_leaves,
            decomposition="atoms" if atoms else "rows", **phase,
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
                "diag_blocks": diag, "form": g.form, "scatter_pairs": scatter_pairs, "threshold": threshold,
                "cache_key": cache_key, "cache_bytes": cache_bytes,
                "cnt_dtype": np.dtype(ker.count_dtype(N)).name, "progress": (topic, float(_progress_every))}
        if atoms:
            plan["copy"] = {"ranges": group_ranges[gi]}
        tok = tokenize(fp, tiles, rc, se, atoms)
        if n_leaves == 1:  # one task streams every row chunk and writes the tiles itself
            final = dask.delayed(_leaf_and_finalize, pure=True)(
                plan, copy_chunks if atoms else chunks, out, job, tuple(_fail_units),
                dask_key_name=f"distpen-coact-stream-{tok}")
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

    topic = f"distpen-coact-progress-{fp[:16]}-{uuid.uuid4().hex[:8]}"

    def on_event(event):
        msg = event[1] if isinstance(event, tuple) else event
        key = msg.get("key")
        with lock:
            meta = meta_of.get(key)
            if meta is not None and key not in ended:
                running[key] = int(msg.get("rows", 0)) * meta[2]

    stop = threading.Event()

    def tick():  # progress.json and the callback move while long tasks run, not only when they end
        while not stop.wait(_progress_every):
            report()

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

    client.subscribe_topic(topic, on_event)
    ticker = threading.Thread(target=tick, name="distpen-coact-progress", daemon=True)
    ticker.start()
    try:
        if atoms:
            copy_plan = {"tile": T, "k_atoms": K, "form": g.form, "threshold": threshold, "cache_key": None,
                         "width": int(g.row_width()), "entry_bytes": _copy_entry_bytes(g)}
            copy_chunks = _copy_round(client, chunks, out, fp, copy_plan, nb, state, lock, report)
        while next_group < len(groups) and next_group < in_flight_max:
            submit(next_group)
            next_group += 1
        for fut in ac:
            with lock:  # a task's rows move from `running` to `work` in one step the ticker cannot split
                ended.add(fut.key)
                kind, gi, n_tiles, rows = meta_of.pop(fut.key)
            if fut.status == "error":
                fut.result()  # raises the task's exception
            if kind == "leaf":
                with lock:
                    running.pop(fut.key, None)
                    state["work"] += rows * n_tiles
                fut.release()
                report()
                continue
            res = fut.result()
            fut.release()
            with lock:
                running.pop(fut.key, None)
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
        stop.set()      # no progress write may land after the failure is recorded
        ticker.join()
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
        stop.set()
        ticker.join()
        client.unsubscribe_topic(topic)
        _release_worker_buffers(client)
    job.finish(units_computed=state["computed"])
    if not job.pending():
        shutil.rmtree(scratch_dir(out), ignore_errors=True)
    report(force=True)
    return CoactivationStats(out, allow_incomplete=_units is not None)


def _choose_decomposition(decomposition, g, prm, mem, client, out) -> bool:
    """Whether the job runs the atom-major decomposition (see ``coactivation_stats``). The default
    takes it only when the forecast says it is over twice as fast and the disk under ``out`` can
    hold the copy."""
    if decomposition == "rows":
        return False
    if decomposition == "atoms":
        if isinstance(g, WindowedGates):
            raise InvalidArgumentError("decomposition='atoms' does not take window= (a window's rows are dense: "
                                       "they are made from the tokens' rows inside each task); use 'rows'")
        if g.form not in ("topk", "sparse"):
            raise InvalidArgumentError(f"decomposition='atoms' needs top-k or CSR gates, got {g.form} gates")
        return True
    if g.form != "topk" or not prm["streaming"] or prm["n_blocks"] < 2:
        return False
    from ..cluster import n_workers
    from .forecast import plan_atom_major

    fc = plan_atom_major(g.n_tokens, g.k_atoms, topk=int(g.row_width()), n_workers=max(1, n_workers(client)),
                         memory_limit=int(mem), tile=prm["tile"], row_chunk=prm["row_chunk"])
    if fc["speedup"] <= 2.0:
        return False
    where = os.path.abspath(out)
    while not os.path.exists(where):  # the store may not exist yet: the disk it will be on
        where = os.path.dirname(where)
    need = _copy_bytes(g.n_tokens, 1, int(g.row_width()), _copy_entry_bytes(g), prm["n_blocks"])
    return need <= shutil.disk_usage(where).free


def _copy_entry_bytes(g) -> int:
    """Bytes an entry of the atom-major copy takes: its row (int32), atom and gate."""
    cdt, vdt = ker.csr_dtypes(g.k_atoms, np.dtype(g.dtype))
    return 4 + np.dtype(cdt).itemsize + np.dtype(vdt).itemsize


def _copy_bytes(n_rows: int, n_files: int, width: int, entry_bytes: int, n_blocks: int) -> int:
    """At most the bytes of the copy files of ``n_rows`` rows in ``n_files`` files: ``width``
    entries a row, plus each file's block offsets and ``.npy`` headers."""
    return n_rows * width * entry_bytes + n_files * (8 * (n_blocks + 1) + 512)


def _copy_round(client, chunks, out, fp, plan, n_blocks, state, lock, report):
    """Write the atom-major copy of every row chunk that has none yet (one task each, at most a few
    per worker in flight); returns the square tasks' chunks ``(r0, r1, copy file, 0)``."""
    from distributed import as_completed

    directory = am.copy_dir(scratch_dir(out), fp)
    os.makedirs(directory, exist_ok=True)
    copies = [(r0, r1, am.copy_path(directory, r0, r1), 0) for r0, r1, _, _ in chunks]
    todo = [(c, p) for c, p in zip(chunks, copies) if not os.path.exists(p[2])]
    rows_todo = sum(c[1] - c[0] for c, _ in todo)
    _check_copy_room(directory, rows_todo, len(todo), plan["width"], plan["entry_bytes"], n_blocks)
    with lock:
        state["copied"] = sum(r1 - r0 for r0, r1, _, _ in chunks) - rows_todo
    report(force=True)
    import dask

    from ..cluster import n_workers

    nxt, in_flight = 0, max(2, 2 * n_workers(client))
    ac = as_completed(with_results=False, loop=client.loop)

    def submit(i):
        chunk, copy = todo[i]
        task = dask.delayed(_copy_chunk, pure=True)(plan, n_blocks, chunk, copy[2],
                                                    dask_key_name=f"distpen-coact-copy-{fp[:16]}-{chunk[0]}")
        ac.add(client.compute(task, optimize_graph=False, priority=-i))

    try:
        while nxt < len(todo) and nxt < in_flight:
            submit(nxt)
            nxt += 1
        for fut in ac:
            res = fut.result()  # raises the task's exception
            fut.release()
            with lock:
                state["copied"] += res["rows"]
            report()
            if nxt < len(todo):
                submit(nxt)
                nxt += 1
    except BaseException:
        for f in list(ac.futures):
            f.cancel()
        raise
    report(force=True)  # the copy phase's last report says every row is copied
    with lock:
        del state["copied"]
        state["t0"] = time.time()  # the square tasks' rate is measured from here
    return copies


def _check_copy_room(directory: str, n_rows: int, n_files: int, width: int, entry_bytes: int,
                     n_blocks: int) -> None:
    """Refuse, before any copy task runs, an atom-major copy the disk cannot hold: the ``n_rows``
    rows of the ``n_files`` chunks still to copy (see :func:`_copy_bytes`)."""
    need = _copy_bytes(n_rows, n_files, width, entry_bytes, n_blocks)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise StoreError(
            f"decomposition='atoms' writes an atom-major copy of the gates into {directory}: it needs up to "
            f"{need / 2**30:.2f} GiB ({n_files} row chunks of up to {width} entries a row, {entry_bytes} bytes "
            f"each) and the disk has {free / 2**30:.2f} GiB free; free some space, put the store on a larger "
            f"disk, or pass decomposition='rows'")


def scratch_dir(out: str) -> str:
    """The job's scratch directory, inside the run store (so every worker that sees ``out`` sees
    it): delphi shard indexes, spilled encoded chunks. Removed when the job completes."""
    return os.path.join(out, "_distpen", STAGE, "scratch")


def _prepare_source(g, out: str, passes: int, row_chunk: int, client):
    """The source the job reads and its future on the cluster (it is sent once), after the
    source's one-off calls (``job_source``) ran on the workers, one task each (e.g. indexing each
    delphi shard once)."""
    scratch = scratch_dir(out)
    os.makedirs(scratch, exist_ok=True)
    src, calls = g.job_source(scratch, passes, row_chunk)
    fut = client.scatter(src, broadcast=False, hash=True)  # once: the job's row chunks read it too
    if calls:
        futs = [client.submit(fn, fut, *args, pure=False) for fn, *args in calls]
        try:
            client.gather(futs)
        finally:
            for f in futs:
                f.cancel()
    return src, fut
