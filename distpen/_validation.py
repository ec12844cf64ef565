"""Small ``check_*`` helpers that validate an argument and return it normalised.

Messages follow one pattern: what is wrong, the value received, what was expected, the fix.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import InvalidArgumentError, InvalidDtypeError, ShapeMismatchError

_EXACT_INT_LIMIT = 2**53


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return repr(x)


def check_float64_array(x, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float64 array when the conversion is exact.

    float16/float32, bool and integers up to 2**53 in magnitude convert exactly; complex, object,
    string and datetime input is refused with an :class:`InvalidDtypeError`.
    """
    arr = np.asarray(x) if not isinstance(x, np.ndarray) else x
    kind = arr.dtype.kind
    if kind == "f":
        if arr.dtype.itemsize > 8:
            raise InvalidDtypeError(
                f"{name} has dtype {arr.dtype}, which float64 cannot hold exactly; "
                "expected float64 (or float32/int); cast it explicitly if precision loss is acceptable"
            )
    elif kind in "iub":
        if kind in "iu" and arr.size and arr.dtype.itemsize >= 8:
            hi, lo = int(arr.max()), int(arr.min())  # exact integer comparison, no float rounding
            if hi > _EXACT_INT_LIMIT or lo < -_EXACT_INT_LIMIT:
                big = hi if abs(hi) >= abs(lo) else lo
                raise InvalidDtypeError(
                    f"{name} holds the integer {big}, beyond 2**53 in magnitude, which float64 cannot "
                    "represent exactly; expected floats or integers within ±2**53"
                )
    else:
        raise InvalidDtypeError(
            f"{name} has dtype {arr.dtype}; expected a real float64 array (float32 and integer "
            "arrays are converted exactly, complex/object/string arrays are refused)"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ShapeMismatchError(f"{name} must be {ndim}-D, got {_describe(arr)}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _first_nonfinite(arr: np.ndarray) -> int:
    from ._fastcheck import first_nonfinite

    return first_nonfinite(arr)


def check_vector(x, name: str, *, length: int | None = None, finite: bool = True,
                 what: str | None = None) -> np.ndarray:
    """Validate a 1-D float64 vector of an optional exact ``length``."""
    arr = check_float64_array(x, name, ndim=1)
    if length is not None and arr.shape[0] != length:
        hint = f" ({what})" if what else ""
        raise ShapeMismatchError(
            f"{name} has length {arr.shape[0]}, expected {length}{hint}"
        )
    bad = _first_nonfinite(arr) if finite and arr.size else -1
    if bad >= 0:
        raise InvalidArgumentError(
            f"{name} must be finite, but {name}[{bad}] = {float(arr[bad])}"
        )
    return arr


def check_int_array(x, name: str, *, ndim: int = 1) -> np.ndarray:
    """Return ``x`` as an int64 array; floats are accepted only when they hold whole numbers."""
    arr = np.asarray(x)
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InvalidDtypeError(f"{name} holds values beyond int64: max {arr.max()}")
        out = arr.astype(np.int64, copy=False)
    elif arr.dtype.kind == "f" and arr.size == 0:
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InvalidDtypeError(
                f"{name} must hold integers, got {_describe(arr)} with non-integral values"
            )
        out = arr.astype(np.int64)
    else:
        raise InvalidDtypeError(f"{name} must be an integer array, got {_describe(arr)}")
    if out.ndim != ndim:
        raise ShapeMismatchError(f"{name} must be {ndim}-D, got {_describe(arr)}")
    return np.ascontiguousarray(out)


def check_positive_int(x, name: str, *, allow_zero: bool = False) -> int:
    """Validate a (non-negative or) positive Python/numpy integer and return it as ``int``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        else:
            raise InvalidArgumentError(f"{name} must be an integer, got {x!r}")
    x = int(x)
    if x < 0 or (x == 0 and not allow_zero):
        expect = "≥ 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{name} must be {expect}, got {x}")
    return x


def check_finite_scalar(x, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Validate a real, finite scalar (optionally > 0 or ≥ 0) and return it as ``float``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":
            x = x.item()
        else:
            raise InvalidArgumentError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise InvalidArgumentError(f"{name} must be finite, got {x!r}")
    if positive and not x > 0:
        raise InvalidArgumentError(f"{name} must be > 0, got {x!r}")
    if nonnegative and not x >= 0:
        raise InvalidArgumentError(f"{name} must be ≥ 0, got {x!r}")
    return x
