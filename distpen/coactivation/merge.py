"""``merge_stats``: the exact merge of the statistics of two disjoint token sets, tile by tile."""

from __future__ import annotations

import math
import os

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError, ShapeMismatchError
from ..store import local_store_path
from ._store import _prepare_store
from .plan import _FORMAT_VERSION, _parse_unit, _tiles, _unit
from .stats import CoactivationStats, open_stats

__all__ = ["merge_stats"]


# ============================================================================ merge
def _merge_tile(a: CoactivationStats, b: CoactivationStats, out: str, I: int, J: int, T: int, job) -> dict:
    import zarr

    K = a.k_atoms
    group = zarr.open_group(out, mode="r+")
    i0, i1, j0, j1 = I * T, min(K, (I + 1) * T), J * T, min(K, (J + 1) * T)
    outputs = []
    ps = a.block(i0, i1, j0, j1, "pair_sum") + b.block(i0, i1, j0, j1, "pair_sum")
    pc = a.block(i0, i1, j0, j1, "pair_count") + b.block(i0, i1, j0, j1, "pair_count")
    if I == J:
        for name in ("fire_count", "gate_sum", "gate_sq_sum"):
            arr = group[name]
            arr[i0:i1] = np.asarray(a._group[name][i0:i1]) + np.asarray(b._group[name][i0:i1])
            outputs.append(f"{name}/" + arr.metadata.chunk_key_encoding.encode_chunk_key((I,)))
    for name, val in (("pair_sum", ps), ("pair_count", pc)):
        arr = group[name]
        arr[i0:i1, j0:j1] = val
        outputs.append(f"{name}/" + arr.metadata.chunk_key_encoding.encode_chunk_key((I, J)))
    outputs = [o for o in outputs if os.path.exists(os.path.join(out, o))]
    job.mark_done(_unit(I, J), outputs, info={"nonzero": bool(ps.any() or pc.any())})
    return {"unit": _unit(I, J)}


def merge_stats(a, b, out, *, tile=None, overwrite=False, client=None) -> CoactivationStats:
    """Exact merge of the statistics of two disjoint token sets: every sum and count adds.

    Parameters
    ----------
    a, b : CoactivationStats or path
        Statistics over the same atoms (their tile sizes may differ).
    out : path
        The merged store; tile by tile on the cluster, resumable like :func:`coactivation_stats`.
    tile : int, optional
        Tile size of the output (default: ``a``'s).
    overwrite : bool

    Returns
    -------
    CoactivationStats

    Raises
    ------
    ShapeMismatchError
        ``a`` and ``b`` have different ``k_atoms``.
    InvalidArgumentError
        One counts per token and the other per window, or their windows differ.
    StoreConflictError
        ``out`` holds another job and ``overwrite`` is False.

    Examples
    --------
    >>> merged = merge_stats("stats-shard0.zarr", "stats-shard1.zarr", "stats-all.zarr")   # doctest: +SKIP
    """
    from distributed import wait

    from ..cluster import get_client

    a = a if isinstance(a, CoactivationStats) else open_stats(a)
    b = b if isinstance(b, CoactivationStats) else open_stats(b)
    if a.k_atoms != b.k_atoms:
        raise ShapeMismatchError(
            f"cannot merge statistics over different atoms: a has k_atoms = {a.k_atoms}, b has {b.k_atoms}"
        )
    if (a.window, a.seq_len) != (b.window, b.seq_len):
        def what(s):
            return "per token" if s.window is None else f"per window of {s.window} (seq_len {s.seq_len})"
        raise InvalidArgumentError(
            f"cannot merge statistics counted {what(a)} ({a.path}) with statistics counted {what(b)} ({b.path})"
        )
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidArgumentError(f"out must be a local path to a Zarr group, got {type(out).__name__}")
    out = local_store_path(out)
    if out in (a.path, b.path):
        raise InvalidArgumentError(f"merge_stats: out {out!r} must differ from the inputs")
    K = a.k_atoms
    T = min(check_positive_int(tile, "tile"), K) if tile is not None else a.tile_size
    nb = math.ceil(K / T)
    units = [_unit(i, j) for i, j in _tiles(nb)]
    spec = {"kind": "merge", "version": _FORMAT_VERSION, "k_atoms": K, "tile": T,
            "inputs": [{"path": a.path, "fingerprint": a.fingerprint, "n_tokens": a.n_tokens},
                       {"path": b.path, "fingerprint": b.fingerprint, "n_tokens": b.n_tokens}]}
    N = a.n_tokens + b.n_tokens
    meta = {"n_tokens": N, "k_atoms": K, "tile": T, "merged_from": [a.path, b.path]}
    if a.window is not None:
        meta.update(window=a.window, seq_len=a.seq_len, n_source_tokens=a.n_source_tokens + b.n_source_tokens)
    _, job = _prepare_store(out, spec, units, meta, overwrite)
    client = client or get_client()
    pending = [_parse_unit(u) for u in job.pending()]
    futs = [client.submit(_merge_tile, a, b, out, I, J, T, job, key=f"distpen-merge-{job.fingerprint}-{I}-{J}")
            for I, J in pending]
    try:
        wait(futs)
        client.gather(futs)
    except BaseException as exc:
        job.fail(f"{type(exc).__name__}: {exc}")
        raise
    job.finish(units_computed=len(pending))
    return CoactivationStats(out)
