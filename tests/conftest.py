"""Shared fixtures.

``dask_client``: one ``distributed.Client`` on a ``LocalCluster`` with 2 worker processes of one
thread each, started once per test session (starting clusters is the slowest part of the suite).
It is the default client while the session runs, so ``distpen.cluster.get_client()`` returns it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dask_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                           dashboard_address=":0", host="127.0.0.1")
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def dask_client(dask_cluster):
    from distributed import Client

    client = Client(dask_cluster, set_as_default=True)
    yield client
    client.close()


@pytest.fixture
def client(dask_client):
    """The session client, made the default again (a test may have connected another one)."""
    from distributed.client import _set_global_client

    _set_global_client(dask_client)
    return dask_client
