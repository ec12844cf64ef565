"""Distributed co-activation statistics against plain numpy (docs/design.md)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import distpen as dp
from distpen.coactivation import _kernels as ker
from distpen.coactivation import _tasks as tasks
from distpen.coactivation import plan as coplan
from distpen.coactivation import stats as stats_mod
from distpen.errors import (
    GateDataError,
    InvalidArgumentError,
    ShapeMismatchError,
    StoreConflictError,
    StoreCorruptError,
)
from distpen.store import RunStore


# --------------------------------------------------------------------------- data and reference
def mixed_gates(n=403, k=23, seed=0, dtype=np.float64):
    """Gates whose first atoms fire half the time and the others rarely (both kernel routes)."""
    rng = np.random.default_rng(seed)
    rate = np.where(np.arange(k) < k // 2, 0.5, 0.03)
    G = (rng.random((n, k)) < rate) * rng.exponential(1.0, (n, k))
    G[:, k - 1] = 0.0  # an atom that never fires
    return G.astype(dtype)


def reference(G):
    G64 = G.astype(np.float64)
    F = (G > 0).astype(np.int64)
    return {"n_tokens": G.shape[0], "pair_sum": G64.T @ G64, "pair_count": F.T @ F,
            "fire_count": F.sum(0), "gate_sum": G64.sum(0), "gate_sq_sum": (G64 ** 2).sum(0)}


def full(st, name):
    return st.block(0, st.k_atoms, 0, st.k_atoms, name)


def assert_stats(st, ref, rtol=1e-12):
    assert st.n_tokens == ref["n_tokens"]
    ps = full(st, "pair_sum")
    assert ps.dtype == np.float64 and ps.shape == ref["pair_sum"].shape
    np.testing.assert_allclose(ps, ref["pair_sum"], rtol=rtol, atol=1e-12)
    pc = full(st, "pair_count")
    assert pc.dtype == np.int64
    np.testing.assert_array_equal(pc, ref["pair_count"])
    assert st.fire_count.dtype == np.int64
    np.testing.assert_array_equal(st.fire_count, ref["fire_count"])
    np.testing.assert_allclose(st.gate_sum, ref["gate_sum"], rtol=rtol)
    np.testing.assert_allclose(st.gate_sq_sum, ref["gate_sq_sum"], rtol=rtol)


def to_topk(G, k, seed=0):
    """Top-k form of gates with at most k non-zeros per row, shuffled slots, −1/0 empty slots."""
    rng = np.random.default_rng(seed)
    n, K = G.shape
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.zeros((n, k), dtype=G.dtype)
    for r in range(n):  # test data construction only
        nz = np.flatnonzero(G[r])
        assert nz.size <= k
        slots = rng.permutation(k)[:nz.size]
        idx[r, slots] = nz
        val[r, slots] = G[r, nz]
    # a few empty slots marked by value 0 with a real index that is not otherwise present
    for r in range(0, n, 7):
        free = np.flatnonzero(idx[r] == -1)
        unused = np.setdiff1d(np.arange(K), idx[r])
        if free.size and unused.size:
            idx[r, free[0]] = unused[0]
    return idx, val


def topk_gates(n=300, K=29, k=6, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    G = np.zeros((n, K), dtype=dtype)
    w = 1.0 / np.arange(1, K + 1)
    for r in range(n):
        m = rng.integers(0, k + 1)
        atoms = rng.choice(K, size=m, replace=False, p=w / w.sum())
        G[r, atoms] = rng.exponential(1.0, m)
    return G


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row_chunk, tile, split_every", [
    (403, 23, 2),    # one chunk, one tile
    (50, 7, 2),      # ragged last tile (23 = 3·7 + 2) and last row chunk
    (64, 10, 3),
    (17, 1, 4),      # size-1 tiles
])
def test_dense_matches_numpy(client, tmp_path, dtype, row_chunk, tile, split_every):
    G = mixed_gates(dtype=dtype, k=23 if tile > 1 else 9)
    st = dp.coactivation_stats(dp.DenseGates(G), tmp_path / "st", row_chunk=row_chunk, tile=tile,
                               split_every=split_every)
    assert_stats(st, reference(G))
    assert st.tile_size == tile and st.pair_sum.chunks == (tile, tile)
    p = RunStore(tmp_path / "st").job("coactivation").progress()
    assert p["status"] == "done" and p["units_done"] == p["units_total"] == len(st._job.units)
    if tile == 7:
        assert p["routes"]["scatter"] > 0 and p["routes"]["blas"] > 0  # mixed densities use both kernels


def test_only_upper_tiles_stored_and_zero_tiles_absent(client, tmp_path):
    rng = np.random.default_rng(3)
    G = np.zeros((200, 30))
    G[:100, :10] = rng.random((100, 10))        # atoms 0-9 fire on the first half
    G[100:, 20:] = rng.random((100, 10))        # atoms 20-29 on the second: tiles (0,2) and (1,·) stay zero
    st = dp.coactivation_stats(G, tmp_path / "st", tile=10, row_chunk=64)
    chunk_files = sorted(os.listdir(tmp_path / "st" / "pair_sum" / "c" / "0") +
                         [f"2/{x}" for x in os.listdir(tmp_path / "st" / "pair_sum" / "c" / "2")])
    assert not os.path.exists(tmp_path / "st" / "pair_sum" / "c" / "1")
    assert chunk_files == ["0", "2/2"]                   # (0,0) and (2,2) only; (0,2) is zero
    assert st.nonzero_tiles() == [(0, 0), (2, 2)]
    assert_stats(st, reference(G))
    t = st.tile(2, 0)                                    # a lower tile reads as the transpose
    assert t.pair_sum.shape == (10, 10) and not t.pair_sum.any()
    np.testing.assert_allclose(st.tile(0, 0).pair_sum, G[:, :10].T @ G[:, :10], rtol=1e-12)
    assert RunStore(tmp_path / "st").verify()["ok"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_matches_numpy_and_dense_form(client, tmp_path, dtype):
    G = topk_gates(dtype=dtype)
    idx, val = to_topk(G, 6)
    st_k = dp.coactivation_stats(dp.TopKGates(idx, val, 29), tmp_path / "k", row_chunk=41, tile=8, split_every=2)
    st_d = dp.coactivation_stats(dp.DenseGates(G), tmp_path / "d", row_chunk=41, tile=8, split_every=2)
    assert_stats(st_k, reference(G))
    np.testing.assert_array_equal(full(st_k, "pair_count"), full(st_d, "pair_count"))
    np.testing.assert_allclose(full(st_k, "pair_sum"), full(st_d, "pair_sum"), rtol=1e-13)
    np.testing.assert_array_equal(st_k.fire_count, st_d.fire_count)


def test_numpy_dask_and_zarr_inputs_agree(client, tmp_path):
    import dask.array as da
    import zarr

    G = mixed_gates(n=250, k=14, seed=5, dtype=np.float32)
    z = zarr.create_array(str(tmp_path / "g.zarr"), shape=G.shape, chunks=(32, 14), dtype="float32")
    z[:] = G
    res = {}
    for name, arr in (("numpy", G), ("dask", da.from_array(G, chunks=(37, 5))), ("zarr", z)):
        st = dp.coactivation_stats(arr, tmp_path / name, row_chunk=64, tile=6, split_every=2)
        res[name] = (full(st, "pair_sum"), full(st, "pair_count"))
        assert_stats(st, reference(G))
    # same row_chunk and split_every: bit-identical whatever the input's container
    for name in ("dask", "zarr"):
        assert np.array_equal(res[name][0], res["numpy"][0])
        assert np.array_equal(res[name][1], res["numpy"][1])


def test_bit_identical_rerun(client, tmp_path):
    G = mixed_gates(n=600, k=20, seed=8, dtype=np.float32)
    a = dp.coactivation_stats(G, tmp_path / "a", row_chunk=40, tile=8, split_every=3)
    b = dp.coactivation_stats(G, tmp_path / "b", row_chunk=40, tile=8, split_every=3)
    assert np.array_equal(full(a, "pair_sum"), full(b, "pair_sum"))
    assert np.array_equal(a.gate_sq_sum, b.gate_sq_sum)


@pytest.mark.parametrize("split_every", [3, 100])
def test_int32_and_int64_count_accumulators_store_the_same_counts(client, tmp_path, monkeypatch, split_every):
    """Below 2³¹ tokens the pair counts accumulate in int32; the int64 accumulators used beyond
    give the same stored (int64) statistics, on the reduction tree and on the streaming plan."""
    G = mixed_gates(n=600, k=20, seed=8, dtype=np.float32)
    assert ker.count_dtype(600) == np.int32
    assert ker.count_dtype(2**31) == np.int64
    a = dp.coactivation_stats(G, tmp_path / "a", row_chunk=40, tile=5, split_every=split_every)
    monkeypatch.setattr(ker, "count_dtype", lambda n: np.int64)
    b = dp.coactivation_stats(G, tmp_path / "b", row_chunk=40, tile=5, split_every=split_every)
    for name in ("pair_sum", "pair_count"):
        assert full(a, name).dtype == full(b, name).dtype
        assert np.array_equal(full(a, name), full(b, name))
    assert_stats(a, reference(G), rtol=1e-6)


def test_merge_of_halves_equals_whole(client, tmp_path):
    G = mixed_gates(n=500, k=21, seed=9)
    whole = dp.coactivation_stats(G, tmp_path / "whole", row_chunk=64, tile=8)
    a = dp.coactivation_stats(G[:230], tmp_path / "a", row_chunk=64, tile=8)
    b = dp.coactivation_stats(G[230:], tmp_path / "b", row_chunk=50, tile=5)  # another tiling
    m = dp.merge_stats(a, str(tmp_path / "b"), tmp_path / "m")
    assert m.n_tokens == 500 and m.tile_size == 8
    assert_stats(m, reference(G))
    np.testing.assert_array_equal(full(m, "pair_count"), full(whole, "pair_count"))
    np.testing.assert_allclose(full(m, "pair_sum"), full(whole, "pair_sum"), rtol=1e-13)
    assert dp.open_stats(tmp_path / "m").pairs(measure="count") == whole.pairs(measure="count")


def test_merge_rejects_different_atoms(client, tmp_path):
    a = dp.coactivation_stats(mixed_gates(n=50, k=6), tmp_path / "a")
    b = dp.coactivation_stats(mixed_gates(n=50, k=7), tmp_path / "b")
    with pytest.raises(ShapeMismatchError, match="a has k_atoms = 6, b has 7"):
        dp.merge_stats(a, b, tmp_path / "m")
    with pytest.raises(InvalidArgumentError, match="must differ from the inputs"):
        dp.merge_stats(a, a, tmp_path / "a")


# --------------------------------------------------------------------------- measures and pairs
def numpy_measure(G, measure):
    r = reference(G)
    N = G.shape[0]
    ps, pc, f, q = r["pair_sum"], r["pair_count"].astype(float), r["fire_count"].astype(float), r["gate_sq_sum"]
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure == "mean":
            M, den = ps / N, np.ones_like(ps)
        elif measure == "count":
            M, den = pc, np.ones_like(ps)
        elif measure == "jaccard":
            den = f[:, None] + f[None, :] - pc
            M = pc / den
        elif measure == "cosine":
            den = np.sqrt(q[:, None] * q[None, :])
            M = ps / den
        elif measure == "lift":
            den = f[:, None] * f[None, :]
            M = pc * N / den
        elif measure == "dice":
            den = f[:, None] + f[None, :]
            M = 2 * pc / den
        elif measure == "npmi":
            den = np.where((pc > 0) & (pc < N), 1.0, 0.0)
            M = np.log(pc * N / (f[:, None] * f[None, :])) / -np.log(pc / N)
        else:  # the correlations, straight from the dense data
            X = (G > 0).astype(float) if measure == "phi" else G.astype(float)
            sd = X.std(axis=0)
            den = sd[:, None] * sd[None, :]
            M = ((X - X.mean(axis=0)).T @ (X - X.mean(axis=0)) / N) / den
    return M, den > 0


@pytest.fixture(scope="module")
def measured(tmp_path_factory, dask_client):
    G = mixed_gates(n=400, k=19, seed=11)
    G[:, 3] = 0.0  # a second silent atom: every measure's denominator hits 0 for its pairs
    G[:, 0] = 1.0  # an always-on atom (raw Jaccard favours it; lift does not)
    path = tmp_path_factory.mktemp("measured") / "st"
    return G, dp.coactivation_stats(G, path, row_chunk=64, tile=7)


@pytest.mark.parametrize("measure", ["mean", "count", "jaccard", "cosine", "lift", "npmi", "phi", "pearson", "dice"])
@pytest.mark.parametrize("threshold, min_count", [(0.0, 0), (0.02, 5)])
def test_every_measure_matches_numpy_formula(client, measured, measure, threshold, min_count):
    G, st = measured
    pt = st.pairs(threshold=threshold, measure=measure, min_count=min_count)
    M, ok = numpy_measure(G, measure)
    pc = reference(G)["pair_count"]
    jj, kk = np.triu_indices(G.shape[1], 1)
    keep = ok[jj, kk] & (M[jj, kk] > threshold) & (pc[jj, kk] >= min_count)
    assert pt.k_atoms == G.shape[1]
    np.testing.assert_array_equal(pt.j, jj[keep])
    np.testing.assert_array_equal(pt.k, kk[keep])
    # correlations come from sums (S/N − μ_j μ_k): near 0 they lose digits to cancellation, not more
    atol = 1e-12 if measure in ("npmi", "phi", "pearson") else 0.0
    np.testing.assert_allclose(pt.w, M[jj, kk][keep], rtol=1e-12, atol=atol)
    assert not np.isin(3, pt.j) and not np.isin(3, pt.k)          # silent atom: no pair, no division by 0
    if measure in ("phi", "pearson"):                               # always-on atom: no variance, no pair
        assert not np.isin(0, pt.j)
    # the same tiles processed in this process (a dashboard without a scheduler) give the same table
    assert st.pairs(threshold=threshold, measure=measure, min_count=min_count, top_m=3, client="local") == \
        st.pairs(threshold=threshold, measure=measure, min_count=min_count, top_m=3)
    assert np.isfinite(pt.w).all() and (pt.w > 0).all()


def test_lift_is_not_dominated_by_always_on_atom(client, measured):
    G, st = measured
    jac = st.pairs(measure="jaccard", top_m=1)
    lift = st.pairs(measure="lift", top_m=1)
    # atom 0 fires on every token: it is the top Jaccard partner of many atoms, but its lift is exactly 1
    assert (np.concatenate([jac.j, jac.k]) == 0).sum() > 3
    w0 = lift.w[(lift.j == 0) | (lift.k == 0)]
    np.testing.assert_allclose(w0, 1.0, rtol=1e-12)


@pytest.mark.parametrize("measure", ["mean", "lift"])
@pytest.mark.parametrize("m", [1, 3])
def test_top_m_keeps_pairs_among_m_strongest_of_either_atom(client, measured, measure, m):
    G, st = measured
    pt = st.pairs(top_m=m, measure=measure)
    M, ok = numpy_measure(G, measure)
    K = G.shape[1]
    elig = ok & (M > 0) & ~np.eye(K, dtype=bool)
    V = np.where(elig, M, -np.inf)
    theta = -np.sort(-V, axis=1)[:, m - 1]  # m-th strongest partner value (−inf if fewer)
    jj, kk = np.triu_indices(K, 1)
    keep = elig[jj, kk] & ((M[jj, kk] >= theta[jj]) | (M[jj, kk] >= theta[kk]))
    np.testing.assert_array_equal(pt.j, jj[keep])
    np.testing.assert_array_equal(pt.k, kk[keep])
    # every atom that has partners keeps at least min(m, #partners) of them
    deg = pt.degree()
    np.testing.assert_array_less(np.minimum(m, elig.sum(1)) - 1, deg + 1e-9)
    assert len(pt) < len(st.pairs(measure=measure))


def test_pairs_mean_feeds_the_penalty_and_saves(client, measured, tmp_path):
    G, st = measured
    pt = st.pairs(out=tmp_path / "pairs")
    ref = dp.PairTable.from_dense(G.T @ G / G.shape[0])
    np.testing.assert_array_equal(pt.j, ref.j)
    np.testing.assert_allclose(pt.w, ref.w, rtol=1e-12)
    assert dp.PairTable.open(tmp_path / "pairs") == pt
    pen = dp.DecoderIncoherencePenalty.from_pairs(pt, np.ones(G.shape[1], dtype=int), 3, 0.5)
    assert np.isfinite(pen.value(np.ones(G.shape[1] * 3), np.zeros(0)))
    np.testing.assert_allclose(st.coactivation_dense(), G.T @ G / G.shape[0], rtol=1e-12)


def test_coactivation_dense_refuses_large_k(client, measured, monkeypatch):
    _, st = measured
    monkeypatch.setattr(stats_mod, "MAX_DENSE_K", 10)
    with pytest.raises(InvalidArgumentError, match=r"K = 19 > 10 .* pass force=True"):
        st.coactivation_dense()
    assert st.coactivation_dense(force=True).shape == (19, 19)


# --------------------------------------------------------------------------- processes, memory
def test_runs_on_worker_processes(client, tmp_path):
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    G = mixed_gates(n=2000, k=12, seed=12)
    st = dp.coactivation_stats(G, tmp_path / "st", row_chunk=50, tile=4, split_every=2)
    assert_stats(st, reference(G))
    # the job's leaves ran on both processes
    logs = client.run(lambda dask_worker: sum(1 for k in dask_worker.state.log
                                              if "distpen-coact-leaf" in str(k)))
    assert all(v > 0 for v in logs.values()), logs


def _rss_sampler(dask_worker, interval=0.02):
    import threading

    import psutil

    proc = psutil.Process()
    dask_worker._distpen_peak = proc.memory_info().rss
    dask_worker._distpen_stop = threading.Event()

    def loop():
        while not dask_worker._distpen_stop.is_set():
            dask_worker._distpen_peak = max(dask_worker._distpen_peak, proc.memory_info().rss)
            dask_worker._distpen_stop.wait(interval)

    threading.Thread(target=loop, daemon=True).start()
    return True


def _rss_peak(dask_worker):
    dask_worker._distpen_stop.set()
    return dask_worker._distpen_peak


def test_out_of_core_within_worker_memory_limit(tmp_path, dask_client):
    """Workers of 400 MiB each stream dense gates 3× larger than their total memory."""
    import zarr
    from distributed import Client, LocalCluster

    limit = 400 * 2**20
    n, k = 1_250_000, 512  # float32: 2.56 GB of dense gates, 2% non-zero
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=":0", host="127.0.0.1") as cluster, \
            Client(cluster, set_as_default=False) as c:
        g = dp.synth_gates(tmp_path / "g", n, k, density=0.02, seed=4, client=c)
        assert g.n_tokens * g.k_atoms * 4 > 3 * 2 * limit
        pids = c.run(os.getpid)
        c.run(_rss_sampler)
        st = dp.coactivation_stats(g, tmp_path / "st", client=c)
        peaks = c.run(_rss_peak)
        assert c.run(os.getpid) == pids                      # no worker was killed and restarted
        # row chunks were sized from the 400 MiB limit
        assert st.attrs["row_chunk"] * k * 24 <= limit / 4
        # a slice on this cluster and on the 2 GiB session cluster, same row_chunk/split_every: bit-identical
        z = zarr.create_array(str(tmp_path / "part"), shape=(20_000, k), chunks=(5_000, k), dtype="float32")
        z[:] = g.array[:20_000]
        args = dict(row_chunk=1500, tile=200, split_every=3)
        small = dp.coactivation_stats(z, tmp_path / "small", client=c, **args)
        small_ps = full(small, "pair_sum")
    other = dp.coactivation_stats(z, tmp_path / "other", client=dask_client, **args)
    assert max(peaks.values()) < limit, {a: p / 2**20 for a, p in peaks.items()}
    assert st.n_tokens == n
    pc = full(st, "pair_count")
    np.testing.assert_array_equal(np.diag(pc), st.fire_count)
    assert 0.015 * n * k < st.fire_count.sum() < 0.03 * n * k
    assert np.array_equal(full(other, "pair_sum"), small_ps)


def test_default_split_every_streams_when_the_tiles_make_enough_groups():
    mem = 2**30  # one accumulator per task may take mem/6: ten 1024-tiles
    assert coplan.default_split_every(mem, 8192, 10, 1024) == 10          # 36 tiles: 4 groups
    assert coplan.default_split_every(mem, 8192, 10, None) == 10          # default tile: the same
    assert coplan.default_split_every(mem, 2048, 10, 1024) == coplan.DEFAULT_SPLIT_EVERY  # 3 tiles, 1 group
    assert coplan.default_split_every(mem, 8192, 1, 1024) == coplan.DEFAULT_SPLIT_EVERY   # one row chunk
    # sparse gates stream as soon as there are 4 tiles: re-reading a chunk is served from the cache
    assert coplan.default_split_every(mem, 4096, 10, 1024, sparse=True) == 10           # 10 tiles
    assert coplan.default_split_every(mem, 4096, 10, 1024) == coplan.DEFAULT_SPLIT_EVERY
    assert coplan.default_split_every(mem, 2048, 10, 1024, sparse=True) == coplan.DEFAULT_SPLIT_EVERY  # 3 tiles
    # ... unless the tree's leaf accumulators are small beside the gates (2 leaves × 10 tiles × 16 MiB)
    assert coplan.default_split_every(mem, 4096, 8, 1024, sparse=True, input_bytes=256e6) == coplan.DEFAULT_SPLIT_EVERY
    assert coplan.default_split_every(mem, 4096, 8, 1024, sparse=True, input_bytes=100e6) == 8


def test_groups_are_balanced():
    tiles = coplan._tiles(16)  # 136 tiles, at most 44 per group: 4 groups of 34, not 44/44/44/4
    groups = coplan._group_tiles(tiles, 1024, 4 * 2**30, 1)
    assert [len(g) for g in groups] == [34, 34, 34, 34] and [t for g in groups for t in g] == tiles


def test_streaming_groups_come_in_multiples_of_the_workers():
    """5 groups on 2 workers would leave one idle for the last round: 6 smaller ones instead,
    never more groups than tiles."""
    tiles = coplan._tiles(32)  # 528 tiles of 1024², 117 per group in a 11 GiB worker: 5 groups
    mem = 11 * 2**30
    assert len(coplan._group_tiles(tiles, 1024, mem, 1, 4)) == 5
    groups = coplan._group_tiles(tiles, 1024, mem, 1, 4, multiple_of=2)
    assert [len(g) for g in groups] == [88] * 6 and [t for g in groups for t in g] == tiles
    assert len(coplan._group_tiles(tiles, 1024, mem, 1, 4, multiple_of=64)) == 64
    assert len(coplan._group_tiles(coplan._tiles(3), 1024, mem, 1, 4, multiple_of=64)) == 6  # 6 tiles


def test_how_tiles_are_grouped_never_changes_a_bit(client, tmp_path, monkeypatch):
    """The job rounds its groups up to a multiple of the workers; a cluster of another size groups
    the tiles differently, and the stores are equal bit for bit."""
    import distpen.cluster as cluster

    G = topk_gates(n=700, K=40, k=5, seed=4)
    idx, val = to_topk(G, 5)
    gates = dp.TopKGates(idx, val, 40)
    args = dict(row_chunk=100, tile=8, split_every=100)           # 15 tiles, streaming
    two = dp.coactivation_stats(gates, tmp_path / "two", **args)
    monkeypatch.setattr(cluster, "n_workers", lambda client=None: 7)
    seven = dp.coactivation_stats(gates, tmp_path / "seven", **args)
    assert (two._job.progress()["n_groups"], seven._job.progress()["n_groups"]) == (4, 7)
    assert_stats(two, reference(G))
    for name in ("pair_sum", "pair_count"):
        assert np.array_equal(full(two, name), full(seven, name)), name
    for name in ("fire_count", "gate_sum", "gate_sq_sum"):
        assert np.array_equal(getattr(two, name), getattr(seven, name)), name


@pytest.mark.parametrize("form", ["topk", "dense"])
def test_streaming_plan_one_task_per_group(client, tmp_path, form):
    """split_every ≥ the number of row chunks: one task per tile group reads every chunk and writes
    its tiles itself (no leaf, combine or write task); pooled buffers are dropped afterwards."""
    from distributed import get_task_stream

    from distpen._alloc import pooled_bytes

    G = topk_gates(n=500)
    idx, val = to_topk(G, 6)
    gates = dp.TopKGates(idx, val, 29) if form == "topk" else dp.DenseGates(G)
    with get_task_stream(client=client) as ts:
        st = dp.coactivation_stats(gates, tmp_path / "st", row_chunk=60, tile=5, split_every=100)
    assert_stats(st, reference(G))
    assert st.attrs["split_every"] == 100 and st._job.progress()["n_leaves_per_group"] == 1
    names = {str(d["key"]).split("-")[2] for d in ts.data if str(d["key"]).startswith("distpen-coact-")}
    assert names == {"stream"}, names
    assert set(client.run(pooled_bytes).values()) == {0}
    if form == "topk":
        # the scatter kernel adds every row in token order: one 500-row chunk gives the same bits
        one = dp.coactivation_stats(gates, tmp_path / "one", row_chunk=500, tile=5)
        for name in ("pair_sum", "pair_count", "gate_sum", "gate_sq_sum"):
            a, b = (full(x, name) if name.startswith("pair") else getattr(x, name) for x in (st, one))
            assert np.array_equal(a, b), name


def test_streaming_sparse_dense_gates_use_the_chunk_cache_and_match_topk_bits(client, tmp_path):
    """Sparse dense gates on the streaming plan: workers keep each chunk's sparse rows across the
    tile groups; every tile takes the scatter route, so the result equals the top-k form of the
    same gates bit for bit (and numpy)."""
    import zarr

    G = topk_gates(n=600, K=60, k=4, seed=21)
    assert np.count_nonzero(G) / G.size < 0.125
    z = zarr.create_array(str(tmp_path / "g"), shape=G.shape, chunks=(100, 60), dtype="float64")
    z[:] = G
    idx, val = to_topk(G, 4)
    args = dict(row_chunk=100, tile=10, split_every=100)          # 21 tiles: 4 streaming groups
    dense = dp.coactivation_stats(z, tmp_path / "d", **args)
    topk = dp.coactivation_stats(dp.TopKGates(idx, val, 60), tmp_path / "k", **args)
    p = dense._job.progress()
    assert p["n_groups"] == 4 and p["routes"]["blas"] == 0
    assert_stats(dense, reference(G))
    for name in ("pair_sum", "pair_count"):
        assert np.array_equal(full(dense, name), full(topk, name)), name
    for name in ("fire_count", "gate_sum", "gate_sq_sum"):
        assert np.array_equal(getattr(dense, name), getattr(topk, name)), name


@pytest.mark.parametrize("decomposition", ["rows", "atoms"])
def test_streaming_topk_within_worker_memory_limit(tmp_path, decomposition):
    """Workers of 500 MiB stream top-k gates (2 GB as dense float32) into a 1 GB statistics array:
    the plan streams (row-major: 8 tile groups; atom-major: a copy task per row chunk, then squares
    of tiles), each task stays under the limit, and the result equals scipy.sparse."""
    import scipy.sparse as sp
    from distributed import Client, LocalCluster

    limit = 500 * 2**20
    n, K, k = 60_000, 8192, 16
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=":0", host="127.0.0.1") as cluster, \
            Client(cluster, set_as_default=False) as c:
        g = dp.synth_gates(tmp_path / "g", n, K, topk=k, seed=5, client=c)
        assert n * K * 4 > 3 * limit and K * K * 16 > 2 * limit
        pids = c.run(os.getpid)
        c.run(_rss_sampler)
        st = dp.coactivation_stats(g, tmp_path / "st", tile=1024, decomposition=decomposition, client=c)
        peaks = c.run(_rss_peak)
        assert c.run(os.getpid) == pids
        p = st._job.progress()
    assert max(peaks.values()) < limit, {a: q / 2**20 for a, q in peaks.items()}
    assert p["n_groups"] >= 4 and p["n_leaves_per_group"] == 1 and st.attrs["split_every"] >= 2
    assert p["decomposition"] == decomposition
    idx, val = g.indices[:], g.values[:]
    keep = (idx >= 0) & (val > 0)
    A = sp.csr_array((val[keep].astype(np.float64), (np.nonzero(keep)[0], idx[keep])), shape=(n, K))
    ref = (A.T @ A).tocsr()
    for I, J in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        t = st.tile(I, J)
        np.testing.assert_allclose(t.pair_sum, ref[t.rows, t.cols].toarray(), rtol=1e-12, atol=0)
    F = A.copy()
    F.data[:] = 1.0
    np.testing.assert_array_equal(st.fire_count, np.asarray(F.sum(axis=0)).astype(np.int64))


# --------------------------------------------------------------------------- resume and failures
@pytest.mark.parametrize("split_every", [2, 100])
def test_resume_computes_only_missing_tiles(client, tmp_path, split_every):
    G = mixed_gates(n=300, k=20, seed=13)
    args = dict(row_chunk=64, tile=6, split_every=split_every)   # 4 blocks: 10 tiles
    ref = dp.coactivation_stats(G, tmp_path / "ref", **args)
    first = [(0, 0), (0, 3), (2, 2)]
    dp.coactivation_stats(G, tmp_path / "st", **args, _units=first)   # "interrupted" after 3 tiles
    store = RunStore(tmp_path / "st")
    job = store.job("coactivation")
    assert sorted(job.done()) == ["0.0", "0.3", "2.2"]
    assert job.status == "incomplete"
    with pytest.raises(StoreCorruptError, match="incomplete: 3 of 10 tiles complete"):
        dp.open_stats(tmp_path / "st")
    before = {u: job.marker(u)["time"] for u in job.done()}
    stale = tmp_path / "st" / "pair_sum" / "c" / "1" / "1.tmp-99-1"  # a writer killed mid-write
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a chunk")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    st = dp.coactivation_stats(G, tmp_path / "st", **args)
    assert not stale.exists()                                           # swept on resume
    p = job.progress()
    assert p["units_computed"] == 7 and p["units_skipped"] == 3 and p["status"] == "done"
    assert {u: job.marker(u)["time"] for u in before} == before          # completed tiles not redone
    assert np.array_equal(full(st, "pair_sum"), full(ref, "pair_sum"))
    assert np.array_equal(full(st, "pair_count"), full(ref, "pair_count"))
    # resuming with defaults adopts the stored parameters (no conflict), and has nothing left to do
    again = dp.coactivation_stats(G, tmp_path / "st")
    assert again.tile_size == 6 and job.progress()["units_computed"] == 0


def test_crash_between_chunk_write_and_marker_is_recomputed(client, tmp_path):
    G = mixed_gates(n=200, k=12, seed=14)
    args = dict(row_chunk=50, tile=6, split_every=2)
    with pytest.raises(RuntimeError, match="injected fault after writing tile 0.1"):
        dp.coactivation_stats(G, tmp_path / "st", **args, _fail_units=("0.1",))
    job = RunStore(tmp_path / "st").job("coactivation")
    assert "0.1" not in job.done()
    assert os.path.exists(tmp_path / "st" / "pair_sum" / "c" / "0" / "1")  # chunk written, marker not
    assert job.status == "failed" and "injected fault" in job.progress()["failures"][-1]["error"]
    st = dp.coactivation_stats(G, tmp_path / "st", **args)
    assert "0.1" in RunStore(tmp_path / "st").job("coactivation").done()
    assert_stats(st, reference(G))


@pytest.mark.parametrize("split_every", [2, 100])   # a reduction tree, and one streaming task per group
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_bad_gate_stops_job_without_partial_tiles(client, tmp_path, form, split_every):
    G = topk_gates(n=240, K=18, k=4, seed=15)
    bad_row, bad_atom = 130, 14   # atom 14 lies in block 2 (tile 6)
    G[bad_row, bad_atom] = 0.0
    if form == "dense":
        G[bad_row, bad_atom] = np.nan
        gates = dp.DenseGates(G)
    else:
        idx, val = to_topk(G, 5)
        slot = np.flatnonzero(idx[bad_row] == -1)[0]
        idx[bad_row, slot], val[bad_row, slot] = bad_atom, -1.0
        gates = dp.TopKGates(idx, val, 18)
    what = "is NaN" if form == "dense" else "is negative"
    with pytest.raises(GateDataError, match=rf"row {bad_row}, atom {bad_atom} {what} .*row chunk \[128, 160\).*"
                                            r"re-run the same command"):
        dp.coactivation_stats(gates, tmp_path / "st", row_chunk=32, tile=6, split_every=split_every)
    store = RunStore(tmp_path / "st")
    job = store.job("coactivation")
    done = job.done()
    assert job.status == "failed"
    for u in ("0.2", "1.2", "2.2"):                       # every tile touching atom 14 ...
        assert u not in done                              # ... is not complete
        i, j = map(int, u.split("."))
        assert not os.path.exists(tmp_path / "st" / "pair_sum" / "c" / str(i) / str(j))  # ... nor written
    clean = G.copy()
    clean[bad_row, bad_atom] = 0.0
    ref = reference(clean)
    st = dp.open_stats(tmp_path / "st", allow_incomplete=True)
    for u in done:                                        # tiles that completed are valid
        i, j = map(int, u.split("."))
        t = st.tile(i, j)
        np.testing.assert_allclose(t.pair_sum, ref["pair_sum"][t.rows, t.cols], rtol=1e-12)
    assert store.verify()["ok"]


def test_out_of_range_topk_index_in_zarr_found_during_compute(client, tmp_path):
    import zarr

    idx = np.array([[0, 1], [2, 9], [1, -1]] * 10, dtype=np.int32)
    val = np.ones(idx.shape, dtype=np.float32)
    zi = zarr.create_array(str(tmp_path / "i.zarr"), shape=idx.shape, chunks=(8, 2), dtype="int32")
    zv = zarr.create_array(str(tmp_path / "v.zarr"), shape=idx.shape, chunks=(8, 2), dtype="float32")
    zi[:], zv[:] = idx, val
    with pytest.raises(GateDataError, match=r"row 1, atom 9 is an atom index outside \[-1, k_atoms\)"):
        dp.coactivation_stats(dp.TopKGates(zi, zv, 5), tmp_path / "st", row_chunk=8)
    # numpy indices are checked up front, before any work
    with pytest.raises(InvalidArgumentError, match=r"top-k indices hold 9, outside \[-1, 5\)"):
        dp.TopKGates(idx, val, 5)


def test_repeated_topk_index_is_an_error(client, tmp_path):
    idx = np.array([[0, 1], [3, 3], [1, -1]], dtype=np.int64)
    with pytest.raises(GateDataError, match=r"row 1, atom 3 is repeated within the row"):
        dp.coactivation_stats(dp.TopKGates(idx, np.ones((3, 2)), 5), tmp_path / "st")


def test_store_conflict_and_overwrite(client, tmp_path):
    G = mixed_gates(n=100, k=8, seed=16)
    dp.coactivation_stats(G, tmp_path / "st", tile=4, row_chunk=50)
    with pytest.raises(StoreConflictError, match=r"already holds a different coactivation job .*overwrite=True"):
        dp.coactivation_stats(G[:90], tmp_path / "st", tile=4, row_chunk=50)
    with pytest.raises(StoreConflictError, match=r"params.tile: stored 4, requested 3"):
        dp.coactivation_stats(G, tmp_path / "st", tile=3, row_chunk=50)
    st = dp.coactivation_stats(G[:90], tmp_path / "st", tile=4, row_chunk=50, overwrite=True)
    assert_stats(st, reference(G[:90]))
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "x.txt").write_text("not a store")
    with pytest.raises(StoreConflictError, match="is not a distpen coactivation store"):
        dp.coactivation_stats(G, tmp_path / "other")


def test_progress_is_written_and_reported(client, tmp_path):
    G = mixed_gates(n=400, k=16, seed=17)
    seen = []
    dp.coactivation_stats(G, tmp_path / "st", row_chunk=25, tile=4, split_every=2, progress=seen.append)
    with open(tmp_path / "st" / "_distpen" / "coactivation" / "progress.json") as f:
        p = json.load(f)
    assert p["units_total"] == 10 and p["units_done"] == 10 and p["rows_processed"] == 400
    assert p["rows_total"] == 400 and p["throughput_rows_per_s"] > 0
    assert p["started"] <= p["updated"] and p["status"] == "done"
    assert seen[0]["units_done"] == 0 and seen[-1]["units_done"] == 10
    assert [s["rows_processed"] for s in seen] == sorted(s["rows_processed"] for s in seen)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"row_chunk": 0}, InvalidArgumentError, "row_chunk must be > 0, got 0"),
    ({"tile": -3}, InvalidArgumentError, "tile must be > 0, got -3"),
    ({"tile": 2.5}, InvalidArgumentError, "tile must be an integer, got 2.5"),
    ({"split_every": 1}, InvalidArgumentError, r"split_every must be ≥ 2 .*got 1"),
])
def test_bad_parameters_rejected_before_work(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dp.coactivation_stats(np.ones((4, 3)), tmp_path / "st", **kwargs)
    assert not os.path.exists(tmp_path / "st")


@pytest.mark.parametrize("call, exc, match", [
    (lambda st: st.pairs(measure="pmi"), InvalidArgumentError, r"measure must be one of .*got 'pmi'"),
    (lambda st: st.pairs(threshold=-1), InvalidArgumentError, "threshold must be ≥ 0, got -1.0"),
    (lambda st: st.pairs(top_m=0), InvalidArgumentError, "top_m must be > 0, got 0"),
    (lambda st: st.pairs(min_count=-2), InvalidArgumentError, "min_count must be ≥ 0, got -2"),
    (lambda st: st.tile(0, 9), InvalidArgumentError, r"tile index J = 9 out of range; expected an integer in \[0, 3\)"),
])
def test_bad_query_arguments(client, measured, call, exc, match):
    with pytest.raises(exc, match=match):
        call(measured[1])


def test_open_stats_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no statistics store at"):
        dp.open_stats(tmp_path / "nothing")
    import zarr

    zarr.open_group(str(tmp_path / "g"), mode="w").attrs["format"] = "something.else"
    with pytest.raises(StoreCorruptError, match="is not a coactivation statistics store"):
        dp.open_stats(tmp_path / "g")


def test_topk_chunk_cache_holds_validated_chunks_within_budget(tmp_path):
    import zarr

    G = topk_gates(n=120)
    idx, val = to_topk(G, 6)
    zi = zarr.create_array(str(tmp_path / "i"), shape=idx.shape, chunks=(40, 6), dtype="int64")
    zv = zarr.create_array(str(tmp_path / "v"), shape=val.shape, chunks=(40, 6), dtype="float64")
    zi[:], zv[:] = idx, val
    ws = ker.ScatterWorkspace()
    data, base = (zi, zv), (0, 0)
    plan = {"k_atoms": 29, "cache_key": "job", "cache_bytes": 2 * (16 * 40 * 6 + 8 * 41)}
    try:
        first = tasks._topk_chunk(plan, data, base, 0, 40, 8, 16, ws)
        assert tasks._topk_chunk(plan, data, base, 0, 40, 8, 16, ws) is first       # a hit
        ref = ker.topk_block_csr(idx[:40], val[:40], 0, 29, 29)
        assert all(np.array_equal(a, b) for a, b in zip(first, ref))                  # every atom
        tasks._topk_chunk(plan, data, base, 40, 80, 8, 16, ws)
        third = tasks._topk_chunk(plan, data, base, 80, 120, 8, 16, ws)               # over budget
        assert third[1].min() >= 8 and third[1].max() < 16                            # span only
        assert len(tasks._CHUNKS) == 2 and tasks._CHUNKS_USED[0] <= plan["cache_bytes"]
        zv[50, :] = np.where(idx[50] >= 0, np.nan, 0.0)
        with pytest.raises(GateDataError, match="row 50"):
            tasks._topk_chunk({**plan, "cache_key": "other"}, data, base, 40, 80, 0, 29, ws)
    finally:
        assert tasks._release_buffers() >= 0
    assert not tasks._CHUNKS and tasks._CHUNKS_USED[0] == 0


# --------------------------------------------------------------------------- delphi neighbour lists
def test_neighbours_match_a_dense_jaccard_top_m_and_write_delphi_json(client, measured, tmp_path):
    import json

    G, st = measured
    M, ok = numpy_measure(G, "jaccard")
    K = G.shape[1]
    lists = st.neighbours(measure="jaccard", top_m=4, out=tmp_path / "layer-co-occurrence.json")
    for a in range(K):
        cand = [(M[a, b], b) for b in range(K) if b != a and ok[a, b] and M[a, b] > 0]
        cand.sort(key=lambda x: (-x[0], x[1]))
        got = lists[a]
        assert [p for _, p in got] == [b for _, b in cand[:4]], a
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in cand[:4]], rtol=1e-12)
    assert lists[3] == [] and lists[K - 1] == []          # never fire: empty lists, not NaN
    text = (tmp_path / "layer-co-occurrence.json").read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert sorted(doc, key=int) == [str(a) for a in range(K)]
    score, nbr = doc["1"][0]                               # score first, as delphi's loader reads it
    assert isinstance(score, float) and isinstance(nbr, int) and nbr == lists[1][0][1]


# --------------------------------------------------------------------------- clusters
def planted_gates(n=3000, k=48, seed=2):
    """Groups of latents that fire together, plus background noise: real structure to recover."""
    rng = np.random.default_rng(seed)
    groups = [range(0, 6), range(6, 10), range(10, 13), range(20, 28), range(30, 32)]
    G = (rng.random((n, k)) < 0.02) * rng.exponential(1.0, (n, k))
    for g in groups:
        on = rng.random(n) < 0.1
        for a in g:
            fire = on & (rng.random(n) < 0.9)
            G[fire, a] = 1.0 + rng.random(int(fire.sum()))
    return G


def dense_components(J, thr):
    from scipy.sparse.csgraph import connected_components

    A = (J > thr).astype(int)
    np.fill_diagonal(A, 0)
    return connected_components(A, directed=False)[1]


@pytest.mark.parametrize("max_size", [3, 6, 200])
def test_clusters_match_sae_cooccurrence_dense_bisection(client, tmp_path, max_size):
    G = planted_gates()
    st = dp.coactivation_stats(G, tmp_path / "st", row_chunk=700, tile=16)
    J, ok = numpy_measure(G, "jaccard")
    J = np.where(ok, J, 0.0)
    np.fill_diagonal(J, 0.0)
    cl = st.clusters("jaccard", max_size=max_size)
    # the threshold is the smallest (over the edge weights) whose largest component fits max_size
    lab = dense_components(J, cl.threshold)
    assert np.bincount(lab).max() <= max_size
    below = np.unique(J[J > 0])
    below = below[below < cl.threshold]
    if cl.threshold > 0:  # one step lower (the next edge weight down, or 0) no longer fits
        lower = below[-1] if below.size else 0.0
        assert np.bincount(dense_components(J, lower)).max() > max_size
    groups = {frozenset(np.flatnonzero(lab == g).tolist()) for g in np.unique(lab) if np.sum(lab == g) >= 2}
    assert {frozenset(r["members"].tolist()) for r in cl.rows} == groups
    assert list(cl.sizes) == sorted(cl.sizes, reverse=True)
    for r in cl.rows:
        m = r["members"]
        sub = J[np.ix_(m, m)] > cl.threshold
        assert r["edges"] == int(sub.sum()) // 2
        assert r["density"] == pytest.approx(r["edges"] / (len(m) * (len(m) - 1) / 2))
        deg = np.where(sub, J[np.ix_(m, m)], 0.0).sum(axis=1)
        assert deg[list(m).index(r["hub"])] == pytest.approx(deg.max())
    assert cl.n_isolated == int(sum(np.sum(lab == g) == 1 for g in np.unique(lab)))


def test_clusters_recover_planted_groups_and_louvain_partitions(client, tmp_path):
    G = planted_gates()
    st = dp.coactivation_stats(G, tmp_path / "st", row_chunk=700, tile=16)
    cl = st.clusters("jaccard", threshold=0.3)
    found = {frozenset(r["members"].tolist()) for r in cl.rows}
    assert {frozenset(range(0, 6)), frozenset(range(6, 10)), frozenset(range(20, 28))} <= found
    lv = st.clusters("npmi", method="louvain", threshold=0.2, seed=1)
    members = np.concatenate([r["members"] for r in lv.rows])
    assert members.size == np.unique(members).size                    # a partition
    assert all(r["size"] >= 2 and 0 < r["density"] <= 1 for r in lv.rows)
    again = st.clusters("npmi", method="louvain", threshold=0.2, seed=1)
    assert [r["members"].tolist() for r in again.rows] == [r["members"].tolist() for r in lv.rows]
    labels = lv.labels(G.shape[1])
    assert (labels[members] >= 0).all() and (labels == -1).sum() == G.shape[1] - members.size
    with pytest.raises(InvalidArgumentError, match="method must be one of"):
        st.clusters(method="leiden")
    with pytest.raises(InvalidArgumentError, match="max_size must be ≥ 2"):
        st.clusters(max_size=1)


def test_statistics_store_opens_in_xarray_with_named_dimensions(client, tmp_path):
    import xarray as xr

    G = mixed_gates(n=300, k=21, seed=4)
    st = dp.coactivation_stats(G, tmp_path / "st", row_chunk=100, tile=8)
    ds = xr.open_zarr(str(tmp_path / "st"), consolidated=False)
    assert ds["pair_sum"].dims == ("latent", "partner") and ds["fire_count"].dims == ("latent",)
    assert set(ds.data_vars) == {"pair_sum", "pair_count", "fire_count", "gate_sum", "gate_sq_sum"}
    ref = reference(G)
    np.testing.assert_array_equal(ds["fire_count"].values, ref["fire_count"])
    # upper tiles only are stored: xarray sees the upper block triangle, the rest fill value 0
    ps = ds["pair_sum"].values
    np.testing.assert_allclose(np.triu(ps), np.triu(ref["pair_sum"]), rtol=1e-12)
    assert ds.attrs["n_tokens"] == st.n_tokens == 300


def test_progress_moves_while_one_streaming_task_runs(client, tmp_path):
    """One tile group, one streaming task over many row chunks: the rows processed reported to the
    callback and to progress.json rise while that task runs, before any tile is done."""
    G = topk_gates(n=12000, seed=5)
    idx, val = to_topk(G, 6)
    seen = []
    st = dp.coactivation_stats(dp.TopKGates(idx, val, 29), tmp_path / "st", row_chunk=10, tile=29,
                               split_every=10_000, progress=lambda info: seen.append(dict(info)),
                               _progress_every=0.005)
    assert_stats(st, reference(G))
    assert st._job.progress()["n_groups"] == 1 and st._job.progress()["n_leaves_per_group"] == 1
    during = [i["rows_processed"] for i in seen if i["units_done"] == 0]
    assert any(0 < r < 12000 for r in during), during
    assert during == sorted(during)                  # rows only ever rise
    assert seen[-1]["rows_processed"] == 12000 and seen[-1]["units_done"] == seen[-1]["units_total"]
