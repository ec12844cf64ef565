"""The atom-major decomposition (``decomposition="atoms"``): the copy, its reads, the square tasks,
and the job's bits against the row-major plan's."""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import distpen as dp
from distpen.coactivation import _kernels as ker
from distpen.coactivation import atom_major as am
from distpen.coactivation import plan as coplan
from distpen.coactivation.forecast import DEFAULT_RATES, calibrate, plan_atom_major
from distpen.coactivation.job import scratch_dir
from distpen.errors import GateDataError, InvalidArgumentError
from distpen.store import RunStore

sys.path.insert(0, os.path.dirname(__file__))
from test_coactivation_stats import assert_stats, full, reference, to_topk, topk_gates  # noqa: E402


def _assert_same_bits(a, b):
    for name in ("pair_sum", "pair_count"):
        assert np.array_equal(full(a, name), full(b, name)), name
    for name in ("fire_count", "gate_sum", "gate_sq_sum"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------- pieces
def test_square_groups_cover_every_tile_once():
    nb = 7
    tiles = coplan._tiles(nb)
    squares = am.square_groups(tiles, nb, 3)                     # ranges [0,3) [3,6) [6,7)
    got = sorted(t for ts, _ in squares for t in ts)
    assert got == tiles
    for ts, ranges in squares:
        blocks = {b for r in ranges for b in range(*r)}
        assert {b for t in ts for b in t} <= blocks                # a task reads every block it needs
        assert all(r0 < r1 for r0, r1 in ranges) and ranges == sorted(ranges)
    assert len(squares) == 6 and [len(ts) for ts, _ in squares][0] == 9   # largest first
    # adjacent ranges are read as one; a far pair as two
    assert ([(0, 6)] in [r for _, r in squares]) and ([(0, 3), (6, 7)] in [r for _, r in squares])
    # a pending subset: only squares holding pending tiles, only those tiles
    sub = am.square_groups([(0, 1), (5, 6), (6, 6)], nb, 3)
    assert sorted(t for ts, _ in sub for t in ts) == [(0, 1), (5, 6), (6, 6)] and len(sub) == 3


def test_copy_round_trip_equals_the_rows_restricted_to_the_blocks(tmp_path):
    """by_block + write_copy + read_chunk give, for any block ranges, the chunk's sparse rows with
    only those blocks' atoms, sorted by atom: the same arrays as slicing the CSR matrix."""
    rng = np.random.default_rng(3)
    n, K, T = 500, 90, 16                                          # 6 blocks, the last ragged
    A = sp.random(n, K, density=0.12, format="csr", random_state=rng, dtype=np.float64)
    A.sort_indices()
    csr = (A.indptr.astype(np.int64), A.indices.astype(np.int32), A.data.astype(np.float32))
    nb = -(-K // T)
    path = str(tmp_path / "c.npy")
    assert am.write_copy(path, csr, T, nb) == A.nnz
    assert not glob.glob(str(tmp_path / "*.tmp"))
    ws = ker.ScatterWorkspace()
    for ranges in ([(0, nb)], [(1, 3)], [(0, 1), (4, 6)], [(5, 6)], [(2, 2)]):
        keep = np.zeros(K, dtype=bool)
        for b0, b1 in ranges:
            keep[b0 * T:min(K, b1 * T)] = True
        ref = A[:, np.flatnonzero(keep)].tocsr()
        ref.sort_indices()
        ip, cols, vals = am.read_chunk(path, n, ranges, ws)
        np.testing.assert_array_equal(ip, ref.indptr)
        np.testing.assert_array_equal(cols, np.flatnonzero(keep)[ref.indices])
        np.testing.assert_array_equal(vals, ref.data.astype(np.float32))


def test_a_truncated_copy_file_is_named(tmp_path):
    A = sp.random(50, 40, density=0.2, format="csr", random_state=1)
    csr = (A.indptr.astype(np.int64), A.indices.astype(np.int32), A.data)
    path = str(tmp_path / "c.npy")
    am.write_copy(path, csr, 8, 5)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)
    with pytest.raises(OSError, match="truncated copy file"):
        am.read_chunk(path, 50, [(0, 5)], ker.ScatterWorkspace())


# --------------------------------------------------------------------------- the job
def test_atoms_equal_rows_bit_for_bit_topk(client, tmp_path):
    G = topk_gates(n=700, K=40, k=5, seed=4, dtype=np.float32)
    idx, val = to_topk(G, 5)
    gates = dp.TopKGates(idx, val, 40)
    args = dict(row_chunk=100, tile=8)                            # 5 blocks, 15 tiles, 7 chunks
    rows = dp.coactivation_stats(gates, tmp_path / "rows", split_every=7, decomposition="rows", **args)
    infos = []
    atoms = dp.coactivation_stats(gates, tmp_path / "atoms", decomposition="atoms", _side=2,
                                  progress=infos.append, **args)
    assert_stats(atoms, reference(G))
    _assert_same_bits(rows, atoms)
    p = atoms._job.progress()
    assert p["decomposition"] == "atoms" and p["n_groups"] == 6 and p["status"] == "done"
    assert atoms.attrs["split_every"] == 7                        # streams: the rows job's parameters
    copying = [i for i in infos if i.get("phase") == "atom-major copy"]
    assert copying and copying[-1]["phase_done"] == 700 and copying[-1]["phase_total"] == 700
    assert infos[-1]["phase"] == "tiles" and infos[-1]["rows_processed"] == 700
    assert not os.path.exists(scratch_dir(str(tmp_path / "atoms")))  # the copy goes with the job


@pytest.mark.parametrize("threshold", [0.0, 0.4, {"relative": 0.5}])
def test_atoms_equal_rows_bit_for_bit_csr_with_thresholds(client, tmp_path, threshold):
    rng = np.random.default_rng(8)
    A = sp.random(450, 37, density=0.15, format="csr", random_state=rng, dtype=np.float64)
    gates = dp.SparseGates(A)
    args = dict(row_chunk=64, tile=6, split_every=8, fire_threshold=threshold)   # 7 blocks, 8 chunks
    rows = dp.coactivation_stats(gates, tmp_path / "rows", **args)
    atoms = dp.coactivation_stats(gates, tmp_path / "atoms", decomposition="atoms", _side=3, **args)
    _assert_same_bits(rows, atoms)
    assert atoms._job.progress()["n_groups"] == 6


def test_interrupted_atoms_job_reuses_its_copy_and_resumes_under_rows(client, tmp_path):
    from distributed import get_task_stream

    G = topk_gates(n=600, K=30, k=4, seed=9)
    idx, val = to_topk(G, 4)
    gates = dp.TopKGates(idx, val, 30)
    args = dict(row_chunk=100, tile=6, split_every=6)             # 5 blocks, 15 tiles
    ref = dp.coactivation_stats(gates, tmp_path / "ref", **args)
    out = tmp_path / "st"
    dp.coactivation_stats(gates, out, decomposition="atoms", _side=2, _units=[(0, 0), (0, 3)], **args)
    copies = glob.glob(os.path.join(scratch_dir(str(out)), "atom-major-*", "rows-*.npy"))
    assert len(copies) == 6                                        # kept: the job is not done
    with get_task_stream(client=client) as ts:
        dp.coactivation_stats(gates, out, decomposition="atoms", _side=2, _units=[(1, 1), (2, 4)], **args)
    names = {str(d["key"]).split("-")[2] for d in ts.data if str(d["key"]).startswith("distpen-coact-")}
    assert names == {"stream"}, names                               # no chunk copied twice
    st = dp.coactivation_stats(gates, out, decomposition="rows", **args)   # the rest, row-major
    assert st._job.progress()["units_computed"] == 11
    _assert_same_bits(ref, st)
    assert not os.path.exists(scratch_dir(str(out)))


def test_a_bad_gate_fails_the_copy_and_leaves_no_partial_file(client, tmp_path):
    G = topk_gates(n=400, K=20, k=4, seed=2)
    idx, val = to_topk(G, 4)
    val = val.copy()
    val[250, 0] = np.nan
    idx[250, 0] = 3
    gates = dp.TopKGates(idx, val, 20)
    with pytest.raises(GateDataError, match="row 250"):
        dp.coactivation_stats(gates, tmp_path / "st", row_chunk=100, tile=5, decomposition="atoms", _side=2)
    assert not glob.glob(os.path.join(scratch_dir(str(tmp_path / "st")), "**", "*.tmp"), recursive=True)
    assert RunStore(tmp_path / "st").job("coactivation").status == "failed"


def test_a_copy_the_disk_cannot_hold_is_refused_before_any_copy(client, tmp_path, monkeypatch):
    """The copy's size (at most 4 + 4 + 4 bytes an entry for float32 top-k gates) is checked against
    the free space before a copy task runs; once there is room, the same job runs to the end."""
    import collections

    from distpen.coactivation import job as jobmod
    from distpen.errors import StoreError

    G = topk_gates(n=400, K=20, k=4, seed=3).astype(np.float32)
    idx, val = to_topk(G, 4)
    gates = dp.TopKGates(idx, val.astype(np.float32), 20)
    args = dict(row_chunk=100, tile=5, decomposition="atoms", _side=2)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(jobmod.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(StoreError, match=r"needs up to 0\.00 GiB \(4 row chunks of up to 4 entries a row, 12 bytes "
                                         r"each\) and the disk has 0\.00 GiB free"):
        dp.coactivation_stats(gates, tmp_path / "st", **args)
    assert not glob.glob(os.path.join(scratch_dir(str(tmp_path / "st")), "atom-major-*", "rows-*"))
    assert RunStore(tmp_path / "st").job("coactivation").status == "failed"
    monkeypatch.undo()
    st = dp.coactivation_stats(gates, tmp_path / "st", **args)
    assert_stats(st, reference(G))


def test_the_default_takes_atoms_when_the_forecast_and_the_disk_allow(client, tmp_path, monkeypatch):
    """decomposition=None: atom-major when the forecast says over 2x and the disk holds the copy,
    else row-major (never an error for want of disk); either way the same bits."""
    import collections

    from distpen.coactivation import forecast
    from distpen.coactivation import job as jobmod

    G = topk_gates(n=600, K=30, k=4, seed=7).astype(np.float32)
    idx, val = to_topk(G, 4)
    gates = dp.TopKGates(idx, val.astype(np.float32), 30)
    args = dict(row_chunk=100, tile=6, split_every=6)
    rows = dp.coactivation_stats(gates, tmp_path / "rows", **args)
    assert rows._job.progress()["decomposition"] == "rows"        # the real forecast: no gain here
    real = forecast.plan_atom_major
    monkeypatch.setattr(forecast, "plan_atom_major", lambda *a, **k: {**real(*a, **k), "speedup": 3.0})
    auto = dp.coactivation_stats(gates, tmp_path / "auto", **args)
    assert auto._job.progress()["decomposition"] == "atoms"
    _assert_same_bits(rows, auto)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(jobmod.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    short = dp.coactivation_stats(gates, tmp_path / "short", **args)   # 600 x 4 entries of 12 bytes > 1000
    assert short._job.progress()["decomposition"] == "rows"
    _assert_same_bits(rows, short)


def test_atoms_decomposition_refuses_bad_arguments(client, tmp_path):
    G = topk_gates(n=200, K=20, k=4)
    idx, val = to_topk(G, 4)
    gates = dp.TopKGates(idx, val, 20)
    with pytest.raises(InvalidArgumentError, match="decomposition must be 'rows', 'atoms' or None, got 'cols'"):
        dp.coactivation_stats(gates, tmp_path / "a", decomposition="cols")
    with pytest.raises(InvalidArgumentError, match="needs top-k or CSR gates, got dense gates"):
        dp.coactivation_stats(dp.DenseGates(G), tmp_path / "b", decomposition="atoms")
    with pytest.raises(InvalidArgumentError, match="decomposition='atoms' does not take window="):
        dp.coactivation_stats(gates, tmp_path / "b", window=4, seq_len=20, decomposition="atoms")
    with pytest.raises(InvalidArgumentError, match=r"split_every must be at least the number of row chunks \(4\)"):
        dp.coactivation_stats(gates, tmp_path / "c", row_chunk=50, split_every=2, decomposition="atoms")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# --------------------------------------------------------------------------- the forecast
def test_atom_major_forecast_uses_the_jobs_squares_and_prefers_them_at_cluster_scale():
    mem = 8 * 2**30
    fc = plan_atom_major(10**9, 131_072, topk=32, n_workers=64, memory_limit=mem)
    nb = 128
    side = am.default_side(mem, 1024, nb)
    assert fc["blocks_per_side"] == side and fc["n_tasks"] == len(am.square_groups(coplan._tiles(nb), nb, side))
    assert fc["accumulator_bytes_per_task"] <= mem / 6 + 1
    assert fc["speedup"] > 2.0                                     # the corpus is read once, not per group
    assert fc["bytes_read_per_worker"] < fc["row_major_bytes_read_per_worker"] / 3
    # the copy's cost is in it: slower rates, a longer forecast
    slow = plan_atom_major(10**9, 131_072, topk=32, n_workers=64, memory_limit=mem,
                           rates={"t_transpose": 10 * DEFAULT_RATES["t_transpose"]})
    assert slow["predicted_s"] > fc["predicted_s"] and slow["breakdown_s"]["copy"] > fc["breakdown_s"]["copy"]


def test_calibrate_measures_the_copy_rates():
    r = calibrate(rows=5_000, large_tiles=8)
    assert 0 < r["t_transpose"] < 1e-6 and 0 < r["t_sort"] < 1e-6
