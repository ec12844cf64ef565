"""Domain exceptions of distpen.

Every exception subclasses a built-in (``ValueError``, ``TypeError`` or ``RuntimeError``) so
generic handlers keep working, while callers can tell "bad gates" apart from "store conflict".
"""

from __future__ import annotations

__all__ = [
    "DistpenError",
    "InvalidArgumentError",
    "InvalidDtypeError",
    "ShapeMismatchError",
    "PairTableError",
    "ScheduleError",
    "GateDataError",
    "StoreError",
    "StoreConflictError",
    "StoreCorruptError",
    "WorkerLostError",
]


class DistpenError(Exception):
    """Base class of every error raised by distpen."""


class InvalidArgumentError(DistpenError, ValueError):
    """An argument has an invalid value (range, finiteness, emptiness, ...)."""


class ShapeMismatchError(InvalidArgumentError):
    """An array argument has a shape or length that does not fit the others."""


class InvalidDtypeError(DistpenError, TypeError):
    """An array argument has a dtype that cannot be converted exactly."""


class PairTableError(InvalidArgumentError):
    """A pair list is malformed (out of range, ``j >= k``, duplicated, bad weight)."""


class ScheduleError(InvalidArgumentError):
    """A weight schedule or iteration counter is invalid."""


class GateDataError(DistpenError, ValueError):
    """Gate data found invalid during a computation (NaN, inf, negative, repeated index)."""


class StoreError(DistpenError, RuntimeError):
    """Base class of run-store problems."""


class StoreConflictError(StoreError):
    """A store already holds a different job (pass ``overwrite=True`` to replace it)."""


class StoreCorruptError(StoreError):
    """A store is damaged: its manifest disagrees with what is on disk."""


class WorkerLostError(DistpenError, RuntimeError):
    """A worker holding state that exists nowhere else (a resident solve's vectors) left the
    cluster; the call can be re-run."""
