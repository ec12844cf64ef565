""":class:`Resident`: a penalty and its coefficients kept on the workers across calls.

Its ``evaluate`` and ``newton_step`` reuse them (no second transfer of ``t``, whatever other calls
run in between) until the handle is closed.
"""

from __future__ import annotations

import uuid

from .._broadcast import BROADCASTS
from .evaluate import evaluate
from .newton import newton_step

__all__ = ["Resident"]


class Resident:
    """A penalty and its coefficients ``t`` kept on the workers across calls.

    A context manager: inside it, :meth:`evaluate` and :meth:`newton_step` take the arguments of
    :func:`distpen.evaluate` and :func:`distpen.newton_step` without the penalty, ``t`` and ``rho``,
    and reuse the copies already on the workers — the penalty and ``t`` are sent once, on the first
    call, and never again while ``t`` is unchanged (it is compared bit for bit with a private copy,
    so changing it in place is seen and sent). Calls for other penalties meanwhile do not evict
    them. Closing the handle releases them on every worker.

    Parameters
    ----------
    penalty : DecoderIncoherencePenalty or NestedPrefixPenalty
    t : array of shape (n,)
    rho : array of shape (penalty.rho_count,)

    The calls run on :func:`distpen.cluster.get_client`'s cluster, like the functions.

    Examples
    --------
    >>> with dp.Resident(pen, beta, rho) as r:                          # doctest: +SKIP
    ...     g = r.evaluate(ops=("value", "grad"))["grad"]
    ...     step = r.newton_step(-g, damping=1e-3)
    """

    def __init__(self, penalty, t, rho):
        from ._common import check_penalty

        check_penalty(penalty)
        self.penalty, self.t, self.rho = penalty, t, rho
        self._scope = f"resident-{uuid.uuid4().hex}"
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError("this Resident handle is closed; open a new one")

    def _call(self, fn, *args, **kwargs):
        self._check_open()
        with BROADCASTS.scope(self._scope):
            return fn(*args, **kwargs)

    def evaluate(self, ops=("value", "grad"), v=None, **kwargs):
        """:func:`distpen.evaluate` of the resident penalty at the resident ``t``."""
        return self._call(evaluate, self.penalty, self.t, self.rho, ops=ops, v=v, **kwargs)

    def newton_step(self, rhs, **kwargs):
        """:func:`distpen.newton_step` of the resident penalty at the resident ``t``."""
        return self._call(newton_step, self.penalty, self.t, self.rho, rhs, **kwargs)

    def close(self) -> None:
        """Release the penalty and ``t`` on the workers (idempotent)."""
        if not self._closed:
            self._closed = True
            BROADCASTS.release(self._scope)
