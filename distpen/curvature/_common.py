"""What every curvature job shares: the operation names, penalty and ``ops`` checks, input
identities for manifests, the client, progress tracking, and clean cancellation of tasks."""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import InvalidArgumentError
from ..pairs import PairTable
from ..penalties import DecoderIncoherencePenalty, NestedPrefixPenalty
from ._vectors import is_dask_array, is_zarr_array

__all__ = ["OPS"]


OPS = ("value", "grad", "grad_rho", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
SCALAR_OPS = ("value", "grad_rho")
VECTOR_OPS = ("grad", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
PROBE_OPS = ("hvp", "psd_majorizer_hvp")
#: results up to this many bytes come back as numpy when no ``out`` is given
NUMPY_RESULT_LIMIT = 2 * 2**30
#: pair tables up to this size are scattered whole to the workers (with a numpy ``t``)
SHARED_PAIRS_LIMIT = 2**30


def _client():
    from ..cluster import get_client

    return get_client()


def check_penalty(penalty) -> None:
    """Refuse anything but the two penalties the distributed layer knows."""
    if not isinstance(penalty, (DecoderIncoherencePenalty, NestedPrefixPenalty)):
        raise InvalidArgumentError(
            f"penalty must be a DecoderIncoherencePenalty or NestedPrefixPenalty, got {type(penalty).__name__}"
        )


def check_ops(ops, v) -> tuple[str, ...]:
    """Validate the requested operations (and that ``v`` is there when a product is asked for)."""
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    if not ops:
        raise InvalidArgumentError(f"ops is empty; expected some of {OPS}")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise InvalidArgumentError(f"unknown op {unknown[0]!r} in ops; expected names from {OPS}")
    if v is None and any(o in PROBE_OPS for o in ops):
        raise InvalidArgumentError(
            f"ops {[o for o in ops if o in PROBE_OPS]} need a probe vector: pass v= of the same length as t"
        )
    return tuple(dict.fromkeys(ops))


def _sum_tree(values, split_every: int = 8):
    """Deterministic pairwise tree sum (fixed order) of floats or equal-shape arrays."""
    vals = list(values)
    if not vals:
        return 0.0
    while len(vals) > 1:
        vals = [math.fsum(vals[i:i + split_every]) if np.isscalar(vals[i])
                else np.sum(vals[i:i + split_every], axis=0) for i in range(0, len(vals), split_every)]
    return vals[0]


def _open_out_group(out):
    import zarr

    if out is None:
        return None
    if isinstance(out, zarr.Group):
        return out
    return zarr.open_group(str(out), mode="a")


def _spill_path(group, name: str) -> str:
    import os

    store_path = getattr(group.store, "root", None)
    if store_path is None:
        return None
    return os.path.join(str(store_path), group.path, f"_input_{name}")


def input_identity(x, name: str) -> dict:
    """JSON identity of an input for a job spec: Zarr path/shape/chunks, or a digest of numpy data."""
    import hashlib

    if is_zarr_array(x):
        root = getattr(x.store, "root", None)
        return {"kind": "zarr", "path": None if root is None else str(root), "array": x.path,
                "shape": list(x.shape), "chunks": list(x.chunks), "dtype": str(x.dtype)}
    if is_dask_array(x):
        return {"kind": "dask", "name": x.name, "shape": list(x.shape)}
    arr = np.ascontiguousarray(np.asarray(x))
    return {"kind": "numpy", "shape": list(arr.shape), "dtype": str(arr.dtype),
            "blake2b": hashlib.blake2b(arr.view(np.uint8).ravel(), digest_size=16).hexdigest()}


def pairs_identity(pairs: PairTable) -> dict:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for arr in (pairs.j, pairs.k, pairs.w):
        h.update(np.ascontiguousarray(arr).view(np.uint8).ravel())
    return {"n_pairs": len(pairs), "k_atoms": pairs.k_atoms, "blake2b": h.hexdigest()}


def _executing_keys(dask_worker) -> list:
    state = getattr(dask_worker, "state", None)
    executing = getattr(state, "executing", ()) if state is not None else ()
    return [getattr(ts, "key", ts) for ts in executing]


def _quiesce(futures, timeout: float = 120.0) -> None:
    """Wait until no worker still executes one of ``futures`` (a cancelled task that was already
    running goes on until it returns, unknown to the scheduler), so the store is quiet when an
    error surfaces."""
    if not futures:
        return
    client = futures[0].client
    keys = {f.key for f in futures}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = {k for ks in client.run(_executing_keys).values() for k in ks}
        except Exception:  # noqa: BLE001 - best effort; the original error is what matters
            return
        if not running & keys:
            return
        time.sleep(0.05)


class _Tracker:
    """Client side of a job: progress into the store as futures finish, failures recorded."""

    def __init__(self, job, stage_label: str, total: int, progress=None, every: float = 0.5):
        self.job, self.label, self.total, self.cb = job, stage_label, total, progress
        self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.every = every

    def step(self, n: int = 1, **fields):
        self.done += n
        now = time.perf_counter()
        if self.cb is not None:
            self.cb(self.label, self.done, self.total)
        if self.job is not None and (now - self.last >= self.every or self.done == self.total):
            elapsed = now - self.t0
            self.job.update_progress(phase=self.label, phase_done=self.done, phase_total=self.total,
                                     units_done=len(self.job.done()), elapsed_s=elapsed,
                                     units_per_s=self.done / elapsed if elapsed > 0 else None, **fields)
            self.last = now

    def gather(self, futures, on_result=None):
        from distributed import as_completed

        try:
            for fut in as_completed(futures):
                res = fut.result()
                if on_result is not None:
                    on_result(res)
                self.step()
        except Exception as exc:
            for f in futures:
                f.cancel()
            _quiesce(futures)
            if self.job is not None:
                self.job.fail(f"{type(exc).__name__}: {exc}")
                note = (f"; completed units are kept in {self.job.store.path}: re-run the same call "
                        "to compute only the missing ones")
                if hasattr(exc, "add_note"):
                    exc.add_note(note)
            raise


def _child_path(group, name: str) -> str:
    import os

    root = getattr(group.store, "root", None)
    if root is None:
        raise InvalidArgumentError("a factored majorizer needs a local directory store")
    return os.path.join(str(root), group.path, name)
