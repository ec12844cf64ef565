"""Gate sources: dense ``N × K`` and top-k ``(indices, values)`` gates, and ``open_gates``.

A gate source knows its size (``n_tokens``, ``k_atoms``), its form, its row width and a row chunk
that matches its storage; the co-activation plan reads it by row chunks on the workers. Arrays may
be numpy, dask or Zarr; a path is opened as the Zarr group :func:`~distpen.sources.synth.synth_gates`
writes (attributes ``format = "distpen.gates"``, ``form``, ``k_atoms``) or as a 2-D Zarr array.
"""

from __future__ import annotations

import os

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError, InvalidDtypeError, ShapeMismatchError, StoreCorruptError

__all__ = ["DenseGates", "TopKGates", "open_gates"]


_FORMAT = "distpen.gates"
_FORMAT_VERSION = 1
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _kind(x) -> str:
    import dask.array as da
    import zarr

    if isinstance(x, zarr.Array):
        return "zarr"
    if isinstance(x, da.Array):
        return "dask"
    if isinstance(x, np.ndarray):
        return "numpy"
    return "other"


def _as_array(x, name: str):
    kind = _kind(x)
    if kind == "other":
        if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
            x = np.asarray(x)
            kind = "numpy"
        else:
            raise InvalidArgumentError(
                f"{name} must be a numpy, dask or zarr array, got {type(x).__name__}"
            )
    return x, kind


def _zarr_path(z) -> str | None:
    store = z.store
    root = getattr(store, "root", None)
    if root is None and hasattr(store, "fs") and hasattr(store, "path"):  # FsspecStore: its URL
        root = store.fs.unstrip_protocol(store.path)
    if root is None:
        return None
    return os.path.join(str(root), z.path) if z.path else str(root)


def _input_spec(x, kind: str) -> dict:
    """JSON description of an input array for a job fingerprint."""
    from dask.base import tokenize

    spec = {"kind": kind, "shape": [int(s) for s in x.shape], "dtype": str(x.dtype)}
    if kind == "zarr":
        spec["path"] = _zarr_path(x) or f"<{type(x.store).__name__}>"
        spec["chunks"] = [int(c) for c in x.chunks]
    elif kind == "dask":
        spec["name"] = x.name
        spec["chunks"] = [[int(c) for c in cs] for cs in x.chunks]
    else:
        spec["token"] = tokenize(x)
    return spec


def _row_chunk_hint(x, kind: str) -> int | None:
    if kind == "zarr":
        return int(x.chunks[0])
    if kind == "dask":
        return int(max(x.chunks[0]))
    return None


class DenseGates:
    """Dense gates ``g[n, j] ≥ 0``, mostly zeros.

    Parameters
    ----------
    array : array of shape (n_tokens, k_atoms), float32 or float64
        numpy, dask or zarr array.

    Raises
    ------
    ShapeMismatchError
        If ``array`` is not 2-D or has a zero dimension.
    InvalidDtypeError
        If its dtype is not float32 or float64.

    Examples
    --------
    >>> g = DenseGates(np.zeros((10, 4), dtype=np.float32))
    >>> g.n_tokens, g.k_atoms, g.form
    (10, 4, 'dense')
    """

    form = "dense"

    def __init__(self, array):
        array, kind = _as_array(array, "gates")
        if array.ndim != 2:
            raise ShapeMismatchError(
                f"dense gates must be 2-D (n_tokens, k_atoms), got {array.ndim}-D of shape {tuple(array.shape)}"
            )
        if np.dtype(array.dtype) not in _FLOATS:
            raise InvalidDtypeError(
                f"dense gates have dtype {array.dtype}; expected float32 or float64 "
                "(cast with .astype('float32'))"
            )
        n, k = (int(s) for s in array.shape)
        if n == 0 or k == 0:
            raise ShapeMismatchError(f"dense gates must have at least one token and one atom, got shape {(n, k)}")
        self.array, self.kind = array, kind
        self.n_tokens, self.k_atoms = n, k
        self.dtype = np.dtype(array.dtype)

    def __repr__(self) -> str:
        return f"DenseGates({self.kind}, n_tokens={self.n_tokens}, k_atoms={self.k_atoms}, dtype={self.dtype})"

    def input_spec(self) -> dict:
        """JSON description (form, kind, path/token, shape, chunks, dtype) used in job manifests."""
        return {"form": "dense", "k_atoms": self.k_atoms, "gates": _input_spec(self.array, self.kind)}

    def row_chunk_hint(self) -> int | None:
        return _row_chunk_hint(self.array, self.kind)

    def row_width(self) -> int:
        """Entries per token in the input."""
        return self.k_atoms


class TopKGates:
    """Top-k gates: for each token the indices and values of its ``k`` active atoms.

    Parameters
    ----------
    indices : array of shape (n_tokens, k), integer
        Atom indices in ``[-1, k_atoms)``; −1 marks an empty slot. An index repeated within a row
        is an error (found while computing).
    values : array of shape (n_tokens, k), float32 or float64
        Gate values ≥ 0; 0 marks an empty slot.
    k_atoms : int
        Number of atoms ``K``.

    Raises
    ------
    ShapeMismatchError
        Wrong ndim, ``indices`` and ``values`` of different shapes, or ``k > k_atoms``.
    InvalidDtypeError
        Non-integer indices or non-float values.
    InvalidArgumentError
        Non-positive ``k_atoms``, or (numpy input) an index outside ``[-1, k_atoms)``.

    Examples
    --------
    >>> g = TopKGates(np.array([[0, 2], [1, -1]]), np.array([[1.0, 0.5], [2.0, 0.0]]), k_atoms=3)
    >>> g.n_tokens, g.k, g.form
    (2, 2, 'topk')
    """

    form = "topk"

    def __init__(self, indices, values, k_atoms, *, _index_range=None):
        self.k_atoms = check_positive_int(k_atoms, "k_atoms")
        indices, ikind = _as_array(indices, "indices")
        values, vkind = _as_array(values, "values")
        for name, arr in (("indices", indices), ("values", values)):
            if arr.ndim != 2:
                raise ShapeMismatchError(
                    f"top-k {name} must be 2-D (n_tokens, k), got {arr.ndim}-D of shape {tuple(arr.shape)}"
                )
        if indices.shape[0] != values.shape[0]:
            raise ShapeMismatchError(
                f"top-k indices have {indices.shape[0]} tokens but values have {values.shape[0]}; "
                "both must have the same N"
            )
        if indices.shape[1] != values.shape[1]:
            raise ShapeMismatchError(
                f"top-k indices have k = {indices.shape[1]} slots per token but values have "
                f"{values.shape[1]}; both must be (n_tokens, k)"
            )
        if np.dtype(indices.dtype).kind not in "iu":
            raise InvalidDtypeError(
                f"top-k indices have dtype {indices.dtype}; expected an integer dtype (int32 or int64)"
            )
        if np.dtype(values.dtype) not in _FLOATS:
            raise InvalidDtypeError(
                f"top-k values have dtype {values.dtype}; expected float32 or float64"
            )
        n, k = (int(s) for s in indices.shape)
        if n == 0 or k == 0:
            raise ShapeMismatchError(f"top-k gates must have at least one token and one slot, got shape {(n, k)}")
        if k > self.k_atoms:
            raise ShapeMismatchError(
                f"top-k gates have k = {k} slots per token but only k_atoms = {self.k_atoms} atoms; "
                "k must be ≤ k_atoms (is k_atoms right?)"
            )
        if ikind == "numpy" and indices.size:
            lo, hi = int(indices.min()), int(indices.max())
            _check_index_range(lo, hi, self.k_atoms)
        elif _index_range is not None:
            _check_index_range(int(_index_range[0]), int(_index_range[1]), self.k_atoms)
        self.indices, self.values = indices, values
        self.kind = ikind if ikind == vkind else f"{ikind}+{vkind}"
        self._ikind, self._vkind = ikind, vkind
        self.n_tokens, self.k = n, k
        self.dtype = np.dtype(values.dtype)

    def __repr__(self) -> str:
        return (f"TopKGates({self.kind}, n_tokens={self.n_tokens}, k={self.k}, k_atoms={self.k_atoms}, "
                f"dtype={self.dtype})")

    def input_spec(self) -> dict:
        return {"form": "topk", "k_atoms": self.k_atoms,
                "indices": _input_spec(self.indices, self._ikind),
                "values": _input_spec(self.values, self._vkind)}

    def row_chunk_hint(self) -> int | None:
        return _row_chunk_hint(self.indices, self._ikind) or _row_chunk_hint(self.values, self._vkind)

    def row_width(self) -> int:
        return self.k


def _check_index_range(lo: int, hi: int, k_atoms: int) -> None:
    if lo < -1 or hi >= k_atoms:
        bad = lo if lo < -1 else hi
        raise InvalidArgumentError(
            f"top-k indices hold {bad}, outside [-1, {k_atoms}) (k_atoms = {k_atoms}); "
            "indices must be atom ids or -1 for an empty slot"
        )


def as_gates(gates):
    """Return ``gates`` if it is a gate object; wrap a 2-D float array as :class:`DenseGates`;
    open a path with :func:`open_gates`."""
    if isinstance(gates, (DenseGates, TopKGates)):
        return gates
    if isinstance(gates, (str, os.PathLike)):
        return open_gates(gates)
    if isinstance(gates, tuple):
        raise InvalidArgumentError(
            "gates given as a tuple; wrap top-k data as TopKGates(indices, values, k_atoms)"
        )
    return DenseGates(gates)


def open_gates(path):
    """Open gates stored in Zarr.

    Parameters
    ----------
    path : str or os.PathLike
        A local path or an fsspec URL (``s3://...``, ``gs://...``, ``file://...``; the workers open it
        with their own credentials).
        A Zarr group written by :func:`synth_gates` (attributes ``format="distpen.gates"``,
        ``form="dense"`` with array ``gates``, or ``form="topk"`` with ``indices``, ``values`` and
        ``k_atoms``), or a bare 2-D float Zarr array (dense gates).

    Returns
    -------
    DenseGates or TopKGates

    Raises
    ------
    InvalidArgumentError
        Nothing at ``path``.
    StoreCorruptError
        A group that does not say which form it holds.
    """
    import zarr

    p = os.fspath(path)
    if "://" not in p and not os.path.exists(p):  # an fsspec URL (s3://, memory://...) is opened by zarr
        raise InvalidArgumentError(f"no gates at {p!r} (path does not exist)")
    try:
        node = zarr.open(p, mode="r")
    except Exception as exc:
        raise InvalidArgumentError(f"cannot open gates at {p!r} as Zarr: {exc}") from None
    if isinstance(node, zarr.Array):
        return DenseGates(node)
    attrs = dict(node.attrs)
    form = attrs.get("form")
    if attrs.get("format") != _FORMAT or form not in ("dense", "topk"):
        members = sorted(node.array_keys())
        raise StoreCorruptError(
            f"{p!r} is not a gates store: attributes format={attrs.get('format')!r}, form={form!r} "
            f"(arrays {members}); expected format='distpen.gates' and form 'dense' or 'topk' "
            "(wrap other arrays with DenseGates/TopKGates)"
        )
    try:
        if form == "dense":
            g = DenseGates(node["gates"])
        else:
            g = TopKGates(node["indices"], node["values"], attrs["k_atoms"],
                          _index_range=attrs.get("index_range"))
    except KeyError as exc:
        raise StoreCorruptError(f"gates store {p!r} (form {form!r}) lacks {exc}") from None
    if "k_atoms" in attrs and int(attrs["k_atoms"]) != g.k_atoms:
        raise ShapeMismatchError(
            f"gates store {p!r} says k_atoms = {attrs['k_atoms']} but its arrays hold {g.k_atoms} atoms"
        )
    return g
