"""Gate sources: dense ``N × K``, top-k ``(indices, values)`` and CSR gates, and ``open_gates``.

A gate source knows its size (``n_tokens``, ``k_atoms``), its form, its row width and a row chunk
that matches its storage; the co-activation plan reads it by row chunks on the workers. Arrays may
be numpy, dask or Zarr; a path is opened as the Zarr group :func:`~distpen.sources.synth.synth_gates`
or :func:`~distpen.sources.encode.encode_gates` writes (attributes ``format = "distpen.gates"``,
``form``, ``k_atoms``), as a 2-D Zarr array, or as a delphi latent cache directory.

Sources of the ``"sparse"`` form (:class:`SparseGates`, :class:`DelphiGates`, the stored CSR of
``encode_gates`` and :class:`~distpen.sources.encode.EncodedGates`) share one protocol, which the
statistics job relies on:

* ``n_tokens``, ``k_atoms``, ``dtype``, ``row_align`` (a row chunk is a multiple of it),
  ``input_spec()``, ``row_chunk_hint()``, ``row_width()`` (entries per row, an estimate);
* ``csr_rows(r0, r1)`` → ``(indptr, indices, values)`` of rows ``[r0, r1)`` (``indptr`` int64
  from 0), as stored: rows need not be sorted; the job's kernels validate and sort them;
* ``job_source(scratch, passes, row_chunk)`` → ``(source, calls)``: the source a job reads and the calls
  ``(function, *args)`` to run once, on the workers, before any row chunk is read (each called as
  ``function(source, *args)``); ``scratch`` is a directory every worker sees, and ``passes`` the
  number of times the job will read each row chunk of ``row_chunk`` rows.
"""

from __future__ import annotations

import os

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError, InvalidDtypeError, ShapeMismatchError, StoreCorruptError

__all__ = ["DenseGates", "TopKGates", "SparseGates", "DelphiGates", "as_gates", "open_gates"]


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


def is_gate_source(x) -> bool:
    """True for an object of the gate-source protocol (dense, top-k or sparse form)."""
    return getattr(x, "form", None) in ("dense", "topk", "sparse") and hasattr(x, "input_spec")


def as_gates(gates):
    """Return ``gates`` if it is a gate object; wrap a 2-D float array as :class:`DenseGates`, a
    ``scipy.sparse`` matrix as :class:`SparseGates` and a :class:`~distpen.sources.delphi.DelphiLatents`
    as :class:`DelphiGates`; open a path with :func:`open_gates`."""
    from .delphi import DelphiLatents

    if is_gate_source(gates):
        return gates
    if isinstance(gates, DelphiLatents):
        return DelphiGates(gates)
    if _is_scipy_sparse(gates):
        return SparseGates(gates)
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

        A delphi latent cache directory (``latents/<hookpoint>/`` or ``latents/`` with one
        hookpoint) is opened as :class:`DelphiGates`; a CSR store written by ``encode_gates``
        (``form="sparse"``) as a sparse gate source.

    Returns
    -------
    DenseGates, TopKGates, DelphiGates or a sparse gate source

    Raises
    ------
    InvalidArgumentError
        Nothing at ``path``.
    StoreCorruptError
        A group that does not say which form it holds.
    """
    import zarr

    from .delphi import DelphiLatents, is_latent_cache

    p = os.fspath(path)
    if "://" not in p and not os.path.exists(p):  # an fsspec URL (s3://, memory://...) is opened by zarr
        raise InvalidArgumentError(f"no gates at {p!r} (path does not exist)")
    if not _has_zarr_json(p) and is_latent_cache(p):
        return DelphiGates(DelphiLatents(p))
    try:
        node = zarr.open(p, mode="r")
    except Exception as exc:
        raise InvalidArgumentError(f"cannot open gates at {p!r} as Zarr: {exc}") from None
    if isinstance(node, zarr.Array):
        return DenseGates(node)
    attrs = dict(node.attrs)
    form = attrs.get("form")
    if attrs.get("format") == _FORMAT and form == "sparse":
        return _StoredCSRGates(p, attrs)
    if attrs.get("format") != _FORMAT or form not in ("dense", "topk"):
        members = sorted(node.array_keys())
        raise StoreCorruptError(
            f"{p!r} is not a gates store: attributes format={attrs.get('format')!r}, form={form!r} "
            f"(arrays {members}); expected format='distpen.gates' and form 'dense', 'topk' or 'sparse' "
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


# ============================================================================ CSR gates
def _is_scipy_sparse(x) -> bool:
    return hasattr(x, "tocsr") and hasattr(x, "shape") and hasattr(x, "nnz")


def _has_zarr_json(p: str) -> bool:
    if "://" in p and not p.startswith("file://"):
        return False
    p = p.removeprefix("file://")
    return os.path.isfile(os.path.join(p, "zarr.json")) or os.path.isfile(os.path.join(p, ".zgroup"))


def _check_indptr_chunk(ip: np.ndarray, r0: int, r1: int, nnz: int, where: str) -> np.ndarray:
    """``indptr[r0 : r1 + 1]`` checked (non-decreasing, within the entries) and rebased to 0."""
    ip = np.asarray(ip).astype(np.int64, copy=False)
    d = np.diff(ip)
    if (d < 0).any() or ip[0] < 0 or ip[-1] > nnz:
        bad = int(np.flatnonzero(d < 0)[0]) if (d < 0).any() else (0 if ip[0] < 0 else len(d) - 1)
        from ..errors import GateDataError

        raise GateDataError(
            f"{where}: indptr decreases or leaves the {nnz} entries at row {r0 + bad} (indptr "
            f"{ip[bad]} → {ip[bad + 1] if bad + 1 < len(ip) else ip[bad]}; row chunk [{r0}, {r1})); "
            "indptr must be non-decreasing from 0 to len(indices)"
        )
    return ip - ip[0]


class SparseGates:
    """CSR gates: row ``n`` holds atoms ``indices[indptr[n]:indptr[n+1]]`` with those ``values``.

    Rows may be in any order within themselves (the job sorts them); an atom repeated within a
    row is an error (found while computing), and explicitly stored zeros are no entries.

    Parameters
    ----------
    indptr : array of shape (n_tokens + 1,), integer, or a ``scipy.sparse`` matrix / array
        Row offsets: ``indptr[0] = 0``, non-decreasing, ``indptr[-1] = len(indices)``. A
        ``scipy.sparse`` matrix of shape (n_tokens, k_atoms) may be passed instead of the three
        arrays (it is converted with ``tocsr()``; ``k_atoms`` defaults to its width).
    indices : array of shape (nnz,), integer
        Atom ids in ``[0, k_atoms)``.
    values : array of shape (nnz,), float32 or float64
        Gate values ≥ 0 and finite (checked per row chunk while computing).
    k_atoms : int
        Number of atoms ``K``.

    numpy and Zarr arrays are accepted (numpy input is checked whole before any work; for Zarr
    only the ends of ``indptr`` are, and every row chunk's rows are checked when read).

    Raises
    ------
    ShapeMismatchError
        Arrays that are not 1-D, an ``indptr`` of fewer than 2 entries, or lengths that disagree.
    InvalidDtypeError
        Non-integer ``indptr``/``indices`` or non-float ``values``.
    InvalidArgumentError
        A non-positive ``k_atoms``, ``indptr`` not starting at 0 or decreasing, or (numpy) an index
        outside ``[0, k_atoms)``.

    Examples
    --------
    >>> g = SparseGates([0, 2, 2, 3], [1, 0, 2], [0.5, 1.0, 2.0], k_atoms=3)
    >>> g.n_tokens, g.k_atoms, g.form, g.nnz
    (3, 3, 'sparse', 3)
    """

    form = "sparse"
    row_align = 1

    def __init__(self, indptr, indices=None, values=None, k_atoms=None):
        if _is_scipy_sparse(indptr):
            if indices is not None or values is not None:
                raise InvalidArgumentError(
                    "SparseGates got a scipy.sparse matrix and separate indices/values; pass either "
                    "the matrix alone or the three CSR arrays"
                )
            m = indptr.tocsr()
            if k_atoms is None:
                k_atoms = int(m.shape[1])
            elif int(m.shape[1]) > int(k_atoms):
                raise ShapeMismatchError(
                    f"the scipy.sparse gates have {m.shape[1]} columns but k_atoms = {k_atoms}"
                )
            indptr, indices, values = m.indptr, m.indices, m.data
        if indices is None or values is None or k_atoms is None:
            raise InvalidArgumentError(
                "SparseGates needs indptr, indices, values and k_atoms (or a scipy.sparse matrix)"
            )
        self.k_atoms = check_positive_int(k_atoms, "k_atoms")
        arrs = {}
        for name, x in (("indptr", indptr), ("indices", indices), ("values", values)):
            x, kind = _as_array(x, name)
            if kind == "dask":
                raise InvalidArgumentError(
                    f"CSR {name} is a dask array; compute it or store it in Zarr first"
                )
            if x.ndim != 1:
                raise ShapeMismatchError(
                    f"CSR {name} must be 1-D, got {x.ndim}-D of shape {tuple(x.shape)}"
                )
            arrs[name] = (x, kind)
        (ip, ipk), (ind, indk), (val, valk) = arrs["indptr"], arrs["indices"], arrs["values"]
        for name, x in (("indptr", ip), ("indices", ind)):
            if np.dtype(x.dtype).kind not in "iu":
                raise InvalidDtypeError(f"CSR {name} have dtype {x.dtype}; expected an integer dtype")
        if np.dtype(val.dtype) not in _FLOATS:
            raise InvalidDtypeError(f"CSR values have dtype {val.dtype}; expected float32 or float64")
        if ip.shape[0] < 2:
            raise ShapeMismatchError(
                f"CSR indptr has {ip.shape[0]} entries; expected n_tokens + 1 ≥ 2"
            )
        if ind.shape[0] != val.shape[0]:
            raise ShapeMismatchError(
                f"CSR indices have {ind.shape[0]} entries but values have {val.shape[0]}; "
                "both must have nnz = indptr[-1] entries"
            )
        first, last = int(ip[0]), int(ip[ip.shape[0] - 1])
        if first != 0:
            raise InvalidArgumentError(f"CSR indptr starts at {first}; expected indptr[0] = 0")
        if last != ind.shape[0]:
            raise ShapeMismatchError(
                f"CSR indptr ends at {last} but indices/values have {ind.shape[0]} entries; "
                "expected indptr[-1] = len(indices)"
            )
        if ipk == "numpy":
            d = np.diff(ip.astype(np.int64))
            if (d < 0).any():
                r = int(np.flatnonzero(d < 0)[0])
                raise InvalidArgumentError(
                    f"CSR indptr decreases at row {r} ({int(ip[r])} → {int(ip[r + 1])}); "
                    "expected a non-decreasing indptr"
                )
        if indk == "numpy" and ind.size:
            lo, hi = int(ind.min()), int(ind.max())
            if lo < 0 or hi >= self.k_atoms:
                bad = lo if lo < 0 else hi
                raise InvalidArgumentError(
                    f"CSR indices hold {bad}, outside [0, {self.k_atoms}) (k_atoms = {self.k_atoms}); "
                    "indices must be atom ids"
                )
        self.indptr, self.indices, self.values = ip, ind, val
        self._kinds = (ipk, indk, valk)
        self.kind = ipk if ipk == indk == valk else "+".join((ipk, indk, valk))
        self.n_tokens = int(ip.shape[0]) - 1
        self.nnz = int(ind.shape[0])
        self.dtype = np.dtype(val.dtype)

    def __repr__(self) -> str:
        return (f"SparseGates({self.kind}, n_tokens={self.n_tokens}, k_atoms={self.k_atoms}, "
                f"nnz={self.nnz}, dtype={self.dtype})")

    def input_spec(self) -> dict:
        return {"form": "sparse", "k_atoms": self.k_atoms,
                "indptr": _input_spec(self.indptr, self._kinds[0]),
                "indices": _input_spec(self.indices, self._kinds[1]),
                "values": _input_spec(self.values, self._kinds[2])}

    def __dask_tokenize__(self):
        return ("distpen.SparseGates", _canonical_spec(self.input_spec()))

    def row_chunk_hint(self) -> int | None:
        return _row_chunk_hint(self.indptr, self._kinds[0])

    def row_width(self) -> int:
        return max(1, -(-self.nnz // self.n_tokens))

    def job_source(self, scratch, passes=1, row_chunk=None):
        return self, []

    def csr_rows(self, r0: int, r1: int):
        """Rows ``[r0, r1)`` as stored: ``(indptr from 0, indices, values)`` (``indptr`` checked)."""
        ip = _check_indptr_chunk(np.asarray(self.indptr[r0:r1 + 1]), r0, r1, self.nnz, "CSR gates")
        a = int(np.asarray(self.indptr[r0]))
        b = a + int(ip[-1])
        return ip, np.asarray(self.indices[a:b]), np.asarray(self.values[a:b])


def _canonical_spec(spec) -> str:
    import json

    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)


class DelphiGates:
    """A delphi latent cache as a sparse gate source (one token per row, CSR).

    A row chunk is a range of whole sequences (``row_align = seq_len``). Before a job reads any
    rows, each shard is indexed once, by one task (:meth:`job_source`: the index files go into the
    job's scratch directory, which every worker sees, so no worker re-reads a whole shard).

    Parameters
    ----------
    cache : DelphiLatents

    Examples
    --------
    >>> g = DelphiGates(DelphiLatents("results/latents/layers.6"))    # doctest: +SKIP
    """

    form = "sparse"

    def __init__(self, cache):
        self.cache = cache
        self.n_tokens = int(cache.n_tokens)
        self.k_atoms = int(cache.k_atoms)
        self.row_align = int(cache.seq_len)
        self.dtype = np.dtype(np.float32)
        self.nnz = int(sum(s[3] for s in cache.shards))
        self.kind = "delphi"

    def __repr__(self) -> str:
        return f"DelphiGates({self.cache!r})"

    def input_spec(self) -> dict:
        c = self.cache
        return {"form": "delphi", "k_atoms": self.k_atoms, "n_tokens": self.n_tokens,
                "seq_len": self.row_align, "path": str(c.path),
                "shards": [[str(p), int(a), int(b), int(n)] for p, a, b, n in c.shards],
                "config": c.config}

    def __dask_tokenize__(self):
        return ("distpen.DelphiGates", _canonical_spec(self.input_spec()), self.cache.index_dir)

    def row_chunk_hint(self) -> int | None:
        return None

    def row_width(self) -> int:
        return max(1, -(-self.nnz // max(1, self.n_tokens)))

    def job_source(self, scratch, passes=1, row_chunk=None):
        """A copy indexing into ``scratch/delphi-index`` and one indexing call per shard."""
        import copy

        cache = copy.copy(self.cache)
        cache.index_dir = os.path.join(scratch, "delphi-index")
        return DelphiGates(cache), [(_index_shard, i) for i in range(len(cache.shards))]

    def csr_rows(self, r0: int, r1: int):
        L = self.row_align
        if r0 % L or (r1 % L and r1 != self.n_tokens):
            raise InvalidArgumentError(
                f"rows [{r0}, {r1}) of a delphi cache must be whole sequences of {L} tokens"
            )
        return self.cache.read_csr(r0 // L, -(-r1 // L))


def _index_shard(source, i: int) -> str:
    return source.cache.index_shard(i)


class _StoredCSRGates:
    """CSR gates stored by ``encode_gates``: one sub-group ``chunks/<c>`` per row chunk ``c`` (rows
    ``[c·row_chunk, (c+1)·row_chunk)``) holding ``indptr`` (from 0), ``indices`` and ``values``."""

    form = "sparse"
    row_align = 1

    def __init__(self, path: str, attrs: dict):
        try:
            self.k_atoms = int(attrs["k_atoms"])
            self.n_tokens = int(attrs["n_tokens"])
            self.stored_chunk = int(attrs["row_chunk"])
            self.nnz = int(attrs.get("nnz", 0))
        except KeyError as exc:
            raise StoreCorruptError(f"sparse gates store {path!r} lacks the attribute {exc}") from None
        self.path = path
        self.dtype = np.dtype(attrs.get("dtype", "float32"))
        self.kind = "zarr"
        self._attrs = {k: attrs[k] for k in ("k_atoms", "n_tokens", "row_chunk") if k in attrs}

    def __repr__(self) -> str:
        return f"SparseGates(zarr {self.path!r}, n_tokens={self.n_tokens}, k_atoms={self.k_atoms})"

    def input_spec(self) -> dict:
        return {"form": "sparse", "kind": "zarr-chunks", "path": self.path, **self._attrs}

    def __dask_tokenize__(self):
        return ("distpen.StoredCSRGates", _canonical_spec(self.input_spec()))

    def row_chunk_hint(self) -> int | None:
        return self.stored_chunk

    def row_width(self) -> int:
        return max(1, -(-self.nnz // max(1, self.n_tokens))) if self.nnz else 32

    def job_source(self, scratch, passes=1, row_chunk=None):
        return self, []

    def _chunk(self, c: int):
        import zarr

        try:
            g = zarr.open_group(self.path, mode="r", path=f"chunks/{c}")
            return g["indptr"], g["indices"], g["values"]
        except Exception as exc:  # noqa: BLE001 - any failure means the chunk is not there
            r0 = c * self.stored_chunk
            raise StoreCorruptError(
                f"sparse gates store {self.path!r}: row chunk {c} (rows {r0}.."
                f"{min(self.n_tokens, r0 + self.stored_chunk)}) is missing or unreadable ({exc}); "
                "re-run encode_gates to complete it"
            ) from None

    def csr_rows(self, r0: int, r1: int):
        rc = self.stored_chunk
        ips, inds, vals = [np.zeros(1, np.int64)], [], []
        base = 0
        for c in range(r0 // rc, (r1 - 1) // rc + 1):
            a, b = max(r0, c * rc) - c * rc, min(r1, (c + 1) * rc) - c * rc
            zptr, zind, zval = self._chunk(c)
            ip = _check_indptr_chunk(zptr[a:b + 1], c * rc + a, c * rc + b, int(zind.shape[0]),
                                     f"{self.path}/chunks/{c}")
            o = int(zptr[a])
            inds.append(zind[o:o + int(ip[-1])])
            vals.append(zval[o:o + int(ip[-1])])
            ips.append(ip[1:] + base)
            base += int(ip[-1])
        return np.concatenate(ips), np.concatenate(inds), np.concatenate(vals)
