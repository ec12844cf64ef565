"""Run a compiled chunk kernel over a range of chunks on a few threads.

The compiled kernels are serial, GIL-free (``nogil``) functions ``kernel(c0, c1, *args)`` that do
chunks ``c0 ≤ c < c1`` of some work; every chunk writes its own part of the output. This module
splits ``[0, n_chunks)`` into contiguous pieces and lets up to :func:`threads` threads take pieces
until none is left. That replaces numba's ``parallel=True``: a parallel kernel costs numba several
times the compilation of its serial body (the outlined loop body and its callees are compiled
again for the thread pool), and most calls run inside Dask tasks limited to one thread anyway.

The thread count is per calling thread: :func:`distpen._workers.kernel_threads` sets it inside a
task; otherwise it is ``NUMBA_NUM_THREADS`` (numba's default, the number of cores).
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["default_threads", "n_chunks_of", "run_chunks", "set_threads", "threads"]

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
#: pieces per thread: enough for uneven chunks to balance, few enough to keep dispatch cheap
_PIECES_PER_THREAD = 4


def n_chunks_of(n: int, size: int) -> int:
    """How many chunks of ``size`` cover ``n`` items (the last one may be short)."""
    return (int(n) + size - 1) // size


def default_threads() -> int:
    """Threads a kernel may use when nothing limits it: ``NUMBA_NUM_THREADS`` (the cores)."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def threads() -> int:
    """Threads a kernel started from this thread may use."""
    n = getattr(_local, "n", None)
    return default_threads() if n is None else n


def set_threads(n: int | None) -> int | None:
    """Set this thread's kernel thread count (None: the default); returns the previous setting."""
    previous = getattr(_local, "n", None)
    _local.n = None if n is None else max(1, int(n))
    return previous


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="distpen-kernel"), n
        return _pool


def run_chunks(kernel, n_chunks: int, *args) -> None:
    """``kernel(c0, c1, *args)`` over pieces covering ``[0, n_chunks)``, on up to :func:`threads` threads.

    Exceptions of any piece are raised here, after every started piece has finished.
    """
    n_chunks = int(n_chunks)
    if n_chunks <= 0:
        return
    t = min(threads(), n_chunks)
    if t <= 1:
        kernel(0, n_chunks, *args)
        return
    n_pieces = min(n_chunks, t * _PIECES_PER_THREAD)
    bounds = [n_chunks * i // n_pieces for i in range(n_pieces + 1)]
    counter = itertools.count()   # next() is atomic under the GIL

    def work():
        while True:
            i = next(counter)
            if i >= n_pieces:
                return
            kernel(bounds[i], bounds[i + 1], *args)

    pool = _executor(t - 1)
    futures = [pool.submit(work) for _ in range(t - 1)]
    error = None
    try:
        work()
    except Exception as exc:  # finish the other pieces' threads before raising
        error = exc
    for f in futures:
        try:
            f.result()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error
