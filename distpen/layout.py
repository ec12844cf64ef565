"""Coefficient layouts: penalty tiers, ψ slices and the decoder β layout (docs/design.md)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from ._validation import check_int_array, check_positive_int, check_vector
from .errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["PenaltyTier", "PsiSlice", "DecoderLayout"]

#: The remedy repeated by every length-mismatch message about β.
BETA_REMEDY = "pass the decoder coefficients of the same atoms, in atom order, each block row-major (M_k × p_out)"


class PenaltyTier(enum.Enum):
    """Which parameter vector of a fit a penalty acts on."""

    BETA = "beta"
    PSI = "psi"
    RHO = "rho"

    @classmethod
    def parse(cls, value) -> "PenaltyTier":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidArgumentError(
                f"tier must be one of {[t.name for t in cls]}, got {value!r}"
            ) from None


@dataclass(frozen=True)
class PsiSlice:
    """A contiguous slice ``[start, stop)`` of the ψ vector holding an ``n_rows × latent_dim`` target.

    Examples
    --------
    >>> s = PsiSlice(10, 22, latent_dim=4)
    >>> s.size, s.n_rows
    (12, 3)
    """

    start: int
    stop: int
    latent_dim: int | None = None

    def __post_init__(self):
        start = check_positive_int(self.start, "PsiSlice.start", allow_zero=True)
        stop = check_positive_int(self.stop, "PsiSlice.stop")
        if stop <= start:
            raise InvalidArgumentError(
                f"PsiSlice.stop must be > start, got start={start}, stop={stop}"
            )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        if self.latent_dim is not None:
            f = check_positive_int(self.latent_dim, "PsiSlice.latent_dim")
            if (stop - start) % f:
                raise ShapeMismatchError(
                    f"PsiSlice of size {stop - start} is not a multiple of latent_dim {f}"
                )
            object.__setattr__(self, "latent_dim", f)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def n_rows(self) -> int:
        return self.size // (self.latent_dim or self.size)

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)

    def take(self, psi: np.ndarray) -> np.ndarray:
        """Return the view ``psi[start:stop]`` after checking ``psi`` is long enough."""
        psi = np.asarray(psi)
        if psi.ndim != 1 or psi.shape[0] < self.stop:
            raise ShapeMismatchError(
                f"psi of shape {psi.shape} is too short for {self!r}; expected ≥ {self.stop} entries"
            )
        return psi[self.start:self.stop]


class DecoderLayout:
    """Layout of a flat β vector: atom ``k`` owns ``B_k ∈ ℝ^{M_k × p_out}`` at ``offsets[k]``.

    Parameters
    ----------
    block_sizes : array of shape (k_atoms,)
        ``M_k`` ≥ 1 rows per atom; at least two atoms.
    p_out : int
        Columns of every block (> 0).

    Examples
    --------
    >>> lay = DecoderLayout([1, 2], 3)
    >>> lay.n_coef, list(lay.offsets)
    (9, [0, 3, 9])
    >>> lay.block(np.arange(9.0), 1)
    array([[3., 4., 5.],
           [6., 7., 8.]])
    """

    def __init__(self, block_sizes, p_out: int):
        sizes = check_int_array(block_sizes, "block_sizes")
        self.p_out = check_positive_int(p_out, "p_out")
        if sizes.shape[0] < 2:
            raise InvalidArgumentError(
                f"block_sizes must describe at least two atoms (pairs need two blocks), "
                f"got {sizes.shape[0]}"
            )
        if (sizes <= 0).any():
            bad = int(np.flatnonzero(sizes <= 0)[0])
            raise InvalidArgumentError(
                f"block_sizes must all be ≥ 1, but block_sizes[{bad}] = {sizes[bad]}"
            )
        self.block_sizes = sizes.copy()  # never freeze or alias the caller's array
        self.block_sizes.setflags(write=False)
        row_offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
        np.cumsum(sizes, out=row_offsets[1:])
        self.row_offsets = row_offsets
        self.row_offsets.setflags(write=False)
        self.offsets = row_offsets * self.p_out
        self.offsets.setflags(write=False)

    @property
    def k_atoms(self) -> int:
        return int(self.block_sizes.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def n_coef(self) -> int:
        return int(self.offsets[-1])

    @property
    def max_block(self) -> int:
        return int(self.block_sizes.max())

    def check_beta(self, t, name: str = "t") -> np.ndarray:
        """Validate a flat β of the right length; return it as contiguous float64."""
        t = check_vector(t, name)
        if t.shape[0] == 0:
            raise InvalidArgumentError(f"{name} is empty; expected {self.n_coef} coefficients")
        if t.shape[0] != self.n_coef:
            raise ShapeMismatchError(
                f"block_sizes sum to {self.n_rows} rows × p_out {self.p_out} = {self.n_coef} "
                f"coefficients, but {name} has {t.shape[0]}; {BETA_REMEDY}"
            )
        return t

    def block(self, t: np.ndarray, k: int) -> np.ndarray:
        """A view of ``B_k`` (``M_k × p_out``) inside the flat vector ``t``."""
        return t[self.offsets[k]:self.offsets[k + 1]].reshape(self.block_sizes[k], self.p_out)

    def blocks(self, t: np.ndarray) -> list[np.ndarray]:
        """Views of every block, in atom order."""
        return [self.block(t, k) for k in range(self.k_atoms)]

    def rows(self, t: np.ndarray) -> np.ndarray:
        """``t`` viewed as the stacked ``(Σ M_k) × p_out`` matrix of all block rows."""
        return t.reshape(self.n_rows, self.p_out)

    def padded(self, t: np.ndarray, m_max: int | None = None) -> np.ndarray:
        """Blocks zero-padded to a common row count: array of shape ``(k_atoms, m_max, p_out)``."""
        m_max = self.max_block if m_max is None else int(m_max)
        if m_max < self.max_block:
            raise InvalidArgumentError(f"m_max = {m_max} is smaller than the largest block {self.max_block}")
        out = np.zeros((self.k_atoms, m_max, self.p_out))
        atom = np.repeat(np.arange(self.k_atoms), self.block_sizes)
        row = np.arange(self.n_rows) - self.row_offsets[atom]
        out[atom, row] = self.rows(t)
        return out

    def atom_of_coef(self, idx) -> np.ndarray:
        """Atom owning each flat coefficient index."""
        return np.searchsorted(self.offsets, np.asarray(idx), side="right") - 1

    def coef_range(self, atom_lo: int, atom_hi: int) -> tuple[int, int]:
        """Flat range ``[start, stop)`` of atoms ``atom_lo ≤ k < atom_hi``."""
        return int(self.offsets[atom_lo]), int(self.offsets[atom_hi])

    def subset(self, atoms) -> "DecoderLayout":
        """Layout of the given atoms only, in the given order."""
        return DecoderLayout(self.block_sizes[np.asarray(atoms, dtype=np.int64)], self.p_out)

    def gather(self, t: np.ndarray, atoms) -> np.ndarray:
        """Concatenate the blocks of ``atoms`` (in order) into one flat vector."""
        atoms = np.asarray(atoms, dtype=np.int64)
        idx = _ranges(self.offsets[atoms], self.offsets[atoms + 1])
        return t[idx]

    def scatter_index(self, atoms) -> np.ndarray:
        """Flat indices into the full β of the blocks of ``atoms`` (in order)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        return _ranges(self.offsets[atoms], self.offsets[atoms + 1])

    def block_matmul(self, t: np.ndarray, mats: np.ndarray, atoms=None) -> np.ndarray:
        """``V_a @ mats[i]`` for each atom ``a = atoms[i]`` (all atoms by default), as one flat vector.

        ``t`` holds the blocks of exactly those atoms, in order; ``mats`` is ``(n_atoms, p, p)``.
        Atoms are grouped by block size, so there is one batched matmul per distinct ``M``.
        """
        atoms = np.arange(self.k_atoms) if atoms is None else np.asarray(atoms, dtype=np.int64)
        sizes = self.block_sizes[atoms]
        p = self.p_out
        if mats.shape != (atoms.shape[0], p, p):
            raise ShapeMismatchError(f"mats has shape {mats.shape}, expected ({atoms.shape[0]}, {p}, {p})")
        if t.shape[0] != int(sizes.sum()) * p:
            raise ShapeMismatchError(f"t has {t.shape[0]} entries, expected {int(sizes.sum()) * p}")
        if atoms.shape[0] and sizes.min() == sizes.max():  # one block size: a batched matmul, no gather
            return np.matmul(t.reshape(atoms.shape[0], int(sizes[0]), p), mats).ravel()
        rows = t.reshape(-1, p)
        out = np.empty_like(rows)
        first_row = np.zeros(atoms.shape[0], dtype=np.int64)
        np.cumsum(sizes[:-1], out=first_row[1:])
        for m in np.unique(sizes):  # at most a handful of distinct block sizes
            sel = np.flatnonzero(sizes == m)
            idx = first_row[sel][:, None] + np.arange(m)[None, :]
            out[idx] = np.matmul(rows[idx], mats[sel])
        return out.ravel()

    def to_spec(self) -> dict:
        return {"block_sizes": self.block_sizes.tolist(), "p_out": self.p_out}

    def __eq__(self, other):
        return (isinstance(other, DecoderLayout) and self.p_out == other.p_out
                and np.array_equal(self.block_sizes, other.block_sizes))

    def __repr__(self) -> str:
        return (f"DecoderLayout(k_atoms={self.k_atoms}, p_out={self.p_out}, "
                f"rows={self.n_rows}, n_coef={self.n_coef})")


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], stops[i])`` without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.zeros(lengths.shape[0], dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_start[1:])
    shift = np.repeat(starts - seg_start, lengths)
    return np.arange(total, dtype=np.int64) + shift
