"""The penalty protocol shared by every penalty, and its input checks."""

from __future__ import annotations

import copy

import numpy as np

from .._validation import check_vector
from ..errors import InvalidArgumentError, ScheduleError
from ..layout import PenaltyTier
from ..weights import ScalarWeightSchedule, check_iteration

__all__ = ["Penalty"]


class Penalty:
    """Base class: every penalty maps a flat target ``t`` and its ρ slice to value and derivatives.

    Subclasses implement ``_value``, ``_grad``, ``_grad_rho``, ``_hvp``, ``_gn_hvp``,
    ``_hessian_diag`` and ``_gn_diag`` on validated inputs, and ``_check_target``.
    """

    kind_tag: str = ""
    rho_count: int = 0
    tier: PenaltyTier = PenaltyTier.BETA
    schedule: ScalarWeightSchedule | None = None

    # ---------------------------------------------------------------- input checks
    def _check_target(self, t, name: str = "t") -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_rho(self, rho) -> np.ndarray:
        if rho is None:
            rho = np.zeros(0)
        return check_vector(rho, "rho", length=self.rho_count,
                            what=f"{type(self).__name__} takes its own ρ slice of rho_count = {self.rho_count}")

    def _check_probe(self, v, t: np.ndarray, name: str = "v") -> np.ndarray:
        if v is None:
            raise InvalidArgumentError(f"{name} is required: pass a probe vector of length {t.shape[0]}")
        return check_vector(v, name, length=t.shape[0], what="the same length as t")

    # ---------------------------------------------------------------- public API
    def value(self, t, rho=None) -> float:
        """Penalty value."""
        t = self._check_target(t)
        return float(self._value(t, self._check_rho(rho)))

    def grad_target(self, t, rho=None) -> np.ndarray:
        """Gradient with respect to ``t``."""
        t = self._check_target(t)
        return self._grad(t, self._check_rho(rho))

    def grad_rho(self, t, rho=None) -> np.ndarray:
        """Gradient with respect to the penalty's ρ slice (length ``rho_count``)."""
        t = self._check_target(t)
        return self._grad_rho(t, self._check_rho(rho))

    def hvp(self, t, rho, v) -> np.ndarray:
        """Exact Hessian-vector product ``∇²_t P · v``."""
        t = self._check_target(t)
        rho = self._check_rho(rho)
        return self._hvp(t, rho, self._check_probe(v, t))

    def psd_majorizer_hvp(self, t, rho, v) -> np.ndarray:
        """Product with the positive semi-definite Gauss-Newton majorizer."""
        t = self._check_target(t)
        rho = self._check_rho(rho)
        return self._gn_hvp(t, rho, self._check_probe(v, t))

    def hessian_diag(self, t, rho=None):
        """Diagonal of the exact Hessian, or ``None`` when it is not available in closed form."""
        t = self._check_target(t)
        return self._hessian_diag(t, self._check_rho(rho))

    def psd_majorizer_diag(self, t, rho=None) -> np.ndarray:
        """Diagonal of the Gauss-Newton majorizer (closed form)."""
        t = self._check_target(t)
        return self._gn_diag(t, self._check_rho(rho))

    # ---------------------------------------------------------------- schedules
    def _schedule_weight_changed(self, w: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_schedule(self, schedule: ScalarWeightSchedule) -> None:
        if not isinstance(schedule, ScalarWeightSchedule):
            raise ScheduleError(f"schedule must be a ScalarWeightSchedule, got {schedule!r}")

    def with_weight_schedule(self, schedule: ScalarWeightSchedule) -> "Penalty":
        """A copy of this penalty driven by ``schedule`` (its weight set to the schedule's current weight)."""
        self._check_schedule(schedule)
        out = copy.copy(self)
        out.schedule = schedule.copy()
        out._schedule_weight_changed(out.schedule.current_weight(out.schedule.iter_count))
        return out

    def apply_schedule(self, it: int) -> None:
        """Set the weight to the schedule's weight at iteration ``it`` and its counter to ``it + 1``.

        Without a schedule the penalty is left unchanged (after ``it`` is validated).
        """
        it = check_iteration(it)
        if self.schedule is None:
            return
        self._schedule_weight_changed(self.schedule.current_weight(it))
        self.schedule.iter_count = it + 1

    @property
    def iter_count(self) -> int:
        return 0 if self.schedule is None else self.schedule.iter_count
