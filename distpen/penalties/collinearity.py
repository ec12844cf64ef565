"""Collinearity of decoder blocks: the overlap of each candidate pair and its smoothstep gate (docs/design.md).

Per pair, with ``G_x = B_xᵀ B_x`` (``p × p``)::

    o_jk = ⟨G_j, G_k⟩_F / (‖G_j‖_F ‖G_k‖_F) = ‖B_j B_kᵀ‖²_F / (‖B_j B_jᵀ‖_F ‖B_k B_kᵀ‖_F)  ∈ [0, 1]

computed on the ``M × M`` side (``B_j B_kᵀ`` is ``M_j × M_k``; no ``p × p`` Gram is formed), 0 when a
Gram is 0. The gate is ``g = u²(3 − 2u)`` with ``u = clamp((o − low)/(1 − low), 0, 1)``; a candidate
``(j, k, w)`` is kept with weight ``w·g`` when ``g > 0``. These are in-memory kernels; a distributed
wrapper runs them over pair chunks, each on the blocks its pairs touch.
"""

from __future__ import annotations

import numpy as np

from .._validation import check_finite_scalar
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..layout import DecoderLayout
from ..pairs import PairTable
from . import _decoder_kernels as K

__all__ = ["pair_overlap", "smoothstep_gate", "collinearity_gate_local", "check_low", "block_gram_norms", "overlap_of",
           "BAND_BYTES"]

#: bytes of the decoder blocks ``B_j`` that the overlap kernel keeps in cache while it streams their
#: partners (a band of atoms; a share of L3 for each of two workers here)
BAND_BYTES = 4 << 20


def _check(pairs, t, layout: DecoderLayout) -> np.ndarray:
    if not isinstance(pairs, PairTable):
        raise InvalidArgumentError(f"pairs must be a PairTable, got {type(pairs).__name__}")
    if pairs.k_atoms != layout.k_atoms:
        raise ShapeMismatchError(
            f"pairs index k_atoms = {pairs.k_atoms} atoms but the layout describes {layout.k_atoms}; "
            "build the pairs over the same atoms as the decoder"
        )
    return layout.check_beta(t, "t")


def pair_overlap(pairs: PairTable, t, layout: DecoderLayout) -> np.ndarray:
    """The overlap ``o_jk`` of every pair, in table order.

    Parameters
    ----------
    pairs : PairTable
        Candidate pairs over ``layout.k_atoms`` atoms.
    t : array of shape (layout.n_coef,)
        The flat decoder (the β layout of docs/design.md).
    layout : DecoderLayout

    Returns
    -------
    array of shape (n_pairs,)
        Values in [0, 1]; 0 for a pair with a zero block.

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        On pairs over other atoms or a ``t`` of the wrong length.

    Examples
    --------
    >>> import numpy as np, distpen as dp
    >>> from distpen.penalties.collinearity import pair_overlap
    >>> lay = dp.DecoderLayout([1, 1, 1], 2)
    >>> pairs = dp.PairTable([0, 0], [1, 2], [1.0, 1.0], 3)
    >>> pair_overlap(pairs, np.array([1.0, 0.0, 2.0, 0.0, 0.0, 1.0]), lay).tolist()
    [1.0, 0.0]
    """
    t = _check(pairs, t, layout)
    return _overlap(pairs, t, layout)


def _overlap(pairs: PairTable, t: np.ndarray, layout: DecoderLayout) -> np.ndarray:
    return overlap_of(pairs.j, pairs.k, t, layout)


def block_gram_norms(t: np.ndarray, layout: DecoderLayout) -> np.ndarray:
    """``‖B_a B_aᵀ‖_F`` of every atom of ``layout`` (the overlap's denominators), from a checked ``t``."""
    return K.self_gram_norms(t, layout.offsets, layout.block_sizes, layout.p_out, layout.max_block)


def overlap_of(j: np.ndarray, k: np.ndarray, t: np.ndarray, layout: DecoderLayout, norms=None) -> np.ndarray:
    """The overlaps of the pairs ``(j[q], k[q])`` of ``layout``'s atoms, from a checked ``t`` (no validation).

    The pairs may come in any order: they are visited by bands of ``j`` (atoms whose blocks take
    about :data:`BAND_BYTES`, kept in cache) and, within a band, by increasing ``k`` (so the
    partners' blocks are read in address order), and the overlaps returned in the given order;
    the order changes the speed only. ``norms`` are the :func:`block_gram_norms` when the caller
    already has them (a worker reuses them across tasks).
    """
    if j.shape[0] == 0:
        return np.zeros(0)
    off, m, p = layout.offsets, layout.block_sizes, layout.p_out
    band = max(1, int(BAND_BYTES * layout.k_atoms // max(1, 8 * layout.n_coef)))
    order = K.order_by_band(j, k, layout.k_atoms, band)
    E = K.gate_sqnorms(t, off, m, p, j, k, order)
    g = block_gram_norms(t, layout) if norms is None else norms
    den = g[j] * g[k]
    o = np.zeros_like(E)
    ok = den > 0
    np.divide(E, den, out=o, where=ok)
    np.clip(o, 0.0, 1.0, out=o)  # Cauchy-Schwarz, up to rounding
    return o


def check_low(low) -> float:
    """``low`` as a float in [0, 1), or an error naming it."""
    low = check_finite_scalar(low, "low")
    if not 0.0 <= low < 1.0:
        raise InvalidArgumentError(f"low must lie in [0, 1), got {low!r}; 0.5 keeps pairs overlapping more than half")
    return low


def smoothstep_gate(o, low: float = 0.5) -> np.ndarray:
    """``g = u²(3 − 2u)`` with ``u = clamp((o − low)/(1 − low), 0, 1)``, elementwise."""
    low = check_low(low)
    u = np.clip((np.asarray(o, dtype=np.float64) - low) / (1.0 - low), 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def collinearity_gate_local(pairs: PairTable, t, block_sizes, p_out: int, low: float = 0.5):
    """Gate candidate pairs by the collinearity of their decoder blocks.

    Parameters
    ----------
    pairs : PairTable
        Candidate pairs ``(j, k, w)``.
    t : array of shape (Σ block_sizes · p_out,)
        The flat decoder.
    block_sizes : array of int
    p_out : int
    low : float
        In [0, 1): overlaps at or below ``low`` get gate 0, overlap 1 gets gate 1.

    Returns
    -------
    (PairTable, ndarray of shape (n_pairs,))
        The kept pairs with weights ``w·g`` (``g > 0``), in table order, and the overlap of every
        candidate (for plotting).

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        On a bad ``low``, a ``t`` of the wrong length or pairs over other atoms.

    Examples
    --------
    >>> import numpy as np, distpen as dp
    >>> from distpen.penalties.collinearity import collinearity_gate_local
    >>> pairs = dp.PairTable([0, 0], [1, 2], [2.0, 1.0], 3)
    >>> kept, o = collinearity_gate_local(pairs, np.array([1.0, 0.0, 2.0, 0.0, 0.0, 1.0]), [1, 1, 1], 2)
    >>> kept.j.tolist(), kept.k.tolist(), kept.w.tolist(), o.tolist()
    ([0], [1], [2.0], [1.0, 0.0])
    """
    low = check_low(low)
    layout = DecoderLayout(block_sizes, p_out)
    t = _check(pairs, t, layout)
    o = _overlap(pairs, t, layout)
    g = smoothstep_gate(o, low)
    keep = g > 0
    kept = PairTable(pairs.j[keep], pairs.k[keep], pairs.w[keep] * g[keep], pairs.k_atoms, _trusted=True)
    return kept, o
