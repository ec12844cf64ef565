"""Where a distributed task reads a vector argument (``t`` or ``v``) from.

A numpy vector is scattered to the workers once (broadcast) and each task takes the entries it
needs; a Zarr array is read by each task for exactly the index ranges it needs; a dask array is
computed once (small) or written to a Zarr array next to the results (large) and then read the same way.
"""

from __future__ import annotations

import numpy as np

from .._broadcast import BROADCASTS
from .._fastcheck import first_nonfinite
from .._validation import check_float64_array
from ..errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["VectorSource", "as_vector_source", "is_zarr_array", "is_dask_array"]

_DASK_COMPUTE_LIMIT = 512 * 2**20  # bytes of a dask vector computed into memory rather than spilled to Zarr


def is_zarr_array(x) -> bool:
    try:
        import zarr
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, zarr.Array)


def is_dask_array(x) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, da.Array)


def _ranges(starts, lengths):
    from ..layout import _ranges as r

    starts = np.asarray(starts, dtype=np.int64)
    return r(starts, starts + np.asarray(lengths, dtype=np.int64))


class VectorSource:
    """A picklable handle a task uses to read entries of a flat vector of length ``n``.

    ``payload`` is a numpy array (or a Dask future of one) or a ``zarr.Array``.
    """

    def __init__(self, kind: str, payload, n: int):
        self.kind, self.payload, self.n = kind, payload, int(n)

    def meta(self) -> "VectorSource":
        """A copy to ship inside a task: numpy payloads travel separately (as a scattered future)."""
        return VectorSource(self.kind, None if self.kind == "numpy" else self.payload, self.n)

    def task_payload(self):
        """What to pass as the task argument beside :meth:`meta` (the scattered future, or None)."""
        return self.payload if self.kind == "numpy" else None

    def read_ranges(self, starts, lengths, payload=None) -> np.ndarray:
        """Entries ``[starts[i], starts[i] + lengths[i])`` (sorted, disjoint) concatenated, as float64.

        Adjacent ranges are merged into runs and read as slices; a Zarr array is read once over
        the covering span when the runs fill most of it, so a task never builds a per-entry index
        for what is one contiguous read.
        """
        data = self.payload if payload is None else payload
        starts = np.asarray(starts, dtype=np.int64)
        ends = starts + np.asarray(lengths, dtype=np.int64)
        if starts.shape[0] == 0:
            return np.zeros(0)
        brk = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        rs = starts[np.concatenate([[0], brk])]
        re_ = ends[np.concatenate([brk - 1, [starts.shape[0] - 1]])]
        total = int((re_ - rs).sum())
        if data.ndim == 2:  # an n_rows × F Zarr array read as a flat vector
            idx = _ranges(rs, re_ - rs)
            F = data.shape[1]
            rows = np.unique(idx // F)
            block = np.asarray(data.oindex[rows, :], dtype=np.float64)
            pos = np.searchsorted(rows, idx // F)
            return np.ascontiguousarray(block[pos, idx % F])
        lo, hi = int(rs[0]), int(re_[-1])
        if self.kind == "numpy" and rs.shape[0] <= 4096:
            return np.concatenate([np.asarray(data[a:b], dtype=np.float64) for a, b in zip(rs, re_)])
        if self.kind == "numpy":
            return np.ascontiguousarray(data[_ranges(rs, re_ - rs)], dtype=np.float64)
        if hi - lo <= 2 * total + 2**20:  # one read of the covering span, then slices of it
            span = np.asarray(data[lo:hi], dtype=np.float64)
            if rs.shape[0] == 1:
                return span
            return np.concatenate([span[a - lo:b - lo] for a, b in zip(rs, re_)]) if rs.shape[0] <= 4096 \
                else np.ascontiguousarray(span[_ranges(rs - lo, re_ - rs)])
        if rs.shape[0] <= 64:
            return np.concatenate([np.asarray(data[int(a):int(b)], dtype=np.float64) for a, b in zip(rs, re_)])
        return np.ascontiguousarray(data.oindex[_ranges(rs, re_ - rs)], dtype=np.float64)

    def read_all(self) -> np.ndarray:
        if self.kind == "numpy":
            return np.ascontiguousarray(self.payload, dtype=np.float64).ravel()
        return np.ascontiguousarray(self.payload[...], dtype=np.float64).ravel()


def as_vector_source(x, n: int, name: str, *, client=None, spill_path=None) -> tuple[VectorSource, np.ndarray | None]:
    """Validate ``x`` (numpy, dask or zarr; flat of length ``n`` or 2-D with ``n`` entries).

    Returns the source and, for numpy input, the validated local array (else ``None``). Numpy
    input is broadcast to the workers when ``client`` is given — unless an equal array was
    broadcast under the same ``name`` last time, whose future is reused (see
    :mod:`distpen._broadcast`).
    """
    if is_zarr_array(x):
        _check_size(x.shape, n, name)
        if x.dtype.kind not in "fiu":
            raise InvalidArgumentError(f"{name} is a Zarr array of dtype {x.dtype}; expected a real float array")
        return VectorSource("zarr", x, n), None
    if is_dask_array(x):
        _check_size(x.shape, n, name)
        if x.dtype.kind not in "fiu":
            raise InvalidArgumentError(f"{name} is a dask array of dtype {x.dtype}; expected a real float array")
        if x.nbytes <= _DASK_COMPUTE_LIMIT or spill_path is None:
            x = x.compute()
        else:
            import zarr

            z = zarr.create_array(spill_path, shape=x.shape, dtype="f8",
                                  chunks=tuple(max(c) for c in x.chunks), overwrite=True)
            x.astype("f8").to_zarr(z)
            return VectorSource("zarr", z, n), None
    arr = check_float64_array(x, name)
    if arr.ndim != 1:
        if arr.size != n:
            raise ShapeMismatchError(f"{name} has shape {arr.shape} ({arr.size} entries), expected {n} entries")
        arr = arr.ravel()
    if arr.shape[0] != n:
        raise ShapeMismatchError(f"{name} has length {arr.shape[0]}, expected {n} for this penalty")
    bad = first_nonfinite(arr)
    if bad >= 0:
        raise InvalidArgumentError(f"{name} must be finite, but {name}[{bad}] = {float(arr[bad])!r}")
    payload = BROADCASTS.array(client, name, arr) if client is not None else arr
    return VectorSource("numpy", payload, n), arr


def _check_size(shape, n: int, name: str) -> None:
    size = int(np.prod(shape))
    if len(shape) not in (1, 2) or size != n:
        raise ShapeMismatchError(
            f"{name} has shape {tuple(shape)} ({size} entries), but the penalty expects {n} entries"
        )
