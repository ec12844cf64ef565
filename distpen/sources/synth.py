"""``synth_gates``: synthetic dense or top-k gates written chunk by chunk on the workers.

Every row chunk is generated from ``(seed, chunk index)`` alone, so the same call gives the same
gates on any cluster, and no process holds more than one chunk.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._validation import check_finite_scalar, check_positive_int
from ..errors import InvalidArgumentError, InvalidDtypeError, StoreConflictError
from .gates import _FLOATS, _FORMAT, _FORMAT_VERSION, open_gates

__all__ = ["synth_gates"]


_GENERATOR = "distpen.synth/1"


# ----------------------------------------------------------------------------- synthetic gates
def _synth_model(k_atoms: int, seed: int, topk: int | None, density: float | None) -> dict:
    """Global parameters of the generator, a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    K = k_atoms
    perm = rng.permutation(K)
    # heavy-tailed (Zipf-like) firing propensity: atom perm[r] has weight 1/(r+1)^0.9
    w = np.empty(K)
    w[perm] = 1.0 / np.arange(1, K + 1) ** 0.9
    n_groups = max(1, K // 64)
    sizes = rng.integers(2, 9, size=n_groups)
    sizes = np.minimum(sizes, max(2, (topk or K) // 2))
    # planted groups: disjoint runs of a second permutation (atoms of every popularity)
    perm2 = rng.permutation(K)
    groups, start = [], 0
    for s in sizes:
        if start + s > K:
            break
        groups.append(np.sort(perm2[start:start + s]))
        start += s
    if K < 2:
        groups = []
    gp = rng.uniform(0.5, 1.5, size=len(groups))
    group_rate = 0.3  # a token fires one planted group with this probability
    model = {"w": w, "groups": groups, "group_p": gp / gp.sum() if len(groups) else gp, "group_rate": group_rate}
    if density is not None:
        # per-atom firing probability p_a = min(1, c·w_a), c solved so that mean(p) = density
        lo, hi = 0.0, 1.0
        while np.minimum(1.0, hi * w).mean() < density and hi < 1e30:
            hi *= 2
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if np.minimum(1.0, mid * w).mean() < density:
                lo = mid
            else:
                hi = mid
        model["p"] = np.minimum(1.0, hi * w)
    else:
        model["cdf"] = np.cumsum(w) / w.sum()
    return model


def _fill_topk_numba():
    from numba import njit

    @njit(cache=True, nogil=True)
    def fill(cand, gidx, gstart, gsize, gatoms, out):
        n, m = cand.shape
        k = out.shape[1]
        for r in range(n):
            p = 0
            g = gidx[r]
            if g >= 0:
                for t in range(gsize[g]):
                    if p < k:
                        out[r, p] = gatoms[gstart[g] + t]
                        p += 1
            for c in range(m):
                if p >= k:
                    break
                a = cand[r, c]
                dup = False
                for q in range(p):
                    if out[r, q] == a:
                        dup = True
                        break
                if not dup:
                    out[r, p] = a
                    p += 1
            for q in range(p, k):
                out[r, q] = -1
    return fill


_FILL = None


def _synth_chunk(c: int, r0: int, r1: int, k_atoms: int, seed: int, topk, density, dtype: str, model_key):
    """Generate and return row chunk ``c`` (rows ``[r0, r1)``); a pure function of its arguments."""
    global _FILL
    model = _model_cache(model_key, k_atoms, seed, topk, density)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, int(c)]))
    n = r1 - r0
    groups = model["groups"]
    ng = len(groups)
    if ng:
        fires = rng.random(n) < model["group_rate"]
        gidx = np.where(fires, rng.choice(ng, size=n, p=model["group_p"]), -1).astype(np.int64)
    else:
        gidx = np.full(n, -1, dtype=np.int64)
    if topk is not None:
        if _FILL is None:
            _FILL = _fill_topk_numba()
        m = 2 * topk + 8
        cand = np.searchsorted(model["cdf"], rng.random((n, m)), side="right").astype(np.int64)
        np.minimum(cand, k_atoms - 1, out=cand)
        gsize = np.array([len(g) for g in groups] or [0], dtype=np.int64)
        gstart = np.concatenate([[0], np.cumsum(gsize)[:-1]]).astype(np.int64)
        gatoms = np.concatenate(groups).astype(np.int64) if ng else np.zeros(1, dtype=np.int64)
        idx = np.empty((n, topk), dtype=np.int64)
        _FILL(cand, gidx, gstart, gsize, gatoms, idx)
        vals = rng.lognormal(-1.0, 0.75, size=(n, topk)).astype(dtype)
        vals[idx < 0] = 0
        return idx.astype(np.int32), vals
    fire = rng.random((n, k_atoms), dtype=np.float32) < model["p"][None, :].astype(np.float32)
    if ng:
        rows = np.flatnonzero(gidx >= 0)
        for g in range(ng):  # loop over planted groups (not tokens)
            sel = rows[gidx[rows] == g]
            if sel.size:
                fire[np.ix_(sel, groups[g])] = True
    vals = np.zeros((n, k_atoms), dtype=dtype)
    vals[fire] = rng.lognormal(-1.0, 0.75, size=int(fire.sum())).astype(dtype)
    return vals


def _model_cache(key, k_atoms, seed, topk, density):
    m = _MODELS.get(key)
    if m is None:
        if len(_MODELS) > 4:
            _MODELS.clear()
        m = _MODELS[key] = _synth_model(k_atoms, seed, topk, density)
    return m


def _synth_write(path: str, c: int, r0: int, r1: int, k_atoms: int, seed: int, topk, density, dtype, key):
    import zarr

    group = zarr.open_group(path, mode="r+")
    out = _synth_chunk(c, r0, r1, k_atoms, seed, topk, density, dtype, key)
    if topk is not None:
        group["indices"][r0:r1] = out[0]
        group["values"][r0:r1] = out[1]
    else:
        group["gates"][r0:r1] = out
    return r1 - r0


def synth_gates(path, n_tokens, k_atoms, *, topk=None, density=None, seed=0, row_chunk=None,
                dtype="float32", overwrite=False, progress=None, client=None):
    """Write realistic synthetic gates to a Zarr group, chunk by chunk, in parallel on the cluster.

    Atoms have heavy-tailed (Zipf-like, exponent 0.9) firing propensities; planted groups of 2–8
    atoms co-fire (a token fires one group with probability 0.3); gate values are log-normal.
    Every row chunk is generated from ``(seed, chunk index)`` alone, so the output is identical for
    a seed whatever the cluster, and no process ever holds more than one chunk.

    Parameters
    ----------
    path : str or os.PathLike
        Output Zarr group.
    n_tokens, k_atoms : int
        ``N`` and ``K``.
    topk : int, optional
        Write top-k gates (``indices`` int32 and ``values`` of shape (N, topk)); slots a token
        could not fill are empty (−1 / 0).
    density : float in (0, 1], optional
        Write dense gates (``gates`` of shape (N, K)) with this mean fraction of non-zeros.
        Default 0.02 when neither ``topk`` nor ``density`` is given.
    seed : int
    row_chunk : int, optional
        Rows per stored chunk (default: about 16 MiB of gates per chunk).
    dtype : {"float32", "float64"}
    overwrite : bool
        Replace an existing store at ``path``.
    progress : callable, optional
        Called as ``progress(done_rows, total_rows)`` after each chunk.
    client : distributed.Client, optional
        Default: :func:`distpen.cluster.get_client`.

    Returns
    -------
    DenseGates or TopKGates
        The written gates (backed by the Zarr arrays).

    Raises
    ------
    InvalidArgumentError
        Non-positive sizes, both ``topk`` and ``density``, ``topk > k_atoms``, density outside (0, 1].
    StoreConflictError
        ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> g = synth_gates("gates.zarr", 100_000, 4096, topk=32, seed=1)   # doctest: +SKIP
    """
    import zarr
    from dask.base import tokenize
    from distributed import as_completed

    from ..cluster import get_client

    n_tokens = check_positive_int(n_tokens, "n_tokens")
    k_atoms = check_positive_int(k_atoms, "k_atoms")
    seed = check_positive_int(seed, "seed", allow_zero=True)
    if topk is not None and density is not None:
        raise InvalidArgumentError(
            f"pass topk (top-k gates) or density (dense gates), not both; got topk={topk}, density={density}"
        )
    if topk is None and density is None:
        density = 0.02
    if topk is not None:
        topk = check_positive_int(topk, "topk")
        if topk > k_atoms:
            raise InvalidArgumentError(f"topk = {topk} exceeds k_atoms = {k_atoms}; expected topk ≤ k_atoms")
    else:
        density = check_finite_scalar(density, "density")
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"density must be in (0, 1], got {density}")
    if np.dtype(dtype) not in _FLOATS:
        raise InvalidDtypeError(f"dtype must be float32 or float64, got {dtype!r}")
    dtype = str(np.dtype(dtype))
    width = topk if topk is not None else k_atoms
    if row_chunk is None:
        row_chunk = max(1, min(n_tokens, (16 * 2**20) // (width * 4)))
    row_chunk = check_positive_int(row_chunk, "row_chunk")
    p = os.fspath(path)
    if os.path.exists(p) and not overwrite:
        raise StoreConflictError(f"{p!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    group = zarr.open_group(p, mode="w")
    rc = min(row_chunk, n_tokens)
    if topk is not None:
        group.create_array("indices", shape=(n_tokens, topk), chunks=(rc, topk), dtype="int32", fill_value=-1)
        group.create_array("values", shape=(n_tokens, topk), chunks=(rc, topk), dtype=dtype, fill_value=0)
    else:
        group.create_array("gates", shape=(n_tokens, k_atoms), chunks=(rc, k_atoms), dtype=dtype, fill_value=0)
    model = _synth_model(k_atoms, seed, topk, density)
    attrs = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "form": "topk" if topk else "dense",
        "k_atoms": k_atoms, "n_tokens": n_tokens, "seed": seed, "generator": _GENERATOR,
        "planted_groups": [g.tolist() for g in model["groups"]], "complete": False,
    }
    if topk:
        attrs.update(topk=topk, index_range=[-1, k_atoms - 1])
    else:
        attrs.update(density=density)
    group.attrs.update(attrs)

    client = client or get_client()
    key = tokenize(_GENERATOR, k_atoms, seed, topk, density)
    n_chunks = math.ceil(n_tokens / rc)
    bounds = [(c, c * rc, min(n_tokens, (c + 1) * rc)) for c in range(n_chunks)]
    in_flight = max(4, 3 * len(client.scheduler_info().get("workers", {}) or [1]))
    ac = as_completed(loop=client.loop)
    it = iter(bounds)
    done_rows = 0
    tok = tokenize(p, n_tokens, rc, key, dtype)

    def submit_next():
        nxt = next(it, None)
        if nxt is not None:
            c, r0, r1 = nxt
            ac.add(client.submit(_synth_write, p, c, r0, r1, k_atoms, seed, topk, density, dtype, key,
                                 key=f"distpen-synth-{tok}-{c}", pure=False, retries=1))

    for _ in range(in_flight):
        submit_next()
    for fut in ac:
        done_rows += fut.result()
        fut.release()
        if progress is not None:
            progress(done_rows, n_tokens)
        submit_next()
    group.attrs["complete"] = True
    return open_gates(p)


_MODELS: dict = {}
