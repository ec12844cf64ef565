"""What both PCG loops of :func:`~distpen.curvature.newton.newton_step` share: the result type, the
preconditioner of an atom range, and the check of a user's ``E·x`` rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._workers import kernel_threads
from ..errors import InvalidArgumentError

__all__ = ["NewtonResult"]


@dataclass
class NewtonResult:
    """Outcome of :func:`newton_step`."""

    x: np.ndarray
    residuals: list = field(default_factory=list)  # ‖r_i‖ / ‖rhs‖, starting with 1.0
    iterations: int = 0
    converged: bool = False
    precond: str = "block"
    seconds: float = 0.0


def _precond_part(r, pen, t, rho, precond: str, damping: float, threads: int, extra_diag=None):
    """Worker task: the preconditioner of a range's atoms — ``1/(diag + δ)`` or ``(S_a + δI)⁻¹``,
    with the diagonal of a user's extra curvature added when it is known."""
    with kernel_threads(threads):
        if precond == "jacobi":
            d = pen._rows("psd_majorizer_diag", t, rho, None, r.lo, r.hi)
            if extra_diag is not None:
                d += extra_diag[r.c0:r.c1]
            return r.index, 1.0 / (d + damping)
        S = pen._weighted_grams(t, rho, np.arange(r.lo, r.hi))
        S += damping * np.eye(S.shape[1])[None, :, :]
        if extra_diag is not None:  # I ⊗ (S_a + diag(d̄_a)): the mean over the atom's rows keeps the form
            lay, p = pen.layout, pen.p_out
            for i, a in enumerate(range(r.lo, r.hi)):
                block = extra_diag[lay.offsets[a]:lay.offsets[a + 1]].reshape(-1, p)
                S[i][np.diag_indices(p)] += block.mean(axis=0)
        return r.index, np.linalg.inv(S)  # batched: (I ⊗ (S_a + δI))⁻¹ = I ⊗ (S_a + δI)⁻¹


def _extra_rows(fn, x, c0: int, c1: int) -> np.ndarray:
    """Rows ``[c0, c1)`` of a user's ``E·x`` from ``fn(x, c0, c1)``, checked."""
    rows = np.asarray(fn(x, c0, c1), dtype=np.float64)
    if rows.shape != (c1 - c0,):
        raise InvalidArgumentError(
            f"extra(x, {c0}, {c1}) returned shape {rows.shape}; expected ({c1 - c0},), the rows [c0, c1) of E·x")
    return rows
