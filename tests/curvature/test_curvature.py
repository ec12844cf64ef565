"""Distributed evaluation and Gauss-Newton assembly against the in-memory penalties."""

from __future__ import annotations

import os
import time

import dask.array as da
import numpy as np
import pytest
import zarr

import distpen as dp
from distpen.cli.demo import synthetic_decoder_problem
from distpen.curvature.evaluate import evaluate
from distpen.curvature.factored import FactoredMajorizer
from distpen.curvature.tiles import assemble_majorizer, tile_work
from distpen.errors import InvalidArgumentError, ShapeMismatchError, StoreConflictError

ALL_OPS = ("value", "grad", "grad_rho", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")


def decoder_problem(K=40, p=6, n_pairs=150, seed=0, learnable=True, max_block=4):
    bs, pairs, beta = synthetic_decoder_problem(K, p, n_pairs, max_block=max_block, seed=seed)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, bs, p, 1.7, learnable_weight=learnable)
    rng = np.random.default_rng(seed + 10)
    rho = np.array([0.3]) if learnable else np.zeros(0)
    return pen, beta, rho, rng.standard_normal(beta.shape[0])


def reference(pen, t, rho, v):
    return {"value": pen.value(t, rho), "grad": pen.grad_target(t, rho), "grad_rho": pen.grad_rho(t, rho),
            "hvp": pen.hvp(t, rho, v), "psd_majorizer_hvp": pen.psd_majorizer_hvp(t, rho, v),
            "psd_majorizer_diag": pen.psd_majorizer_diag(t, rho), "hessian_diag": pen.hessian_diag(t, rho)}


def assert_matches(res, ref, rtol=1e-12):
    assert set(res) == set(ref)
    for name, want in ref.items():
        got = res[name]
        if want is None:
            assert got is None, name
            continue
        got = np.asarray(got[...] if isinstance(got, zarr.Array) else got, dtype=np.float64).reshape(np.shape(want))
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        assert np.max(np.abs(got - want), initial=0.0) <= rtol * scale, name


@pytest.mark.parametrize("n_tasks", [1, 3, 17, 1000])
def test_evaluate_decoder_numpy_equals_in_memory(client, n_tasks):
    pen, beta, rho, v = decoder_problem()
    res = evaluate(pen, beta, rho, ops=ALL_OPS, v=v, n_tasks=n_tasks)
    assert_matches(res, reference(pen, beta, rho, v))
    assert isinstance(res["grad"], np.ndarray) and res["grad"].dtype == np.float64


def test_evaluate_reuses_broadcast_inputs_only_while_they_are_unchanged(client):
    """The penalty and an equal t are sent once across calls; a t changed in place, another
    penalty or a changed pair weight are sent again — results always equal the in-memory ones."""
    from distpen._broadcast import BROADCASTS

    pen, beta, rho, v = decoder_problem(seed=3)
    t = beta.copy()
    BROADCASTS.clear()
    evaluate(pen, t, rho, ops=("grad",))
    keys = {name: BROADCASTS._get(client, name)["future"].key for name in ("t", "penalty")}
    res = evaluate(pen, t, rho, ops=("value", "hvp"), v=v)
    assert BROADCASTS._get(client, "t")["future"].key == keys["t"]
    assert BROADCASTS._get(client, "penalty")["future"].key == keys["penalty"]
    assert_matches(res, {"value": pen.value(t, rho), "hvp": pen.hvp(t, rho, v)})
    t[5] += 0.25                                   # in place: the next call must see it
    res = evaluate(pen, t, rho, ops=("grad",))
    assert BROADCASTS._get(client, "t")["future"].key != keys["t"]
    assert_matches(res, {"grad": pen.grad_target(t, rho)})
    pen2 = pen.with_pairs(dp.PairTable(pen.pairs.j, pen.pairs.k, pen.pairs.w * 2.0, pen.k_atoms))
    res = evaluate(pen2, t, rho, ops=("grad",))
    assert BROADCASTS._get(client, "penalty")["future"].key != keys["penalty"]
    assert_matches(res, {"grad": pen2.grad_target(t, rho)})
    BROADCASTS.clear()
    assert BROADCASTS._get(client, "t") is None


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
@pytest.mark.parametrize("chunk", [7, 50, 10_000])
def test_evaluate_decoder_inputs_into_zarr(client, tmp_path, kind, chunk):
    pen, beta, rho, v = decoder_problem(seed=3, learnable=False)
    t = beta
    if kind == "dask":
        t = da.from_array(beta, chunks=33)
    elif kind == "zarr":
        t = zarr.create_array(str(tmp_path / "beta.zarr"), shape=beta.shape, chunks=(41,), dtype="f8")
        t[:] = beta
    res = evaluate(pen, t, rho, ops=ALL_OPS, v=v, out=str(tmp_path / "run"), chunk=chunk, n_tasks=5)
    assert_matches(res, reference(pen, beta, rho, v))
    assert isinstance(res["grad"], zarr.Array)
    assert res["grad"].chunks == (min(chunk, beta.shape[0]),)


def test_evaluate_decoder_one_worker_process(tmp_path):
    from distributed import Client, LocalCluster

    pen, beta, rho, v = decoder_problem(seed=5)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        assert len(c.scheduler_info()["workers"]) == 1
        res = evaluate(pen, beta, rho, ops=ALL_OPS, v=v, n_tasks=4)
    assert_matches(res, reference(pen, beta, rho, v))


@pytest.mark.parametrize("row_chunk", [23, 120])
@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_evaluate_nested_equals_in_memory(client, tmp_path, row_chunk, kind):
    pen = dp.NestedPrefixPenalty([2, 5, 9], [1.0, 0.5, 0.25], eps=0.05, latent_dim=9)
    rng = np.random.default_rng(1)
    psi = rng.standard_normal(120 * 9) * (rng.random(120 * 9) < 0.4)
    v = rng.standard_normal(psi.shape[0])
    rho = np.array([0.1, -0.2, 0.3])
    t = psi
    if kind == "dask":
        t = da.from_array(psi.reshape(120, 9), chunks=(13, 9))
    elif kind == "zarr":
        t = zarr.create_array(str(tmp_path / "psi.zarr"), shape=(120, 9), chunks=(17, 9), dtype="f8")
        t[:] = psi.reshape(120, 9)
    ref = {"value": pen.value(psi, rho), "grad": pen.grad_target(psi, rho), "grad_rho": pen.grad_rho(psi, rho),
           "hvp": pen.hvp(psi, rho, v), "psd_majorizer_hvp": pen.psd_majorizer_hvp(psi, rho, v),
           "psd_majorizer_diag": pen.psd_majorizer_diag(psi, rho), "hessian_diag": pen.hessian_diag(psi, rho)}
    res = evaluate(pen, t, rho, ops=ALL_OPS, v=v, row_chunk=row_chunk)
    assert_matches(res, ref)
    res = evaluate(pen, t, rho, ops=ALL_OPS, v=v, row_chunk=row_chunk, out=str(tmp_path / "out"))
    assert_matches(res, ref)


# --------------------------------------------------------------------------- assembly
def _stored_tiles(path, name="H"):
    base = os.path.join(path, name, "c")
    if not os.path.isdir(base):
        return set()
    return {(int(i), int(j)) for i in os.listdir(base) for j in os.listdir(os.path.join(base, i))}


def _dense(pen, beta, rho, scale):
    n = beta.shape[0]
    H = np.zeros((n, n))
    pen.accumulate_psd_majorizer_dense(beta, rho, scale, H)
    return H


@pytest.mark.parametrize("tile", [9, 37, 100, 10_000])
def test_assembled_tiles_equal_dense(client, tmp_path, tile):
    pen, beta, rho, _ = decoder_problem(K=30, p=4, n_pairs=60, seed=2)
    dense = _dense(pen, beta, rho, 1.5)
    out = str(tmp_path / "run")
    H = assemble_majorizer(pen, beta, rho, out, scale=1.5, tile=tile)
    n = beta.shape[0]
    assert H.shape == (n, n) and H.chunks == (min(tile, n),) * 2
    np.testing.assert_allclose(H[...], dense, rtol=0, atol=1e-12 * np.abs(dense).max())
    # exactly the tiles with a contribution exist on disk
    T = min(tile, n)
    nt = -(-n // T)
    nonzero = {(I, J) for I in range(nt) for J in range(nt)
               if np.any(dense[I * T:(I + 1) * T, J * T:(J + 1) * T] != 0)}
    assert _stored_tiles(out) == nonzero
    assert H.attrs["tiles_written"] == len(nonzero)


def test_tile_work_covers_every_contribution():
    pen, beta, rho, _ = decoder_problem(K=25, p=3, n_pairs=40, seed=4)
    tile = 11
    keys, *_ = tile_work(pen, tile)
    dense = _dense(pen, beta, rho, 1.0)
    n = beta.shape[0]
    nt = -(-n // tile)
    need = {I * nt + J for I in range(nt) for J in range(nt)
            if np.any(dense[I * tile:(I + 1) * tile, J * tile:(J + 1) * tile])}
    assert need <= set(keys.tolist())


def test_factored_matvec_equals_psd_majorizer_hvp(client, tmp_path):
    pen, beta, rho, v = decoder_problem(seed=6)
    fm = assemble_majorizer(pen, beta, rho, str(tmp_path / "fac"), scale=2.0, format="factored")
    assert isinstance(fm, FactoredMajorizer)
    want = 2.0 * pen.psd_majorizer_hvp(beta, rho, v)
    np.testing.assert_allclose(fm.matvec(v), want, rtol=0, atol=1e-12 * np.abs(want).max())
    S = fm.S[...]
    np.testing.assert_allclose(S, pen.weighted_grams(beta, rho), rtol=1e-13, atol=1e-15)
    reopened = FactoredMajorizer(str(tmp_path / "fac"))
    np.testing.assert_allclose(reopened.matvec(v), want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_interrupted_assembly_resumes_only_missing_tiles(client, tmp_path):
    pen, beta, rho, _ = decoder_problem(K=30, p=4, n_pairs=80, seed=7)
    out = str(tmp_path / "run")
    tile = 13
    n = beta.shape[0]
    nt = -(-n // tile)
    keys, *_ = tile_work(pen, tile)
    bad = int(keys[len(keys) // 2])
    with pytest.raises(RuntimeError, match="injected fault"):
        assemble_majorizer(pen, beta, rho, out, tile=tile, tiles_per_task=3, _fail_tiles={bad})
    store = dp.store.RunStore(out)
    done_tiles = {u for u in store.job("assembly").done() if u.startswith("H.")}
    assert 0 < len(done_tiles) < len(keys)
    assert store.manifest("assembly")["status"] == "failed"
    # what a writer killed mid-write leaves: an old temporary file (swept on resume) and, from a
    # writer that may still be at work, a fresh one (kept)
    cdir = os.path.join(out, "H", "c", "0")
    os.makedirs(cdir, exist_ok=True)
    stale, fresh = os.path.join(cdir, "0.tmp-1-2"), os.path.join(cdir, "1.tmp-3-4")
    for path in (stale, fresh):
        with open(path, "wb") as f:
            f.write(b"half a chunk")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    H = assemble_majorizer(pen, beta, rho, out, tile=tile, tiles_per_task=3)
    assert not os.path.exists(stale) and os.path.exists(fresh)
    os.unlink(fresh)
    assert H.attrs["tiles_computed_this_run"] == len(keys) - len(done_tiles)
    np.testing.assert_allclose(H[...], _dense(pen, beta, rho, 1.0), rtol=0, atol=1e-13)
    assert store.manifest("assembly")["status"] == "done"
    assert divmod(bad, nt)  # the failed tile was recomputed and is present when non-zero
    # a third run has nothing to do
    H = assemble_majorizer(pen, beta, rho, out, tile=tile)
    assert H.attrs["tiles_computed_this_run"] == 0


def test_different_job_into_existing_store_is_refused(client, tmp_path):
    pen, beta, rho, _ = decoder_problem(K=20, p=3, n_pairs=30, seed=8)
    out = str(tmp_path / "run")
    assemble_majorizer(pen, beta, rho, out, tile=16)
    with pytest.raises(StoreConflictError, match="different assembly job.*tile"):
        assemble_majorizer(pen, beta, rho, out, tile=32)
    with pytest.raises(StoreConflictError, match="overwrite=True"):
        assemble_majorizer(pen, beta * 2, rho, out, tile=16)
    H = assemble_majorizer(pen, beta * 2, rho, out, tile=32, overwrite=True)
    np.testing.assert_allclose(H[...], _dense(pen, beta * 2, rho, 1.0), atol=1e-12)


def test_nested_majorizer_is_diagonal(client, tmp_path):
    pen = dp.NestedPrefixPenalty([3, 6], [1.0, 2.0], eps=0.1)
    psi = np.random.default_rng(0).standard_normal(60)
    H = assemble_majorizer(pen, psi, np.zeros(2), str(tmp_path / "run"), tile=16, scale=3.0)
    np.testing.assert_allclose(H[...], np.diag(3.0 * pen.hessian_diag(psi, np.zeros(2))), rtol=1e-14)
    assert _stored_tiles(str(tmp_path / "run")) == {(i, i) for i in range(4)}


def _peak_rss():
    """This process's peak resident memory since its exec (``VmHWM``). Not ``ru_maxrss``: Linux
    carries that across ``execve``, so a spawned worker would report the peak of the test process
    it was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def test_bounded_memory_assembly(client, tmp_path):
    """A worker limited to 600 MB assembles a 2 GB logical matrix (banded pairs) and evaluates it."""
    from distributed import Client, LocalCluster

    limit = 600 * 2**20
    K, p, M = 400, 40, 1
    rng = np.random.default_rng(0)
    j = rng.integers(0, K, 6 * K)
    k = j + rng.integers(1, 20, 6 * K)
    keep = k < K
    key = np.unique(j[keep] * K + k[keep])
    pairs = dp.PairTable(key // K, key % K, rng.random(key.shape[0]), K)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, np.full(K, M), p, 1.0)
    beta = rng.standard_normal(K * M * p)
    v = rng.standard_normal(beta.shape[0])
    n = beta.shape[0]
    tile = 2_000
    assert n * n * 8 > 3 * limit
    # compile the kernels on the session's roomy workers first (numba's disk cache): on a fresh
    # checkout, compiling inside the limited worker would count towards its peak memory
    small = dp.DecoderIncoherencePenalty.from_pairs(pairs[:50], np.full(K, M), p, 1.0)
    assemble_majorizer(small, beta, np.zeros(0), str(tmp_path / "warm-asm"), tile=tile)
    evaluate(small, beta, np.zeros(0), ops=("value", "grad", "psd_majorizer_hvp"), v=v,
             out=str(tmp_path / "warm-ev"), chunk=1_000)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        H = assemble_majorizer(pen, beta, np.zeros(0), str(tmp_path / "asm"), tile=tile)
        res = evaluate(pen, beta, np.zeros(0), ops=("value", "grad", "psd_majorizer_hvp"), v=v,
                       out=str(tmp_path / "ev"), chunk=1_000)
        peak = max(c.run(_peak_rss).values())
    stored = _stored_tiles(str(tmp_path / "asm"))
    assert 0 < len(stored) < (n // tile) ** 2
    for I, J in sorted(stored)[::3]:
        want = np.zeros((tile, tile))
        pen.accumulate_psd_majorizer_tile(beta, np.zeros(0), 1.0, want, I * tile, J * tile)
        np.testing.assert_allclose(H[I * tile:(I + 1) * tile, J * tile:(J + 1) * tile], want, atol=1e-12)
    assert res["value"] == pytest.approx(pen.value(beta), rel=1e-12)
    np.testing.assert_allclose(res["psd_majorizer_hvp"][...], pen.psd_majorizer_hvp(beta, np.zeros(0), v),
                               rtol=0, atol=1e-10)
    assert peak < limit, f"worker peak RSS {peak / 2**20:.0f} MiB over the {limit / 2**20:.0f} MiB limit"


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_before_work(client, tmp_path):
    pen, beta, rho, v = decoder_problem(seed=9)
    with pytest.raises(ShapeMismatchError, match="t has length"):
        evaluate(pen, beta[:-1], rho)
    z = zarr.create_array(str(tmp_path / "short.zarr"), shape=(beta.shape[0] + 3,), chunks=(10,), dtype="f8")
    with pytest.raises(ShapeMismatchError, match=r"t has shape .*expects"):
        evaluate(pen, z, rho)
    with pytest.raises(InvalidArgumentError, match="need a probe vector"):
        evaluate(pen, beta, rho, ops=("hvp",))
    with pytest.raises(InvalidArgumentError, match="unknown op 'hessian'"):
        evaluate(pen, beta, rho, ops=("value", "hessian"))
    with pytest.raises(ShapeMismatchError, match="v has length"):
        evaluate(pen, beta, rho, ops=("hvp",), v=v[:5])
    with pytest.raises(InvalidArgumentError, match="tile must be > 0, got 0"):
        assemble_majorizer(pen, beta, rho, str(tmp_path / "x"), tile=0)
    with pytest.raises(InvalidArgumentError, match="format must be"):
        assemble_majorizer(pen, beta, rho, str(tmp_path / "x"), format="csr")
    with pytest.raises(ShapeMismatchError, match="rho has length 0, expected 1"):
        evaluate(pen, beta, np.zeros(0))
    with pytest.raises(ShapeMismatchError, match="pairs index k_atoms = 41 atoms but block_sizes describe 40"):
        dp.DecoderIncoherencePenalty(dp.PairTable([0], [40], [1.0], 41), pen.block_sizes, pen.p_out, 1.0)
    assert not os.path.exists(tmp_path / "x" / "H")


def test_logical_32_terabyte_majorizer_writes_only_touched_tiles(client, tmp_path):
    """n = 2·10⁶ (32 TB logical): bytes on disk follow the touched tiles, not n²."""
    K, p = 100_000, 20
    rng = np.random.default_rng(0)
    j = np.sort(rng.choice(K - 1, 40, replace=False))
    k = j + 1
    pairs = dp.PairTable(j, k, rng.random(40) + 0.5, K)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, np.ones(K, dtype=np.int64), p, 1.0)
    n = pen.n_coef
    assert n == 2_000_000 and n * n * 8 > 3e13
    beta = rng.standard_normal(n)
    out = str(tmp_path / "huge")
    T = 1024
    H = assemble_majorizer(pen, beta, np.zeros(0), out, tile=T)
    tiles = _stored_tiles(out)
    keys, *_ = tile_work(pen, T)
    assert len(tiles) == H.attrs["tiles_written"] <= len(keys) <= 4 * 40
    on_disk = sum(os.path.getsize(os.path.join(dp_, f)) for dp_, _, fs in os.walk(out) for f in fs)
    assert on_disk < 64 * 2**20
    # one touched tile against the in-process tile kernel
    I, J = sorted(tiles)[0]
    want = np.zeros((T, T))
    pen.accumulate_psd_majorizer_tile(beta, np.zeros(0), 1.0, want, I * T, J * T)
    np.testing.assert_allclose(H[I * T:(I + 1) * T, J * T:(J + 1) * T], want, atol=1e-12)
