"""Matryoshka nested-prefix smoothed-L1 sparsity penalty (docs/design.md).

Bussmann, Nabeshima, Karvonen, Nanda, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders", ICML 2025 (arXiv:2503.17547).
"""

from __future__ import annotations

import numpy as np

from .._validation import check_finite_scalar, check_int_array, check_positive_int, check_vector
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..layout import PenaltyTier
from ..weights import ScalarWeightSchedule, resolve_learnable_weight
from . import _nested_kernels as K
from ._base import Penalty

__all__ = ["NestedPrefixPenalty"]


class NestedPrefixPenalty(Penalty):
    r"""``P = Σ_n Σ_i W_i sqrt(t_{n,i}² + ε²)`` with ``W_i = Σ_{k: m_k > i} λ_k``.

    The target is ``n_rows × F`` row-major (flat ``t[n·F + i]``); shell ``k`` covers the first
    ``m_k`` latents with weight ``λ_k = mult · resolve_learnable_weight(w_k, ρ_k)`` where ``mult`` is
    the schedule's weight (1 without a schedule).

    Parameters
    ----------
    prefix_sizes : array of int
        Strictly increasing ``0 < m_1 < … < m_K ≤ F``.
    shell_weights : array of float
        ``K`` finite weights ≥ 0.
    eps : float
        Smoothing, finite and > 0.
    latent_dim : int, optional
        ``F``; the largest prefix when omitted.
    tier : PenaltyTier
        Which parameter vector the target lives in (ψ by default).

    Examples
    --------
    >>> import numpy as np, distpen as dp
    >>> pen = dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=1e-3)
    >>> pen.value(np.array([3.0, 4.0]), np.zeros(2))   # 2·|3| + 1·|4|, smoothed
    10.000000...
    """

    kind_tag = "nested_prefix"

    def __init__(self, prefix_sizes, shell_weights, eps: float, latent_dim: int | None = None,
                 tier: PenaltyTier = PenaltyTier.PSI):
        prefixes = check_int_array(prefix_sizes, "prefix_sizes")
        if prefixes.shape[0] == 0:
            raise InvalidArgumentError("prefix_sizes is empty; expected at least one prefix size m_1 > 0")
        if (prefixes <= 0).any():
            bad = int(np.flatnonzero(prefixes <= 0)[0])
            raise InvalidArgumentError(f"prefix_sizes must be > 0, but prefix_sizes[{bad}] = {prefixes[bad]}")
        if prefixes.shape[0] > 1 and (np.diff(prefixes) <= 0).any():
            bad = int(np.flatnonzero(np.diff(prefixes) <= 0)[0])
            raise InvalidArgumentError(
                f"prefix_sizes must be strictly increasing, but prefix_sizes[{bad}] = {prefixes[bad]} "
                f"≥ prefix_sizes[{bad + 1}] = {prefixes[bad + 1]}; sort them and drop repeats"
            )
        if latent_dim is None:
            latent_dim = int(prefixes[-1])
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        if prefixes[-1] > self.latent_dim:
            raise InvalidArgumentError(
                f"prefix_sizes reach {prefixes[-1]}, beyond latent_dim = {self.latent_dim}; "
                "every prefix must be ≤ latent_dim"
            )
        weights = check_vector(shell_weights, "shell_weights", length=prefixes.shape[0],
                               what="one weight per prefix")
        if (weights < 0).any():
            bad = int(np.flatnonzero(weights < 0)[0])
            raise InvalidArgumentError(f"shell_weights must be ≥ 0, but shell_weights[{bad}] = {float(weights[bad])}")
        self.prefix_sizes = prefixes.copy()  # never alias the caller's arrays
        self.shell_weights = weights.copy()
        self.prefix_sizes.setflags(write=False)
        self.shell_weights.setflags(write=False)
        self.eps = check_finite_scalar(eps, "eps", positive=True)
        self.tier = PenaltyTier.parse(tier)
        self.rho_count = int(prefixes.shape[0])
        self.multiplier = 1.0
        self.schedule = None

    # ---------------------------------------------------------------- spec
    def to_spec(self) -> dict:
        return {"kind_tag": self.kind_tag, "prefix_sizes": self.prefix_sizes.tolist(),
                "shell_weights": self.shell_weights.tolist(), "eps": self.eps,
                "latent_dim": self.latent_dim, "tier": self.tier.value, "multiplier": self.multiplier,
                "schedule": None if self.schedule is None else self.schedule.to_spec()}

    @classmethod
    def from_spec(cls, spec: dict) -> "NestedPrefixPenalty":
        if spec.get("kind_tag") != cls.kind_tag:
            raise InvalidArgumentError(f"spec kind_tag {spec.get('kind_tag')!r} is not {cls.kind_tag!r}")
        out = cls(spec["prefix_sizes"], spec["shell_weights"], spec["eps"], spec["latent_dim"], spec["tier"])
        out.multiplier = float(spec.get("multiplier", 1.0))
        if spec.get("schedule") is not None:
            out.schedule = ScalarWeightSchedule.from_spec(spec["schedule"])
        return out

    def __repr__(self) -> str:
        return (f"NestedPrefixPenalty(prefix_sizes={self.prefix_sizes.tolist()}, "
                f"shell_weights={self.shell_weights.tolist()}, eps={self.eps!r}, "
                f"latent_dim={self.latent_dim}, tier={self.tier})")

    # ---------------------------------------------------------------- helpers
    def _check_target(self, t, name: str = "t") -> np.ndarray:
        # finiteness is checked by the kernels in the same pass that computes (see _nonfinite)
        t = check_vector(t, name, finite=False)
        n = t.shape[0]
        if n == 0:
            raise InvalidArgumentError(f"{name} is empty; expected n_rows × latent_dim = k × {self.latent_dim} entries")
        if n % self.latent_dim:
            raise ShapeMismatchError(
                f"len({name}) = {n} is not a multiple of latent_dim = {self.latent_dim}; "
                f"the target is n_rows × latent_dim, row-major"
            )
        return t

    def _nonfinite(self, t: np.ndarray, bad_row: int, name: str = "t") -> None:
        """Raise for the first non-finite entry of ``t`` a kernel found in row ``bad_row`` (if any)."""
        if bad_row < 0:
            return
        F = self.latent_dim
        row = t[bad_row * F:(bad_row + 1) * F]
        i = bad_row * F + int(np.flatnonzero(~np.isfinite(row))[0])
        raise InvalidArgumentError(f"{name} must be finite, but {name}[{i}] = {float(t[i])}")

    def _rows(self, t: np.ndarray) -> np.ndarray:
        return t.reshape(-1, self.latent_dim)

    def shell_lambdas(self, rho=None) -> np.ndarray:
        """``λ_k`` for this ρ slice."""
        return self._lambdas(self._check_rho(rho))

    def _lambdas(self, rho: np.ndarray) -> np.ndarray:
        return np.array([self.multiplier * resolve_learnable_weight(w, r)
                         for w, r in zip(self.shell_weights, rho)])

    def column_weights(self, rho=None) -> np.ndarray:
        """``W_i = Σ_{k: m_k > i} λ_k`` for every latent ``i`` (length ``latent_dim``)."""
        return self._column_weights(self._check_rho(rho))

    def _column_weights(self, rho: np.ndarray) -> np.ndarray:
        lam = self._lambdas(rho)
        marks = np.zeros(self.latent_dim)
        np.add.at(marks, self.prefix_sizes - 1, lam)  # K shells, not per row
        return np.cumsum(marks[::-1])[::-1].copy()

    # ---------------------------------------------------------------- operations
    def _col_sums(self, t):
        colsum, bad = K.col_sums_r(self._rows(t), self.eps)
        self._nonfinite(t, bad)
        return colsum

    def _value(self, t, rho):
        return float(np.dot(self._column_weights(rho), self._col_sums(t)))

    def _grad(self, t, rho):
        out = np.empty_like(t)
        self._nonfinite(t, K.grad_into(self._rows(t), self._column_weights(rho), self.eps, self._rows(out)))
        return out

    def _grad_rho(self, t, rho):
        prefix_sums = np.cumsum(self._col_sums(t))[self.prefix_sizes - 1]
        return self._lambdas(rho) * prefix_sums

    def _hessian_diag(self, t, rho):
        out = np.empty_like(t)
        self._nonfinite(t, K.hdiag_into(self._rows(t), self._column_weights(rho), self.eps, self._rows(out)))
        return out

    def _hvp(self, t, rho, v):
        out = np.empty_like(t)
        self._nonfinite(t, K.hvp_into(self._rows(t), self._column_weights(rho), self.eps, self._rows(v),
                                      self._rows(out)))
        return out

    _gn_hvp = _hvp
    _gn_diag = _hessian_diag

    def _check_out(self, out, t: np.ndarray, name: str) -> np.ndarray:
        if out is None:
            return np.empty_like(t)
        if not (isinstance(out, np.ndarray) and out.dtype == np.float64 and out.ndim == 1
                and out.shape == t.shape and out.flags.c_contiguous and out.flags.writeable):
            raise InvalidArgumentError(
                f"{name} must be a writeable C-contiguous 1-D float64 array of length {t.shape[0]} "
                f"(np.empty_like(t)), got {type(out).__name__}"
                + (f" of dtype {out.dtype}, shape {out.shape}" if isinstance(out, np.ndarray) else "")
            )
        if np.shares_memory(out, t):
            raise InvalidArgumentError(f"{name} overlaps t; pass a separate buffer")
        return out

    def value_grad_diag(self, t, rho=None, *, out_grad=None, out_diag=None):
        """Value, gradient and Hessian diagonal in one pass over ``t``.

        Equal to ``(value(t, rho), grad_target(t, rho), hessian_diag(t, rho))`` (the Hessian
        diagonal is also the majorizer's), for a caller that needs all three and wants ``t`` read once.

        Parameters
        ----------
        t : array of shape (n_rows · latent_dim,)
        rho : array of shape (rho_count,)
        out_grad, out_diag : array of shape (n_rows · latent_dim,), optional
            Preallocated float64 buffers for the two arrays (distinct from ``t`` and each other).

        Returns
        -------
        (float, ndarray, ndarray)
            ``out_grad`` and ``out_diag`` when given.

        Raises
        ------
        InvalidArgumentError
            On a non-finite ``t`` or an unusable buffer.

        Examples
        --------
        >>> import numpy as np, distpen as dp
        >>> pen = dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=1e-3)
        >>> val, g, d = pen.value_grad_diag(np.array([3.0, 4.0]), np.zeros(2))
        >>> round(val, 6), g.round(6).tolist()
        (10.0, [2.0, 1.0])
        """
        t = self._check_target(t)
        rho = self._check_rho(rho)
        grad = self._check_out(out_grad, t, "out_grad")
        diag = self._check_out(out_diag, t, "out_diag")
        if out_grad is not None and out_diag is not None and np.shares_memory(grad, diag):
            raise InvalidArgumentError("out_grad and out_diag overlap; pass two separate buffers")
        W = self._column_weights(rho)
        colsum, bad = K.value_grad_diag_into(self._rows(t), W, self.eps, self._rows(grad), self._rows(diag))
        self._nonfinite(t, bad)
        return float(np.dot(W, colsum)), grad, diag

    # ---------------------------------------------------------------- schedules
    def _schedule_weight_changed(self, w: float) -> None:
        self.multiplier = check_finite_scalar(w, "schedule weight", nonnegative=True)
