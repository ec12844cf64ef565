"""Faults on a real cluster: a `dask scheduler` and `dask worker` processes on loopback, and the
`distpen` command in its own process.

* SIGKILL a worker mid-job: the job completes, bit-identical to an undisturbed run.
* SIGKILL the client mid-job: the same command resumes and computes only the missing tiles.
* A poisoned chunk (NaN gate) on a multi-worker run: a clear GateDataError, no partial tile.
* A damaged store (a tile deleted, another truncated, the manifest says complete):
  `distpen status --verify` reports it (exit 1) and a re-run repairs it.

The workers report a 24 MiB memory limit (memory management off) so that the 36 tiles of a job
are packed into several task groups, written one group at a time: a job has a "middle".
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import distpen as dp
from distpen.errors import GateDataError

from _procs import time_limit  # noqa: F401  (autouse: a hung test fails instead of stalling)
from _procs import (JOB_TIMEOUT, ProcCluster, assert_matches, markers, reference_stats, run_distpen,
                    start_distpen, stop, topk_to_sparse, wait_until, write_topk_gates)

N, K, k, ROW_CHUNK, TILE = 30_000, 1024, 16, 2000, 128
# a reduction tree of many small tasks (not one streaming task per tile group), so that tiles
# complete group by group while the job runs and a kill lands mid-job
SPLIT_EVERY = 2
N_TILES = 36                                  # (1024 / 128) blocks → 8·9/2 upper tiles
SMALL_WORKERS = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "False",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(workdir):
    pc = ProcCluster(workdir, worker_env=SMALL_WORKERS, memory_limit="24MiB")
    try:
        pc.start(2)
        yield pc
    finally:
        pc.close()


@pytest.fixture(scope="module")
def monitor(cluster):
    with cluster.client() as c:
        yield c


@pytest.fixture(scope="module")
def gates(workdir):
    path = workdir / "gates"
    idx, val = write_topk_gates(path, N, K, k, seed=7, row_chunk=ROW_CHUNK)
    return path, reference_stats(topk_to_sparse(idx, val, K))


def _cmd(gates_path, out, address):
    return ("coactivation", gates_path, "--out", out, "--tile", TILE, "--row-chunk", ROW_CHUNK,
            "--split-every", SPLIT_EVERY,
            "--scheduler", address, "--quiet")


def _progress(store):
    with open(os.path.join(store, "_distpen", "coactivation", "progress.json")) as f:
        return json.load(f)


def _wait_idle(client, store, timeout=60):
    """Until the scheduler holds no task and the store's markers stop changing."""
    wait_until(lambda: client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0,
               timeout, interval=0.2, what="the scheduler to forget the killed client's tasks")
    last, since = None, time.time()
    while time.time() - since < 1.5:
        now = markers(store)
        if now != last:
            last, since = now, time.time()
        time.sleep(0.1)
    return last


def test_sigkill_worker_mid_job(cluster, monitor, gates, workdir):
    ref_store = workdir / "undisturbed"
    dp.coactivation_stats(str(gates[0]), ref_store, tile=TILE, row_chunk=ROW_CHUNK, split_every=SPLIT_EVERY, client=monitor)
    victim = cluster.add_worker("victim")
    cluster.wait_for_workers(3)
    out = workdir / "killed-worker"
    proc = start_distpen(*_cmd(gates[0], out, cluster.address))
    try:
        wait_until(lambda: markers(out) or proc.poll() is not None, JOB_TIMEOUT, what="the first tile")
        assert proc.poll() is None, "the job finished before a worker could be killed"
        assert len(markers(out)) < N_TILES
        cluster.kill_worker(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=JOB_TIMEOUT)
        assert proc.returncode == 0, err[-3000:]
    finally:
        stop(proc)
    assert len(monitor.scheduler_info()["workers"]) == 2
    p = _progress(out)
    assert p["status"] == "done" and p["units_done"] == N_TILES
    assert p["n_groups"] >= 3                  # the premise: tiles complete group by group
    assert_matches(out, gates[1], exact=ref_store)
    assert dp.RunStore(out).verify()["ok"]


def test_sigkill_client_mid_job_then_resume(cluster, monitor, gates, workdir):
    out = workdir / "killed-client"
    proc = start_distpen(*_cmd(gates[0], out, cluster.address))
    try:
        wait_until(lambda: markers(out) or proc.poll() is not None, JOB_TIMEOUT, what="the first tile")
        assert proc.poll() is None, "the job finished before the client could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    done_before = _wait_idle(monitor, out)
    assert 0 < len(done_before) < N_TILES
    assert _progress(out)["status"] == "running"          # the killed client never finished it
    res = run_distpen(*_cmd(gates[0], out, cluster.address)[:-1])   # the same command, with output
    p = _progress(out)
    assert p["status"] == "done"
    assert p["units_skipped"] == len(done_before)
    assert p["units_computed"] == N_TILES - len(done_before)
    assert f"({N_TILES - len(done_before)} computed now)" in res.stdout
    assert markers(out) == {f"{i}.{j}" for i in range(8) for j in range(i, 8)}
    assert_matches(out, gates[1])


def test_poisoned_chunk_fails_cleanly_without_partial_tiles(cluster, monitor, workdir):
    bad_row = N - 500                          # in the last row chunk: the other leaves complete
    path = workdir / "poisoned"
    idx, _ = write_topk_gates(path, N, K, k, seed=8, row_chunk=ROW_CHUNK, poison_row=bad_row)
    bad_atom = int(idx[bad_row, 0])
    out = workdir / "poisoned-stats"
    res = run_distpen(*_cmd(path, out, cluster.address), check=False)
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("distpen: error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    line = errors[0]
    assert f"row {bad_row}, atom {bad_atom} is NaN" in line
    assert f"row chunk [{N - ROW_CHUNK}, {N})" in line and "re-run the same command" in line
    store = dp.RunStore(out)
    job = store.job("coactivation")
    assert job.status == "failed"
    b = bad_atom // TILE
    done = job.done()
    for i in range(8):                          # every tile touching the bad atom: no marker, no chunk
        u = f"{min(i, b)}.{max(i, b)}"
        assert u not in done
        for name in ("pair_sum", "pair_count"):
            assert not os.path.exists(out / name / "c" / str(min(i, b)) / str(max(i, b)))
    chunk_files = {(n, c) for n in ("pair_sum", "pair_count") if (out / n / "c").exists()
                   for c in (f"{a}.{d}" for a in os.listdir(out / n / "c") for d in os.listdir(out / n / "c" / a))}
    assert {c for _, c in chunk_files} <= done           # every chunk on disk belongs to a complete tile
    assert store.verify()["ok"]
    # the Python API raises the domain exception itself
    with pytest.raises(GateDataError, match=rf"row {bad_row}, atom {bad_atom} is NaN"):
        dp.coactivation_stats(str(path), workdir / "poisoned-stats-2", tile=TILE, row_chunk=ROW_CHUNK, split_every=SPLIT_EVERY,
                              client=monitor)


def test_damaged_store_is_reported_and_repaired(cluster, monitor, gates, workdir):
    out = workdir / "damaged"
    dp.coactivation_stats(str(gates[0]), out, tile=TILE, row_chunk=ROW_CHUNK, split_every=SPLIT_EVERY, client=monitor)
    deleted = out / "pair_sum" / "c" / "0" / "3"
    truncated = out / "pair_count" / "c" / "2" / "5"
    assert deleted.exists() and truncated.exists()
    os.unlink(deleted)
    with open(truncated, "r+b") as f:
        f.truncate(max(1, os.path.getsize(truncated) // 2))
    assert dp.RunStore(out).manifest("coactivation")["status"] == "done"
    res = run_distpen("status", out, "--verify", check=False)
    assert res.returncode == 1
    assert "verify coactivation: DAMAGED" in res.stdout
    assert "0.3: pair_sum/c/0/3" in res.stdout and "2.5: pair_count/c/2/5 has" in res.stdout
    res = run_distpen(*_cmd(gates[0], out, cluster.address))
    p = _progress(out)
    assert p["units_repaired"] == ["0.3", "2.5"] and p["units_computed"] == 2 and p["status"] == "done"
    assert run_distpen("status", out, "--verify").returncode == 0
    assert_matches(out, gates[1])
