"""A span of the flat decoder β kept by each worker for the duration of one call (``collinearity_gate``).

Random candidate pairs touch almost every block, so every task of a call needs nearly the whole
decoder. Rather than each task reading it, each worker process keeps it in a per-process cache
(:func:`cached`), keyed by the call and the β it reads, within a byte budget; the client drops the
call's entries on every worker when the call ends (:func:`release_call`).

A Zarr β is decoded before the call's pair tasks run, by **fill tasks**, one per worker thread
(:func:`fill_part`): the span is cut at chunk boundaries into one part per thread of the host, and
each task decodes its part. The workers of one host (two or more processes) decode into one shared
segment in ``/dev/shm`` (:class:`Span` over an ``mmap``), so the host decodes β once rather than
once per worker: zstd-coded float64 decodes at about 0.6 GB/s a core here, the largest cost of a
call after the pair kernel. Each part writes a token into the segment's header when it is done; a
worker uses the segment only when every part's token is there (a worker whose ``/dev/shm`` is
another one, in another container, sees its own parts only and reads the whole span itself), and
the first pair task on a worker that verified it removes its name, so the memory goes with the
last mapping (a process that dies drops its own). Without ``/dev/shm`` (or with
``DISTPEN_SHARED_SPANS=0``) each worker decodes its parts into private memory.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
import time

import numpy as np

from .._chunkio import read_rows
from ..layout import DecoderLayout
from ..penalties.collinearity import block_gram_norms

__all__ = ["Span", "cached", "fill_part", "release_call", "cache_state", "reset_cache_stats",
           "sharing_enabled", "part_bounds", "read_span"]

#: where shared segments live (a tmpfs); a module attribute so that tests can point it elsewhere
SHM_DIR = "/dev/shm"
#: name prefix of the shared segments (``distpen-span-<call>-<host>``)
SHARED_PREFIX = "distpen-span-"
#: header of a segment: one 8-byte token slot per part; the span's entries follow, page-aligned
MAX_PARTS = 512
HEADER = 8 * MAX_PARTS
#: segments left by calls killed during their fill phase are removed by later calls after this long
STALE_SECONDS = 3600.0

_CACHE: dict = {}             # key -> (value, bytes)
_BUILDING: dict = {}          # key -> threading.Event, while one thread builds the value
_LOCK = threading.Lock()
_USED = [0]
_CLOSED = collections.deque(maxlen=256)  # calls already released: a late task caches nothing for them
#: this process's counters (tests, diagnostics): ``reads`` spans read whole by a pair task,
#: ``hits`` pair tasks that found their span, ``refused`` entries over the budget, ``filled`` parts
#: decoded by fill tasks, ``shared`` spans used from a shared segment, ``rejected`` filled spans
#: found incomplete (read whole instead)
CACHE_STATS = {"reads": 0, "hits": 0, "refused": 0, "filled": 0, "shared": 0, "rejected": 0}


def sharing_enabled() -> bool:
    """Whether the workers of a host may share one segment (``DISTPEN_SHARED_SPANS`` not 0, POSIX)."""
    flag = os.environ.get("DISTPEN_SHARED_SPANS", "1").strip().lower()
    return flag not in ("0", "false", "no", "off") and os.name == "posix" and hasattr(os, "posix_fallocate")


# ============================================================================ the cache
def cached(key, need: int, budget: int, build):
    """The cached value of ``key`` (a tuple whose first item is the call), or ``build()``'s, kept.

    ``need`` bytes are reserved before building when they fit ``budget`` together with what the
    cache already holds; otherwise returns None and nothing is built (the caller reads for itself).
    Threads of one worker asking for the same key while it is being built wait for it. A failed
    build gives its reservation back and raises.
    """
    while True:
        with _LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                return hit[0]
            event = _BUILDING.get(key)
            if event is None:
                if _USED[0] + need > budget:
                    CACHE_STATS["refused"] += 1
                    return None
                _USED[0] += need
                event = _BUILDING[key] = threading.Event()
                break
        event.wait()  # another thread is building it; then look again (it may have failed)
    try:
        value = build()
    except BaseException:
        with _LOCK:
            _USED[0] -= need
            del _BUILDING[key]
        event.set()
        raise
    with _LOCK:
        del _BUILDING[key]
        closed = key[0] in _CLOSED
        if closed:  # the call ended meanwhile: serve this task, keep nothing
            _USED[0] -= need
        else:
            _CACHE[key] = (value, need)
    event.set()
    if closed and hasattr(value, "release"):
        value.release()
    return value


def _drop(key, value) -> None:
    """Remove ``key`` from the cache if it still holds ``value``."""
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is value:
            del _CACHE[key]
            _USED[0] -= hit[1]
    if hasattr(value, "release"):
        value.release()


def release_call(call: str) -> int:
    """Drop this process's entries of ``call`` (run on every worker when the call ends); returns the
    bytes freed. Shared segments lose their name here at the latest."""
    with _LOCK:
        _CLOSED.append(call)
        dropped = [_CACHE.pop(key) for key in [key for key in _CACHE if key[0] == call]]
        freed = sum(need for _, need in dropped)
        _USED[0] -= freed
    for value, _ in dropped:
        if hasattr(value, "release"):
            value.release()
    return freed


def cache_state() -> dict:
    """This process's cache: entries, bytes held and the counters."""
    with _LOCK:
        return {"entries": len(_CACHE), "bytes": _USED[0], **CACHE_STATS}


def reset_cache_stats() -> None:
    with _LOCK:
        for name in CACHE_STATS:
            CACHE_STATS[name] = 0


def _count(name: str) -> None:
    with _LOCK:
        CACHE_STATS[name] += 1


# ============================================================================ spans
class Span:
    """The entries ``[lo, hi)`` of the flat β (``t``, float64) and the layout of their atoms.

    ``t`` is private memory or a view into a shared segment (``name``, ``token``). ``parts`` are
    the parts written by this process; a shared span is complete when every part's token is in the
    segment's header (:meth:`verified`), a private one when this process wrote them all. ``norms``
    (the blocks' Gram norms) are computed once, by the first pair task that needs them.
    """

    def __init__(self, t: np.ndarray, lay: DecoderLayout, n_parts: int, *, mm=None, name=None, token=0,
                 complete: bool = False):
        self.t, self.lay, self.n_parts = t, lay, int(n_parts)
        self.mm, self.name, self.token = mm, name, int(token)
        self.parts: set = set(range(self.n_parts)) if complete else set()
        self.norms = None
        self.checked: bool | None = True if complete else None
        self.lock = threading.Lock()

    def verified(self) -> bool:
        """Whether every part is in (checked once; a shared span then loses its name)."""
        with self.lock:
            if self.checked is None:
                if self.mm is None:
                    self.checked = len(self.parts) == self.n_parts
                else:
                    tokens = np.frombuffer(self.mm, dtype=np.int64, count=self.n_parts)
                    self.checked = bool(np.all(tokens == self.token))
                    self._unlink()  # every fill of the host is done: nobody opens it by name any more
            return self.checked

    def _unlink(self) -> None:
        if self.name is not None:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except OSError:  # already removed (by another worker, or a sweep)
                pass

    def release(self) -> None:
        """Give up the segment's name (the memory goes with the last mapping)."""
        self._unlink()


def part_bounds(lo: int, hi: int, chunk: int, n_parts: int) -> list[int]:
    """``n_parts + 1`` boundaries cutting ``[lo, hi)`` at multiples of ``chunk`` (entries per Zarr
    chunk) into near-equal parts, so that no chunk is decoded by two parts (some may be empty)."""
    first, last = lo // chunk, -(-hi // chunk)
    cuts = [first + (last - first) * i // n_parts for i in range(n_parts + 1)]
    return [lo] + [min(max(c * chunk, lo), hi) for c in cuts[1:-1]] + [hi]


def read_span(t_src, payload, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    """Entries ``[lo, hi)`` of the flat β as float64: a view of a numpy β; a Zarr β read from its
    chunk files (:func:`distpen._chunkio.read_rows`), into ``out`` when given."""
    if t_src.kind == "numpy":
        if out is None:
            return payload[lo:hi]
        out[...] = payload[lo:hi]
        return out
    z = t_src.payload
    if z.ndim == 1 and z.dtype == np.float64 and out is not None:
        return read_rows(z, lo, hi, out=out)
    if z.ndim == 1:
        flat = read_rows(z, lo, hi)
    else:  # n_rows × F, read as a flat vector
        F = int(z.shape[1])
        r0 = lo // F
        flat = read_rows(z, r0, -(-hi // F)).reshape(-1)[lo - r0 * F:hi - r0 * F]
    if out is None:
        return np.ascontiguousarray(flat, dtype=np.float64)
    out[...] = flat
    return out


def _sweep_stale() -> None:
    """Remove shared segments older than :data:`STALE_SECONDS` (left by calls killed while filling)."""
    cutoff = time.time() - STALE_SECONDS
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return
    for e in entries:
        if e.name.startswith(SHARED_PREFIX):
            try:
                if e.stat().st_mtime < cutoff:
                    os.unlink(e.path)
            except OSError:
                pass


def _shared_span(name: str, n: int, lay: DecoderLayout, n_parts: int, token: int) -> Span:
    """Map the host's segment ``name`` (created by whichever worker comes first) for ``n`` entries."""
    _sweep_stale()
    size = HEADER + 8 * n
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # the same size from every worker: idempotent
        os.posix_fallocate(fd, 0, HEADER)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    t = np.frombuffer(mm, dtype=np.float64, count=n, offset=HEADER)
    return Span(t, lay, n_parts, mm=mm, name=name, token=token)


def fill_part(key, need: int, budget: int, t_src, span: tuple, part: int, bounds: list, block_sizes,
              p_out: int, shared: dict | None) -> bool:
    """Worker task: decode part ``part`` (entries ``[bounds[part], bounds[part + 1])``) of the call's
    span into this worker's entry ``key``; with ``shared`` (``{"name", "token"}``) into the host's
    shared segment. Returns whether the part was written (False: over the budget, no shared memory,
    or this worker's entry is another host's segment; the pair tasks then read for themselves).
    """
    a0, a1 = span
    lo, hi = bounds[0], bounds[-1]
    n_parts = len(bounds) - 1

    def build():
        lay = DecoderLayout(block_sizes[a0:a1], p_out)
        if shared is not None:
            try:
                return _shared_span(shared["name"], hi - lo, lay, n_parts, shared["token"])
            except OSError:  # no /dev/shm here, or it is full: this worker reads the whole span itself
                return Span(read_span(t_src, None, lo, hi), lay, n_parts, complete=True)
        return Span(np.empty(hi - lo), lay, n_parts)

    entry = cached(key, need, budget, build)
    if entry is None:
        return False
    if entry.name != (None if shared is None else shared["name"]):
        # the private fallback above (complete), or another host's segment (a task placed off its host)
        return entry.checked is True
    b0, b1 = bounds[part], bounds[part + 1]
    if entry.mm is not None and b1 > b0:
        try:  # reserve this part's pages, so that a full tmpfs is an error here, not a SIGBUS later
            fd = os.open(os.path.join(SHM_DIR, entry.name), os.O_RDWR)
            try:
                os.posix_fallocate(fd, HEADER + 8 * (b0 - lo), 8 * (b1 - b0))
            finally:
                os.close(fd)
        except OSError:
            return False
    read_span(t_src, None, b0, b1, out=entry.t[b0 - lo:b1 - lo])
    with entry.lock:
        entry.parts.add(part)
    if entry.mm is not None:
        np.frombuffer(entry.mm, dtype=np.int64, count=n_parts)[part] = entry.token
    _count("filled")
    return True


def span_for_task(key, need: int, budget: int, read_whole) -> Span | None:
    """The call's span for a pair task: filled by the fill tasks (verified), or read whole by
    ``read_whole()`` when this worker has none or an incomplete one; None when over the budget.
    The blocks' Gram norms are computed here once per worker."""
    filled = [False]

    def build():
        filled[0] = True
        return read_whole()

    entry = cached(key, need, budget, build)
    if entry is None:
        return None
    if not entry.verified():
        _count("rejected")
        _drop(key, entry)
        entry = cached(key, need, budget, build)
        if entry is None:
            return None
    _count("reads" if filled[0] else "hits")
    with entry.lock:
        if entry.norms is None:
            entry.norms = block_gram_norms(entry.t, entry.lay)
            if entry.mm is not None:
                _count("shared")
    return entry
