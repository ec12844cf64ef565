"""Co-occurrence analyses: distpen against the methods delphi and sae_cooccurrence use, side by side.

* **Neighbours** (delphi's co-occurrence neighbours): a dense ``K × K`` count matrix accumulated from
  sparse products of token batches (delphi does this with torch on a GPU; here scipy.sparse and
  numpy, on the CPU), Jaccard, the top 250 partners per latent — against distpen end to end from the
  same top-k gates (``coactivation_stats`` + ``neighbours``) and from a finished statistics store.
* **Clusters** (sae_cooccurrence): a dense float32 Jaccard matrix, then a bisection on the edge
  threshold with scipy's ``connected_components`` until the largest component has at most
  ``max_size`` latents — against ``CoactivationStats.clusters`` on the finished store (which
  gathers only the strongest edges, tile by tile). Measured on their own: the peer from its count
  matrix (its memory beyond the counts), distpen's client and busiest worker during the call alone,
  the best of ``--repeat`` runs, with the load average (the machine may be shared).

Peak memory: the peer's process against distpen's client and busiest worker. Ratios are peer time /
distpen time (> 1: distpen is faster).

Usage::

    python benchmarks/analyses.py            # K = 16 384, 10⁷ top-32 tokens (several minutes)
    python benchmarks/analyses.py --quick    # a smoke run
    python benchmarks/analyses.py --only clusters --tokens 1000000 --keep /tmp/an6   # clusters alone;
                                             # a second run with the same --keep reuses gates and store
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_ms, machine_line, print_table  # noqa: E402
from coactivation import PeakRSS, _worker_rss_start, _worker_rss_stop, make_cluster, timed, warm_up  # noqa: E402


def peer_counts(gates_path, batch: int = 200_000):
    """delphi's method: a dense int64 K × K co-occurrence count from sparse products per token batch."""
    import scipy.sparse as sp
    import zarr

    g = zarr.open_group(gates_path, mode="r")
    idx, val = g["indices"], g["values"]
    n, k = idx.shape
    K = int(g.attrs["k_atoms"])
    C = np.zeros((K, K), dtype=np.int64)
    for r0 in range(0, n, batch):
        i = np.asarray(idx[r0:r0 + batch])
        v = np.asarray(val[r0:r0 + batch])
        ok = (i >= 0) & (v > 0)
        rows = np.repeat(np.arange(i.shape[0]), k)[ok.ravel()]
        X = sp.csr_matrix((np.ones(rows.shape[0], dtype=np.float32), (rows, i.ravel()[ok.ravel()])),
                          shape=(i.shape[0], K))
        C += (X.T @ X).toarray().astype(np.int64)
    return C, n


def peer_jaccard(C):
    f = np.diag(C).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        J = C.astype(np.float32) / (f[:, None] + f[None, :] - C.astype(np.float32))
    J[~np.isfinite(J)] = 0.0
    np.fill_diagonal(J, 0.0)
    return J


def peer_neighbours(J, m: int):
    """Top-m partners per latent (descending, ties by index), partners with Jaccard 0 dropped."""
    part = np.argpartition(-J, m, axis=1)[:, :m]
    out = {}
    for a in range(J.shape[0]):
        cand = part[a][J[a, part[a]] > 0]
        order = np.lexsort((cand, -J[a, cand]))
        out[a] = cand[order].tolist()
    return out


def peer_clusters(J, max_size: int, iters: int = 40):
    """sae_cooccurrence's method: bisect the threshold on the dense matrix with connected_components."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    lo, hi = 0.0, 1.0
    labels = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        labels = connected_components(csr_matrix(J > mid), directed=False)[1]
        if np.bincount(labels).max() <= max_size:
            hi = mid
        else:
            lo = mid
    labels = connected_components(csr_matrix(J > hi), directed=False)[1]
    return hi, labels


def _clusters_section(client, st, C, K, max_size, repeat):
    """Peer (Jaccard + bisection from its counts) against ``st.clusters``: times, memory, agreement."""
    times, client_extra, worker_peak, loads = [], 0, 0, []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        client.run(_worker_rss_start)
        with PeakRSS() as mem:
            t, cl = timed(st.clusters, "jaccard", max_size=max_size, client=client)
        worker_peak = max(worker_peak, max(client.run(_worker_rss_stop).values()))
        times.append(t)
        client_extra = max(client_extra, mem.extra)
    loads.append(os.getloadavg()[0])
    with PeakRSS() as peer_mem:
        tj, J = timed(peer_jaccard, C)
        tcl, (peer_thr, peer_lab) = timed(peer_clusters, J, max_size)
        del J
    loads.append(os.getloadavg()[0])
    peer_groups = {frozenset(np.flatnonzero(peer_lab == g).tolist()) for g in np.unique(peer_lab)
                   if np.sum(peer_lab == g) >= 2}
    our_groups = {frozenset(r["members"].tolist()) for r in cl.rows}
    best = min(times)
    print(f"    clusters (max_size {max_size}): peer {fmt_ms(tj + tcl)} (Jaccard {fmt_ms(tj)}, bisection "
          f"{fmt_ms(tcl)}), +{peer_mem.extra / 2**30:.2f} GiB beyond its counts; distpen best of {repeat} "
          f"{fmt_ms(best)} (runs {', '.join(fmt_ms(t) for t in times)}), client +{client_extra / 2**20:.0f} MiB, "
          f"busiest worker {worker_peak / 2**30:.2f} GiB RSS; ratio {(tj + tcl) / best:.1f}x faster, "
          f"client memory {client_extra / max(peer_mem.extra, 1):.3f} of the peer's; load average "
          f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores")
    print(f"    clusters: threshold peer {peer_thr:.6f} (bisection, 40 steps) vs distpen {cl.threshold:.6f} "
          f"(exact over edge weights); groups identical: {peer_groups == our_groups} "
          f"({len(peer_groups)} vs {len(our_groups)})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--atoms", type=int, default=None)
    ap.add_argument("--only", choices=("all", "clusters", "windows"), default="all",
                    help="clusters: the clusters comparison alone (the peer's counts read from the store); "
                         "windows: window statistics (W = 256) against per-token statistics alone")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of distpen's clusters (best reported)")
    ap.add_argument("--keep", default=None,
                    help="work directory kept afterwards; gates and store found there (same sizes) are reused")
    args = ap.parse_args(argv)
    import distpen as dp

    N = args.tokens or (200_000 if args.quick else 10_000_000)
    K = args.atoms or (2048 if args.quick else 16_384)
    m, max_size = (50 if args.quick else 250), 200
    print(f"distpen analyses benchmark{' (--quick)' if args.quick else ''}: {machine_line()}")
    print(f"top-32 gates, N = {N:,} tokens, K = {K:,} latents; neighbours top {m}; clusters max_size {max_size}")
    work = args.keep or tempfile.mkdtemp(prefix="distpen-bench-analyses-")
    os.makedirs(work, exist_ok=True)
    cluster, client = make_cluster(2, "auto")
    try:
        warm_up(client, work)
        gates, stats_path = os.path.join(work, "gates"), os.path.join(work, "stats")
        st = _reusable(gates, stats_path, N, K)
        if st is None:
            dp.synth_gates(gates, N, K, topk=32, seed=3, client=client, overwrite=True)
        if args.only == "windows":
            _windows_section(client, gates, work, st)
            return
        if args.only == "clusters":
            if st is None:
                st = dp.coactivation_stats(dp.open_gates(gates), stats_path, overwrite=True, client=client)
            st.clusters("jaccard", threshold=1.0, client=client)  # warm: the workers import and compile
            _clusters_section(client, st, st.block(0, K, 0, K, "pair_count"), K, max_size, args.repeat)
            return
        # peer: one process, dense K × K
        with PeakRSS() as peer_mem:
            tc, (C, _) = timed(peer_counts, gates)
            tj, J = timed(peer_jaccard, C)
            tn, peer_nb = timed(peer_neighbours, J, m)
        del J
        peer_nb_total = tc + tj + tn
        # distpen: end to end from the gates, then from the finished store
        client.run(_worker_rss_start)
        with PeakRSS() as client_mem:
            ts, st = timed(dp.coactivation_stats, dp.open_gates(gates), stats_path, overwrite=True,
                           client=client)
            tnb, ours = timed(st.neighbours, "jaccard", m, os.path.join(work, "nb.json"), client=client)
        worker_peak = max(client.run(_worker_rss_stop).values())
        # agreement
        same = sum(set(peer_nb[a]) == {p for _, p in ours[a]} for a in range(K))
        exact = sum(peer_nb[a] == [p for _, p in ours[a]] for a in range(K))
        print_table(["task", "peer", "distpen", "ratio"], [
            ["neighbours, end to end from the gates", fmt_ms(peer_nb_total), fmt_ms(ts + tnb),
             f"{peer_nb_total / (ts + tnb):.2f}x"],
            ["neighbours, from a finished store", fmt_ms(tj + tn), fmt_ms(tnb), f"{(tj + tn) / tnb:.2f}x"],
        ], title="Times (peer: dense K×K counts from scipy.sparse products; distpen: 2 workers)")
        print(f"    peer breakdown: counts {fmt_ms(tc)}, Jaccard {fmt_ms(tj)}, top-{m} {fmt_ms(tn)}; "
              f"distpen statistics {fmt_ms(ts)}")
        print(f"    peak memory: peer process +{peer_mem.extra / 2**30:.2f} GiB; distpen client "
              f"+{client_mem.extra / 2**30:.2f} GiB, busiest worker {worker_peak / 2**30:.2f} GiB RSS "
              f"(ratio {max(client_mem.extra, worker_peak) / max(peer_mem.extra, 1):.2f} of the peer's)")
        print(f"    neighbour lists: {same}/{K} identical as sets, {exact}/{K} in the same order "
              "(differences are ties at the m-th score and float32 Jaccard in the peer)")
        st.clusters("jaccard", threshold=1.0, client=client)
        _clusters_section(client, st, C, K, max_size, args.repeat)
        _windows_section(client, gates, work, st, ts)
    finally:
        client.close()
        cluster.close()


def _windows_section(client, gates, work, st=None, t_tokens=None, window=256, seq_len=1024):
    """Window co-occurrence (W = 256 within sequences of 1 024 tokens) against per-token statistics
    of the same gates, same cluster: the time, the window density and the kernel routes taken."""
    import distpen as dp

    g = dp.open_gates(gates)
    if t_tokens is None:
        t_tokens, st = timed(dp.coactivation_stats, g, os.path.join(work, "stats-tokens"), overwrite=True,
                             client=client)
    load0 = os.getloadavg()[0]
    tw, sw = timed(dp.coactivation_stats, g, os.path.join(work, "stats-windows"), window=window, seq_len=seq_len,
                   overwrite=True, client=client)
    p = sw._job.progress()
    per_window = float(sw.fire_count.sum()) / sw.n_tokens
    per_token = float(st.fire_count.sum()) / st.n_tokens
    pairs_tok = st.n_tokens * per_token * (per_token + 1) / 2
    pairs_win = sw.n_tokens * per_window * (per_window + 1) / 2
    print_table(["statistics", "rows", "latents per row", "pair products", "time", "routes (scatter/blas)"], [
        ["per token", f"{st.n_tokens:,}", f"{per_token:.1f}", f"{pairs_tok:.3g}", fmt_ms(t_tokens), "-"],
        [f"per window of {window}", f"{sw.n_tokens:,}", f"{per_window:.1f} ({per_window / sw.k_atoms:.0%})",
         f"{pairs_win:.3g}", fmt_ms(tw), f"{p['routes']['scatter']}/{p['routes']['blas']}"],
    ], title=f"Window co-occurrence (W = {window}, seq_len = {seq_len}) vs per token, same gates, 2 workers")
    print(f"    windows / tokens time: {tw / t_tokens:.2f}x (target ≤ 1.5x); load average {load0:.1f} → "
          f"{os.getloadavg()[0]:.1f}. A window's union of latents makes ~{pairs_win / pairs_tok:.0f}x the "
          "per-token pair products: rows that dense take the BLAS route per tile")


def _reusable(gates, stats_path, N, K):
    """The finished store in a kept work directory, if its gates have these sizes."""
    import distpen as dp

    try:
        g = dp.open_gates(gates)
        st = dp.open_stats(stats_path)
    except Exception:  # noqa: BLE001 - nothing (usable) there: build it
        return None
    return st if (g.n_tokens, g.k_atoms, st.n_tokens, st.k_atoms) == (N, K, N, K) else None


if __name__ == "__main__":
    main()
