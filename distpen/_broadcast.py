"""Reuse of data already broadcast to the workers across calls (one entry per name and client).

``evaluate`` with a numpy ``t`` broadcasts the penalty and ``t`` to every worker; an optimisation
loop calls it several times on the same penalty and, between steps, on the same ``t`` (value and
gradient, then Hessian-vector products with new probes). Re-sending 256 MB per call costs more
than the kernels. :class:`BroadcastCache` keeps the last future of each kind with what it was
made from, and hands it back when the new input is *equal*:

* an array is compared bit for bit with a private copy taken when it was sent (so in-place
  changes by the caller are seen; the comparison reads memory once, faster than sending or hashing);
* a penalty by identity of the object and of its pair arrays, and equality of its spec.

A future whose data was lost (its workers died) is not reused.

Inside :meth:`BroadcastCache.scope` (what :class:`distpen.Resident` uses), entries belong to that
scope: calls made for other penalties meanwhile do not replace them, and :meth:`BroadcastCache.release`
drops them (and their data on the workers) when the scope's owner is closed.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np

from ._fastcheck import same_bits

__all__ = ["BroadcastCache", "BROADCASTS"]

#: arrays larger than this are sent every time (the private copy would cost client memory)
MAX_CACHED_BYTES = 2**30


class BroadcastCache:
    def __init__(self):
        self._entries: dict = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _client_key(self, client):
        return (id(client), getattr(client, "id", None), getattr(self._local, "scope", None))

    @contextlib.contextmanager
    def scope(self, name):
        """Entries made or found while the block runs (in this thread) belong to scope ``name``."""
        old = getattr(self._local, "scope", None)
        self._local.scope = name
        try:
            yield
        finally:
            self._local.scope = old

    def release(self, name) -> int:
        """Drop scope ``name``'s entries and release their futures; returns how many there were."""
        with self._lock:
            keys = [k for k in self._entries if k[0][2] == name]
            entries = [self._entries.pop(k) for k in keys]
        for e in entries:
            try:
                e["future"].release()
            except Exception:  # noqa: BLE001 - a closed client has released it already
                pass
        return len(entries)

    def _get(self, client, name):
        with self._lock:
            e = self._entries.get((self._client_key(client), name))
        if e is None or e["future"].status != "finished":
            return None
        return e

    def _put(self, client, name, entry):
        with self._lock:
            # one entry per (client, name): the previous future is released; entries of clients
            # that have closed are dropped with their private copies
            stale = [k for k, e in self._entries.items()
                     if getattr(e["future"].client, "status", "closed") not in ("running", "connecting", "newly-created")]
            for k in stale:
                del self._entries[k]
            self._entries[(self._client_key(client), name)] = entry

    def array(self, client, name: str, arr: np.ndarray):
        """A future of ``arr`` on every worker (reused when an equal array was sent last time)."""
        e = self._get(client, name)
        if e is not None and same_bits(e["copy"], arr):
            return e["future"]
        fut = client.scatter(arr, broadcast=True, hash=False)
        if arr.nbytes <= MAX_CACHED_BYTES:
            self._put(client, name, {"future": fut, "copy": arr.copy()})
        return fut

    def penalty(self, client, pen):
        """A future of the penalty object on every worker (reused for the same, unchanged penalty)."""
        spec = pen.to_spec()
        pairs = pen.pairs
        ident = (id(pen), id(pairs), id(pairs.j), id(pairs.k), id(pairs.w), len(pairs))
        e = self._get(client, "penalty")
        if e is not None and e["ident"] == ident and e["ref"]() is pen and e["spec"] == spec:
            return e["future"]
        fut = client.scatter(pen, broadcast=True, hash=False)
        self._put(client, "penalty", {"future": fut, "ident": ident, "ref": weakref.ref(pen), "spec": spec})
        return fut

    def clear(self) -> None:
        """Drop every entry and release its future (sent now, while the client is up)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            try:
                e["future"].release()
            except Exception:  # noqa: BLE001 - a closed client has released it already
                pass


#: the process-wide cache used by :func:`distpen.curvature.evaluate` and :func:`distpen.curvature.newton.newton_step`
BROADCASTS = BroadcastCache()
