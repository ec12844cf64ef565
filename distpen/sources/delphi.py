"""A delphi latent cache as a source of CSR gate rows: ``DelphiLatents``.

Layout, confirmed in EleutherAI/delphi @ 3c2e1393 (2025-11-29): ``delphi/latents/cache.py``
(``LatentCache.save_splits``, ``_generate_split_indices``, ``save_config``, ``InMemoryCache.add``,
``get_nonzeros``), ``delphi/latents/loader.py`` (``TensorBuffer.load``, ``LatentDataset._edges``),
``delphi/config.py`` (``CacheConfig``) and ``delphi/utils.py`` (``to_int64_tensor``):

- ``latents/<hookpoint>/{start}_{end}.safetensors``, split by *latent* range: boundaries are
  ``torch.linspace(0, width, n_splits + 1).long()`` and a shard holds latents ``start..end``
  with ``end`` inclusive (``boundaries[1:] - 1``). delphi's loader lists ``*.safetensors``, splits
  the stem on ``_`` and sorts by start.
- each shard: ``locations [nnz, 3]`` = (sequence, position, latent − start), uint16 when both the
  sequence and offset columns are < 2¹⁶, else uint32 (the loader also accepts int16/int32/int64/
  uint64); ``activations [nnz]`` float16 (``.half()``); optionally ``tokens [n_sequences, ctx_len]``
  (the same in every shard). Only ``|a| > 1e-5`` is stored (``torch.nonzero(latents.abs() > 1e-5)``),
  so tokens where nothing fires have no entry. The sequence index is ``batch_number · batch_size``
  plus the row in the batch.
- ``latents/<hookpoint>/config.json``: ``CacheConfig.to_dict()`` plus ``model_name``:
  ``dataset_repo``, ``dataset_split``, ``dataset_name``, ``dataset_column``, ``batch_size``,
  ``cache_ctx_len``, ``n_tokens``, ``n_splits``. delphi caches ``(n_tokens // cache_ctx_len //
  batch_size) · batch_size`` whole sequences (``load_token_batches``), which is the sequence count
  used here when the shards hold no ``tokens``.

A row of gates is one token, ``sequence · ctx_len + position``; ``n_tokens = n_sequences · ctx_len``
counts every token, including those where nothing fired. The entries of a shard are never assumed
sorted: each shard is **indexed once** (one read of its ``locations``/``activations``, validated
whole) into a small file of per-sequence offsets, plus, only when the shard is not already in
(token, latent) order, a sorted copy. Both live in ``index_dir`` (a local directory; by default
under the system temp dir, keyed by the shard's identity, so a worker that already indexed a shard
reuses it). ``read_csr(seq0, seq1)`` then reads just that sequence range's byte ranges of each
shard. The object holds paths and header offsets only: it pickles small to Dask workers.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading

import numpy as np
from numba import njit

from ..errors import GateDataError, InvalidArgumentError, InvalidDtypeError, ShapeMismatchError
from . import _safetensors as st

__all__ = ["DelphiLatents", "is_latent_cache"]

_SHARD_RE = re.compile(r"^(\d+)_(\d+)\.safetensors$")
_LOC_DTYPES = ("U16", "U32", "I16", "I32", "I64", "U64")
_ACT_DTYPES = ("F16", "F32", "BF16")
_INDEX_VERSION = 1


def _shard_names(names):
    return [n for n, is_dir in names if not is_dir and n.endswith(".safetensors")]


def is_latent_cache(path, storage_options=None) -> bool:
    """True when ``path`` is a delphi hookpoint directory or a ``latents/`` directory of them."""
    try:
        names = st.list_files(path, storage_options)
    except (OSError, InvalidArgumentError):
        return False
    if any(_SHARD_RE.match(n) for n in _shard_names(names)):
        return True
    for n, is_dir in names:
        if is_dir:
            try:
                sub = st.list_files(st.join(path, n), storage_options)
            except OSError:
                continue
            if any(_SHARD_RE.match(s) for s in _shard_names(sub)):
                return True
    return False


class _Shard:
    __slots__ = ("path", "name", "start", "end", "loc", "act", "nnz", "ident")

    def __init__(self, path, name, start, end, loc, act, ident):
        self.path, self.name, self.start, self.end = path, name, start, end
        self.loc, self.act, self.ident = loc, act, ident
        self.nnz = loc.shape[0]

    def __getstate__(self):
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


class DelphiLatents:
    """Gate rows out of a delphi latent cache directory, one token per row, as CSR.

    Parameters
    ----------
    path : str or path-like
        ``latents/<hookpoint>/`` itself, or ``latents/`` (then ``hookpoint`` picks the
        subdirectory; it may be omitted when there is only one). Local, ``file://`` or an fsspec URL.
    hookpoint : str, optional
    n_sequences : int, optional
        Number of cached sequences; by default the shards' ``tokens`` row count, else what
        delphi caches for ``config.json``'s ``n_tokens``, ``cache_ctx_len`` and ``batch_size``.
    index_dir : str, optional
        Local directory for the per-shard index files (default: under the system temp dir).

    Attributes
    ----------
    k_atoms : int   width of the SAE (last shard's ``end`` + 1)
    seq_len : int   ``cache_ctx_len``
    n_sequences, n_tokens : int   ``n_tokens = n_sequences · seq_len``
    config : dict   the parsed ``config.json``

    Raises
    ------
    InvalidArgumentError
        Not a cache, several hookpoints and none chosen, a malformed shard name, latent ranges that
        overlap or leave a gap, a missing ``locations``/``activations``, an unknown context length.
    InvalidDtypeError, ShapeMismatchError
        Tensors of the wrong dtype or shape (file and tensor named).

    Examples
    --------
    >>> cache = DelphiLatents("results/latents", hookpoint="layers.6")   # doctest: +SKIP
    >>> indptr, indices, values = cache.read_csr(0, 8)                   # doctest: +SKIP
    """

    def __init__(self, path, hookpoint=None, *, n_sequences=None, index_dir=None,
                 storage_options=None):
        self.storage_options = storage_options
        root = path if st.is_url(path) else str(os.fspath(path)).removeprefix("file://")
        if not st.isdir(root, storage_options):
            raise InvalidArgumentError(f"{root}: no such latent cache directory")
        names = st.list_files(root, storage_options)
        if hookpoint is not None:
            root = st.join(root, hookpoint)
            if not st.isdir(root, storage_options):
                found = sorted(n for n, d in names if d)
                raise InvalidArgumentError(
                    f"{root}: no such hookpoint directory; the cache holds {found}"
                )
            names = st.list_files(root, storage_options)
        elif not _shard_names(names):
            hooks = [n for n, d in names if d and _shard_names(st.list_files(st.join(root, n),
                                                                             storage_options))]
            if not hooks:
                raise InvalidArgumentError(
                    f"{root}: not a delphi latent cache (no {{start}}_{{end}}.safetensors shards "
                    "here or in a hookpoint subdirectory)"
                )
            if len(hooks) > 1:
                raise InvalidArgumentError(
                    f"{root}: the cache holds several hookpoints {hooks}; pass hookpoint=..."
                )
            hookpoint = hooks[0]
            root = st.join(root, hookpoint)
            names = st.list_files(root, storage_options)
        self.path = root
        self.hookpoint = hookpoint if hookpoint is not None else \
            str(root).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
        cfg_path = st.join(root, "config.json")
        self.config = st.read_json(cfg_path, storage_options) \
            if "config.json" in dict(names) else {}
        self._parse_shards(names)
        self._parse_lengths(cfg_path, n_sequences)
        self.index_dir = index_dir

    # ------------------------------------------------------------------ validation at open
    def _parse_shards(self, names):
        ranges = []
        for n in _shard_names(names):
            m = _SHARD_RE.match(n)
            if not m:
                raise InvalidArgumentError(
                    f"{st.join(self.path, n)}: not a delphi shard name; expected "
                    "{start}_{end}.safetensors (end inclusive)"
                )
            ranges.append((int(m.group(1)), int(m.group(2)), n))
        ranges.sort()
        expect = 0
        for start, end, n in ranges:
            if end < start:
                raise InvalidArgumentError(f"{st.join(self.path, n)}: latent range {start}..{end} is empty")
            if start < expect:
                raise InvalidArgumentError(
                    f"{st.join(self.path, n)}: latent range {start}..{end} overlaps the previous "
                    f"shard (which ends at {expect - 1}); remove the duplicate shard"
                )
            if start > expect:
                raise InvalidArgumentError(
                    f"{st.join(self.path, n)}: latent range {start}..{end} leaves latents "
                    f"{expect}..{start - 1} in no shard; a shard is missing"
                )
            expect = end + 1
        self.k_atoms = expect
        shards = []
        tokens_shape = None
        for start, end, n in ranges:
            p = st.join(self.path, n)
            tensors, _ = st.read_header(p, self.storage_options)
            for key in ("locations", "activations"):
                if key not in tensors:
                    raise InvalidArgumentError(
                        f"{p}: tensor {key!r} is missing; the shard holds {sorted(tensors)} "
                        "(a delphi shard has 'locations', 'activations' and optionally 'tokens')"
                    )
            loc, act = tensors["locations"], tensors["activations"]
            if loc.dtype not in _LOC_DTYPES:
                raise InvalidDtypeError(
                    f"{p}: 'locations' has dtype {loc.dtype}; expected an integer dtype "
                    "(delphi writes uint16 or uint32)"
                )
            if len(loc.shape) != 2 or loc.shape[1] != 3:
                raise ShapeMismatchError(
                    f"{p}: 'locations' has shape {list(loc.shape)}; expected [nnz, 3] "
                    "(sequence, position, latent − start)"
                )
            if act.dtype not in _ACT_DTYPES:
                raise InvalidDtypeError(
                    f"{p}: 'activations' has dtype {act.dtype}; expected float16 (or F32/BF16)"
                )
            if act.shape != (loc.shape[0],):
                raise ShapeMismatchError(
                    f"{p}: 'activations' has shape {list(act.shape)} but 'locations' has "
                    f"{loc.shape[0]} rows; expected [{loc.shape[0]}]"
                )
            if "tokens" in tensors:
                tshape = tensors["tokens"].shape
                if len(tshape) != 2:
                    raise ShapeMismatchError(f"{p}: 'tokens' has shape {list(tshape)}; expected 2-D")
                if tokens_shape is not None and tshape != tokens_shape:
                    raise ShapeMismatchError(
                        f"{p}: 'tokens' has shape {list(tshape)}, other shards {list(tokens_shape)}"
                    )
                tokens_shape = tshape
            ident = f"{p}|{st.file_size(p, self.storage_options)}"
            if not st.is_url(p):
                ident += f"|{os.stat(p).st_mtime_ns}"
            shards.append(_Shard(p, n, start, end, loc, act, ident))
        self._shards = shards
        self._tokens_shape = tokens_shape

    def _parse_lengths(self, cfg_path, n_sequences):
        cfg = self.config
        ctx = cfg.get("cache_ctx_len", cfg.get("ctx_len"))
        if ctx is None and self._tokens_shape is not None:
            ctx = self._tokens_shape[1]
        if ctx is None:
            raise InvalidArgumentError(
                f"{cfg_path}: the context length is unknown (no config.json 'cache_ctx_len' and no "
                "'tokens' in the shards); restore the cache's config.json"
            )
        ctx = int(ctx)
        if self._tokens_shape is not None and self._tokens_shape[1] != ctx:
            raise ShapeMismatchError(
                f"{self._shards[0].path}: 'tokens' has {self._tokens_shape[1]} positions per "
                f"sequence but config.json says cache_ctx_len = {ctx}"
            )
        if n_sequences is None:
            if self._tokens_shape is not None:
                n_sequences = self._tokens_shape[0]
            elif "n_tokens" in cfg:
                bs = int(cfg.get("batch_size", 1)) or 1
                n_sequences = (int(cfg["n_tokens"]) // ctx // bs) * bs
            else:
                raise InvalidArgumentError(
                    f"{cfg_path}: the number of sequences is unknown (no 'tokens' in the shards and "
                    "no 'n_tokens' in config.json); pass n_sequences=..."
                )
        self.seq_len = ctx
        self.n_sequences = int(n_sequences)
        self.n_tokens = self.n_sequences * ctx

    # ------------------------------------------------------------------ public attributes
    @property
    def n_rows(self) -> int:
        return self.n_tokens

    @property
    def shards(self) -> list[tuple[str, int, int, int]]:
        """``(path, start, end, nnz)`` of each shard, in latent order (``end`` inclusive)."""
        return [(s.path, s.start, s.end, s.nnz) for s in self._shards]

    def __repr__(self) -> str:
        return (f"DelphiLatents({self.path!r}, k_atoms={self.k_atoms}, n_sequences={self.n_sequences}"
                f", seq_len={self.seq_len}, shards={len(self._shards)})")

    # ------------------------------------------------------------------ indexing
    def _index_path(self, s: _Shard) -> str:
        root = self.index_dir or os.path.join(tempfile.gettempdir(), "distpen-delphi-index")
        h = hashlib.sha1(f"{_INDEX_VERSION}|{s.ident}|{self.n_sequences}|{self.seq_len}"
                         .encode()).hexdigest()[:20]
        return os.path.join(root, f"{s.start}_{s.end}-{h}.safetensors")

    def index_shard(self, i: int) -> str:
        """Index shard ``i`` (validate it whole, record per-sequence offsets); return the index path.

        Idempotent: an index already present for the same shard (path, size, mtime) is reused.
        """
        s = self._shards[i]
        ipath = self._index_path(s)
        if os.path.exists(ipath):
            return ipath
        loc = np.ascontiguousarray(st.read_tensor(s.loc, self.storage_options))
        act = st.widen_to_float32(st.read_tensor(s.act, self.storage_options), s.act.dtype)
        width = s.end - s.start + 1
        # one compiled pass finds the first entry failing each check, and whether the entries are
        # sorted by (token row, latent); the checks are then reported in this order
        first = np.full(5, -1, dtype=np.int64)
        is_sorted = _scan_entries(loc, act, self.n_sequences, self.seq_len, width, first)
        for c, (name, hi) in enumerate((("sequence", self.n_sequences), ("position", self.seq_len),
                                        ("latent offset", width))):
            if first[c] >= 0:
                e = int(first[c])
                raise GateDataError(
                    f"{s.path}: entry {e} has {name} {int(loc[e, c])}, outside 0..{hi - 1} "
                    f"(location {loc[e].astype(np.int64).tolist()}; the cache has {self.n_sequences} "
                    f"sequences of {self.seq_len} tokens and this shard {width} latents)"
                )
        if first[3] >= 0:
            e = int(first[3])
            raise GateDataError(
                f"{s.path}: activation {e} is {act[e]} at token row {int(loc[e, 0]) * self.seq_len + int(loc[e, 1])}"
                " (sequence {}, position {}); the cache is damaged".format(int(loc[e, 0]), int(loc[e, 1]))
            )
        if first[4] >= 0:
            e = int(first[4])
            raise GateDataError(
                f"{s.path}: activation {e} is negative ({act[e]}) at token row "
                f"{int(loc[e, 0]) * self.seq_len + int(loc[e, 1])}, latent {s.start + int(loc[e, 2])}; distpen's "
                "gates are ≥ 0 (a cache of a signed SAE cannot be used as gates)"
            )
        if is_sorted:
            data = {"seq_offsets": _seq_offsets(loc, self.n_sequences), "sorted": np.array([1], dtype=np.int64)}
        else:
            data = self._sorted_index(s, loc, act, width)
        from safetensors.numpy import save_file

        os.makedirs(os.path.dirname(ipath), exist_ok=True)
        tmp = f"{ipath}.tmp-{os.getpid()}-{threading.get_ident()}"
        save_file(data, tmp)
        os.replace(tmp, ipath)  # atomic: a concurrent reader sees the whole index or none
        return ipath

    def _sorted_index(self, s, loc, act, width):
        """The index of a shard whose entries are not in (token row, latent) order: the entries
        sorted, as positions, latent offsets and values (a repeated (token, latent) refused)."""
        seq, pos, off = (loc[:, c].astype(np.int64) for c in range(3))
        key = (seq * self.seq_len + pos) * width + off
        order = np.argsort(key, kind="stable")
        key = key[order]
        dup = np.flatnonzero(key[1:] == key[:-1])
        if dup.size:
            kd = int(key[dup[0]])
            row, lat = divmod(kd, width)
            raise GateDataError(
                f"{s.path}: token row {row} (sequence {row // self.seq_len}, position "
                f"{row % self.seq_len}) has latent {s.start + lat} twice; a cache holds one "
                "entry per (token, latent)"
            )
        seq = seq[order]
        row = key // width
        return {"seq_offsets": np.searchsorted(seq, np.arange(self.n_sequences + 1), side="left").astype(np.int64),
                "sorted": np.array([0], dtype=np.int64),
                "pos": (row % self.seq_len).astype(np.int32),
                "col": (key % width).astype(np.int32),
                "val": act[order]}

    def index(self) -> None:
        """Index every shard (each is read once; later ``read_csr`` calls read byte ranges only)."""
        for i in range(len(self._shards)):
            self.index_shard(i)

    # ------------------------------------------------------------------ reading
    def _shard_slice(self, i, seq0, seq1):
        """Shard ``i``'s entries for sequences ``seq0 … seq1`` in (token row, latent) order, as
        ``(locations [n, 3], activations float32)``, or None: a sorted shard's locations as stored,
        an unsorted one's (sequence, position, latent offset) rebuilt from its index."""
        s = self._shards[i]
        ipath = self.index_shard(i)
        itens, _ = st.read_header(ipath)
        offs = st.read_rows(itens["seq_offsets"], seq0, seq1 + 1).astype(np.int64)
        o0, o1 = int(offs[0]), int(offs[-1])
        is_sorted = bool(st.read_tensor(itens["sorted"])[0])
        if o1 == o0:
            return None
        if is_sorted:
            loc = np.ascontiguousarray(st.read_rows(s.loc, o0, o1, self.storage_options))
            act = st.widen_to_float32(st.read_rows(s.act, o0, o1, self.storage_options), s.act.dtype)
            return loc, act
        seq_of = np.repeat(np.arange(seq0, seq1, dtype=np.int64), np.diff(offs))
        loc = np.column_stack([seq_of, st.read_rows(itens["pos"], o0, o1), st.read_rows(itens["col"], o0, o1)])
        return loc.astype(np.int64, copy=False), np.ascontiguousarray(st.read_rows(itens["val"], o0, o1),
                                                                      dtype=np.float32)

    def read_csr(self, seq0: int, seq1: int):
        """Gates of token rows ``seq0·seq_len … seq1·seq_len`` as CSR.

        Returns
        -------
        indptr : int64 array of shape ((seq1 − seq0)·seq_len + 1,)
        indices : int32 array of shape (nnz,), latents, increasing within each row
        values : float32 array of shape (nnz,), > 0

        Raises
        ------
        GateDataError
            A shard's data is invalid (file and token row named); see ``index_shard``.
        """
        if not (0 <= seq0 <= seq1 <= self.n_sequences):
            raise InvalidArgumentError(
                f"sequence range {seq0}..{seq1} is outside 0..{self.n_sequences}"
            )
        n_rows = (seq1 - seq0) * self.seq_len
        parts = [(self._shards[i].start, self._shard_slice(i, seq0, seq1)) for i in range(len(self._shards))]
        parts = [(start, p) for start, p in parts if p is not None]
        # a counting sort by token row: shards ascend in latent and each slice is (row, latent)
        # sorted, so placing the slices in shard order leaves the latents of a row increasing
        counts = np.zeros(n_rows, dtype=np.int64)
        for _, (loc, act) in parts:
            _count_loc(loc, act, seq0, self.seq_len, counts)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        cursor = indptr[:-1].copy()
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        values = np.empty(int(indptr[-1]), dtype=np.float32)
        for start, (loc, act) in parts:
            _place_loc(loc, act, seq0, self.seq_len, start, cursor, indices, values)
        return indptr, indices, values


@njit(cache=True, nogil=True)
def _count_loc(loc, act, seq0, seq_len, counts):
    """Entries with a positive activation per token row (``loc`` rows: sequence, position, latent
    offset)."""
    for e in range(act.shape[0]):
        if act[e] > 0:
            counts[(np.int64(loc[e, 0]) - seq0) * seq_len + np.int64(loc[e, 1])] += 1


@njit(cache=True, nogil=True)
def _place_loc(loc, act, seq0, seq_len, start, cursor, indices, values):
    """Append each positive entry to its token row at ``cursor`` (advanced), latent = offset + start."""
    for e in range(act.shape[0]):
        a = act[e]
        if a > 0:
            r = (np.int64(loc[e, 0]) - seq0) * seq_len + np.int64(loc[e, 1])
            d = cursor[r]
            indices[d] = np.int32(loc[e, 2]) + np.int32(start)
            values[d] = a
            cursor[r] = d + 1


@njit(cache=True, nogil=True)
def _scan_entries(loc, act, n_seq, seq_len, width, first):
    """First entry (or −1) with its sequence, position or latent offset out of range, a non-finite
    and a negative activation, in ``first[0:5]``; returns whether the keys (token row, latent)
    strictly increase."""
    his = (n_seq, seq_len, width)
    prev = np.int64(-1)
    ordered = True
    for e in range(act.shape[0]):
        for c in range(3):
            x = np.int64(loc[e, c])
            if (x < 0 or x >= his[c]) and first[c] < 0:
                first[c] = e
        a = act[e]
        if not np.isfinite(a):
            if first[3] < 0:
                first[3] = e
        elif a < 0 and first[4] < 0:
            first[4] = e
        key = (np.int64(loc[e, 0]) * seq_len + np.int64(loc[e, 1])) * width + np.int64(loc[e, 2])
        ordered &= key > prev
        prev = key
    return ordered


@njit(cache=True, nogil=True)
def _seq_offsets(loc, n_seq):
    """Where each sequence's entries start in a shard sorted by token row (``n_seq + 1`` offsets)."""
    out = np.zeros(n_seq + 1, dtype=np.int64)
    for e in range(loc.shape[0]):
        out[np.int64(loc[e, 0]) + 1] += 1
    for q in range(n_seq):
        out[q + 1] += out[q]
    return out
