"""Gate inputs of the co-activation statistics: dense ``N × K`` or top-k ``(indices, values)``.

Both forms accept numpy, dask or zarr arrays. Shapes, dtypes and the atom count are checked when
the object is built (before any work). Top-k indices are range-checked up front when that is cheap
(numpy input, or a Zarr group whose attributes record the index range, as :func:`synth_gates`
writes); otherwise every task checks the indices it reads and raises
:class:`~distpen.errors.GateDataError` naming the row and atom, before anything is written.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ._validation import check_finite_scalar, check_positive_int
from .errors import (InvalidArgumentError, InvalidDtypeError, ShapeMismatchError,
                     StoreConflictError, StoreCorruptError)

__all__ = ["DenseGates", "TopKGates", "open_gates", "synth_gates"]

_FORMAT = "distpen.gates"
_FORMAT_VERSION = 1
_GENERATOR = "distpen.synth/1"
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


# ----------------------------------------------------------------------------- synthetic gates
def _synth_model(k_atoms: int, seed: int, topk: int | None, density: float | None) -> dict:
    """Global parameters of the generator, a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    K = k_atoms
    perm = rng.permutation(K)
    # heavy-tailed (Zipf-like) firing propensity: atom perm[r] has weight 1/(r+1)^0.9
    w = np.empty(K)
    w[perm] = 1.0 / np.arange(1, K + 1) ** 0.9
    n_groups = max(1, K // 64)
    sizes = rng.integers(2, 9, size=n_groups)
    sizes = np.minimum(sizes, max(2, (topk or K) // 2))
    # planted groups: disjoint runs of a second permutation (atoms of every popularity)
    perm2 = rng.permutation(K)
    groups, start = [], 0
    for s in sizes:
        if start + s > K:
            break
        groups.append(np.sort(perm2[start:start + s]))
        start += s
    if K < 2:
        groups = []
    gp = rng.uniform(0.5, 1.5, size=len(groups))
    group_rate = 0.3  # a token fires one planted group with this probability
    model = {"w": w, "groups": groups, "group_p": gp / gp.sum() if len(groups) else gp, "group_rate": group_rate}
    if density is not None:
        # per-atom firing probability p_a = min(1, c·w_a), c solved so that mean(p) = density
        lo, hi = 0.0, 1.0
        while np.minimum(1.0, hi * w).mean() < density and hi < 1e30:
            hi *= 2
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if np.minimum(1.0, mid * w).mean() < density:
                lo = mid
            else:
                hi = mid
        model["p"] = np.minimum(1.0, hi * w)
    else:
        model["cdf"] = np.cumsum(w) / w.sum()
    return model


def _fill_topk_numba():
    from numba import njit

    @njit(cache=True, nogil=True)
    def fill(cand, gidx, gstart, gsize, gatoms, out):
        n, m = cand.shape
        k = out.shape[1]
        for r in range(n):
            p = 0
            g = gidx[r]
            if g >= 0:
                for t in range(gsize[g]):
                    if p < k:
                        out[r, p] = gatoms[gstart[g] + t]
                        p += 1
            for c in range(m):
                if p >= k:
                    break
                a = cand[r, c]
                dup = False
                for q in range(p):
                    if out[r, q] == a:
                        dup = True
                        break
                if not dup:
                    out[r, p] = a
                    p += 1
            for q in range(p, k):
                out[r, q] = -1
    return fill


_FILL = None


def _synth_chunk(c: int, r0: int, r1: int, k_atoms: int, seed: int, topk, density, dtype: str, model_key):
    """Generate and return row chunk ``c`` (rows ``[r0, r1)``); a pure function of its arguments."""
    global _FILL
    model = _model_cache(model_key, k_atoms, seed, topk, density)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, int(c)]))
    n = r1 - r0
    groups = model["groups"]
    ng = len(groups)
    if ng:
        fires = rng.random(n) < model["group_rate"]
        gidx = np.where(fires, rng.choice(ng, size=n, p=model["group_p"]), -1).astype(np.int64)
    else:
        gidx = np.full(n, -1, dtype=np.int64)
    if topk is not None:
        if _FILL is None:
            _FILL = _fill_topk_numba()
        m = 2 * topk + 8
        cand = np.searchsorted(model["cdf"], rng.random((n, m)), side="right").astype(np.int64)
        np.minimum(cand, k_atoms - 1, out=cand)
        gsize = np.array([len(g) for g in groups] or [0], dtype=np.int64)
        gstart = np.concatenate([[0], np.cumsum(gsize)[:-1]]).astype(np.int64)
        gatoms = np.concatenate(groups).astype(np.int64) if ng else np.zeros(1, dtype=np.int64)
        idx = np.empty((n, topk), dtype=np.int64)
        _FILL(cand, gidx, gstart, gsize, gatoms, idx)
        vals = rng.lognormal(-1.0, 0.75, size=(n, topk)).astype(dtype)
        vals[idx < 0] = 0
        return idx.astype(np.int32), vals
    fire = rng.random((n, k_atoms), dtype=np.float32) < model["p"][None, :].astype(np.float32)
    if ng:
        rows = np.flatnonzero(gidx >= 0)
        for g in range(ng):  # loop over planted groups (not tokens)
            sel = rows[gidx[rows] == g]
            if sel.size:
                fire[np.ix_(sel, groups[g])] = True
    vals = np.zeros((n, k_atoms), dtype=dtype)
    vals[fire] = rng.lognormal(-1.0, 0.75, size=int(fire.sum())).astype(dtype)
    return vals


_MODELS: dict = {}


def _model_cache(key, k_atoms, seed, topk, density):
    m = _MODELS.get(key)
    if m is None:
        if len(_MODELS) > 4:
            _MODELS.clear()
        m = _MODELS[key] = _synth_model(k_atoms, seed, topk, density)
    return m


def _synth_write(path: str, c: int, r0: int, r1: int, k_atoms: int, seed: int, topk, density, dtype, key):
    import zarr

    group = zarr.open_group(path, mode="r+")
    out = _synth_chunk(c, r0, r1, k_atoms, seed, topk, density, dtype, key)
    if topk is not None:
        group["indices"][r0:r1] = out[0]
        group["values"][r0:r1] = out[1]
    else:
        group["gates"][r0:r1] = out
    return r1 - r0


def synth_gates(path, n_tokens, k_atoms, *, topk=None, density=None, seed=0, row_chunk=None,
                dtype="float32", overwrite=False, progress=None, client=None):
    """Write realistic synthetic gates to a Zarr group, chunk by chunk, in parallel on the cluster.

    Atoms have heavy-tailed (Zipf-like, exponent 0.9) firing propensities; planted groups of 2–8
    atoms co-fire (a token fires one group with probability 0.3); gate values are log-normal.
    Every row chunk is generated from ``(seed, chunk index)`` alone, so the output is identical for
    a seed whatever the cluster, and no process ever holds more than one chunk.

    Parameters
    ----------
    path : str or os.PathLike
        Output Zarr group.
    n_tokens, k_atoms : int
        ``N`` and ``K``.
    topk : int, optional
        Write top-k gates (``indices`` int32 and ``values`` of shape (N, topk)); slots a token
        could not fill are empty (−1 / 0).
    density : float in (0, 1], optional
        Write dense gates (``gates`` of shape (N, K)) with this mean fraction of non-zeros.
        Default 0.02 when neither ``topk`` nor ``density`` is given.
    seed : int
    row_chunk : int, optional
        Rows per stored chunk (default: about 16 MiB of gates per chunk).
    dtype : {"float32", "float64"}
    overwrite : bool
        Replace an existing store at ``path``.
    progress : callable, optional
        Called as ``progress(done_rows, total_rows)`` after each chunk.
    client : distributed.Client, optional
        Default: :func:`distpen.cluster.get_client`.

    Returns
    -------
    DenseGates or TopKGates
        The written gates (backed by the Zarr arrays).

    Raises
    ------
    InvalidArgumentError
        Non-positive sizes, both ``topk`` and ``density``, ``topk > k_atoms``, density outside (0, 1].
    StoreConflictError
        ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> g = synth_gates("gates.zarr", 100_000, 4096, topk=32, seed=1)   # doctest: +SKIP
    """
    import zarr
    from dask.base import tokenize
    from distributed import as_completed

    from .cluster import get_client

    n_tokens = check_positive_int(n_tokens, "n_tokens")
    k_atoms = check_positive_int(k_atoms, "k_atoms")
    seed = check_positive_int(seed, "seed", allow_zero=True)
    if topk is not None and density is not None:
        raise InvalidArgumentError(
            f"pass topk (top-k gates) or density (dense gates), not both; got topk={topk}, density={density}"
        )
    if topk is None and density is None:
        density = 0.02
    if topk is not None:
        topk = check_positive_int(topk, "topk")
        if topk > k_atoms:
            raise InvalidArgumentError(f"topk = {topk} exceeds k_atoms = {k_atoms}; expected topk ≤ k_atoms")
    else:
        density = check_finite_scalar(density, "density")
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"density must be in (0, 1], got {density}")
    if np.dtype(dtype) not in _FLOATS:
        raise InvalidDtypeError(f"dtype must be float32 or float64, got {dtype!r}")
    dtype = str(np.dtype(dtype))
    width = topk if topk is not None else k_atoms
    if row_chunk is None:
        row_chunk = max(1, min(n_tokens, (16 * 2**20) // (width * 4)))
    row_chunk = check_positive_int(row_chunk, "row_chunk")
    p = os.fspath(path)
    if os.path.exists(p) and not overwrite:
        raise StoreConflictError(f"{p!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    group = zarr.open_group(p, mode="w")
    rc = min(row_chunk, n_tokens)
    if topk is not None:
        group.create_array("indices", shape=(n_tokens, topk), chunks=(rc, topk), dtype="int32", fill_value=-1)
        group.create_array("values", shape=(n_tokens, topk), chunks=(rc, topk), dtype=dtype, fill_value=0)
    else:
        group.create_array("gates", shape=(n_tokens, k_atoms), chunks=(rc, k_atoms), dtype=dtype, fill_value=0)
    model = _synth_model(k_atoms, seed, topk, density)
    attrs = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "form": "topk" if topk else "dense",
        "k_atoms": k_atoms, "n_tokens": n_tokens, "seed": seed, "generator": _GENERATOR,
        "planted_groups": [g.tolist() for g in model["groups"]], "complete": False,
    }
    if topk:
        attrs.update(topk=topk, index_range=[-1, k_atoms - 1])
    else:
        attrs.update(density=density)
    group.attrs.update(attrs)

    client = client or get_client()
    key = tokenize(_GENERATOR, k_atoms, seed, topk, density)
    n_chunks = math.ceil(n_tokens / rc)
    bounds = [(c, c * rc, min(n_tokens, (c + 1) * rc)) for c in range(n_chunks)]
    in_flight = max(4, 3 * len(client.scheduler_info().get("workers", {}) or [1]))
    ac = as_completed(loop=client.loop)
    it = iter(bounds)
    done_rows = 0
    tok = tokenize(p, n_tokens, rc, key, dtype)

    def submit_next():
        nxt = next(it, None)
        if nxt is not None:
            c, r0, r1 = nxt
            ac.add(client.submit(_synth_write, p, c, r0, r1, k_atoms, seed, topk, density, dtype, key,
                                 key=f"distpen-synth-{tok}-{c}", pure=False, retries=1))

    for _ in range(in_flight):
        submit_next()
    for fut in ac:
        done_rows += fut.result()
        fut.release()
        if progress is not None:
            progress(done_rows, n_tokens)
        submit_next()
    group.attrs["complete"] = True
    return open_gates(p)
