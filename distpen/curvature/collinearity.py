"""``collinearity_gate``: select penalised pairs by the collinearity of their decoder blocks, on a cluster.

The overlap of a candidate pair, ``o_jk = ‖B_j B_kᵀ‖²_F / (‖B_j B_jᵀ‖_F ‖B_k B_kᵀ‖_F)``, and its smoothstep
gate are the in-memory kernels of :mod:`distpen.penalties.collinearity`; this module runs them over
chunks of the candidate table. A task receives its chunk of pairs, reads only the decoder blocks
those pairs touch (numpy ``t`` is broadcast once; a Zarr ``t`` is read by the tasks themselves),
renumbers the pairs onto those atoms and calls the kernel. The client concatenates the chunks in
table order, so the result does not depend on the chunking.
"""

from __future__ import annotations

import math

import numpy as np

from .._validation import check_positive_int
from .._workers import kernel_threads, threads_per_task
from ..cluster import n_workers
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..layout import DecoderLayout
from ..pairs import PairTable
from ..penalties.collinearity import check_low, pair_overlap, smoothstep_gate
from ._common import _client
from ._vectors import VectorSource, as_vector_source

__all__ = ["collinearity_gate", "DEFAULT_CHUNK_PAIRS"]

#: candidate pairs per task when the caller gives no ``chunk_pairs``: random candidates touch most of
#: the decoder, so every task reads nearly all of it; fewer, larger tasks read it fewer times
DEFAULT_CHUNK_PAIRS = 1 << 20


def _gate_chunk(j: np.ndarray, k: np.ndarray, t_src: VectorSource, t_payload, block_sizes: np.ndarray,
                p_out: int, threads: int) -> np.ndarray:
    """Worker task: the overlaps of one chunk of candidate pairs, from the blocks they touch only.

    When the touched atoms cover most of the span between the first and the last of them (random
    candidates over many atoms do), the span is read as one slice and its atoms used in place:
    gathering nearly the whole decoder into a compact copy would cost more than the few untouched
    blocks read along.
    """
    lay = DecoderLayout(block_sizes, p_out)
    atoms = np.union1d(j, k)
    a0, a1 = int(atoms[0]), int(atoms[-1]) + 1
    touched = int(np.sum(lay.block_sizes[atoms]))
    if 2 * touched >= int(lay.offsets[a1] - lay.offsets[a0]) // p_out and a1 - a0 >= 2:
        atoms = np.arange(a0, a1, dtype=np.int64)  # the whole span: one contiguous read
    elif atoms.shape[0] < 2:  # a layout needs two atoms; add one that plays no part
        atoms = np.union1d(atoms, [0 if atoms[0] != 0 else 1])
    local, _ = PairTable(j, k, np.ones(j.shape[0]), lay.k_atoms, _trusted=True).restrict(atoms)
    with kernel_threads(threads):
        t_local = t_src.read_ranges(lay.offsets[atoms], lay.block_sizes[atoms] * p_out, t_payload)
        return pair_overlap(local, t_local, lay.subset(atoms))


def collinearity_gate(pairs: PairTable, t, block_sizes, p_out: int, *, low: float = 0.5, out=None,
                      chunk_pairs: int | None = None, return_overlap: bool = False, client=None):
    """Keep the candidate pairs whose decoder blocks overlap, weighted by the smoothstep gate.

    For each candidate ``(j, k, w)``: the overlap ``o_jk`` (in [0, 1]; 0 when a block is zero), the
    gate ``g = u²(3 − 2u)`` with ``u = clamp((o − low)/(1 − low), 0, 1)``, and the pair kept with
    weight ``w·g`` when ``g > 0``. See ``docs/design.md`` for where this comes from and how it
    combines with co-activation (gate the pairs co-activation selected).

    Parameters
    ----------
    pairs : PairTable
        Candidate pairs, e.g. from :meth:`~distpen.CoactivationStats.pairs`.
    t : array of shape (Σ block_sizes · p_out,)
        The flat decoder β: numpy, dask or a Zarr array (read by the tasks, block by block).
    block_sizes : array of int, shape (K,)
    p_out : int
    low : float in [0, 1)
        Overlaps at or below ``low`` get gate 0; overlap 1 gets gate 1.
    out : path, optional
        Also write the kept pairs there (:meth:`PairTable.save`) with the arrays ``candidate_j``,
        ``candidate_k`` and ``overlap`` of every candidate, for plotting.
    chunk_pairs : int, optional
        Candidate pairs per task (default :data:`DEFAULT_CHUNK_PAIRS`, at least one task per worker).
    return_overlap : bool
        Return ``(kept, overlap)`` instead of ``kept``.
    client : distributed.Client, optional

    Returns
    -------
    PairTable, or (PairTable, ndarray of shape (len(pairs),))

    Raises
    ------
    InvalidArgumentError, ShapeMismatchError
        Before any work: pairs over other atoms, a ``t`` of the wrong length or not finite, a bad
        ``low`` or ``chunk_pairs``.

    Examples
    --------
    >>> kept = dp.collinearity_gate(stats.pairs(top_m=32), beta, block_sizes, p_out=64)   # doctest: +SKIP
    """
    if not isinstance(pairs, PairTable):
        raise InvalidArgumentError(f"pairs must be a PairTable, got {type(pairs).__name__}")
    low = check_low(low)
    lay = DecoderLayout(block_sizes, p_out)
    if pairs.k_atoms != lay.k_atoms:
        raise ShapeMismatchError(
            f"pairs index k_atoms = {pairs.k_atoms} atoms but block_sizes describe {lay.k_atoms}; "
            "build the pairs over the same atoms as the decoder"
        )
    cp = DEFAULT_CHUNK_PAIRS if chunk_pairs is None else check_positive_int(chunk_pairs, "chunk_pairs")
    client = client or _client()
    t_src, _ = as_vector_source(t, lay.n_coef, "t", client=client)
    n = len(pairs)
    if n == 0:
        kept, overlap = PairTable([], [], [], pairs.k_atoms), np.zeros(0)
    else:
        threads = threads_per_task(client)
        n_chunks = min(n, max(math.ceil(n / cp), n_workers(client)))  # each task reads its blocks once
        bounds = np.linspace(0, n, n_chunks + 1).astype(np.int64)
        sizes = lay.block_sizes
        futs = [client.submit(_gate_chunk, pairs.j[a:b], pairs.k[a:b], t_src.meta(), t_src.task_payload(),
                              sizes, lay.p_out, threads, pure=False)
                for a, b in zip(bounds[:-1], bounds[1:])]
        try:
            overlap = np.concatenate(client.gather(futs))
        finally:
            for f in futs:
                f.release()
        g = smoothstep_gate(overlap, low)
        keep = g > 0
        kept = PairTable(pairs.j[keep], pairs.k[keep], pairs.w[keep] * g[keep], pairs.k_atoms, _trusted=True)
    if out is not None:
        import zarr

        kept.save(out)
        group = zarr.open_group(str(out), mode="r+")
        for name, arr in (("candidate_j", pairs.j), ("candidate_k", pairs.k), ("overlap", overlap)):
            z = group.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 20)),), dtype=arr.dtype,
                                   fill_value=0)
            if n:
                z[:] = arr
        group.attrs.update({"collinearity_low": low})
    return (kept, overlap) if return_overlap else kept
