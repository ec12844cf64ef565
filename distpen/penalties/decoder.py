"""Decoder incoherence penalty over co-activating atom pairs (docs/design.md)."""

from __future__ import annotations

import numpy as np

from .._alloc import zeros
from .._validation import check_finite_scalar
from ..errors import InvalidArgumentError, InvalidDtypeError, ScheduleError, ShapeMismatchError
from ..layout import DecoderLayout, PenaltyTier
from ..pairs import PairTable
from ..weights import ScalarWeightSchedule, resolve_learnable_weight
from . import _decoder_kernels as K
from ._base import Penalty

__all__ = ["DecoderIncoherencePenalty", "NORMALIZATIONS"]

#: the accepted values of ``normalize``
NORMALIZATIONS = (None, "frobenius")
_NO_INV = np.zeros(0)


def check_normalize(normalize):
    """``None`` or ``"frobenius"``; anything else is an error."""
    if normalize is None or (isinstance(normalize, str) and normalize == "frobenius"):
        return normalize
    raise InvalidArgumentError(
        f"normalize must be None (P = ½ Σ W ‖B_j B_kᵀ‖²) or 'frobenius' (each pair divided by "
        f"‖B_j‖²‖B_k‖²), got {normalize!r}"
    )


class DecoderIncoherencePenalty(Penalty):
    r"""Cross-atom decoder incoherence ``P = ½ Σ_pairs s·w_jk ‖B_j B_kᵀ‖²_F``.

    Atom ``k`` owns the block ``B_k`` (``M_k × p_out``) of the flat decoder vector ``t``; pairs are a
    sparse :class:`~distpen.PairTable` of co-activating atoms. The strength ``s`` is ``weight``, or
    ``resolve_learnable_weight(weight, ρ[0])`` when ``learnable_weight`` is set.

    With ``normalize="frobenius"`` each pair is divided by ``N_j N_k``, ``N_x = ‖B_x‖²_F``:
    ``P = ½ Σ_pairs s·w_jk ‖B_j B_kᵀ‖²_F / (N_j N_k)``, homogeneous of degree 0 in every block. Its
    Gauss-Newton majorizer has the unnormalised blocks with pair weight ``κ = s·w_jk/(N_j N_k)``
    from the current norms; a pair with a zero block contributes nothing to any operation (a block
    with ``N < 1e-150`` counts as zero: ``1/N`` would overflow ``κ``).

    Parameters
    ----------
    pairs : PairTable
        Pairs over ``len(block_sizes)`` atoms.
    block_sizes : array of shape (k_atoms,)
        Rows ``M_k ≥ 1`` of every atom's block.
    p_out : int
        Columns of every block.
    weight : float
        Finite and > 0.
    learnable_weight : bool
        Whether the strength is ``weight·exp(ρ)`` with its own ρ entry (``rho_count = 1``).
    normalize : {None, "frobenius"}
        The penalty's form (see above).

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError, PairTableError
        On a bad weight, layout or pair list.

    Examples
    --------
    >>> import numpy as np, distpen as dp
    >>> C = np.array([[0.0, 0.5], [0.5, 0.0]])
    >>> pen = dp.DecoderIncoherencePenalty.from_coactivation(C, [1, 1], 2, weight=2.0)
    >>> pen.value(np.array([1.0, 0.0, 1.0, 1.0]))   # ½ · 2 · 0.5 · (1·1 + 0·1)²
    0.5
    >>> nrm = dp.DecoderIncoherencePenalty.from_coactivation(C, [1, 1], 2, weight=2.0, normalize="frobenius")
    >>> nrm.value(np.array([1.0, 0.0, 1.0, 1.0]))   # … / (‖B_0‖² ‖B_1‖²) = 0.5 / 2
    0.25
    """

    kind_tag = "decoder_incoherence"
    tier = PenaltyTier.BETA

    def __init__(self, pairs: PairTable, block_sizes, p_out: int, weight: float,
                 learnable_weight: bool = False, normalize: str | None = None):
        if not isinstance(pairs, PairTable):
            raise InvalidArgumentError(
                f"pairs must be a PairTable, got {type(pairs).__name__}; build one with "
                "PairTable(j, k, w, k_atoms) or PairTable.from_dense(C)"
            )
        self.layout = DecoderLayout(block_sizes, p_out)
        if pairs.k_atoms != self.layout.k_atoms:
            raise ShapeMismatchError(
                f"pairs index k_atoms = {pairs.k_atoms} atoms but block_sizes describe "
                f"{self.layout.k_atoms}; build the pairs over the same atoms as the decoder"
            )
        self.pairs = pairs
        self.weight = check_finite_scalar(weight, "weight", positive=True)
        if not isinstance(learnable_weight, (bool, np.bool_)):
            raise InvalidArgumentError(f"learnable_weight must be a bool, got {learnable_weight!r}")
        self.learnable_weight = bool(learnable_weight)
        self.rho_count = 1 if self.learnable_weight else 0
        self.normalize = check_normalize(normalize)
        self.schedule = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_coactivation(cls, C, block_sizes, p_out: int, weight: float,
                          learnable_weight: bool = False, normalize: str | None = None) -> "DecoderIncoherencePenalty":
        """Build from a dense ``K × K`` co-activation matrix (``w = ½(C[j,k] + C[k,j])``, zeros dropped)."""
        layout = DecoderLayout(block_sizes, p_out)
        C_arr = np.asarray(C)
        if C_arr.ndim != 2 or C_arr.shape != (layout.k_atoms, layout.k_atoms):
            raise ShapeMismatchError(
                f"coactivation must be K × K = {layout.k_atoms} × {layout.k_atoms} for "
                f"{layout.k_atoms} blocks, got shape {C_arr.shape}"
            )
        return cls(PairTable.from_dense(C_arr), layout.block_sizes, p_out, weight, learnable_weight, normalize)

    @classmethod
    def from_pairs(cls, pairs, block_sizes, p_out: int, weight: float,
                   learnable_weight: bool = False, normalize: str | None = None) -> "DecoderIncoherencePenalty":
        """Build from a :class:`PairTable` or a ``(j, k, w)`` triple over ``len(block_sizes)`` atoms."""
        if not isinstance(pairs, PairTable):
            try:
                j, k, w = pairs
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"pairs must be a PairTable or a (j, k, w) triple of arrays, got {type(pairs).__name__}"
                ) from None
            pairs = PairTable(j, k, w, len(np.asarray(block_sizes)))
        return cls(pairs, block_sizes, p_out, weight, learnable_weight, normalize)

    # ---------------------------------------------------------------- spec (cheap to ship)
    def to_spec(self) -> dict:
        """A JSON-able description without the pairs (they travel separately)."""
        return {"kind_tag": self.kind_tag, **self.layout.to_spec(), "weight": self.weight,
                "learnable_weight": self.learnable_weight, "normalize": self.normalize,
                "schedule": None if self.schedule is None else self.schedule.to_spec()}

    @classmethod
    def from_spec(cls, spec: dict, pairs: PairTable) -> "DecoderIncoherencePenalty":
        if spec.get("kind_tag") != cls.kind_tag:
            raise InvalidArgumentError(f"spec kind_tag {spec.get('kind_tag')!r} is not {cls.kind_tag!r}")
        out = cls(pairs, spec["block_sizes"], spec["p_out"], spec["weight"], spec["learnable_weight"],
                  spec.get("normalize"))  # specs written before normalisation existed are unnormalised
        if spec.get("schedule") is not None:
            out.schedule = ScalarWeightSchedule.from_spec(spec["schedule"])
        return out

    def with_pairs(self, pairs: PairTable, layout: DecoderLayout | None = None) -> "DecoderIncoherencePenalty":
        """The same penalty (weight, schedule) on another pair set, optionally over another layout."""
        layout = self.layout if layout is None else layout
        out = type(self)(pairs, layout.block_sizes, layout.p_out, self.weight, self.learnable_weight,
                         self.normalize)
        out.schedule = None if self.schedule is None else self.schedule.copy()
        return out

    def restrict(self, pairs: PairTable) -> tuple["DecoderIncoherencePenalty", np.ndarray]:
        """A penalty over only the atoms ``pairs`` touch, renumbered locally, and those atoms.

        ``local.value(layout.gather(t, atoms))`` equals the contribution of ``pairs`` to the full value.
        """
        local_pairs, atoms = pairs.restrict(pairs.atoms())
        return self.with_pairs(local_pairs, self.layout.subset(atoms)), atoms

    # ---------------------------------------------------------------- helpers
    @property
    def k_atoms(self) -> int:
        return self.layout.k_atoms

    @property
    def p_out(self) -> int:
        return self.layout.p_out

    @property
    def block_sizes(self) -> np.ndarray:
        return self.layout.block_sizes

    @property
    def n_coef(self) -> int:
        return self.layout.n_coef

    def __repr__(self) -> str:
        return (f"DecoderIncoherencePenalty(k_atoms={self.k_atoms}, p_out={self.p_out}, "
                f"n_pairs={len(self.pairs)}, weight={self.weight!r}, "
                f"learnable_weight={self.learnable_weight}"
                + ("" if self.normalize is None else f", normalize={self.normalize!r}") + ")")

    def _check_target(self, t, name: str = "t") -> np.ndarray:
        return self.layout.check_beta(t, name)

    def strength(self, rho=None) -> float:
        """The effective ``s`` for this ρ slice."""
        rho = self._check_rho(rho)
        return self._strength(rho)

    def _strength(self, rho: np.ndarray) -> float:
        if self.learnable_weight:
            return resolve_learnable_weight(self.weight, rho[0])
        return self.weight

    def _lay(self):
        lay = self.layout
        return lay.offsets, lay.block_sizes, lay.p_out

    # ---------------------------------------------------------------- operations
    def pair_sqnorms(self, t) -> np.ndarray:
        """``‖B_j B_kᵀ‖²_F`` for every pair, in table order."""
        t = self._check_target(t)
        off, m, p = self._lay()
        return K.pair_sqnorms(t, off, m, p, self.pairs.j, self.pairs.k)

    def _inv(self, t) -> np.ndarray:
        """Per-atom ``1/N_a`` (0 for a zero block) when normalised; an empty array otherwise."""
        if self.normalize is None:
            return _NO_INV
        off, m, p = self._lay()
        return K.inverse_sqnorms(t, off, m, p)[1]

    def block_sqnorms(self, t) -> np.ndarray:
        """``N_a = ‖B_a‖²_F`` for every atom."""
        t = self._check_target(t)
        off, m, p = self._lay()
        return K.inverse_sqnorms(t, off, m, p)[0]

    def _pair_weights(self, inv, q0: int = 0, q1: int | None = None) -> np.ndarray:
        """``w_jk`` of pairs ``[q0, q1)``, times ``inv_j·inv_k`` when normalised (strength not applied)."""
        pairs = self.pairs
        w = pairs.w[q0:q1]
        if self.normalize is None:
            return w
        return w * (inv[pairs.j[q0:q1]] * inv[pairs.k[q0:q1]])

    def gn_pair_weights(self, t, rho=None) -> np.ndarray:
        """The Gauss-Newton pair weight of every pair, in table order: array of shape (n_pairs,).

        ``W_jk = s·w_jk`` for the unnormalised penalty; ``κ_jk = s·w_jk/(N_j N_k)`` from the current
        norms with ``normalize="frobenius"`` (0 for a pair with a zero block). The Gauss-Newton
        matrix is the unnormalised one of docs/design.md with these weights, and
        ``weighted_grams``' ``S_a = Σ_b κ_ab B_bᵀ B_b``.
        """
        t = self._check_target(t)
        rho = self._check_rho(rho)
        return self._strength(rho) * self._pair_weights(self._inv(t))

    def _value(self, t, rho):
        off, m, p = self._lay()
        sq = K.pair_sqnorms(t, off, m, p, self.pairs.j, self.pairs.k)
        if self.normalize is not None:
            return 0.5 * self._strength(rho) * float(np.dot(self._pair_weights(self._inv(t)), sq))
        return 0.5 * self._strength(rho) * float(np.dot(self.pairs.w, sq))

    _ROW_OPS = {"grad": -1, "psd_majorizer_hvp": 0, "hvp": 1, "psd_majorizer_offdiag_hvp": 2,
                "psd_majorizer_diag": -2}

    def _rows(self, op: str, t, rho, v=None, lo: int = 0, hi: int | None = None, inv=None) -> np.ndarray:
        """Rows of atoms ``[lo, hi)`` of a vector operation, computed from those atoms' pairs only.

        ``inv`` (from :meth:`_inv`) may be passed by callers that run several operations on one ``t``.
        """
        hi = self.k_atoms if hi is None else hi
        off, m, p = self._lay()
        base = int(off[lo])
        out = zeros(int(off[hi]) - base)
        if hi == lo:
            return out
        indptr, nbr, wts = self.pairs.directed()
        s = self._strength(rho)
        mode = self._ROW_OPS[op]
        mmax = self.layout.max_block
        if self.normalize is None:
            if mode == -1:
                K.grad_csr(t, off, m, p, indptr, nbr, wts, s, out, mmax, lo, hi, base)
            elif mode == -2:
                K.gn_diag_csr(t, off, m, p, indptr, nbr, wts, s, out, lo, hi, base, _NO_INV)
            else:
                K.hvp_csr(t, v, off, m, p, indptr, nbr, wts, s, mode, out, mmax, lo, hi, base, _NO_INV)
            return out
        inv = self._inv(t) if inv is None else inv
        if mode == -1:
            K.grad_norm_csr(t, off, m, p, indptr, nbr, wts, s, inv, out, mmax, lo, hi, base)
        elif mode == -2:
            K.gn_diag_csr(t, off, m, p, indptr, nbr, wts, s, out, lo, hi, base, inv)
        elif mode == 1:
            alpha = K.block_dots(t, v, off, m, p, inv)
            K.hvp_norm_csr(t, v, off, m, p, indptr, nbr, wts, s, inv, alpha, out, mmax, lo, hi, base)
        else:
            K.hvp_csr(t, v, off, m, p, indptr, nbr, wts, s, mode, out, mmax, lo, hi, base, inv)
        return out

    def _grad(self, t, rho):
        return self._rows("grad", t, rho)

    def _grad_rho(self, t, rho):
        if not self.learnable_weight:
            return np.zeros(0)
        return np.array([self._value(t, rho)])

    def _hvp(self, t, rho, v):
        return self._rows("hvp", t, rho, v)

    def _gn_hvp(self, t, rho, v):
        return self._rows("psd_majorizer_hvp", t, rho, v)

    def _hessian_diag(self, t, rho):
        return None

    def _gn_diag(self, t, rho):
        # diag(I ⊗ S_a) in closed form: Σ_b w_ab Σ_c B_b[c, o]² on every row of atom a
        return self._rows("psd_majorizer_diag", t, rho)

    def weighted_grams(self, t, rho=None, atoms=None) -> np.ndarray:
        """``s·S_a = s·Σ_b w_ab B_bᵀ B_b`` for ``atoms`` (all by default): array ``(n, p_out, p_out)``.

        Atom ``a``'s diagonal block of the Gauss-Newton matrix is ``I_{M_a} ⊗ s·S_a``.
        """
        t = self._check_target(t)
        return self._weighted_grams(t, self._check_rho(rho), atoms)

    def _weighted_grams(self, t, rho, atoms=None) -> np.ndarray:
        atoms = np.arange(self.k_atoms, dtype=np.int64) if atoms is None else np.asarray(atoms, dtype=np.int64)
        off, m, p = self._lay()
        indptr, nbr, wts = self.pairs.directed()
        S = K.weighted_grams_csr(t, off, m, p, indptr, nbr, wts, atoms, self._inv(t))
        S *= self._strength(rho)
        return S

    def accumulate_psd_majorizer_dense(self, t, rho, scale: float, out: np.ndarray) -> np.ndarray:
        """Add ``scale·H_GN`` into the dense ``n × n`` array ``out`` block by block; return ``out``.

        Diagonal blocks ``I ⊗ S_a`` and each pair's two off-diagonal blocks are written directly,
        in ``O(Σ_pairs (M_j M_k + M_j + M_k)·p²)``.
        """
        t = self._check_target(t)
        self._check_dense_out(out, t.shape[0])
        return self.accumulate_psd_majorizer_tile(t, rho, scale, out, 0, 0)

    def accumulate_psd_majorizer_tile(self, t, rho, scale: float, out: np.ndarray, row0: int, col0: int,
                                      grams=None) -> np.ndarray:
        """Add the part of ``scale·H_GN`` in rows ``[row0, row0 + out.shape[0])`` and columns
        ``[col0, col0 + out.shape[1])`` into the 2-D float64 array ``out``; return ``out``.

        ``grams = (atoms, S)`` supplies the strength-scaled ``s·S_a`` of the diagonal blocks (from
        :meth:`weighted_grams` over the complete pair set) when this penalty holds only the pairs
        that touch the tile; by default they are computed from this penalty's own pairs.
        """
        t = self._check_target(t)
        rho = self._check_rho(rho)
        scale = check_finite_scalar(scale, "scale")
        if not (isinstance(out, np.ndarray) and out.ndim == 2 and out.dtype == np.float64
                and out.flags.c_contiguous and out.flags.writeable):
            raise InvalidArgumentError("out must be a writeable C-contiguous 2-D float64 array")
        s = self._strength(rho)
        off, m, p = self._lay()
        inv = self._inv(t)
        if grams is None:
            atoms = np.arange(self.k_atoms, dtype=np.int64)
            indptr, nbr, wts = self.pairs.directed()
            S = K.weighted_grams_csr(t, off, m, p, indptr, nbr, wts, atoms, inv)
            diag_scale = s * scale
        else:
            atoms, S = np.asarray(grams[0], dtype=np.int64), np.ascontiguousarray(grams[1], dtype=np.float64)
            if S.shape != (atoms.shape[0], p, p):
                raise ShapeMismatchError(f"grams S has shape {S.shape}, expected ({atoms.shape[0]}, {p}, {p})")
            diag_scale = scale
        K.diag_blocks_into(S, atoms, off, m, p, diag_scale, out, int(row0), int(col0))
        K.gn_offdiag_into(t, off, m, p, self.pairs.j, self.pairs.k, self._pair_weights(inv), s * scale, out,
                          int(row0), int(col0))
        return out

    def evaluate_owned(self, t, rho, ops, v=None, *, out_atoms=None, value_atoms=None,
                       _validated: bool = False) -> dict:
        """Operations restricted to the atoms a worker owns ("owner computes").

        Vector results (``grad``, ``hvp``, ``psd_majorizer_hvp``, ``psd_majorizer_diag`` and
        ``psd_majorizer_offdiag_hvp`` — the Gauss-Newton product without its diagonal blocks
        ``I ⊗ S_a``, used with stored ``S_a`` by the factored form) are the
        rows of atoms ``out_atoms = (lo, hi)`` only — exactly those of the full operation, provided
        the penalty holds every pair touching them — as one flat array of their coefficients.
        ``value`` and ``grad_rho`` count the pairs whose ``j`` lies in ``value_atoms``, so disjoint
        value ranges sum to the full value. ``hessian_diag`` is ``None``. (``_validated`` skips the
        input checks for callers that validated ``t``, ``rho`` and ``v`` once for many calls.)
        """
        if not _validated:
            t = self._check_target(t)
            rho = self._check_rho(rho)
        K_ = self.k_atoms
        lo, hi = (0, K_) if out_atoms is None else (int(out_atoms[0]), int(out_atoms[1]))
        vlo, vhi = (0, K_) if value_atoms is None else (int(value_atoms[0]), int(value_atoms[1]))
        if not (0 <= lo <= hi <= K_ and 0 <= vlo <= vhi <= K_):
            raise InvalidArgumentError(f"atom ranges {out_atoms!r}, {value_atoms!r} must lie in [0, {K_}]")
        s = self._strength(rho)
        off, m, p = self._lay()
        inv = self._inv(t)
        res: dict = {}
        if "value" in ops or "grad_rho" in ops:
            q0, q1 = np.searchsorted(self.pairs.j, [vlo, vhi])
            sq = K.pair_sqnorms(t, off, m, p, self.pairs.j[q0:q1], self.pairs.k[q0:q1])
            val = 0.5 * s * float(np.dot(self._pair_weights(inv, q0, q1), sq))
            if "value" in ops:
                res["value"] = val
            if "grad_rho" in ops:
                res["grad_rho"] = np.array([val]) if self.learnable_weight else np.zeros(0)
        for name in ops:
            if name in self._ROW_OPS:
                probe = None
                if name in ("hvp", "psd_majorizer_hvp", "psd_majorizer_offdiag_hvp"):
                    probe = v if _validated else self._check_probe(v, t)
                res[name] = self._rows(name, t, rho, probe, lo, hi, inv)
        if "hessian_diag" in ops:
            res["hessian_diag"] = None
        return res

    @staticmethod
    def _check_dense_out(out, n: int) -> None:
        if not isinstance(out, np.ndarray):
            raise InvalidArgumentError(f"out must be a numpy array of shape ({n}, {n}), got {type(out).__name__}")
        if out.shape != (n, n):
            raise ShapeMismatchError(f"out has shape {out.shape}, expected ({n}, {n}) for len(t) = {n}")
        if out.dtype != np.float64:
            raise InvalidDtypeError(f"out has dtype {out.dtype}; expected float64 (np.zeros((n, n)))")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidArgumentError(
                f"out must be a writeable C-contiguous float64 array, got dtype {out.dtype}, "
                f"c_contiguous={out.flags.c_contiguous}, writeable={out.flags.writeable}"
            )

    # ---------------------------------------------------------------- schedules
    def _check_schedule(self, schedule) -> None:
        super()._check_schedule(schedule)
        if schedule.lower <= 0:
            raise ScheduleError(
                f"the decoder weight must stay > 0, but the schedule reaches {schedule.lower!r}; "
                "use w_start, w_end > 0"
            )

    def _schedule_weight_changed(self, w: float) -> None:
        self.weight = check_finite_scalar(w, "weight", positive=True)
