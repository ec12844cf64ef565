"""Allocation of large zero-filled work arrays.

``np.zeros`` takes freshly mapped, lazily zeroed pages from ``calloc``; every first touch of a 4 KiB
page is then a page fault, and kernels that scatter into a large accumulator fault at random all
over it (measured here: 1.4 s to first-touch 544 MB at random, against 0.23 s for the same work on
an array from :func:`zeros`). :func:`zeros` allocates through numpy's ``malloc`` path, which asks
the kernel for transparent huge pages on large buffers, and writes the zeros sequentially, so the
pages are faulted in order and in 2 MiB units where the kernel allows.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["zeros", "BufferPool", "POOL"]

#: below this many bytes np.zeros is as fast (no large mapping is involved)
_SMALL = 1 << 20


def zeros(shape, dtype=np.float64) -> np.ndarray:
    """A C-contiguous zero array of ``shape`` and ``dtype``, pre-faulted for random access."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) if np.ndim(shape) else int(shape)
    if n * dt.itemsize < _SMALL:
        return np.zeros(shape, dtype=dt)
    out = np.empty(shape, dtype=dt)
    out.fill(0)
    return out


class BufferPool:
    """Large raw buffers kept by a process between tasks whose work arrays never leave the task.

    A task :meth:`take` s a buffer, carves its arrays out of it and :meth:`give` s it back when it is
    done; the next task reuses the pages already faulted in. Thread-safe. :meth:`clear` drops every
    buffer (a job calls it on its workers when it ends, so that idle workers hold nothing).
    """

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` bytes (contents undefined)."""
        nbytes = max(int(nbytes), 1)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:  # by position: list.remove would compare the arrays elementwise with ==
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
            if self._free:  # too small: drop one before growing, so the pool never hoards
                self._free.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)

    def clear(self) -> int:
        """Drop every free buffer; returns the bytes released."""
        with self._lock:
            n = sum(b.nbytes for b in self._free)
            self._free.clear()
        return n

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)


#: the process-wide pool
POOL = BufferPool()


def carve(buf: np.ndarray, specs) -> list[np.ndarray]:
    """Zero-filled C-contiguous arrays ``[(shape, dtype), ...]`` laid out one after another in ``buf``
    (each starting on a 64-byte boundary)."""
    out, off, base = [], 0, buf.ctypes.data
    for shape, dtype in specs:
        dt = np.dtype(dtype)
        off = -(-(base + off) // 64) * 64 - base
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        a = buf[off:off + n].view(dt).reshape(shape)
        a.fill(0)
        out.append(a)
        off += n
    return out


def carve_bytes(specs) -> int:
    """Bytes :func:`carve` needs for ``specs`` (whatever the buffer's own alignment)."""
    off = 64
    for shape, dtype in specs:
        off = -(-off // 64) * 64 + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return off


def pooled_bytes() -> int:
    """Bytes held by this process's :data:`POOL` (for ``client.run`` on workers)."""
    return POOL.nbytes
