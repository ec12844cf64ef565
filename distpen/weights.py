"""Learnable weights and scalar weight schedules (docs/design.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._validation import check_finite_scalar, check_positive_int
from .errors import InvalidArgumentError, ScheduleError

__all__ = [
    "resolve_learnable_weight",
    "Geometric",
    "Linear",
    "ReciprocalIter",
    "ScalarWeightSchedule",
    "MAX_ITERATION",
    "check_iteration",
]

#: Iteration counters at or above this value are treated as corrupted.
MAX_ITERATION = 1_000_000
_LOG_CLAMP = 700.0


def resolve_learnable_weight(base: float, rho: float) -> float:
    """Return the effective weight ``sign(base)·exp(clamp(ln|base| + rho, -700, 700))``.

    ``0`` stays ``0``. The clamp keeps the result finite and non-zero for any finite ``rho``.

    Raises
    ------
    InvalidArgumentError
        If ``base`` or ``rho`` is not finite.

    Examples
    --------
    >>> resolve_learnable_weight(2.0, 0.0)
    2.0
    >>> resolve_learnable_weight(1.0, 1000.0) == math.exp(700.0)
    True
    """
    base = check_finite_scalar(base, "base")
    rho = check_finite_scalar(rho, "rho")
    if base == 0.0:
        return 0.0
    log_w = math.log(abs(base)) + rho
    if -_LOG_CLAMP < log_w < _LOG_CLAMP and abs(rho) <= _LOG_CLAMP:
        return base * math.exp(rho)  # exact at rho = 0; finite and non-zero inside the clamp
    return math.copysign(math.exp(min(max(log_w, -_LOG_CLAMP), _LOG_CLAMP)), base)


def check_iteration(it, name: str = "it") -> int:
    """Validate an iteration counter: an integer in ``[0, MAX_ITERATION)``."""
    if isinstance(it, bool) or not hasattr(it, "__index__"):
        raise ScheduleError(f"{name} must be a non-negative integer, got {it!r}")
    it = int(it)
    if it < 0:
        raise ScheduleError(f"{name} must be ≥ 0, got {it}")
    if it >= MAX_ITERATION:
        raise ScheduleError(
            f"{name} = {it} is implausible (≥ {MAX_ITERATION:,}); the iteration counter looks "
            "corrupted: pass the solver's real iteration number"
        )
    return it


@dataclass(frozen=True)
class Geometric:
    """Geometric approach to ``w_end``: ``w_end − Δ·rate**it`` with ``0 < rate < 1``."""

    rate: float

    def __post_init__(self):
        try:
            rate = check_finite_scalar(self.rate, "Geometric.rate")
        except InvalidArgumentError as exc:
            raise ScheduleError(str(exc)) from None
        if not 0.0 < rate < 1.0:
            raise ScheduleError(f"Geometric.rate must be in (0, 1), got {rate!r}")
        object.__setattr__(self, "rate", rate)

    def raw_weight(self, w_start: float, w_end: float, it: int) -> float:
        r = self.rate**it  # w_end − Δ·r, written so both ends are exact
        return w_start * r + w_end * (1.0 - r)

    def to_spec(self) -> dict:
        return {"kind": "geometric", "rate": self.rate}


@dataclass(frozen=True)
class Linear:
    """Linear ramp from ``w_start`` to ``w_end`` over ``steps`` iterations, then constant."""

    steps: int

    def __post_init__(self):
        try:
            steps = check_positive_int(self.steps, "Linear.steps")
        except InvalidArgumentError as exc:
            raise ScheduleError(str(exc)) from None
        object.__setattr__(self, "steps", steps)

    def raw_weight(self, w_start: float, w_end: float, it: int) -> float:
        return w_start + (it / self.steps) * (w_end - w_start) if it < self.steps else w_end

    def to_spec(self) -> dict:
        return {"kind": "linear", "steps": self.steps}


@dataclass(frozen=True)
class ReciprocalIter:
    """Reciprocal approach to ``w_end``: ``w_end − Δ/(1 + it)``."""

    def raw_weight(self, w_start: float, w_end: float, it: int) -> float:
        r = 1.0 / (1.0 + it)  # w_end − Δ/(1 + it), exact at it = 0
        return w_start * r + w_end * (1.0 - r)

    def to_spec(self) -> dict:
        return {"kind": "reciprocal"}


_KINDS = {"geometric": Geometric, "linear": Linear, "reciprocal": ReciprocalIter}


class ScalarWeightSchedule:
    """A scalar weight that moves from ``w_start`` to ``w_end`` as iterations pass.

    Parameters
    ----------
    w_start, w_end : float
        Finite, ≥ 0.
    kind : Geometric | Linear | ReciprocalIter

    Raises
    ------
    ScheduleError
        On a negative or non-finite weight or an unknown kind.

    Examples
    --------
    >>> s = ScalarWeightSchedule(1.0, 0.0, Linear(4))
    >>> [s.step() for _ in range(5)]
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """

    def __init__(self, w_start: float, w_end: float, kind):
        try:
            self.w_start = check_finite_scalar(w_start, "w_start", nonnegative=True)
            self.w_end = check_finite_scalar(w_end, "w_end", nonnegative=True)
        except InvalidArgumentError as exc:
            raise ScheduleError(str(exc)) from None
        if not isinstance(kind, (Geometric, Linear, ReciprocalIter)):
            raise ScheduleError(
                f"kind must be Geometric(rate), Linear(steps) or ReciprocalIter(), got {kind!r}"
            )
        self.kind = kind
        self.iter_count = 0

    @property
    def lower(self) -> float:
        return min(self.w_start, self.w_end)

    @property
    def upper(self) -> float:
        return max(self.w_start, self.w_end)

    def current_weight(self, it: int) -> float:
        """The weight at iteration ``it`` (clamped to ``[min(w), max(w)]``)."""
        it = check_iteration(it)
        w = self.kind.raw_weight(self.w_start, self.w_end, it)
        return min(max(w, self.lower), self.upper)

    def step(self) -> float:
        """Return ``current_weight(iter_count)`` and advance the counter."""
        w = self.current_weight(self.iter_count)
        self.iter_count += 1
        return w

    def copy(self) -> "ScalarWeightSchedule":
        out = ScalarWeightSchedule(self.w_start, self.w_end, self.kind)
        out.iter_count = self.iter_count
        return out

    def to_spec(self) -> dict:
        return {"w_start": self.w_start, "w_end": self.w_end, "kind": self.kind.to_spec(),
                "iter_count": self.iter_count}

    @classmethod
    def from_spec(cls, spec: dict) -> "ScalarWeightSchedule":
        kind_spec = dict(spec["kind"])
        kind_cls = _KINDS.get(kind_spec.pop("kind", None))
        if kind_cls is None:
            raise ScheduleError(f"unknown schedule kind in spec: {spec['kind']!r}")
        out = cls(spec["w_start"], spec["w_end"], kind_cls(**kind_spec))
        out.iter_count = check_iteration(spec.get("iter_count", 0), "iter_count")
        return out

    def __eq__(self, other):
        return isinstance(other, ScalarWeightSchedule) and self.to_spec() == other.to_spec()

    def __repr__(self) -> str:
        return (f"ScalarWeightSchedule(w_start={self.w_start!r}, w_end={self.w_end!r}, "
                f"kind={self.kind!r}, iter_count={self.iter_count})")
