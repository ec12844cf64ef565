"""Co-activation at corpus scale: top-k gates, 10⁷ tokens × K = 32 768 latents on 2 workers.

One run measures, on the same machine and in the same process:

* the job end to end (``coactivation_stats`` from Zarr to the statistics store) on a
  ``LocalCluster`` of ``--workers`` single-threaded workers: tokens/s, the pair updates it did, ns per
  pair update per core, and each worker's peak RSS;
* the cache-resident scatter microbenchmark (the job's own kernel scattering into one 128² tile,
  192 KiB, in L2), and ``calibrate``'s rates into one 1024² tile (16 MiB) and a group of 64 tiles
  (1 GiB): the floor and the out-of-cache rates a pair update is compared with;
* the forecast of ``plan_coactivation`` with those calibrated rates, against the measured time;
* with ``--decomposition both`` (the default), the same job again with ``decomposition="atoms"``
  (an atom-major copy, then square tasks: :mod:`distpen.coactivation.atom_major`), its forecast
  (``plan_atom_major``), and a check that both stores hold the same bits.

The gates are made with ``distpen synth`` once and kept in ``--workdir`` (10⁷ tokens: 2.6 GB, about
3 minutes on 2 cores), so a second run (another commit, say) reuses them.

Usage::

    python benchmarks/scale.py --workdir /tmp/distpen-scale                 # 10⁷ × 32 768, k = 32
    python benchmarks/scale.py --workdir /tmp/distpen-scale --tokens 100000000
    python benchmarks/scale.py --quick                                      # 2·10⁵ × 4 096, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from coactivation import make_cluster, run_distpen  # noqa: E402


def resident_scatter_rate(rows: int = 200_000, k: int = 32, tile: int = 128, seed: int = 0) -> dict:
    """ns per pair update of the job's scatter kernel into one ``tile``² tile that stays in L2
    (128²: 192 KiB of float64 sums and int32 counts), both methods, one thread: the floor."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from distpen.coactivation import _kernels as ker

    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((rows, tile)), axis=1)[:, :k].astype(np.int32)
    val = rng.uniform(0.1, 1.0, (rows, k)).astype(np.float32)
    csr = ker.topk_block_csr(idx, val, 0, tile, tile)
    out = {}
    with threadpool_limits(1):
        for method in ("tile", "bucket"):
            s = np.zeros((1, tile, tile))
            c = np.zeros((1, tile, tile), dtype=np.int32)
            ws = ker.ScatterWorkspace()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                ker.scatter_group(csr, 0, tile, 1, [(0, 0)], [0], s, c, ws, method=method)
                best = min(best, time.perf_counter() - t0)
            out[method] = best / (rows * k * (k + 1) / 2) * 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--atoms", type=int, default=32_768)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="11GiB", help="per worker (default: the machine shared by 2)")
    ap.add_argument("--workdir", default=None, help="where the gates and the store go (kept)")
    ap.add_argument("--quick", action="store_true", help="2·10⁵ tokens × 4 096 latents")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--decomposition", choices=("rows", "atoms", "both"), default="both",
                    help="the row-major plan, the atom-major one, or both side by side (default)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.atoms = 200_000, 4096
    import dask.utils

    import distpen as dp
    from distpen.coactivation.forecast import calibrate, plan_atom_major, plan_coactivation

    workdir = args.workdir or tempfile.mkdtemp(prefix="distpen-scale-")
    os.makedirs(workdir, exist_ok=True)
    N, K, k = args.tokens, args.atoms, args.topk
    gates = os.path.join(workdir, f"gates-{N}-{K}-{k}.zarr")
    out = os.path.join(workdir, f"stats-{N}-{K}-{k}")
    mem = dask.utils.parse_bytes(args.memory_limit)
    print(f"distpen scale benchmark: N = {N:,}, K = {K:,}, k = {k}, {args.workers} workers × "
          f"{mem / 2**30:.1f} GiB, {os.cpu_count()} cores; work dir {workdir}", flush=True)

    rates = calibrate()
    resident = resident_scatter_rate()
    print(f"cache-resident scatter (one 128² tile): {resident['tile']:.2f} ns/pair straight from the rows, "
          f"{resident['bucket']:.2f} ns/pair bucketed", flush=True)
    print("calibrated per-core rates: " + ", ".join(f"{n} {v:.3g}" for n, v in rates.items()), flush=True)
    cluster, client = make_cluster(args.workers, mem)
    try:
        if not os.path.exists(os.path.join(gates, ".done")):
            t0 = time.perf_counter()
            shutil.rmtree(gates, ignore_errors=True)
            dp.synth_gates(gates, N, K, topk=k, seed=2, client=client)
            open(os.path.join(gates, ".done"), "w").close()
            print(f"synthesised the gates in {time.perf_counter() - t0:.0f} s", flush=True)
        g = dp.open_gates(gates)
        plan = plan_coactivation(N, K, topk=k, n_workers=args.workers, memory_limit=mem,
                                 stored_chunk=g.row_chunk_hint(), rates=rates)
        print(plan, flush=True)
        kinds = ["rows", "atoms"] if args.decomposition == "both" else [args.decomposition]
        runs = {}
        for kind in kinds:
            if kind == "atoms":
                fc = plan_atom_major(N, K, topk=k, n_workers=args.workers, memory_limit=mem, tile=plan.tile,
                                     row_chunk=plan.row_chunk, rates=rates)
                print(f"atom-major plan: {fc['n_tasks']} square tasks of {fc['blocks_per_side']}² blocks, "
                      f"predicted {fc['predicted_s']:,.0f} s: "
                      + ", ".join(f"{n} {v:,.0f} s" for n, v in fc["breakdown_s"].items()), flush=True)
                predicted = fc["predicted_s"]
            else:
                predicted = plan.predicted_s
            # the job chooses row_chunk and split_every (streaming) the same way for both: same bits
            wall, st, peak = run_distpen(client, gates, f"{out}-{kind}", decomposition=kind)
            runs[kind] = (wall, st, peak, predicted)
            print(f"{kind}: end to end {wall:.1f} s, {N / wall:,.0f} tokens/s, peak RSS {peak / 2**30:.2f} GiB",
                  flush=True)
        same = None
        if len(runs) == 2:  # same bits: every per-atom vector and a sample of tiles
            a, b = runs["rows"][1], runs["atoms"][1]
            nbk = -(-K // plan.tile)
            same = all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("fire_count", "gate_sum", "gate_sq_sum"))
            for i, j in [(0, 0), (0, nbk - 1), (nbk // 2, nbk // 2 + 1), (nbk - 1, nbk - 1)]:
                ta, tb = a.tile(i, j), b.tile(i, j)
                same = same and all(np.array_equal(getattr(ta, n), getattr(tb, n)) for n in ("pair_sum", "pair_count"))
            print(f"rows and atoms stores equal bit for bit (vectors and 4 tiles): {same}; atoms / rows time "
                  f"{runs['atoms'][0] / runs['rows'][0]:.2f}", flush=True)
        fires = int(next(iter(runs.values()))[1].fire_count.sum())
    finally:
        client.close()
        cluster.close()
    pairs = float(plan.pair_updates)
    res = {"n_tokens": N, "k_atoms": K, "topk": k, "workers": args.workers, "pair_updates": pairs,
           "cache_resident_ns_per_pair": round(resident["tile"], 2),
           "cache_resident_bucketed_ns_per_pair": round(resident["bucket"], 2),
           "one_tile_16mib_ns_per_pair": round(rates["t_pair_small"] * 1e9, 2),
           "one_gib_group_ns_per_pair": round(rates["t_pair_large"] * 1e9, 2),
           "n_groups": plan.n_groups, "fires": fires, "same_bits": same, "runs": {}}
    for kind, (wall, st, peak, predicted) in runs.items():
        ns_pair = wall * args.workers / pairs * 1e9
        err = predicted / wall - 1
        res["runs"][kind] = {"wall_s": round(wall, 2), "tokens_per_s": round(N / wall),
                             "ns_per_pair_per_core": round(ns_pair, 2), "predicted_s": round(predicted, 1),
                             "prediction_error": round(err, 3), "worker_peak_rss_gib": round(peak / 2**30, 2)}
        print(f"\n{kind}: end to end {wall:.1f} s: {N / wall:,.0f} tokens/s (target ≥ 300 000 at 10⁷ × 32 768); "
              f"{ns_pair:.1f} ns per pair update per core against {resident['tile']:.1f} ns cache-resident "
              f"({ns_pair / resident['tile']:.1f}×), {rates['t_pair_small'] * 1e9:.1f} ns into one 16 MiB tile and "
              f"{rates['t_pair_large'] * 1e9:.1f} ns into a 1 GiB group")
        print(f"{kind}: forecast {predicted:.0f} s against {wall:.0f} s measured ({err:+.0%}; "
              f"target within ±25%); worker peak RSS {peak / 2**30:.2f} GiB (target ≤ 8)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
