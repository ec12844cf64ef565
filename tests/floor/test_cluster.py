"""connect(): embedded LocalCluster by default, a scheduler address, or the current client."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import distpen as dp
from distpen import cluster
from distpen.errors import InvalidArgumentError


def test_default_client_is_reused(client):
    assert dp.connect() is client
    assert cluster.get_client() is client


def test_address_and_environment_variable(client, monkeypatch):
    addr = client.scheduler.address
    try:
        c = dp.connect(addr)
        assert c is not client and c.scheduler.address == addr
        assert dp.connect(addr) is c                       # cached per address
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", addr)
        assert dp.connect() is c
        assert sorted(c.scheduler_info()["workers"]) == sorted(client.scheduler_info()["workers"])
    finally:
        cluster.close()
        from distributed.client import _set_global_client

        _set_global_client(client)


def test_address_with_cluster_arguments_is_an_error(client):
    with pytest.raises(InvalidArgumentError, match=r"got a scheduler address 'tcp://x:1' and LocalCluster arguments \['n_workers'\]"):
        dp.connect("tcp://x:1", n_workers=2)


def test_worker_memory_limit_and_count(client):
    assert cluster.worker_memory_limit(client) == 2 * 2**30
    assert cluster.n_workers(client) == 2


def test_embedded_cluster_in_a_fresh_process():
    """No client and no address: worker processes, one per core, one thread each, a memory limit."""
    code = (
        "import os, distpen as dp\n"
        "from distpen import cluster\n"
        "c = dp.connect()\n"
        "assert dp.connect() is c and cluster.get_client() is c\n"
        "w = c.scheduler_info()['workers']\n"
        "pids = set(c.run(os.getpid).values())\n"
        "print(len(w), sorted({x['nthreads'] for x in w.values()}), len(pids - {os.getpid()}),\n"
        "      cluster.worker_memory_limit(c) > 0, c.dashboard_link.split('/')[2].split(':')[0])\n"
        "cluster.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    n, threads, procs, has_limit, host = out.stdout.split("\n")[-2].replace("[", "").replace("]", "").replace(",", "").split()
    assert int(n) == (os.cpu_count() or 1) and threads == "1" and int(procs) == int(n)
    assert has_limit == "True" and host == "127.0.0.1"


@pytest.mark.parametrize("env_value, want", [(None, "False"), ("1", "True")])
def test_embedded_workers_run_without_the_statistical_profiler(env_value, want):
    """The embedded cluster's workers skip Dask's 10 ms stack sampler (5-8% of an encoding job's
    CPU) unless DISTPEN_WORKER_PROFILE=1; the client's own configuration is left as it was."""
    code = (
        "import dask, distpen as dp\n"
        "from distpen import cluster\n"
        "c = dp.connect(n_workers=1, memory_limit='1GiB')\n"
        "key = 'distributed.worker.profile.enabled'\n"
        "print(set(c.run(lambda: __import__('dask').config.get(key)).values()), dask.config.get(key))\n"
        "cluster.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DASK_SCHEDULER_ADDRESS", "DISTPEN_WORKER_PROFILE")}
    if env_value is not None:
        env["DISTPEN_WORKER_PROFILE"] = env_value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    workers, client_side = out.stdout.split("\n")[-2].rsplit(" ", 1)
    assert workers == "{" + want + "}" and client_side == "True"
