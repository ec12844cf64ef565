"""Distributed evaluation, Gauss-Newton assembly and Newton steps, printed side by side.

Run ``python benchmarks/assembly.py`` for the issue's sizes (several minutes on 2 cores) or
``python benchmarks/assembly.py --quick`` for a small smoke run (< 60 s).

1. ``dp.evaluate`` on the decoder incoherence penalty, K = 32 768 atoms, M = 4, p_out = 256,
   10⁶ random pairs (β = 33.5 M coefficients): every op's pairs/s and GFLOP/s next to a GEMM peak
   measured in the same run, on a ``LocalCluster`` of 1 worker × 1 kernel thread and of 2 workers ×
   1 kernel thread, against one in-process call of the same penalty method on 1 thread and on every
   core. Targets (per-core scaling, same kernels): 2 workers × 1 thread ≥ 1.8× the in-process call
   on 1 thread; 1 worker × 1 thread within 10% of it; a second ``Resident.evaluate`` sends no β
   (bytes scattered counted). Plus the client- and worker-side overheads of the distributed path
   measured one by one (plan construction, pickled parts, scatter of t, the gather of each part's
   decoder rows).
2. ``dp.assemble_majorizer`` into a Zarr run store: tiles/s and MB/s written (logical tile bytes and
   the chunk bytes on disk, which Zarr compresses with zstd by default) against a disk write
   bandwidth measured in the same run and directory (``fsync``ed). Target ≥ 50%.
3. ``dp.newton_step`` with the vectors on the workers (default) and on the client, to 1e-8 with the
   none / Jacobi / block preconditioners at n ≈ 1 M, then a fixed number of block-preconditioned
   iterations at n = 16.8 M and 67 M: time per PCG iteration against one in-process Gauss-Newton
   product (target ≤ 2×) and the client's peak memory growth (target: flat in n).

Every distributed result is checked against the in-memory penalty before it is reported.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import check as _check  # noqa: E402
from _common import (
    disk_write_bandwidth,
    file_write_bandwidth,
    fmt_ms,
    gemm_peak,
    machine_line,
    print_table,
    time_best,
)

from coactivation import PeakRSS  # noqa: E402

import distpen as dp  # noqa: E402

RTOL = 1e-12

# flops per pair in units of M_j·M_k·p (minimal counts, as in benchmarks/penalties.py)
FLOPS_PER_MMP = {"value": 2, "grad": 6, "hvp": 14, "psd_majorizer_hvp": 8}
EVAL_OPS = ("value", "grad", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag")


def check(name: str, got, ref, rtol: float = RTOL) -> float:
    return _check(name, got, ref, rtol)


def random_pairs(rng, k_atoms: int, n_pairs: int):
    """``n_pairs`` distinct uniformly random pairs ``j < k`` (no K² intermediate), weights in [0.1, 1)."""
    codes = np.zeros(0, dtype=np.int64)
    while codes.shape[0] < n_pairs:
        a = rng.integers(0, k_atoms, size=int(1.3 * n_pairs) + 16)
        b = rng.integers(0, k_atoms, size=a.shape[0])
        keep = a != b
        new = np.minimum(a, b)[keep] * k_atoms + np.maximum(a, b)[keep]
        codes = np.unique(np.concatenate([codes, new]))
    codes = np.sort(rng.permutation(codes)[:n_pairs])
    return codes // k_atoms, codes % k_atoms, rng.uniform(0.1, 1.0, n_pairs)


def make_problem(seed: int, k_atoms: int, m: int, p: int, n_pairs: int):
    rng = np.random.default_rng(seed)
    j, k, w = random_pairs(rng, k_atoms, n_pairs)
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), np.full(k_atoms, m), p, weight=0.7)
    t = rng.standard_normal(pen.n_coef) / np.sqrt(p)
    v = rng.standard_normal(pen.n_coef) / np.sqrt(p)
    return pen, t, v


def op_flops(pen, op: str) -> float:
    if op == "psd_majorizer_diag":  # column sums of squares, then a K×K sparse matvec of p-vectors
        return 2.0 * pen.n_coef + 4.0 * len(pen.pairs) * pen.p_out
    m = pen.block_sizes
    mmp = float(np.sum(m[pen.pairs.j] * m[pen.pairs.k])) * pen.p_out
    return FLOPS_PER_MMP[op] * mmp


def in_process(pen, op: str, t, v):
    rho = np.zeros(0)
    return {"value": lambda: pen.value(t, rho), "grad": lambda: pen.grad_target(t, rho),
            "hvp": lambda: pen.hvp(t, rho, v), "psd_majorizer_hvp": lambda: pen.psd_majorizer_hvp(t, rho, v),
            "psd_majorizer_diag": lambda: pen.psd_majorizer_diag(t, rho)}[op]


def make_cluster(n_workers: int, kernel_threads: int | None = None):
    """``n_workers`` single-threaded workers; ``kernel_threads`` caps the threads of distpen's kernels
    in each (``NUMBA_NUM_THREADS``, which :func:`distpen._parallel.default_threads` reads): by default
    a task's kernels take the host's cores shared by its tasks."""
    from distributed import Client, LocalCluster

    # the workers inherit this process's environment when they are spawned (a Nanny's env= comes too
    # late: a spawned worker imports this script, hence numba, before it is applied)
    saved = os.environ.get("NUMBA_NUM_THREADS")
    if kernel_threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(int(kernel_threads))
    import dask

    from distpen.cluster import embedded_worker_config

    try:
        with dask.config.set(embedded_worker_config()):  # as distpen's embedded cluster makes them
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, host="127.0.0.1")
    finally:
        if saved is None:
            os.environ.pop("NUMBA_NUM_THREADS", None)
        else:
            os.environ["NUMBA_NUM_THREADS"] = saved
    return cluster, Client(cluster)  # the default client: distpen's get_client() finds it


def close_cluster(cc) -> None:
    cluster, client = cc
    client.close()
    cluster.close()


def warm_up_cluster(workdir: str) -> None:
    """Load every compiled kernel in every worker (the first call of a numba kernel loads it)."""
    pen, t, v = make_problem(99, 16, 2, 8, 40)
    rho = np.zeros(0)
    for _ in range(2):  # twice: each worker gets parts
        dp.evaluate(pen, t, rho, ops=EVAL_OPS, v=v)
    d = tempfile.mkdtemp(prefix="warm-", dir=workdir)
    try:
        dp.assemble_majorizer(pen, t, rho, os.path.join(d, "a"), tile=16)
        dp.newton_step(pen, t, rho, v, damping=1.0, precond="block", maxiter=3)
        dp.newton_step(pen, t, rho, v, damping=1.0, precond="jacobi", maxiter=3)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def worker_threads(client) -> int:
    from distpen._workers import threads_per_task

    return threads_per_task(client)


# ------------------------------------------------------------------ 1. evaluate
def bench_evaluate_setup(args):
    if args.quick:
        K, m, p, n_pairs = 2048, 4, 64, 20_000
    else:
        K, m, p, n_pairs = 32_768, 4, 256, 1_000_000
    t0 = time.perf_counter()
    pen, t, v = make_problem(0, K, m, p, n_pairs)
    t_build = time.perf_counter() - t0
    print(f"\n[1] dp.evaluate, DecoderIncoherencePenalty: K = {K}, M = {m}, p_out = {p}, {n_pairs:,} random pairs, "
          f"β = {pen.n_coef:,} coefficients ({pen.n_coef * 8 / 2**20:.0f} MiB), built in {t_build:.1f} s", flush=True)
    return pen, t, v


def bench_in_process(args, pen, t, v, ev):
    """One in-process call of each penalty method: the kernels on every core, then on 1 thread."""
    from distpen._parallel import default_threads

    small, ts, vs = make_problem(98, 16, 2, 8, 40)
    for op in EVAL_OPS:  # load the cached kernels
        in_process(small, op, ts, vs)()
    all_threads = default_threads()
    ev["inproc_threads"] = all_threads
    ev["ref"] = {}
    from distpen._workers import kernel_threads

    # distpen's kernels run on its own thread pool (distpen._parallel), which numba.set_num_threads does
    # not limit: kernel_threads is what a worker task uses, so the 1-thread reference is one thread
    for threads, key in ((all_threads, "inproc"), (1, "inproc1")):
        with kernel_threads(threads):
            for op in EVAL_OPS:
                fn = in_process(pen, op, t, v)
                if key == "inproc":
                    box = {}
                    tm = time_best(lambda: box.__setitem__("r", fn()), repeat=args.repeat, warmup=0)
                    ev["ref"][op] = box["r"]
                else:
                    tm = time_best(fn, repeat=1 if not args.quick else args.repeat, warmup=0)
                ev.setdefault(key, {})[op] = tm.best
                print(f"    in-process, kernel threads {threads}: {op:<18} {fmt_ms(tm.best):>9}", flush=True)


def bench_plan_overheads(args, pen, t, ev):
    """Client-side plan construction and the per-part worker-side gather, measured in this process."""
    from distpen.curvature._vectors import VectorSource
    from distpen.curvature.evaluate import _run_part
    from distpen.curvature.plan import DecoderPlan

    rows = []
    for n_parts in (4, 8):  # evaluate's default: 4 parts per worker thread (1 and 2 workers)
        tm = time_best(lambda: DecoderPlan.balanced(pen, n_parts), repeat=2, warmup=0)
        plan = DecoderPlan.balanced(pen, n_parts)
        pickled = sum(len(pickle.dumps(part, protocol=5)) for part in plan.parts)
        local = [part.local.n_coef for part in plan.parts]
        rows.append([f"DecoderPlan.balanced(pen, {n_parts})", fmt_ms(tm.best),
                     f"{pickled / 2**20:.1f} MiB pickled",
                     f"each part reads {np.mean(local) / pen.n_coef:.0%} of β (mean), "
                     f"{np.mean([len(x.local.pairs) for x in plan.parts]):,.0f} pairs"])
        ev.setdefault("plan", {})[n_parts] = tm.best
    plan = DecoderPlan.balanced(pen, 8)
    part = plan.parts[0]
    src = VectorSource("numpy", t, pen.n_coef)
    tg = time_best(lambda: src.read_ranges(part.starts, part.lengths, t), repeat=2, warmup=0)

    def slices():  # the same rows as merged contiguous runs of slices
        s, e = part.starts, part.starts + part.lengths
        brk = np.flatnonzero(s[1:] != e[:-1]) + 1
        lo, hi = s[np.r_[0, brk]], e[np.r_[brk - 1, s.shape[0] - 1]]
        return np.concatenate([t[a:b] for a, b in zip(lo, hi)])

    assert np.array_equal(slices(), src.read_ranges(part.starts, part.lengths, t))
    ts = time_best(slices, repeat=2, warmup=0)
    ev["gather_part"] = tg.best
    n_runs = int(np.count_nonzero(part.starts[1:] != (part.starts + part.lengths)[:-1]) + 1)
    rows.append(["VectorSource.read_ranges, one of 8 parts", fmt_ms(tg.best),
                 f"{part.lengths.sum() * 8 / 2**20:.0f} MiB",
                 f"index array of {part.lengths.sum():,} int64 + fancy take; the same rows as "
                 f"{n_runs} merged slices: {fmt_ms(ts.best)}"])
    # serial sum of the 8 parts (one thread) vs one in-process call on one thread: decomposition cost
    rho = np.zeros(0)
    serial = 0.0
    for prt in plan.parts:
        t0 = time.perf_counter()
        _run_part(prt, src, t, None, None, rho, ("value",), 1)
        serial += time.perf_counter() - t0
    ev["serial_value_parts"] = serial
    rows.append(["8 parts of 'value' run one after another, 1 thread", fmt_ms(serial), "",
                 f"one in-process value call on 1 thread: {fmt_ms(ev['inproc1']['value'])}"])
    ev["overhead_rows"] = rows


def bench_cluster_evaluate(args, pen, t, v, n_workers, ev):
    client = __import__("distpen").cluster.get_client()
    from distpen._parallel import default_threads

    # what a task's kernels get: the cores per task, capped by the worker's NUMBA_NUM_THREADS
    threads = min(worker_threads(client), min(client.run(default_threads).values()))
    ev.setdefault("worker_threads", {})[n_workers] = threads
    rho = np.zeros(0)
    tsc = time_best(lambda: client.scatter(t, broadcast=True, hash=False), repeat=2, warmup=0)
    ev.setdefault("scatter", {})[n_workers] = tsc.best
    errs = {}
    from distpen._broadcast import BROADCASTS

    for op in EVAL_OPS:
        box = {}
        vv = v if op in ("hvp", "psd_majorizer_hvp") else None
        BROADCASTS.clear()  # cold: the penalty, t (and v) are sent to the workers by this call
        t0 = time.perf_counter()
        dp.evaluate(pen, t, rho, ops=(op,), v=vv)
        cold = time.perf_counter() - t0
        # warm: the same penalty and t again (an optimiser's next operation on the same point)
        tm = time_best(lambda: box.__setitem__("r", dp.evaluate(pen, t, rho, ops=(op,), v=vv)), repeat=args.repeat,
                       warmup=0)
        errs[op] = check(f"evaluate {op} ({n_workers} workers)", box["r"][op], ev["ref"][op])
        ev.setdefault(f"w{n_workers}", {})[op] = tm.best
        ev.setdefault(f"w{n_workers}cold", {})[op] = cold
        print(f"    {n_workers} worker(s) × {threads} kernel thread(s): {op:<18} {fmt_ms(tm.best):>9} "
              f"(first call, sending penalty and t: {fmt_ms(cold)}; rel. err. {errs[op]:.1e})", flush=True)
    BROADCASTS.clear()
    ev.setdefault("errs", {})[n_workers] = max(errs.values())
    # a resident penalty: the second call sends nothing of β (every scatter's bytes are counted)
    sent = []
    real = type(client).scatter

    def counting(self, data, *a, **kw):
        sent.append(sum(getattr(x, "nbytes", 0) for x in (data if isinstance(data, (list, tuple)) else [data])))
        return real(self, data, *a, **kw)

    type(client).scatter = counting
    try:
        with dp.Resident(pen, t, rho) as res:
            res.evaluate(ops=("grad",))
            first = sum(sent)
            sent.clear()
            t0 = time.perf_counter()
            res.evaluate(ops=("grad",))
            ev.setdefault("resident", {})[n_workers] = (first, sum(sent), time.perf_counter() - t0)
    finally:
        type(client).scatter = real
    first, second, t2 = ev["resident"][n_workers]
    print(f"    {n_workers} worker(s): Resident.evaluate(grad) scattered {first / 2**20:,.1f} MiB on its first call, "
          f"{second / 2**20:,.1f} MiB on the second ({fmt_ms(t2)})", flush=True)


def report_evaluate(args, pen, ev, peak, summary):
    n_pairs = len(pen.pairs)
    rows = []
    for op in EVAL_OPS:
        fl = op_flops(pen, op)
        ti, t1, w1, w2 = ev["inproc"][op], ev["inproc1"][op], ev["w1"][op], ev["w2"][op]
        gf = fl / w2 / 1e9
        rows.append([op, f"{fl / 1e9:.1f}", fmt_ms(t1), fmt_ms(ti), fmt_ms(w1), fmt_ms(w2),
                     fmt_ms(ev["w2cold"][op]),
                     f"{n_pairs / w2 / 1e6:.2f} M", f"{gf:.2f}", f"{100 * gf / peak:.0f}%",
                     f"{fl / ti / 1e9:.2f}", f"{w1 / w2:.2f}x", f"{ti / w2:.2f}x", f"{t1 / w2:.2f}x"])
        summary.append([f"evaluate {op}: 2 workers × 1 thread vs one in-process call on 1 thread", t1, w2, 1.8])
        summary.append([f"evaluate {op}: 1 worker × 1 thread vs one in-process call on 1 thread", t1, w1, 0.9])
    it = ev["inproc_threads"]
    print_table(["op", "GFLOP", "in-proc 1 thr", f"in-proc {it} thr", "1 worker", "2 workers", "2 workers, 1st call",
                 "pairs/s (2w)", "GFLOP/s (2w)", "of peak", f"GFLOP/s in-proc {it} thr",
                 "2w vs 1w", f"2w vs in-proc {it} thr", "2w vs in-proc 1 thr"], rows)
    print(f"    float64 GEMM peak measured now: {peak:.1f} GFLOP/s (numpy matmul, square, all cores)")
    print(f"    'one in-process call' = the penalty method (pen.value, pen.grad_target, pen.hvp, "
          f"pen.psd_majorizer_hvp, pen.psd_majorizer_diag) called once in this process on numpy β, "
          f"its kernels on {it} threads ('in-proc {it} thr') and on 1 thread ('in-proc 1 thr', the targets' "
          f"reference: distpen's own thread pool, limited as in a worker task)")
    print(f"    dp.evaluate(pen, t, rho, ops=(op,)) end to end from numpy t (plan on the client, tasks, gather of "
          f"results): 1 worker × {ev['worker_threads'][1]} kernel thread, "
          f"2 workers × {ev['worker_threads'][2]} kernel thread; best of {args.repeat} repeated calls on "
          f"the same penalty and t (sent to the workers once); '1st call' also sends them")
    for nw, (first, second, _) in sorted(ev.get("resident", {}).items()):
        summary.append([f"Resident.evaluate, {nw} worker(s): β bytes sent by the second call",
                        ("bytes", first, second), None, None])
    print(f"    every result equals the in-process one: max relative error {max(ev['errs'].values()):.1e} "
          f"(≤ {RTOL:g})")
    print("    flops per pair in units of M_j·M_k·p: value 2, grad 6, hvp 14, psd_majorizer_hvp 8 (minimal counts); "
          "psd_majorizer_diag: 2n + 4·pairs·p")
    rows = list(ev["overhead_rows"])
    rows.append(["client.scatter(t, broadcast=True), 1 worker / 2 workers",
                 f"{fmt_ms(ev['scatter'][1])} / {fmt_ms(ev['scatter'][2])}", f"{pen.n_coef * 8 / 2**20:.0f} MiB",
                 "paid by the first dp.evaluate call on a new numpy t (and for each new v)"])
    print_table(["distributed-path overhead (measured in isolation)", "time", "size", "note"], rows,
                title="    Overheads of the distributed path")


# ------------------------------------------------------------------ 2. assembly
def chunk_bytes(store_dir: str, array: str, n: int, tile: int):
    """(files, logical bytes, bytes on disk) of the written chunks of the ``n × n`` array ``array``."""
    root = os.path.join(store_dir, array, "c")
    files = logical = disk = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).split(os.sep)
            i, jj = int(rel[0]), int(rel[1])
            rows = min(tile, n - i * tile)
            cols = min(tile, n - jj * tile)
            files += 1
            logical += rows * cols * 8
            disk += os.path.getsize(path)
    return files, logical, disk


def fsync_tree(path: str) -> None:
    for dirpath, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def zarr_write_ceiling(workdir: str, tile: int, n_tiles: int, compressed: bool) -> tuple[float, int]:
    """Seconds (incl. fsync) and bytes on disk to write ``n_tiles`` random dense tiles from this process."""
    import zarr

    d = tempfile.mkdtemp(prefix="ceiling-", dir=workdir)
    try:
        g = zarr.open_group(d, mode="a")
        kw = {} if compressed else {"compressors": None}
        a = g.create_array("X", shape=(tile * n_tiles, tile), chunks=(tile, tile), dtype="f8", fill_value=0.0, **kw)
        block = np.random.default_rng(1).standard_normal((tile, tile))
        t0 = time.perf_counter()
        for i in range(n_tiles):
            a[i * tile:(i + 1) * tile, :] = block
        fsync_tree(os.path.join(d, "X"))
        sec = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(dp_, f)) for dp_, _, fs in os.walk(os.path.join(d, "X", "c"))
                   for f in fs)
        return sec, disk
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench_assembly(args, workdir, summary):
    if args.quick:
        K, m, p, n_pairs, tile = 64, 4, 64, 40, 256
    else:
        K, m, p, n_pairs, tile = 512, 4, 256, 100, 1024
    pen, t, _ = make_problem(3, K, m, p, n_pairs)
    n = pen.n_coef
    rho = np.zeros(0)
    print(f"\n[2] dp.assemble_majorizer(format='tiles'): K = {K}, M = {m}, p_out = {p}, {n_pairs} random pairs, "
          f"n = {n:,} (H is {n * n * 8 / 2**40:.2f} TiB logical), tile = {tile} ({tile * tile * 8 / 2**20:.0f} MiB)",
          flush=True)
    disk_bw = disk_write_bandwidth(workdir, nbytes=(256 << 20) if args.quick else (2 << 30), repeat=2)
    out = os.path.join(workdir, "assembly.zarr")
    try:
        t0 = time.perf_counter()
        H = dp.assemble_majorizer(pen, t, rho, out, tile=tile)
        t_asm = time.perf_counter() - t0
        t0 = time.perf_counter()
        fsync_tree(out)
        t_sync = time.perf_counter() - t0
        files, logical, disk = chunk_bytes(out, "H", n, tile)
        tiles_written = int(H.attrs["tiles_written"])
        codec = ", ".join(type(c).__name__.replace("Codec", "").lower() for c in H.metadata.codecs[1:]) or "no compressor"
        assert files == tiles_written, (files, tiles_written)
        # spot-check tiles against the in-memory penalty
        rng = np.random.default_rng(5)
        written = []
        for dirpath, _, names in os.walk(os.path.join(out, "H", "c")):
            for name in names:
                written.append((int(os.path.basename(dirpath)), int(name)))
        errs = []
        for idx in rng.choice(len(written), size=min(4, len(written)), replace=False):
            I, J = written[idx]
            r0, c0 = I * tile, J * tile
            ref = np.zeros((min(tile, n - r0), min(tile, n - c0)))
            pen.accumulate_psd_majorizer_tile(t, rho, 1.0, ref, r0, c0)
            errs.append(check(f"tile {(I, J)}", H[r0:r0 + ref.shape[0], c0:c0 + ref.shape[1]], ref))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n_ceiling = 16 if args.quick else 64
    t_c, d_c = zarr_write_ceiling(workdir, tile, n_ceiling, True)
    t_u, d_u = zarr_write_ceiling(workdir, tile, n_ceiling, False)
    t_all = t_asm + t_sync
    file_bw = file_write_bandwidth(workdir, tile * tile * 8, n_ceiling, n_procs=2)
    rows = [
        ["assemble_majorizer (as returned)", f"{t_asm:.2f} s", f"{tiles_written / t_asm:.1f}",
         f"{logical / t_asm / 1e6:.0f}", f"{disk / t_asm / 1e6:.0f}", f"{disk / t_asm / 1e9 / disk_bw:.0%}"],
        ["assemble_majorizer + fsync of the chunks", f"{t_all:.2f} s", f"{tiles_written / t_all:.1f}",
         f"{logical / t_all / 1e6:.0f}", f"{disk / t_all / 1e6:.0f}", f"{disk / t_all / 1e9 / disk_bw:.0%}"],
        [f"ceiling: {n_ceiling} dense random tiles, one process, zstd (default)", f"{t_c:.2f} s",
         f"{n_ceiling / t_c:.1f}", f"{n_ceiling * tile * tile * 8 / t_c / 1e6:.0f}", f"{d_c / t_c / 1e6:.0f}",
         f"{d_c / t_c / 1e9 / disk_bw:.0%}"],
        [f"ceiling: {n_ceiling} dense random tiles, one process, no compressor", f"{t_u:.2f} s",
         f"{n_ceiling / t_u:.1f}", f"{n_ceiling * tile * tile * 8 / t_u / 1e6:.0f}", f"{d_u / t_u / 1e6:.0f}",
         f"{d_u / t_u / 1e9 / disk_bw:.0%}"],
    ]
    rows.append([f"ceiling: {n_ceiling} plain files of one tile each, 2 processes, fsync (no Zarr)", "", "", "",
                 f"{file_bw * 1e3:.0f}", f"{file_bw / disk_bw:.0%}"])
    print_table(["what", "time", "tiles/s", "logical MB/s", "on-disk MB/s", "on-disk vs disk bw"], rows)
    n_tiles = -(-n // tile)
    print(f"    {tiles_written} of {n_tiles * n_tiles:,} tiles written: {logical / 2**30:.2f} GiB logical, "
          f"{disk / 2**30:.2f} GiB on disk ({codec}; {disk / logical:.0%}); 2 workers; "
          f"fsync of the chunks afterwards took {t_sync:.2f} s")
    print(f"    disk write bandwidth measured now in the same directory: {disk_bw:.2f} GB/s "
          f"(sequential 64 MiB writes + fsync); spot-checked {len(errs)} tiles against "
          f"accumulate_psd_majorizer_tile: max rel. err. {max(errs):.1e}")
    print("    the ceiling rows write the same tile shape from the client process into a fresh Zarr array "
          "(time includes fsync) to show what Zarr's codec alone allows")
    summary.append(["assembly on-disk MB/s (incl. fsync) vs disk write bandwidth", None, None,
                    ("bw", disk / t_all / 1e9, disk_bw, 0.5)])
    print(f"    plain files of one tile each, written by 2 processes with fsync, reach {file_bw:.2f} GB/s here "
          f"({file_bw / disk_bw:.0%} of the sequential figure); assembly (incl. fsync) reaches "
          f"{disk / t_all / 1e9 / file_bw:.0%} of that")
    summary.append(["assembly on-disk MB/s (as returned) vs disk write bandwidth", None, None,
                    ("bw", disk / t_asm / 1e9, disk_bw, 0.5)])


# ------------------------------------------------------------------ 3. newton_step
def bench_newton(args, workdir, summary):
    """Per-iteration time of the worker-resident PCG and of the client-side one against one
    in-process Gauss-Newton product, and the client's memory growth, at n ≈ 1 M and the largest n run."""
    if args.quick:
        sizes = [(256, 4, 32, 2000, None)]
    else:
        # (K, M, p_out, pairs, iteration cap): n = 1.05 M to convergence; then n = 16.8 M and 67 M for a
        # fixed number of iterations (the per-iteration cost is what the target is about)
        sizes = [(4096, 4, 64, 40_000, None), (16384, 4, 256, 400_000, 12), (32768, 4, 512, 400_000, 8)]
    rel_damping = 0.1 if args.quick else 0.01
    for K, m, p, n_pairs, cap in sizes:
        pen, t, _ = make_problem(4, K, m, p, n_pairs)
        rho = np.zeros(0)
        rhs = pen.grad_target(t, rho)
        diag = pen.psd_majorizer_diag(t, rho)
        damping = rel_damping * float(np.mean(diag))
        maxiter = cap or 500
        tol = 1e-8 if cap is None else 1e-30
        n = pen.n_coef
        print(f"\n[3] dp.newton_step: K = {K}, M = {m}, p_out = {p}, {n_pairs:,} random pairs, n = {n:,} "
              f"({n * 8 / 2**20:,.0f} MiB a vector), rhs = ∇P(β), damping = {rel_damping:g}·mean(diag H_GN), "
              f"{'to 1e-8' if cap is None else f'{cap} iterations'}, 2 workers", flush=True)
        t_prod = time_best(lambda pen=pen, t=t, rhs=rhs: pen.psd_majorizer_hvp(t, rho, rhs), repeat=3, warmup=1).best
        rows, per_it = [], {}
        # at the large sizes the block preconditioner would hold K·p² floats (8.6 GB at K = 16 384,
        # p = 256; 69 GB at p = 512): Jacobi there
        for pre in (("none", "jacobi", "block") if cap is None else ("jacobi",)):
            for vectors in ("workers", "client"):
                # a first short solve loads the parts and the kernels; the timed one follows
                dp.newton_step(pen, t, rho, rhs, damping=damping, maxiter=2, precond=pre, vectors=vectors)
                with PeakRSS() as mem:
                    res = dp.newton_step(pen, t, rho, rhs, damping=damping, tol=tol, maxiter=maxiter, precond=pre,
                                         vectors=vectors)
                # per iteration: from a second solve with twice the iterations (setup and final gather cancel)
                t_long = time.perf_counter()
                dp.newton_step(pen, t, rho, rhs, damping=damping, tol=1e-30, maxiter=2 * res.iterations,
                               precond=pre, vectors=vectors)
                t_long = time.perf_counter() - t_long
                it_s = max(1e-9, (t_long - res.seconds) / max(1, res.iterations))
                per_it[(pre, vectors)] = it_s
                true_rel = float(np.linalg.norm(pen.psd_majorizer_hvp(t, rho, res.x) + damping * res.x - rhs)
                                 / np.linalg.norm(rhs))
                rows.append([pre, vectors, res.iterations, "yes" if res.converged else "-", f"{res.seconds:.2f} s",
                             fmt_ms(it_s), f"{it_s / t_prod:.2f}×", f"{mem.extra / 2**20:,.0f} MiB",
                             f"{true_rel:.1e}"])
                print(f"    {pre}/{vectors}: {res.iterations} iterations, {res.seconds:.2f} s, {fmt_ms(it_s)} an "
                      f"iteration, client +{mem.extra / 2**20:,.0f} MiB", flush=True)
        # the resident solve with x written to Zarr by the workers: what the client holds besides rhs
        # (b goes out in 16 MiB pieces, x never comes back); a first solve loads this path
        pre = "jacobi"
        zx = os.path.join(workdir, f"newton-x-{n}")
        dp.newton_step(pen, t, rho, rhs, damping=damping, maxiter=2, precond=pre, out=zx + "-warm")
        with PeakRSS() as mem:
            res = dp.newton_step(pen, t, rho, rhs, damping=damping, tol=tol, maxiter=maxiter, precond=pre, out=zx)
        rows.append([pre, "workers, out=Zarr", res.iterations, "yes" if res.converged else "-", f"{res.seconds:.2f} s",
                     "-", "-", f"{mem.extra / 2**20:,.0f} MiB", "-"])
        summary.append([f"client peak growth, n = {n:,} ({n * 8 / 2**20:,.0f} MiB a vector), resident solve with out=",
                        ("mib", mem.extra / 2**20), None, None])
        shutil.rmtree(zx, ignore_errors=True)
        shutil.rmtree(zx + "-warm", ignore_errors=True)
        print_table(["precond", "vectors", "iterations", "converged", "time", "time/iteration",
                     "vs 1 product", "client peak growth", "true residual"], rows)
        print(f"    one in-process psd_majorizer_hvp on this problem: {fmt_ms(t_prod)} (numba on every core); "
              "time/iteration = (time of a solve with 2× the iterations − time of this one) / iterations")
        for pre in sorted({k[0] for k in per_it}):
            summary.append([f"PCG iteration, n = {n:,} ({pre}): workers vs client", per_it[(pre, "client")],
                            per_it[(pre, "workers")], None])
            summary.append([f"PCG iteration / in-process product, n = {n:,} ({pre}, workers)", t_prod,
                            per_it[(pre, "workers")], None])
        del pen, t, rhs, diag


def print_summary(summary):
    rows = []
    for op, tp, td, target in summary:
        if isinstance(target, tuple):
            _, bw, ref, frac = target
            rows.append([op, f"{ref:.2f} GB/s", f"{bw:.2f} GB/s", f"{bw / ref:.0%}", f"≥ {frac:.0%}",
                         "yes" if bw / ref >= frac else "NO"])
        elif isinstance(tp, tuple) and tp[0] == "bytes":
            rows.append([op, f"{tp[1] / 2**20:,.1f} MiB (1st)", f"{tp[2] / 2**20:,.1f} MiB", "-", "0 bytes",
                         "yes" if tp[2] == 0 else "NO"])
        elif isinstance(tp, tuple) and tp[0] == "mib":
            rows.append([op, "-", f"{tp[1]:,.0f} MiB", "-", "flat in n", "-"])
        elif isinstance(tp, tuple):
            _, a, b = tp
            rows.append([op, f"{a} it", f"{b} it", f"{a / max(b, 1):.2f}x (none/precond)", "-", "-"])
        else:
            ratio = tp / td
            met = "-" if target is None else ("yes" if ratio >= target else "NO")
            rows.append([op, fmt_ms(tp), fmt_ms(td), f"{ratio:.2f}x", f"≥ {target:g}x" if target else "-", met])
    print_table(["comparison", "reference", "distpen", "ratio", "target", "met"], rows, title="Summary")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small problems: a smoke run of < 60 s")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each evaluate op (best is kept)")
    ap.add_argument("--workdir", default=None,
                    help="directory for the Zarr stores and the disk-bandwidth file (default: a temp dir in /tmp)")
    ap.add_argument("--only", choices=["evaluate", "assembly", "newton"], action="append",
                    help="run only these sections (repeatable)")
    args = ap.parse_args(argv)
    want = set(args.only or ["evaluate", "assembly", "newton"])
    workdir = tempfile.mkdtemp(prefix="distpen-bench-assembly-", dir=args.workdir)
    print(f"distpen assembly benchmarks{' (--quick)' if args.quick else ''}: {machine_line()}", flush=True)
    print(f"    load average at start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t_start = time.perf_counter()
    summary = []
    cc = None
    try:
        if "evaluate" in want:
            pen, t, v = bench_evaluate_setup(args)
            peak = gemm_peak(1500 if args.quick else 3000, repeat=2 if args.quick else 3)
            ev = {}
            bench_in_process(args, pen, t, v, ev)
            bench_plan_overheads(args, pen, t, ev)
            for nw in (1, 2):
                cc = make_cluster(nw, kernel_threads=1)
                warm_up_cluster(workdir)
                bench_cluster_evaluate(args, pen, t, v, nw, ev)
                if nw == 1:
                    close_cluster(cc)
                    cc = None
            report_evaluate(args, pen, ev, peak, summary)
            del pen, t, v, ev
        if want & {"assembly", "newton"}:
            if cc is None:
                cc = make_cluster(2)
                warm_up_cluster(workdir)
            if "assembly" in want:
                bench_assembly(args, workdir, summary)
            if "newton" in want:
                bench_newton(args, workdir, summary)
    finally:
        if cc is not None:
            close_cluster(cc)
        shutil.rmtree(workdir, ignore_errors=True)
    print_summary(summary)
    print(f"\n{machine_line()}; total {time.perf_counter() - t_start:.0f} s")
    print(f"    load average at end (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
