"""Byte-range reading of safetensors files, local or through fsspec, without the safetensors package.

The layout, confirmed in huggingface/safetensors (the format every tool here writes with
``safetensors.numpy.save_file`` / ``save_model``): an 8-byte little-endian unsigned header length
``N``, then ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype": "F16"|"BF16"|"F32"|..., "shape": [...], "data_offsets": [begin, end]}`` (offsets relative
to the first byte after the header) plus an optional ``"__metadata__"`` dict of strings, then the raw
little-endian, C-ordered tensor bytes.

Reading a tensor (or a slice of the rows of one) therefore costs one small header read and one
contiguous byte range: nothing is decoded that the caller did not ask for. Objects here hold paths
and offsets only, never open file handles, so they pickle to Dask workers.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError, InvalidDtypeError, ShapeMismatchError

__all__ = [
    "TensorInfo",
    "is_url",
    "read_range",
    "read_header",
    "read_tensor",
    "read_rows",
    "widen_to_float32",
    "list_files",
    "read_json",
    "exists",
]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB

# safetensors dtype tag -> (numpy storage dtype, itemsize). BF16 is stored as uint16 bits and widened
# exactly by a 16-bit shift (bfloat16 is the top half of a float32).
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def is_url(path) -> bool:
    """True for an fsspec URL other than ``file://``."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _local(path) -> str:
    p = os.fspath(path)
    return p.removeprefix("file://") if isinstance(p, str) else p


def _fs(url: str, storage_options=None):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot open {url!r} with fsspec ({exc}); install the filesystem's package "
            "(s3fs for s3://, gcsfs for gs://)"
        ) from None


def read_range(path, start: int, end: int, storage_options=None) -> bytes:
    """Bytes ``[start, end)`` of a local file or fsspec URL."""
    if end <= start:
        return b""
    if is_url(path):
        fs, p = _fs(path, storage_options)
        data = fs.cat_file(p, start=start, end=end)
    else:
        with open(_local(path), "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
    if len(data) != end - start:
        raise InvalidArgumentError(
            f"{path}: file is truncated: wanted bytes {start}..{end}, got {len(data)} bytes; "
            "the file was cut short (re-copy it)"
        )
    return data


def file_size(path, storage_options=None) -> int:
    if is_url(path):
        fs, p = _fs(path, storage_options)
        return int(fs.size(p))
    return os.path.getsize(_local(path))


def exists(path, storage_options=None) -> bool:
    if is_url(path):
        fs, p = _fs(path, storage_options)
        return fs.exists(p)
    return os.path.exists(_local(path))


def isdir(path, storage_options=None) -> bool:
    if is_url(path):
        fs, p = _fs(path, storage_options)
        return fs.isdir(p)
    return os.path.isdir(_local(path))


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(_local(root), name)


def list_files(root, storage_options=None) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of the entries of a directory (local or URL), sorted by name."""
    if is_url(root):
        fs, p = _fs(root, storage_options)
        out = []
        for info in fs.ls(p, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            out.append((name, info.get("type") == "directory"))
        return sorted(out)
    r = _local(root)
    return sorted((n, os.path.isdir(os.path.join(r, n))) for n in os.listdir(r))


def read_json(path, storage_options=None):
    size = file_size(path, storage_options)
    try:
        return json.loads(read_range(path, 0, size, storage_options).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return _DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        n = self.np_dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n


def read_header(path, storage_options=None) -> tuple[dict[str, TensorInfo], dict]:
    """Parse the header of a safetensors file: ``({name: TensorInfo}, metadata)``.

    Raises
    ------
    InvalidArgumentError
        The file is not a safetensors file (bad length, bad JSON, offsets outside the file).
    """
    path = os.fspath(path) if not is_url(path) else path
    head = read_range(path, 0, 8, storage_options)
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > _MAX_HEADER:
        raise InvalidArgumentError(
            f"{path}: not a safetensors file (header length {n}; expected 1..{_MAX_HEADER} bytes)"
        )
    raw = read_range(path, 8, 8 + n, storage_options)
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(hdr, dict):
        raise InvalidArgumentError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = hdr.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, ent in hdr.items():
        try:
            dtype = ent["dtype"]
            shape = tuple(int(s) for s in ent["shape"])
            b, e = (int(v) for v in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgumentError(
                f"{path}: tensor {name!r} has a malformed header entry {ent!r}"
            ) from None
        if dtype not in _DTYPES:
            raise InvalidDtypeError(
                f"{path}: tensor {name!r} has dtype {dtype}, which distpen does not read; "
                f"expected one of {sorted(_DTYPES)}"
            )
        count = 1
        for s in shape:
            count *= s
        if e - b != count * _DTYPES[dtype].itemsize or b < 0:
            raise InvalidArgumentError(
                f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} spans bytes {b}..{e}, "
                f"which is not {count * _DTYPES[dtype].itemsize} bytes; the file is damaged"
            )
        out[name] = TensorInfo(str(path), name, dtype, shape, base + b, base + e)
    return out, meta


def _decode(buf: bytes, info: TensorInfo, shape) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=info.np_dtype).reshape(shape)
    return arr


def widen_to_float32(arr: np.ndarray, dtype_tag: str) -> np.ndarray:
    """Widen a float tensor's storage to float32 exactly (F16 by cast, BF16 by a 16-bit shift)."""
    if dtype_tag == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype_tag == "F16":
        return arr.astype(np.float32)
    if dtype_tag == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    raise InvalidDtypeError(
        f"cannot widen dtype {dtype_tag} to float32 exactly; expected F32, F16 or BF16"
    )


def read_tensor(info: TensorInfo, storage_options=None) -> np.ndarray:
    """The whole tensor, in its storage dtype (BF16 as uint16 bits)."""
    buf = read_range(info.path, info.begin, info.end, storage_options)
    return _decode(buf, info, info.shape)


def read_rows(info: TensorInfo, r0: int, r1: int, storage_options=None) -> np.ndarray:
    """Rows ``r0:r1`` of a tensor of ≥ 1 dimension, reading only their bytes."""
    if not info.shape:
        raise ShapeMismatchError(f"{info.path}: tensor {info.name!r} is a scalar, not rows")
    if not 0 <= r0 <= r1 <= info.shape[0]:
        raise InvalidArgumentError(
            f"{info.path}: rows {r0}..{r1} are outside tensor {info.name!r} of {info.shape[0]} rows"
        )
    rb = info.row_bytes
    buf = read_range(info.path, info.begin + r0 * rb, info.begin + r1 * rb, storage_options)
    return _decode(buf, info, (r1 - r0,) + info.shape[1:])
