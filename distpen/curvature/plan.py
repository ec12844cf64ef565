"""Owner-computes partitions of a decoder penalty over atom ranges.

Atoms are cut into contiguous ranges of balanced cost (Σ over each atom's pairs of
``M_a·M_b·p_out``). The task owning a range receives the pairs that touch it, reads the decoder
blocks of those pairs' atoms, and computes the rows of its own atoms of every vector result (so
each output chunk is written by exactly one task, with no shuffle) and the value of the pairs whose
``j`` it owns (so values tree-sum to the total). :class:`DecoderPlan` holds the ranges and, for
workers that read ``t`` from Zarr, self-contained parts with renumbered local penalties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..pairs import PairTable
from ..penalties import DecoderIncoherencePenalty
from ._common import SHARED_PAIRS_LIMIT

__all__ = ["partition_atoms", "DecoderPlan"]


# --------------------------------------------------------------------------- partitioning
def atom_costs(pen: DecoderIncoherencePenalty) -> np.ndarray:
    """Work of owning each atom: ``M_a·p·(1 + Σ_{b~a} M_b)``."""
    m = pen.block_sizes.astype(np.float64)
    pairs = pen.pairs
    partner_rows = (np.bincount(pairs.j, weights=m[pairs.k], minlength=pen.k_atoms)
                    + np.bincount(pairs.k, weights=m[pairs.j], minlength=pen.k_atoms))
    return m * pen.p_out * (1.0 + partner_rows)


def partition_atoms(pen: DecoderIncoherencePenalty, n_parts: int) -> np.ndarray:
    """Cut atoms into at most ``n_parts`` contiguous ranges of balanced cost; returns the ``n+1`` atom bounds."""
    K = pen.k_atoms
    n_parts = max(1, min(int(n_parts), K))
    cost = np.cumsum(atom_costs(pen))
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    return np.unique(np.concatenate([[0], np.clip(cuts, 1, K), [K]])).astype(np.int64)


def chunk_aligned_bounds(pen: DecoderIncoherencePenalty, chunk: int, n_parts: int) -> np.ndarray:
    """Coefficient bounds that are multiples of ``chunk`` (Zarr chunk edges), balanced by cost."""
    n = pen.n_coef
    n_chunks = -(-n // chunk)
    n_parts = max(1, min(int(n_parts), n_chunks))
    # cost of each Zarr chunk: cost of the atoms starting in it
    starts = pen.layout.offsets[:-1]
    per_chunk = np.bincount(starts // chunk, weights=atom_costs(pen), minlength=n_chunks)
    cost = np.cumsum(per_chunk) + np.arange(1, n_chunks + 1)  # never zero-cost chunks
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    chunk_edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_chunks), [n_chunks]]))
    return np.minimum(chunk_edges.astype(np.int64) * chunk, n)


class _Range(NamedTuple):
    """One part of an owner-computes split, in global numbering."""

    index: int
    lo: int      # owned atoms [lo, hi): their rows of every vector result
    hi: int
    vlo: int     # value atoms [vlo, vhi): the pairs whose j lies here count towards the value
    vhi: int
    c0: int      # the coefficient range [c0, c1) this part writes
    c1: int

    @property
    def trim(self) -> tuple[int, int]:
        return self.c0 - self.row0, self.c1 - self.row0

    row0: int = 0  # first coefficient of atom lo


@dataclass
class _Part:
    """A part made self-contained for a worker that holds neither ``t`` nor the pairs: the pairs
    touching its atoms, renumbered onto the atoms they touch, and where to read those atoms' blocks."""

    index: int
    c0: int
    c1: int
    local: DecoderIncoherencePenalty  # penalty over the local atoms, pairs renumbered
    starts: np.ndarray           # global offsets of the local atoms' blocks (for reading t, v)
    lengths: np.ndarray
    out_atoms: tuple[int, int]   # local ids of the owned atoms
    value_atoms: tuple[int, int]
    trim: tuple[int, int]        # slice of the owned rows that falls in [c0, c1)
    atoms: np.ndarray = field(repr=False, default=None)  # global ids of the local atoms


class DecoderPlan:
    """The owner-computes split of a decoder penalty into parts (see the module docstring).

    Parameters
    ----------
    pen : DecoderIncoherencePenalty
    bounds : array of int
        Coefficient bounds ``0 = c_0 < … < c_n = n_coef`` of the parts.

    ``ranges`` describe the parts in global numbering (for workers that hold the whole penalty and
    ``t``); ``parts`` (built on first use) are self-contained for workers that read ``t`` from Zarr.
    """

    def __init__(self, pen: DecoderIncoherencePenalty, bounds: np.ndarray):
        self.pen = pen
        self.bounds = np.asarray(bounds, dtype=np.int64)
        off = pen.layout.offsets
        c0, c1 = self.bounds[:-1], self.bounds[1:]
        lo = np.searchsorted(off, c0, side="right") - 1
        hi = np.searchsorted(off, c1, side="left")
        vlo = np.searchsorted(off[:-1], c0, side="left")
        vhi = np.searchsorted(off[:-1], c1, side="left")
        self.ranges = [_Range(i, int(lo[i]), int(hi[i]), int(vlo[i]), int(vhi[i]), int(c0[i]), int(c1[i]),
                              int(off[lo[i]])) for i in range(c0.shape[0])]
        self._parts = None

    @classmethod
    def balanced(cls, pen, n_parts: int, chunk: int | None = None) -> "DecoderPlan":
        if chunk is None:
            atoms = partition_atoms(pen, n_parts)
            return cls(pen, pen.layout.offsets[atoms])
        return cls(pen, chunk_aligned_bounds(pen, chunk, n_parts))

    @property
    def parts(self) -> list[_Part]:
        if self._parts is None:
            perm_k = np.argsort(self.pen.pairs.k, kind="stable")
            k_sorted = self.pen.pairs.k[perm_k]
            self._parts = [self._make_part(r, perm_k, k_sorted) for r in self.ranges]
        return self._parts

    def _make_part(self, r: _Range, perm_k, k_sorted) -> _Part:
        pen, lay, pairs = self.pen, self.pen.layout, self.pen.pairs
        off = lay.offsets
        lo, hi = r.lo, r.hi
        # pairs touching [lo, hi): j in range (a contiguous slice) or k in range with j before it
        q0, q1 = np.searchsorted(pairs.j, [lo, hi])
        a, b = np.searchsorted(k_sorted, [lo, hi])
        from_k = perm_k[a:b]
        from_k = from_k[pairs.j[from_k] < lo]
        idx = np.concatenate([np.arange(q0, q1), np.sort(from_k)])
        idx.sort()
        sub = PairTable(pairs.j[idx], pairs.k[idx], pairs.w[idx], pairs.k_atoms, _trusted=True)
        atoms = np.union1d(sub.atoms(), np.arange(lo, hi, dtype=np.int64))
        if atoms.shape[0] < 2:  # a layout needs two atoms; add a neighbour that plays no part
            atoms = np.union1d(atoms, [0 if atoms[0] != 0 else 1])
        local_pairs, _ = sub.restrict(atoms)
        local = pen.with_pairs(local_pairs, lay.subset(atoms))
        llo = int(np.searchsorted(atoms, lo))
        lvlo, lvhi = (int(x) for x in np.searchsorted(atoms, [r.vlo, r.vhi]))
        return _Part(r.index, r.c0, r.c1, local, off[atoms].copy(), lay.block_sizes[atoms] * lay.p_out,
                     (llo, llo + (hi - lo)), (lvlo, lvhi), r.trim, atoms)

    def __len__(self) -> int:
        return len(self.ranges)


def shared_mode(pen: DecoderIncoherencePenalty, *sources) -> bool:
    """Whether workers should hold the whole penalty and ``t`` (numpy inputs, pairs ≤ 1 GiB)."""
    return all(s is None or s.kind == "numpy" for s in sources) and 24 * len(pen.pairs) <= SHARED_PAIRS_LIMIT


def _atom_aligned_bounds(pen, n_parts: int, atoms_per_chunk: int) -> np.ndarray:
    """Atom bounds that are multiples of ``atoms_per_chunk`` (Zarr chunk edges of ``S``), cost-balanced."""
    K = pen.k_atoms
    n_chunks = -(-K // atoms_per_chunk)
    per_chunk = np.bincount(np.arange(K) // atoms_per_chunk, weights=atom_costs(pen), minlength=n_chunks)
    cost = np.cumsum(per_chunk) + np.arange(1, n_chunks + 1)
    n_parts = max(1, min(int(n_parts), n_chunks))
    targets = cost[-1] * np.arange(1, n_parts) / n_parts
    cuts = np.searchsorted(cost, targets, side="left") + 1
    edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_chunks), [n_chunks]]))
    return np.minimum(edges.astype(np.int64) * atoms_per_chunk, K)
