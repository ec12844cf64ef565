"""Worker-side helpers: how many threads a compiled kernel may use inside one Dask task."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = ["kernel_threads", "threads_per_task"]

#: (threadpoolctl controller, len(sys.modules) when it was made): ``threadpool_limits`` scans the
#: loaded libraries on every call (1.1 ms here, paid by every task of a Newton iteration); a kept
#: controller limits in 0.02 ms, and is made again when modules (so possibly BLAS libraries) were
#: imported since
_CONTROLLER: list = [None, -1]
_CONTROLLER_LOCK = threading.Lock()


def _controller():
    from threadpoolctl import ThreadpoolController

    with _CONTROLLER_LOCK:
        if _CONTROLLER[0] is None or _CONTROLLER[1] != len(sys.modules):
            _CONTROLLER[0] = ThreadpoolController()
            _CONTROLLER[1] = len(sys.modules)
        return _CONTROLLER[0]


@contextlib.contextmanager
def kernel_threads(n: int):
    """Limit the compiled kernels (:mod:`distpen._parallel`) and BLAS to ``n`` threads inside the block.

    Dask runs several tasks per machine; without a limit each task's kernels would start one
    thread per core and oversubscribe it. The limit holds for the calling thread only.
    """
    from ._parallel import default_threads, set_threads

    n = max(1, min(int(n), default_threads()))
    previous = set_threads(n)
    try:
        with _controller().limit(limits=n):
            yield n
    finally:
        set_threads(previous)


def threads_per_task(client) -> int:
    """Cores per running task on the busiest host of the cluster (at least 1).

    A host's cores are asked of its workers (``os.cpu_count`` there), its running tasks are the
    sum of its workers' threads.
    """
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        return 1
    cores = client.run(os.cpu_count)
    per_host: dict[str, list[int]] = {}
    for addr, w in workers.items():
        host = w.get("host", addr)
        entry = per_host.setdefault(host, [int(cores.get(addr) or 1), 0])
        entry[1] += int(w.get("nthreads", 1))
    return max(1, min(c // max(n, 1) for c, n in per_host.values()))
