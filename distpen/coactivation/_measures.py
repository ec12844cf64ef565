"""Measures of a tile of co-activation statistics, and the per-tile selections the read side runs.

Shared by :mod:`.stats` (``pairs``, ``neighbours``) and :mod:`.clusters`: pure functions of a
tile and the store's per-atom vectors, run on the workers tile by tile.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

__all__ = ["MEASURES", "Tile", "tile_measure"]

#: the measures :meth:`CoactivationStats.pairs` derives from the stored sums (no pass over the tokens)
MEASURES = ("mean", "count", "jaccard", "cosine", "lift", "npmi", "phi", "pearson", "dice")

Tile = namedtuple("Tile", ["rows", "cols", "pair_sum", "pair_count"])
Tile.__doc__ = """One block of the symmetric statistics: atom ``rows`` × atom ``cols`` (slices) and
the ``pair_sum`` (float64) and ``pair_count`` (int64) arrays of that block."""


def tile_measure(stats, I, J, measure, threshold, min_count):
    """``(values, eligible)`` of shape (n_I, n_J) for tile ``(I, J)`` of ``stats`` (anything with
    ``tile``, ``n_tokens``, ``fire_count``, ``gate_sum``, ``gate_sq_sum``); eligible excludes a == b."""
    t = stats.tile(I, J)
    ps, pc = t.pair_sum, t.pair_count
    n = float(stats.n_tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure == "mean":
            M = ps / n
            ok = np.ones(ps.shape, dtype=bool)
        elif measure == "count":
            M = pc.astype(np.float64)
            ok = np.ones(ps.shape, dtype=bool)
        elif measure == "jaccard":
            f = stats.fire_count.astype(np.float64)
            den = f[t.rows][:, None] + f[t.cols][None, :] - pc
            ok = den > 0
            M = np.where(ok, pc / np.where(ok, den, 1.0), 0.0)
        elif measure == "cosine":
            q = stats.gate_sq_sum
            den = np.sqrt(q[t.rows][:, None] * q[t.cols][None, :])
            ok = den > 0
            M = np.where(ok, ps / np.where(ok, den, 1.0), 0.0)
        elif measure == "lift":
            f = stats.fire_count.astype(np.float64)
            den = f[t.rows][:, None] * f[t.cols][None, :]
            ok = den > 0
            M = np.where(ok, pc * n / np.where(ok, den, 1.0), 0.0)
        elif measure == "dice":
            f = stats.fire_count.astype(np.float64)
            den = f[t.rows][:, None] + f[t.cols][None, :]
            ok = den > 0
            M = np.where(ok, 2.0 * pc / np.where(ok, den, 1.0), 0.0)
        elif measure == "npmi":  # log(p_jk / (p_j p_k)) / −log p_jk on firing probabilities
            pr = stats.fire_count.astype(np.float64) / n
            pjk = pc / n
            ok = (pc > 0) & (pc < n)  # c = 0: log 0; c = N: −log 1 = 0
            safe = np.where(ok, pjk, 0.5)
            M = np.where(ok, np.log(safe / (pr[t.rows][:, None] * pr[t.cols][None, :]))
                         / -np.log(safe), 0.0)
        elif measure == "phi":  # correlation of the firing indicators
            pr = stats.fire_count.astype(np.float64) / n
            var = pr * (1.0 - pr)
            den = np.sqrt(var[t.rows][:, None] * var[t.cols][None, :])
            ok = den > 0
            M = np.where(ok, (pc / n - pr[t.rows][:, None] * pr[t.cols][None, :]) / np.where(ok, den, 1.0), 0.0)
        else:  # pearson: correlation of the gate values
            mu = stats.gate_sum / n
            var = np.maximum(stats.gate_sq_sum / n - mu * mu, 0.0)
            den = np.sqrt(var[t.rows][:, None] * var[t.cols][None, :])
            ok = den > 0
            cov = ps / n - mu[t.rows][:, None] * mu[t.cols][None, :]
            M = np.where(ok, cov / np.where(ok, den, 1.0), 0.0)
    ok &= (M > threshold) & (pc >= min_count)
    if I == J:
        np.fill_diagonal(ok, False)
    return M, ok


class _InProcess:
    """The two client calls :meth:`CoactivationStats.pairs` makes, run in this process, in order."""

    def map(self, fn, *iterables, key=None):
        return [fn(*args) for args in zip(*iterables)]

    def gather(self, values):
        return values


def _top_values(M, ok, m, axis):
    """The m largest eligible values along ``axis`` (descending, padded with -inf)."""
    V = np.where(ok, M, -np.inf)
    if axis == 0:
        V = V.T
    n, w = V.shape
    if w > m:
        V = -np.partition(-V, m - 1, axis=1)[:, :m]
    V = -np.sort(-V, axis=1)
    if V.shape[1] < m:
        V = np.concatenate([V, np.full((n, m - V.shape[1]), -np.inf)], axis=1)
    return V


def _tile_topm(stats, tile, m, opts):
    I, J = tile
    M, ok = stats._tile_measure(I, J, *opts)
    return _top_values(M, ok, m, 1), (None if I == J else _top_values(M, ok, m, 0))


def _merge_topm(b, parts, m, T, K):
    """θ for atom block ``b``: the m-th largest eligible partner value (-inf if fewer than m)."""
    n = min(K, (b + 1) * T) - b * T
    cands = [p[side] for p, side in parts]
    allv = np.concatenate(cands, axis=1) if cands else np.full((n, m), -np.inf)
    top = _top_values(allv, np.ones(allv.shape, dtype=bool), m, 1)
    return top[:, m - 1]


def _tile_pairs(stats, tile, opts, theta):
    I, J = tile
    M, ok = stats._tile_measure(I, J, *opts)
    if theta is not None:
        th_i, th_j = theta
        ok &= (M >= th_i[:, None]) | (M >= th_j[None, :])
    if I == J:
        ok &= np.triu(np.ones(ok.shape, dtype=bool), 1)
    a, b = np.nonzero(ok)
    T = stats.tile_size
    return (a + I * T).astype(np.int64), (b + J * T).astype(np.int64), M[a, b].astype(np.float64)


def top_m_theta(stats, tiles, top_m, opts, client, name: str, tile_fn=_tile_topm, stats_arg=None):
    """Each latent's ``top_m``-th strongest eligible partner value (−inf when it has fewer), over
    ``tiles``: per tile the ``top_m`` largest values of each row and column (``tile_fn``), then per
    atom block the merge. ``stats_arg`` is what the tile tasks get (default ``stats``); the task
    keys start with ``name``."""
    stats_arg = stats if stats_arg is None else stats_arg
    futs = client.map(tile_fn, [stats_arg] * len(tiles), tiles, [top_m] * len(tiles), [opts] * len(tiles),
                      key=[f"{name}-topm-{I}-{J}" for I, J in tiles])
    by_block = {}
    for (I, J), f in zip(tiles, futs):
        by_block.setdefault(I, []).append((f, 0))
        if I != J:
            by_block.setdefault(J, []).append((f, 1))
    blocks = sorted(by_block)
    T = stats.tile_size
    merged = client.map(_merge_topm, blocks, [by_block[b] for b in blocks], [top_m] * len(blocks),
                        [T] * len(blocks), [stats.k_atoms] * len(blocks),
                        key=[f"{name}-theta-{b}" for b in blocks])
    theta = np.full(stats.k_atoms, -np.inf)
    for b, th in zip(blocks, client.gather(merged)):
        theta[b * T:b * T + th.shape[0]] = th
    return theta
