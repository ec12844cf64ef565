"""Soak: 20 consecutive co-activation jobs on one cluster (a `dask scheduler` and two `dask worker`
processes). Afterwards: the same two workers, no task left on the scheduler or in a worker, no
stray files, open files and threads flat, and worker memory flat within 10%."""

from __future__ import annotations

import ctypes
import gc
import os

import numpy as np
import pytest

import distpen as dp

from _procs import time_limit  # noqa: F401  (autouse: a hung test fails instead of stalling)
from _procs import ProcCluster, reference_stats, topk_to_sparse, write_topk_gates

N_JOBS = 20
WARMUP = 3                    # jobs before the baseline (imports, numba caches, first allocations)
N, K, k, ROW_CHUNK, TILE = 8000, 256, 8, 1000, 128


def _trim_and_measure(dask_worker=None):
    """RSS (bytes), open files and threads of this worker process, after a GC and malloc_trim."""
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
    p = psutil.Process()
    return {"rss": p.memory_info().rss, "fds": p.num_fds(), "threads": p.num_threads(),
            "tasks": len(dask_worker.state.tasks), "data": len(dask_worker.data)}


def _files(root):
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


@pytest.fixture(scope="module")
def soak_cluster(tmp_path_factory):
    pc = ProcCluster(tmp_path_factory.mktemp("soak"))
    try:
        pc.start(2)
        yield pc
    finally:
        pc.close()


def test_twenty_consecutive_jobs(soak_cluster, tmp_path):
    pc = soak_cluster
    pids = {name: p.pid for name, p in pc.workers.items()}
    idx, val = write_topk_gates(tmp_path / "gates", N, K, k, seed=11, row_chunk=ROW_CHUNK)
    ref = reference_stats(topk_to_sparse(idx, val, K))
    local_dirs = {name: pc.workdir / f"local-{name}" for name in pids}
    with pc.client() as client:
        addresses = set(client.scheduler_info()["workers"])
        gates = dp.open_gates(tmp_path / "gates")
        samples, first_files = [], None
        for i in range(N_JOBS):
            out = tmp_path / "jobs" / f"run-{i:02d}"
            st = dp.coactivation_stats(gates, out, tile=TILE, row_chunk=ROW_CHUNK, client=client)
            assert st._job.progress()["units_computed"] == 3
            np.testing.assert_allclose(st.block(0, K, 0, K), ref["pair_sum"], rtol=1e-9)
            files = _files(out)
            first_files = first_files or files
            assert files == first_files                                  # the same files, job after job
            assert not any(os.path.basename(f).startswith(".tmp-") for f in files)
            assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0
            samples.append(client.run(_trim_and_measure))
            if i == WARMUP - 1:
                local_files = {n: _files(d) for n, d in local_dirs.items()}
        assert set(client.scheduler_info()["workers"]) == addresses      # no worker lost, added or restarted
    assert {name: p.pid for name, p in pc.workers.items()} == pids
    assert all(p.poll() is None for p in pc.workers.values())
    assert {n: _files(d) for n, d in local_dirs.items()} == local_files  # no spill or scratch files left
    assert sorted(os.listdir(tmp_path / "jobs")) == [f"run-{i:02d}" for i in range(N_JOBS)]
    for addr in addresses:
        series = [s[addr] for s in samples[WARMUP - 1:]]
        base = series[0]
        assert all(s["tasks"] == 0 and s["data"] == 0 for s in series), series
        assert max(s["fds"] for s in series) <= base["fds"] + 2, [s["fds"] for s in series]
        assert max(s["threads"] for s in series) <= base["threads"] + 2, [s["threads"] for s in series]
        rss = [s["rss"] for s in series]
        assert max(rss) <= 1.10 * base["rss"] and min(rss) >= 0.90 * base["rss"], \
            f"worker {addr} memory not flat within 10%: {[round(r / 2**20, 1) for r in rss]} MiB"
