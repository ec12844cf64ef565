"""Activation sources: ``open_activations`` → ``ActivationSource`` (lazy, row-ranged, picklable).

Formats, confirmed in each writer's source before coding:

- **safetensors banks**: one 2-D ``[tokens, d_in]`` tensor per file (F32, F16 or BF16; F16/BF16 are
  widened exactly to float32), read by byte range (8-byte little-endian header length, JSON
  header, raw C-ordered tensors; see ``_safetensors``), local or fsspec URL.
- **.npy banks**: ``np.load(mmap_mode="r")`` of a 2-D float array (local files).
- **SAELens activation caches** (jbloomAus/SAELens @ 91ca16cc ``sae_lens/cache_activations_runner.py``
  — ``Features({hook_name: Array2D(shape=(context_size, d_in), dtype), "token_ids":
  Sequence(Value("int32"), length=context_size)})``, ``Dataset.from_dict(...).save_to_disk``,
  ``_consolidate_shards`` writing ``data-XXXXX-of-YYYYY.arrow`` + ``state.json`` (``_data_files``) +
  ``dataset_info.json``; huggingface/datasets ``ArrowWriter._WRITER_CLASS = pa.RecordBatchStreamWriter``
  and ``_ArrayXDExtensionType._generate_dtype`` storing an Array2D as ``list<list<value>>``): one row
  per sequence, flattened here to ``context_size`` token rows each. Read with pyarrow, batch by batch.
- **seed-engine shards** (SauersML/gam ``crates/gam-sae/src/corpus/shard_reader.rs``, format
  ``v1``): a 32-byte header — magic ``b"GAMSAE01"``, ``n_rows`` u64, ``p`` u64, ``dtype`` u32
  (0 = f32, the only encoding), reserved u32 — then ``n_rows × p`` little-endian float32, row-major;
  many shards are concatenated in the order given (sorted file names).
- **seed-engine bf16 harvests** (SauersML/gam ``examples/residual_shard_io.py``, ``FORMAT_VERSION
  = 1``, read as stored in the code index, commit id not recorded there; its
  ``tests/test_residual_shard_io.py`` @ 6350c1df checks the same layout): a directory with
  ``manifest.json`` — ``"format": "residual_shard_bf16"``, ``"format_version": 1``, ``"dtype":
  "bfloat16"``, ``"byte_order": "little"``, ``d_model``, ``rows_per_shard``, ``total_tokens`` and
  ``shards``, a list of ``{"file", "rows", "bytes"}`` in row order (plus ``stats`` and the
  harvester's provenance fields, kept as ``ActivationSource.metadata``) — and headerless shard
  files ``shard_00000.bf16``, … holding ``rows × d_model`` little-endian uint16 bf16 bit patterns,
  row-major, widened exactly (``bits << 16``). Cross-checked on 2026-12-03 against a second
  reader in the same repository's code index, a ``load_shard_harvest`` baseline that accepts "the
  exact on-disk format written by gam's ``ShardWriter``": it reads ``d_model``, each shard's
  ``file`` and ``rows`` and widens ``<u2`` bits by ``<< 16`` the same way. The manifest's row
  counts are trusted (a ``"provisional"`` manifest's last shard may still be growing), so a file
  must hold at least ``rows · d_model · 2`` bytes.
- any ``N × d_in`` numpy, dask or Zarr array.

Many files are concatenated in sorted name order. Everything is validated when opened (2-D
tensors, a known key — the keys found are listed —, the same ``d_in`` in every file); non-finite
activations are found at ``read`` and named with their file and row range. A source holds paths,
offsets and row counts, never open handles, so it pickles to Dask workers.
"""

from __future__ import annotations

import glob as _glob
import os
import struct

import numpy as np

from ..errors import GateDataError, InvalidArgumentError, InvalidDtypeError, ShapeMismatchError
from . import _safetensors as st

__all__ = ["ActivationSource", "open_activations"]

_GAM_MAGIC = b"GAMSAE01"
_BF16_FORMAT = "residual_shard_bf16"
_BF16_MANIFEST = "manifest.json"
_GAM_HEADER = 32
_CHUNK_BYTES = 64 << 20


class _Part:
    """One file (or array) of a source: ``n_rows`` rows starting at global row ``base``."""

    __slots__ = ("kind", "path", "n_rows", "meta")

    def __init__(self, kind, path, n_rows, meta):
        self.kind, self.path, self.n_rows, self.meta = kind, path, n_rows, meta

    def __getstate__(self):
        return (self.kind, self.path, self.n_rows, self.meta)

    def __setstate__(self, s):
        self.kind, self.path, self.n_rows, self.meta = s


class ActivationSource:
    """Rows of activations, ``n_rows × d_in``, read lazily by row range as float32.

    Attributes
    ----------
    n_rows : int
    d_in : int
    dtype : str      storage dtype of the first file ("float32", "float16", "bfloat16", ...)
    paths : list of str   the files, in row order (empty for an in-memory array)
    metadata : dict  what the format records beside the rows (a bf16 harvest's manifest fields
                     other than its shard list), else empty
    """

    def __init__(self, parts, d_in, dtype, storage_options=None, metadata=None):
        self._parts = parts
        self.metadata = dict(metadata or {})
        self.d_in = int(d_in)
        self.dtype = dtype
        self.storage_options = storage_options
        self._bases = np.cumsum([0] + [p.n_rows for p in parts]).tolist()
        self.n_rows = int(self._bases[-1])

    @property
    def paths(self):
        return [p.path for p in self._parts if p.path is not None]

    def __repr__(self):
        return (f"ActivationSource(n_rows={self.n_rows}, d_in={self.d_in}, dtype={self.dtype!r}, "
                f"files={len(self.paths)})")

    @property
    def seq_len(self) -> int | None:
        """Tokens per sequence when the files say (a SAELens Arrow cache's ``context_size``), else None."""
        ctxs = {p.meta.get("ctx") for p in self._parts if isinstance(p.meta, dict) and p.meta.get("ctx")}
        return int(ctxs.pop()) if len(ctxs) == 1 else None

    def row_chunk_hint(self) -> int:
        """Rows per chunk so a float32 chunk is about 64 MiB (a multiple of the context size of
        an Arrow cache, and never more than ``n_rows``)."""
        rows = max(1, _CHUNK_BYTES // (4 * self.d_in))
        ctx = max([p.meta.get("ctx", 1) for p in self._parts if isinstance(p.meta, dict)] or [1])
        rows = max(ctx, rows // ctx * ctx)
        return max(1, min(rows, self.n_rows))

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0 .. r1`` as a C-contiguous float32 array of shape (r1 − r0, d_in).

        Raises
        ------
        GateDataError
            A non-finite activation, named with its file and row range.
        """
        if not 0 <= r0 <= r1 <= self.n_rows:
            raise InvalidArgumentError(f"rows {r0}..{r1} are outside 0..{self.n_rows}")
        out = np.empty((r1 - r0, self.d_in), dtype=np.float32)
        for i, p in enumerate(self._parts):
            b0, b1 = self._bases[i], self._bases[i + 1]
            lo, hi = max(r0, b0), min(r1, b1)
            if lo >= hi:
                continue
            block = self._read_part(p, lo - b0, hi - b0)
            if not np.isfinite(block).all():
                bad = int(np.argwhere(~np.isfinite(block))[0][0])
                where = p.path if p.path is not None else "the array"
                raise GateDataError(
                    f"{where}: activation row {lo - b0 + bad} (global row {lo + bad}, in rows "
                    f"{lo - b0}..{hi - b0} of the file) is not finite; clean or drop those tokens"
                )
            out[lo - r0:hi - r0] = block
        return out

    def _read_part(self, p: _Part, a: int, b: int) -> np.ndarray:
        so = self.storage_options
        if p.kind == "safetensors":
            info = p.meta["info"]
            return st.widen_to_float32(st.read_rows(info, a, b, so), info.dtype)
        if p.kind == "gam":
            rb = 4 * self.d_in
            buf = st.read_range(p.path, _GAM_HEADER + a * rb, _GAM_HEADER + b * rb, so)
            return np.frombuffer(buf, dtype="<f4").reshape(b - a, self.d_in).astype(np.float32)
        if p.kind == "bf16":
            rb = 2 * self.d_in
            buf = st.read_range(p.path, a * rb, b * rb, so)
            return st.widen_to_float32(np.frombuffer(buf, dtype="<u2").reshape(b - a, self.d_in), "BF16")
        if p.kind == "npy":
            arr = np.load(p.path, mmap_mode="r")
            return _widen_np(np.asarray(arr[a:b]))
        if p.kind == "arrow":
            return _read_arrow(p, a, b, self.d_in)
        if p.kind == "array":
            return _widen_np(np.asarray(p.meta["array"][a:b]))
        raise AssertionError(p.kind)  # pragma: no cover


def _widen_np(a: np.ndarray) -> np.ndarray:
    if a.dtype.name == "bfloat16":  # ml_dtypes: widen by bits, exactly
        return st.widen_to_float32(a.view(np.uint16), "BF16")
    if a.dtype.kind != "f":
        raise InvalidDtypeError(f"activations have dtype {a.dtype}; expected floats")
    return np.ascontiguousarray(a, dtype=np.float32)  # float16 exact; float64 rounds


# ------------------------------------------------------------------ per-format openers
def _open_safetensors(path, key, so) -> tuple[_Part, int, str]:
    tensors, _ = st.read_header(path, so)
    if key is None:
        two_d = [n for n, t in tensors.items() if len(t.shape) == 2]
        if len(two_d) != 1:
            raise InvalidArgumentError(
                f"{path}: holds tensors {sorted(tensors)}; "
                + ("none is 2-D" if not two_d else f"several are 2-D {sorted(two_d)}")
                + "; pass key=... to pick the [tokens, d_in] tensor"
            )
        key = two_d[0]
    if key not in tensors:
        raise InvalidArgumentError(f"{path}: no tensor {key!r}; the file holds {sorted(tensors)}")
    info = tensors[key]
    if len(info.shape) != 2:
        raise ShapeMismatchError(
            f"{path}: tensor {key!r} has shape {list(info.shape)}; expected 2-D [tokens, d_in]"
        )
    if info.dtype not in ("F32", "F16", "BF16"):
        raise InvalidDtypeError(
            f"{path}: tensor {key!r} has dtype {info.dtype}; expected F32, F16 or BF16"
        )
    name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[info.dtype]
    return _Part("safetensors", str(path), info.shape[0], {"info": info}), info.shape[1], name


def _open_gam(path, so) -> tuple[_Part, int, str]:
    head = st.read_range(path, 0, _GAM_HEADER, so) if st.file_size(path, so) >= _GAM_HEADER else b""
    if len(head) < _GAM_HEADER or head[:8] != _GAM_MAGIC:
        raise InvalidArgumentError(f"{path}: not a GAMSAE01 shard (wrong magic header)")
    n_rows, p, dtype, _ = struct.unpack("<QQII", head[8:])
    if dtype != 0:
        raise InvalidDtypeError(f"{path}: GAMSAE01 dtype tag {dtype}; only f32 (0) is defined")
    need = _GAM_HEADER + n_rows * p * 4
    size = st.file_size(path, so)
    if size < need:
        raise InvalidArgumentError(
            f"{path}: shard is truncated: header expects {need} bytes, file has {size}"
        )
    return _Part("gam", str(path), int(n_rows), {}), int(p), "float32"


def _bf16_manifest(folder, so) -> dict | None:
    """The manifest of a seed-engine bf16 harvest in ``folder`` (a ``manifest.json`` naming its
    format), or None when ``folder`` is not one."""
    man = st.join(folder, _BF16_MANIFEST)
    if not st.exists(man, so):
        return None
    data = st.read_json(man, so)
    return data if isinstance(data, dict) and data.get("format") == _BF16_FORMAT else None


def _open_bf16_harvest(folder, m: dict, so) -> tuple[list[_Part], int, dict]:
    man = st.join(folder, _BF16_MANIFEST)
    if m.get("format_version") != 1:
        raise InvalidArgumentError(
            f"{man}: format_version {m.get('format_version')!r} of {_BF16_FORMAT}; only version 1 is known"
        )
    if m.get("dtype", "bfloat16") != "bfloat16" or m.get("byte_order", "little") != "little":
        raise InvalidDtypeError(
            f"{man}: dtype {m.get('dtype')!r}, byte_order {m.get('byte_order')!r}; expected "
            "'bfloat16', 'little'"
        )
    d = m.get("d_model")
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise InvalidArgumentError(f"{man}: d_model must be a positive integer, got {d!r}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise InvalidArgumentError(f"{man}: 'shards' must be a list of {{file, rows}}, got {type(shards).__name__}")
    parts = []
    for i, s in enumerate(shards):
        rows = s.get("rows") if isinstance(s, dict) else None
        name = s.get("file") if isinstance(s, dict) else None
        if not isinstance(name, str) or not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise InvalidArgumentError(
                f"{man}: shards[{i}] must be {{'file': name, 'rows': n >= 0}}, got {s!r}"
            )
        path = st.join(folder, name)
        if not st.exists(path, so):
            raise InvalidArgumentError(f"{path}: shard listed in {man} is missing")
        need, size = rows * d * 2, st.file_size(path, so)
        if size < need:
            raise InvalidArgumentError(
                f"{path}: shard is truncated: the manifest gives {rows} rows of d_model {d} "
                f"({need} bytes), the file has {size}"
            )
        if rows:
            parts.append(_Part("bf16", path, rows, {}))
    total = sum(p.n_rows for p in parts)
    if "total_tokens" in m and m["total_tokens"] != total:
        raise InvalidArgumentError(
            f"{man}: total_tokens = {m['total_tokens']!r}, but its shards hold {total} rows"
        )
    if not parts:
        raise InvalidArgumentError(f"{man}: the harvest holds no rows")
    meta = {k: v for k, v in m.items() if k != "shards"}
    return parts, d, meta


def _open_npy(path) -> tuple[_Part, int, str]:
    if st.is_url(path):
        raise InvalidArgumentError(f"{path}: .npy banks are read from local paths only")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2:
        raise ShapeMismatchError(f"{path}: array has shape {arr.shape}; expected 2-D [tokens, d_in]")
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise InvalidDtypeError(f"{path}: array has dtype {arr.dtype}; expected floats")
    return _Part("npy", str(path), arr.shape[0], {}), arr.shape[1], arr.dtype.name


def _arrow_files(folder) -> list[str]:
    state = os.path.join(folder, "state.json")
    if os.path.exists(state):
        data = st.read_json(state)
        return [os.path.join(folder, f["filename"]) for f in data.get("_data_files", [])]
    return sorted(_glob.glob(os.path.join(folder, "*.arrow")))


def _open_arrow_dir(folder, key) -> tuple[list[_Part], int, str]:
    import pyarrow as pa

    files = _arrow_files(folder)
    if not files:
        raise InvalidArgumentError(f"{folder}: no .arrow files (state.json lists none)")
    parts, d_in, dtype = [], None, None
    for f in files:
        with pa.memory_map(f, "r") as src:
            reader = pa.ipc.open_stream(src)
            schema = reader.schema
            names = [n for n in schema.names if n != "token_ids"]
            col = key
            if col is None:
                if len(names) != 1:
                    raise InvalidArgumentError(
                        f"{f}: columns {schema.names}; pass key=<hook name> to pick the activations"
                    )
                col = names[0]
            if col not in schema.names:
                raise InvalidArgumentError(f"{f}: no column {col!r}; the columns are {schema.names}")
            counts, ctx, width, vt = [], None, None, None
            for batch in reader:
                counts.append(batch.num_rows)
                if ctx is None and batch.num_rows:
                    arr = batch.column(col)
                    first = arr[0].values if hasattr(arr[0], "values") else None
                    if first is None or not pa.types.is_list(arr.type) or \
                            not pa.types.is_list(arr.type.value_type):
                        raise ShapeMismatchError(
                            f"{f}: column {col!r} has type {arr.type}; expected an Array2D "
                            "(context_size, d_in) per row"
                        )
                    ctx = len(arr[0])
                    width = len(arr[0][0])
                    vt = arr.type.value_type.value_type
        if ctx is None:
            continue
        if d_in is not None and width != d_in:
            raise ShapeMismatchError(f"{f}: d_in = {width}, but earlier files have d_in = {d_in}")
        d_in, dtype = width, str(vt)
        parts.append(_Part("arrow", f, int(sum(counts)) * ctx,
                           {"ctx": ctx, "col": col, "batches": counts}))
    if not parts:
        raise InvalidArgumentError(f"{folder}: the Arrow files hold no rows")
    return parts, d_in, dtype


def _read_arrow(p: _Part, a: int, b: int, d_in: int) -> np.ndarray:
    import pyarrow as pa

    ctx, col, counts = p.meta["ctx"], p.meta["col"], p.meta["batches"]
    s0, s1 = a // ctx, -(-b // ctx)  # sequences covering token rows a..b
    out, seen = [], 0
    with pa.memory_map(p.path, "r") as src:
        reader = pa.ipc.open_stream(src)
        for n in counts:
            batch = reader.read_next_batch()
            lo, hi = max(s0, seen), min(s1, seen + n)
            if lo < hi:
                arr = batch.column(col).slice(lo - seen, hi - lo)
                flat = arr.flatten().flatten().to_numpy(zero_copy_only=False)
                if flat.size != (hi - lo) * ctx * d_in:
                    raise ShapeMismatchError(
                        f"{p.path}: sequences {lo}..{hi} do not all hold ({ctx}, {d_in}) activations"
                    )
                out.append(flat.reshape(-1, d_in))
            seen += n
            if seen >= s1:
                break
    rows = np.concatenate(out) if len(out) > 1 else out[0]
    return _widen_np(rows[a - s0 * ctx: b - s0 * ctx])


# ------------------------------------------------------------------ entry point
def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand(path, so) -> list[str]:
    if st.is_url(path):
        from fsspec.core import url_to_fs

        fs, p = url_to_fs(path, **(so or {}))
        proto = path.split("://", 1)[0]
        if _is_glob(p):
            found = sorted(fs.glob(p))
        elif fs.isdir(p):
            found = sorted(f for f in fs.ls(p, detail=False))
        else:
            found = [p]
        return [f if "://" in f else f"{proto}://{f.lstrip('/')}" for f in found]
    path = str(path).removeprefix("file://")
    if _is_glob(path):
        return sorted(_glob.glob(path))
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path))
    return [path]


def open_activations(path_or_glob, *, key=None, storage_options=None) -> ActivationSource:
    """Open activations for encoding: files, a directory, a glob, or an array.

    Parameters
    ----------
    path_or_glob : str, path-like, or array of shape (n_rows, d_in)
        A ``.safetensors``, ``.npy`` or ``.shard`` (GAMSAE01) file; a directory or glob of them
        (concatenated in sorted order); a SAELens Arrow cache directory (``state.json`` +
        ``*.arrow``); a seed-engine bf16 harvest directory (``manifest.json`` + ``*.bf16``, in
        the manifest's order); or a numpy, dask or Zarr array.
    key : str, optional
        The tensor (safetensors) or column (Arrow: the hook name) holding the activations, when a
        file holds several.

    Raises
    ------
    InvalidArgumentError
        No such file, unknown format, an unknown key (the keys found are listed).
    ShapeMismatchError
        A tensor that is not 2-D, or files with different ``d_in`` (the file is named).

    Examples
    --------
    >>> import numpy as np
    >>> src = open_activations(np.ones((10, 4), np.float32))
    >>> src.n_rows, src.d_in, src.read(2, 5).shape
    (10, 4, (3, 4))
    """
    so = storage_options
    if not isinstance(path_or_glob, (str, os.PathLike)):
        arr = path_or_glob
        shape = getattr(arr, "shape", None)
        if shape is None:
            arr = np.asarray(arr)
            shape = arr.shape
        if len(shape) != 2:
            raise ShapeMismatchError(f"activations must be 2-D (n_rows, d_in), got shape {tuple(shape)}")
        dt = np.dtype(getattr(arr, "dtype", np.float32))
        if dt.kind != "f" and dt.name != "bfloat16":
            raise InvalidDtypeError(f"activations have dtype {dt}; expected floats")
        return ActivationSource([_Part("array", None, int(shape[0]), {"array": arr})],
                                shape[1], dt.name, so)
    path = os.fspath(path_or_glob)
    manifest = _bf16_manifest(path, so) if not _is_glob(path) and st.isdir(path, so) else None
    if manifest is not None:
        parts, d_in, meta = _open_bf16_harvest(path, manifest, so)
        return ActivationSource(parts, d_in, "bfloat16", so, metadata=meta)
    if not st.is_url(path) and os.path.isdir(path.removeprefix("file://")):
        folder = path.removeprefix("file://")
        if os.path.exists(os.path.join(folder, "state.json")) or \
                _glob.glob(os.path.join(folder, "*.arrow")):
            parts, d_in, dtype = _open_arrow_dir(folder, key)
            return ActivationSource(parts, d_in, dtype, so)
    found = _expand(path, so)
    missing = [f for f in found if not st.is_url(f) and not os.path.exists(f.removeprefix("file://"))]
    if missing:
        raise InvalidArgumentError(f"{missing[0]}: no such activation file or directory")
    files = [f for f in found if f.endswith((".safetensors", ".npy", ".shard"))]
    if not files:
        raise InvalidArgumentError(
            f"{path}: no activation files (.safetensors, .npy, .shard) found; a SAELens cache "
            "directory needs its state.json or .arrow files"
        )
    parts, d_in, dtype = [], None, None
    for f in files:
        if f.endswith(".safetensors"):
            part, w, dt = _open_safetensors(f, key, so)
        elif f.endswith(".shard"):
            part, w, dt = _open_gam(f, so)
        else:
            part, w, dt = _open_npy(f)
        if d_in is not None and w != d_in:
            raise ShapeMismatchError(
                f"{f}: activations have d_in = {w}, but {files[0]} has d_in = {d_in}; a bank's "
                "files must come from one hook"
            )
        d_in = w
        dtype = dtype or dt
        parts.append(part)
    return ActivationSource(parts, d_in, dtype, so)
