"""Real SAE data in: encoding on the workers, statistics from a delphi cache, EncodedGates, side by side.

Three comparisons, each in the same run on the same 2-worker ``LocalCluster``:

1. **Encoding** (``encode_gates``) of a safetensors activation bank (d_in = 768, TopK SAE with
   d_sae = 16 384, k = 32, 2·10⁵ tokens) against the SAE's GEMM alone: the float32
   ``x @ W_enc`` of the same rows, one thread, measured in this process and scaled to 2 workers.
   Target: ≥ 70% of the GEMM-bound rate.
2. **Statistics from a delphi-layout cache** (K = 16 384, ≥ 10⁷ tokens, ~32 latents a token)
   against the same gates as a distpen top-k Zarr store. Target: ≥ 0.7× the tokens/s, peak worker
   memory ≤ 4 GiB.
3. **EncodedGates** straight into ``coactivation_stats`` against ``encode_gates`` followed by
   ``coactivation_stats``, with the number of row chunks encoded (each once).

Usage::

    python benchmarks/realdata.py            # the sizes above (long: tens of minutes on 2 cores)
    python benchmarks/realdata.py --quick    # small sizes, a smoke run
    python benchmarks/realdata.py --case encode          # only comparison 1 (also: delphi, encoded)
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

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_line, print_table  # noqa: E402
from coactivation import _worker_rss_start, _worker_rss_stop, make_cluster, timed  # noqa: E402


def write_bank(folder, n, d_in, files=4, seed=0):
    from safetensors.numpy import save_file

    from distpen.sources import open_activations

    pattern = os.path.join(folder, "acts_*.safetensors")
    if os.path.isdir(folder) and len(os.listdir(folder)) == files:  # a --workdir of an earlier run
        src = open_activations(pattern)
        if (src.n_rows, src.d_in) == (n, d_in):
            return pattern
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    cuts = np.linspace(0, n, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        save_file({"activations": rng.standard_normal((b - a, d_in)).astype(np.float32)},
                  os.path.join(folder, f"acts_{i:03d}.safetensors"))
    return pattern


def gemm_rate(d_in, d_sae, rows=2048, clock=time.perf_counter):
    """Tokens/s of the float32 GEMM ``x @ W`` alone on one thread (best of 3); with
    ``clock=time.process_time``, tokens per CPU second."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    W = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    best = float("inf")
    with threadpool_limits(limits=1):
        x @ W[:256].T
        for _ in range(3):
            t0 = clock()
            x @ W.T
            best = min(best, clock() - t0)
    return rows / best


def _cpu_seconds():
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _warm_encoder(d_in):
    """Load the encoder's compiled kernels in this process (a job's first chunk on a cold worker
    would pay it)."""
    import distpen as dp
    from distpen._workers import kernel_threads

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, d_in)).astype(np.float32)
    with kernel_threads(1):
        for act, kw in (("topk", {"k": 4}), ("relu", {})):
            sae = dp.SAE(rng.standard_normal((d_in, 600)).astype(np.float32), np.zeros(600, np.float32),
                         activation=act, **kw)
            sae.encode_topk(x, k=4)
            sae.encode_csr(x)


def write_delphi(folder, n_seq, ctx, K, per_token, n_splits=8, seed=0):
    """A delphi-layout cache (``per_token`` distinct latents on every token) and the same gates as
    top-k arrays (returned)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    T = n_seq * ctx
    stride = K // per_token
    base = rng.integers(0, stride, T).astype(np.int64)
    L = base[:, None] + (np.arange(per_token) * stride)[None, :]          # distinct in each row
    vals = rng.uniform(0.1, 3.0, L.shape).astype(np.float16)
    bounds = np.linspace(0, K, n_splits + 1).astype(np.int64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        tok, j = np.nonzero((L >= lo) & (L < hi))
        loc = np.stack([tok // ctx, tok % ctx, L[tok, j] - lo], axis=1)
        dt = np.uint16 if loc[:, 0].max() < 2**16 and loc[:, 2].max() < 2**16 else np.uint32
        save_file({"locations": loc.astype(dt), "activations": vals[tok, j]},
                  os.path.join(folder, f"{lo}_{hi - 1}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"cache_ctx_len": ctx, "n_tokens": T, "batch_size": 1, "n_splits": n_splits}, f)
    return L.astype(np.int32), vals.astype(np.float32)


def encodes(client):
    from distpen.sources import encode as enc

    return sum(client.run(lambda: enc._ENCODES[0]).values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--memory-limit", default="4GiB")
    ap.add_argument("--case", action="append", choices=["encode", "encoded", "delphi"],
                    help="run only this comparison (repeatable; default: all three)")
    args = ap.parse_args(argv)
    cases = set(args.case or ["encode", "encoded", "delphi"])
    import zarr

    import distpen as dp

    if args.quick:
        n_enc, d_in, d_sae, k = 20_000, 768, 4096, 32
        n_seq, ctx, K, per_tok = 400, 256, 4096, 32
    else:
        n_enc, d_in, d_sae, k = 200_000, 768, 16_384, 32
        n_seq, ctx, K, per_tok = 40_000, 256, 16_384, 32
    work = args.workdir or tempfile.mkdtemp(prefix="distpen-realdata-")
    print(machine_line())
    rows = []
    cluster, client = make_cluster(2, args.memory_limit)
    try:
        rng = np.random.default_rng(2)
        W = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
        sae = dp.SAE(W, (rng.standard_normal(d_sae) * 0.1).astype(np.float32), activation="topk", k=k)
        # warm the workers' kernels: in every worker, then on a small job
        client.run(_warm_encoder, d_in)
        small = dp.SAE(W[:, :256], np.zeros(256, np.float32), activation="topk", k=8)
        dp.encode_gates(np.zeros((512, d_in), np.float32), small, os.path.join(work, "warm"), client=client,
                        overwrite=True)
        dp.coactivation_stats(dp.EncodedGates(np.ones((512, d_in), np.float32), small),
                              os.path.join(work, "warm-st"), overwrite=True, client=client)
        if cases & {"encode", "encoded"}:
            bank = write_bank(os.path.join(work, "bank"), n_enc, d_in)

            # 1. encoding against the GEMM alone. The machine's other load moves both the job and
            # the reference, so also: the GEMM in both workers at once, and CPU efficiency (the
            # GEMM's CPU seconds for these rows over the CPU seconds the workers spent)
            gemm = 2 * gemm_rate(d_in, d_sae)
            gemm_cpu = gemm_rate(d_in, d_sae, clock=time.process_time)
            load0 = os.getloadavg()[0]
            cpu0 = client.run(_cpu_seconds)
            t_enc, g = timed(dp.encode_gates, bank, sae, os.path.join(work, "enc"), overwrite=True, client=client)
            cpu1 = client.run(_cpu_seconds)
            load1 = os.getloadavg()[0]
            both = sum(client.run(gemm_rate, d_in, d_sae).values())  # the GEMM in both workers at once
            enc_rc = zarr.open_group(os.path.join(work, "enc"), mode="r").attrs["row_chunk"]
            cpu_eff = (n_enc / gemm_cpu) / sum(cpu1[w] - cpu0[w] for w in cpu1)
            rows.append(["encode_gates (2 workers)",
                         f"{n_enc / t_enc:,.0f} tok/s ({enc_rc} rows a chunk; CPU efficiency {cpu_eff:.2f})",
                         f"GEMM alone ×2: {gemm:,.0f} tok/s (both workers at once: {both:,.0f})",
                         f"{(n_enc / t_enc) / gemm:.2f} (target ≥ 0.70; {(n_enc / t_enc) / both:.2f} of the "
                         f"concurrent GEMM; load {load0:.1f} → {load1:.1f})"])

        if "encoded" in cases:
            # 3. EncodedGates against encode_gates + coactivation_stats
            if "encode" not in cases:
                t_enc, g = timed(dp.encode_gates, bank, sae, os.path.join(work, "enc"), overwrite=True,
                                 client=client)
            client.run(lambda: __import__("distpen.sources.encode", fromlist=["x"])._ENCODES.__setitem__(0, 0))
            t_direct, _ = timed(dp.coactivation_stats, dp.EncodedGates(bank, sae), os.path.join(work, "direct"),
                                overwrite=True, client=client)
            n_direct = encodes(client)
            t_stats, st = timed(dp.coactivation_stats, g, os.path.join(work, "via"), overwrite=True,
                                client=client)
            rows.append(["EncodedGates → stats", f"{t_direct:.1f} s ({n_direct} chunk encodes)",
                         f"encode_gates + stats: {t_enc + t_stats:.1f} s",
                         f"{(t_enc + t_stats) / t_direct:.2f}× faster"])
        if "delphi" in cases:
            # 2. statistics from a delphi cache against the same gates as top-k Zarr
            cache = os.path.join(work, "latents", "layers.0")
            idx, val = write_delphi(cache, n_seq, ctx, K, per_tok)
            N = n_seq * ctx
            grp = zarr.open_group(os.path.join(work, "topk"), mode="w")
            rc = 1 << 16
            zi = grp.create_array("indices", shape=idx.shape, chunks=(rc, per_tok), dtype="int32", fill_value=-1)
            zv = grp.create_array("values", shape=val.shape, chunks=(rc, per_tok), dtype="float32", fill_value=0)
            zi[:] = idx
            zv[:] = val
            grp.attrs.update(format="distpen.gates", format_version=1, form="topk", k_atoms=K, n_tokens=N,
                             topk=per_tok, index_range=[-1, K - 1])
            del idx, val
            client.run(_worker_rss_start)
            t_topk, st_k = timed(dp.coactivation_stats, os.path.join(work, "topk"), os.path.join(work, "st-k"),
                                 overwrite=True, client=client)
            peak_k = max(client.run(_worker_rss_stop).values())
            client.run(_worker_rss_start)
            t_cache, st_c = timed(dp.coactivation_stats, cache, os.path.join(work, "st-c"), overwrite=True,
                                  client=client, row_chunk=st_k.attrs["row_chunk"] // ctx * ctx or ctx)
            peak_c = max(client.run(_worker_rss_stop).values())
            assert np.array_equal(st_c.fire_count, st_k.fire_count)
            rows.append(["stats from delphi cache", f"{N / t_cache:,.0f} tok/s (peak {peak_c / 2**30:.2f} GiB)",
                         f"top-k Zarr: {N / t_topk:,.0f} tok/s (peak {peak_k / 2**30:.2f} GiB)",
                         f"{t_topk / t_cache:.2f} (target ≥ 0.70)"])
    finally:
        client.close()
        cluster.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(["measure", "distpen", "reference", "ratio"], rows,
                title=f"real data ({'quick' if args.quick else 'full'} sizes)")


if __name__ == "__main__":
    main()
