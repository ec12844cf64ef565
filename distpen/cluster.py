"""Where distributed work runs: an embedded ``LocalCluster`` by default, or a scheduler address.

Every distributed function of distpen calls :func:`get_client`, which returns the current
``distributed.Client`` (the one the user made the default, or the one a previous :func:`connect`
created) and otherwise calls :func:`connect` with no arguments.
"""

from __future__ import annotations

import atexit
import os
import threading

from .errors import InvalidArgumentError

__all__ = ["connect", "get_client", "worker_memory_limit", "n_workers", "close"]

_ENV_ADDRESS = "DASK_SCHEDULER_ADDRESS"
#: set to 1 to keep the embedded cluster's worker profiler (Dask dashboard, Profile page)
_ENV_PROFILE = "DISTPEN_WORKER_PROFILE"
#: fraction of the machine's memory given to the embedded cluster's workers (the rest: scheduler, client)
_EMBEDDED_MEMORY_FRACTION = 0.8
#: memory limit assumed when a worker reports none (``memory_limit=0`` means "no limit")
_DEFAULT_MEMORY_LIMIT = 4 * 2**30

_lock = threading.Lock()
_cache: dict = {"cluster": None, "client": None, "address": None, "security": None}


def _alive(client) -> bool:
    return client is not None and client.status in ("running", "connecting", "newly-created")


def _default_client():
    """The user's current default client, if any (never creates one)."""
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    return client if _alive(client) else None


def connect(address=None, *, security=None, **local_cluster_kwargs):
    """Return a ``distributed.Client``: to ``address``, or to an embedded ``LocalCluster``.

    Parameters
    ----------
    address : str or None
        A scheduler address such as ``"tcp://10.0.0.5:8786"``. When None, the environment variable
        ``DASK_SCHEDULER_ADDRESS`` is used if set; otherwise an embedded ``LocalCluster`` is started
        (worker processes, one per core, one thread each, a memory limit per worker, dashboard on
        127.0.0.1) and reused for the rest of the process. If a default client already exists and
        neither an address nor cluster arguments are given, that client is returned.
    security : distributed.security.Security or True, optional
        TLS. With an address: a ``Security`` holding the cluster's CA and a client certificate
        (:func:`distpen.security.security_from_files`); a ``tls://`` address without it uses the
        Dask configuration's certificates, and is an error if there are none. With an embedded
        cluster: ``True`` for temporary self-signed certificates (``Security.temporary()``), or a
        ``Security`` whose certificates serve every role.
    **local_cluster_kwargs
        Passed to ``LocalCluster`` (e.g. ``n_workers=2, memory_limit="1GiB"``); only with an
        embedded cluster.

    Returns
    -------
    distributed.Client

    Raises
    ------
    InvalidArgumentError
        If both an address and ``LocalCluster`` arguments are given, if ``security=True`` is given
        with an address (temporary certificates cannot be trusted by a remote scheduler), or if a
        ``tls://`` address has no certificates.

    Examples
    --------
    >>> client = connect(n_workers=1, memory_limit="1GiB")  # doctest: +SKIP
    >>> client = connect("tcp://scheduler:8786")             # doctest: +SKIP
    >>> client = connect("tls://scheduler:8786",              # doctest: +SKIP
    ...                  security=security_from_files("ca.pem", "cert.pem", "key.pem"))
    """
    from distributed import Client, LocalCluster

    address = address or os.environ.get(_ENV_ADDRESS) or None
    if address is not None:
        if local_cluster_kwargs:
            raise InvalidArgumentError(
                f"connect() got a scheduler address {address!r} and LocalCluster arguments "
                f"{sorted(local_cluster_kwargs)}; pass one or the other"
            )
        address = str(address)
        security = _address_security(address, security)
        with _lock:
            client = _cache["client"]
            if _alive(client) and _cache["address"] == address and _cache.get("security") is security:
                return client
            client = Client(address, set_as_default=True, security=security)
            _cache.update(client=client, address=address, cluster=None, security=security)
            return client

    with _lock:
        if not local_cluster_kwargs and security is None:
            client = _default_client()
            if client is not None:
                return client
            client = _cache["client"]
            if _alive(client) and _cache["cluster"] is not None:
                return client
        n_cores = os.cpu_count() or 1
        kwargs = dict(processes=True, n_workers=n_cores, threads_per_worker=1,
                      dashboard_address="127.0.0.1:0", host="127.0.0.1")
        kwargs.update(local_cluster_kwargs)
        if security is not None:
            from .security import temporary_security

            kwargs["security"] = temporary_security() if security is True else security
        if "memory_limit" not in kwargs:
            kwargs["memory_limit"] = _embedded_memory_limit(int(kwargs.get("n_workers") or n_cores))
        import dask

        with dask.config.set(embedded_worker_config()):  # the Nanny hands it to its worker process
            cluster = LocalCluster(**kwargs)
        client = Client(cluster, set_as_default=True)
        _cache.update(cluster=cluster, client=client, address=None, security=kwargs.get("security"))
        if not _cache.get("atexit"):
            # at exit, close the client before the cluster: distributed's own exit hooks (registered
            # earlier, so run later) would remove the workers first, and the scheduler logs an ERROR
            # for every broadcast array they still hold ("lose scattered data")
            atexit.register(close)
            _cache["atexit"] = True
        return client


def _address_security(address: str, security):
    """The ``Security`` for a client of the scheduler at ``address`` (None: Dask's default)."""
    if security is True:
        raise InvalidArgumentError(
            f"connect({address!r}, security=True): temporary certificates only secure an embedded "
            "cluster; pass the cluster's certificates, e.g. security_from_files(ca_file, cert, key) "
            "(CLI: --tls-ca-file/--tls-cert/--tls-key)"
        )
    if security is None and address.startswith("tls://"):
        from .security import config_security

        if config_security() is None:  # else Client() takes the configuration's certificates itself
            raise InvalidArgumentError(
                f"scheduler {address!r} uses TLS but no certificates were given; pass "
                "security=security_from_files(ca_file, cert, key) (CLI: --tls-ca-file/--tls-cert/--tls-key) "
                "or set distributed.comm.tls.* in the Dask configuration"
            )
    return security


def embedded_worker_config() -> dict:
    """Dask configuration the embedded ``LocalCluster``'s workers run with.

    The workers' statistical profiler (a stack sample every 10 ms, for the Dask dashboard's Profile
    page) is off: it cost an encoding job 5-8% of its CPU on this project's 2-core machines
    (``benchmarks/realdata.py --case encode``: CPU efficiency 0.72 with it, 0.76-0.82 without), and
    distpen's progress does not use it. ``DISTPEN_WORKER_PROFILE=1`` keeps it on. Clusters that
    distpen does not start keep their own configuration.
    """
    return {"distributed.worker.profile.enabled": os.environ.get(_ENV_PROFILE, "0") not in ("", "0")}


def _embedded_memory_limit(n_workers: int) -> int:
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:  # pragma: no cover - psutil is a dependency of distributed
        total = 8 * 2**30
    return int(total * _EMBEDDED_MEMORY_FRACTION / max(1, n_workers))


def get_client():
    """The current client: the default one if any, the cached one, or a new :func:`connect`.

    Inside a Dask task this returns the worker's client.
    """
    client = _default_client()
    if client is not None:
        return client
    client = _cache["client"]
    if _alive(client):
        return client
    return connect()


def close():
    """Close the embedded cluster and client started by :func:`connect` (if any)."""
    with _lock:
        client, cluster = _cache["client"], _cache["cluster"]
        _cache.update(client=None, cluster=None, address=None, security=None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def _workers(client) -> dict:
    return client.scheduler_info(n_workers=-1).get("workers", {}) if _supports_n_workers(client) \
        else client.scheduler_info().get("workers", {})


def _supports_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def worker_memory_limit(client=None) -> int:
    """The smallest memory limit (bytes) over the cluster's workers.

    Used to choose ``row_chunk`` and ``tile`` when the caller does not. A worker without a limit
    (``memory_limit=0``) counts as the machine's available memory, or 4 GiB if unknown.
    """
    client = client or get_client()
    limits = [int(w.get("memory_limit") or 0) for w in _workers(client).values()]
    limits = [x for x in limits if x > 0]
    if limits:
        return min(limits)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return _DEFAULT_MEMORY_LIMIT


def n_workers(client=None) -> int:
    """Number of workers currently connected (at least 1)."""
    client = client or get_client()
    return max(1, len(_workers(client)))
