"""Plots of what a run store holds (matplotlib figures, so they survive export to HTML).

:func:`plot_coactivation_heatmap`, :func:`plot_firing_rates`, :func:`plot_pair_weights`,
:func:`plot_tile_occupancy`, :func:`plot_newton_residuals`, :func:`plot_penalty_schedule`. Each
returns a :class:`matplotlib.figure.Figure`; when the store holds no data for it yet, the figure
shows a one-line message (also available as ``fig.distpen_message``). Nothing here writes to a store
except :func:`record_penalty_schedule`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError, StoreError
from .status import NEWTON_STAGE, SCHEDULE_STAGE, _as_store

__all__ = [
    "plot_clusters", "latent_partners", "format_latent_partners",
    "plot_coactivation_heatmap", "plot_firing_rates", "plot_pair_weights", "plot_tile_occupancy",
    "plot_newton_residuals", "plot_penalty_schedule", "penalty_schedule_values", "record_penalty_schedule",
    "coactivation_heatmap_data", "tile_occupancy_data",
]


_NO_STATS = ("no co-activation statistics in {path} yet: run "
             "`distpen coactivation GATES --out {path}` (or dp.coactivation_stats) first")


# ============================================================================ plot helpers
def _new_axes(ax=None, figsize=(6.0, 4.5)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _message(fig, ax, title: str, msg: str):
    """Draw ``msg`` in place of a plot (no data yet) and record it on the figure."""
    import textwrap

    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(msg, 60), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="#555555", wrap=True)
    fig.distpen_message = msg
    return fig


def _open_stats(store):
    """(CoactivationStats, None) or (None, message) for a store that has no statistics yet."""
    from ..coactivation.plan import STAGE
    from ..coactivation.stats import CoactivationStats

    if hasattr(store, "pair_sum") and hasattr(store, "fire_count"):
        return store, None
    rs = _as_store(store)
    if not rs.exists():
        return None, f"no run store at {rs.path} yet"
    if rs.manifest(STAGE) is None:
        return None, _NO_STATS.format(path=rs.path)
    try:
        return CoactivationStats(rs.path, allow_incomplete=True), None
    except StoreError as exc:
        return None, str(exc)


def _stats_progress(stats) -> tuple[set, int]:
    job = stats._job
    return job.done(), len(job.units)


def _progress_note(done: int, total: int) -> str:
    return "" if done >= total else f" — {done}/{total} tiles so far"


# ============================================================================ co-activation plots
def coactivation_heatmap_data(stats, top_n: int = 64) -> dict:
    """The co-activation of the ``top_n`` most frequently firing atoms, in a clustered order.

    Parameters
    ----------
    stats : CoactivationStats
    top_n : int
        Number of atoms (the most frequently firing ones among those with statistics so far).

    Returns
    -------
    dict
        ``atoms`` (int64, the atom ids in display order), ``matrix`` (float64, ``pair_sum/n_tokens``
        of those atoms, diagonal set to NaN), ``tiles_done``, ``tiles_total``.

    Raises
    ------
    InvalidArgumentError
        ``top_n`` < 2.
    StoreError
        No atom has fired yet in the tiles complete so far.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 2:
        raise InvalidArgumentError(f"top_n must be an integer ≥ 2, got {top_n!r}")
    fire = stats.fire_count
    fired = np.flatnonzero(fire > 0)
    if fired.shape[0] < 2:
        raise StoreError(f"fewer than 2 atoms have fired in the statistics of {stats.path} so far; "
                         "wait for more tiles, or check the gates")
    order = fired[np.argsort(-fire[fired], kind="stable")][: int(top_n)]
    atoms = np.sort(order)
    T = stats.tile_size
    M = np.asarray(stats.pair_sum.oindex[atoms, atoms], dtype=np.float64)
    blk = atoms // T
    upper = blk[:, None] <= blk[None, :]  # only tiles I ≤ J are stored; mirror the others
    M = np.where(upper, M, M.T) / stats.n_tokens
    q = stats.gate_sq_sum[atoms] / stats.n_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.sqrt(np.outer(q, q))
        S = np.where(den > 0, M / np.where(den > 0, den, 1.0), 0.0)
    D = np.clip(1.0 - S, 0.0, None)
    np.fill_diagonal(D, 0.0)
    D = 0.5 * (D + D.T)
    perm = leaves_list(linkage(squareform(D, checks=False), method="average", optimal_ordering=atoms.shape[0] <= 256))
    atoms, M = atoms[perm], M[np.ix_(perm, perm)]
    np.fill_diagonal(M, np.nan)
    done, total = _stats_progress(stats)
    return {"atoms": atoms, "matrix": M, "tiles_done": len(done), "tiles_total": total}


def plot_coactivation_heatmap(store, top_n: int = 64, *, ax=None):
    """Heatmap of the mean co-activation of the ``top_n`` most frequently firing atoms, clustered.

    Atoms are ordered by average-linkage clustering of their cosine co-activation, so co-firing
    groups show as blocks on the diagonal. The colour scale is logarithmic; white is 0.

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
        A run store with a (finished or running) ``coactivation`` stage.
    top_n : int
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import LogNorm

    fig, ax = _new_axes(ax, (6.5, 5.5))
    title = f"co-activation of the top {top_n} atoms (clustered)"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, ax, title, msg)
    try:
        d = coactivation_heatmap_data(stats, top_n)
    except StoreError as exc:
        return _message(fig, ax, title, str(exc))
    M = np.ma.masked_invalid(np.where(d["matrix"] > 0, d["matrix"], np.nan))
    if M.count() == 0:
        return _message(fig, ax, title, "these atoms have not co-fired in the tiles complete so far")
    im = ax.imshow(M, norm=LogNorm(vmin=M.min(), vmax=M.max()), cmap="viridis", interpolation="nearest")
    n = d["atoms"].shape[0]
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step), [str(a) for a in d["atoms"][::step]], rotation=90, fontsize=7)
    ax.set_yticks(range(0, n, step), [str(a) for a in d["atoms"][::step]], fontsize=7)
    ax.set_xlabel("atom")
    ax.set_ylabel("atom")
    ax.set_title(title + _progress_note(d["tiles_done"], d["tiles_total"]), fontsize=10)
    fig.colorbar(im, ax=ax, label="mean gate product  Σ g_j g_k / N")
    return fig


def plot_firing_rates(store, *, ax=None, bins: int = 40):
    """Distribution of the atoms' firing rates ``fire_count / n_tokens`` on a log scale.

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
    ax : matplotlib.axes.Axes, optional
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax)
    title = "firing-rate distribution"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, ax, title, msg)
    done, total = _stats_progress(stats)
    T, K = stats.tile_size, stats.k_atoms
    known = np.zeros(K, dtype=bool)  # atoms whose diagonal tile (and so fire_count) is complete
    for b in range(stats.n_blocks):
        if f"{b}.{b}" in done:
            known[b * T:(b + 1) * T] = True
    if not known.any():
        return _message(fig, ax, title, f"no atom's firing count is complete yet in {stats.path} "
                        f"({len(done)}/{total} tiles done)")
    rate = stats.fire_count[known] / max(1, stats.n_tokens)
    live = rate[rate > 0]
    dead = int((rate == 0).sum())
    if live.shape[0] == 0:
        return _message(fig, ax, title, f"none of the {rate.shape[0]} atoms counted so far has fired")
    lo, hi = live.min(), live.max()
    edges = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, bins + 1)
    ax.hist(live, bins=edges, histtype="stepfilled", color="#1f77b4", edgecolor="#0b3c61", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("firing rate (fraction of tokens where the atom's gate > 0)")
    ax.set_ylabel("atoms")
    ax.set_title(f"{title}: {live.shape[0]} live, {dead} dead of {rate.shape[0]} atoms"
                 + ("" if known.all() else f" ({known.sum()}/{K} counted so far)"), fontsize=10)
    ax.axvline(np.median(live), color="#d62728", linestyle="--", linewidth=1, label=f"median {np.median(live):.2g}")
    ax.legend(fontsize=8)
    return fig


def plot_clusters(store, measure: str = "jaccard", *, max_size: int = 200, n_show: int = 6, fig=None):
    """The largest groups of co-occurring latents, each as a small heatmap of its pairs' ``measure``,
    and the distribution of group sizes (``CoactivationStats.clusters``, computed in this process).

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
    measure : str
        Edge weight of the pair graph (any of :data:`distpen.coactivation.MEASURES`).
    max_size : int
        The largest connected component is at most this big (the threshold is bisected).
    n_show : int
        Groups drawn as heatmaps.
    fig : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from ..coactivation.clusters import find_clusters

    title = f"groups of co-occurring latents ({measure})"
    stats, msg = _open_stats(store)
    if fig is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2.4 * (n_show + 1), 2.9), layout="constrained")
    if stats is None:
        return _message(fig, fig.add_subplot(), title, msg)
    done, total = _stats_progress(stats)
    table = stats.pairs(measure=measure, client="local")
    cl = find_clusters(table, measure, max_size=max_size)
    if not cl.rows:
        return _message(fig, fig.add_subplot(), title, f"no two latents co-occur under {measure} in {stats.path}"
                        + _progress_note(len(done), total))
    shown = cl.rows[:n_show]
    axes = fig.subplots(1, len(shown) + 1, gridspec_kw={"width_ratios": [1] * len(shown) + [1.4]})
    W = {}
    for a, b, w in zip(table.j.tolist(), table.k.tolist(), table.w.tolist()):
        W[(a, b)] = w
    for ax, r in zip(axes[:-1], shown):
        m = r["members"]
        order = np.argsort(-np.array([sum(W.get((min(a, b), max(a, b)), 0.0) for b in m) for a in m]), kind="stable")
        m = m[order]
        M = np.array([[W.get((min(a, b), max(a, b)), 0.0) for b in m] for a in m])
        ax.imshow(M, cmap="viridis", vmin=0.0, vmax=max(float(M.max()), 1e-12), interpolation="nearest")
        ax.set_title(f"#{r['cluster']}: {r['size']} latents\nhub {r['hub']}, density {r['density']:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[-1]
    sizes = cl.sizes
    ax.hist(sizes, bins=np.arange(2, sizes.max() + 2) - 0.5 if sizes.max() < 40 else 30, color="#ff7f0e",
            edgecolor="#7f3f07", linewidth=0.6)
    ax.set_xlabel("group size (latents)")
    ax.set_ylabel("groups")
    ax.set_title(f"{len(cl)} groups, {cl.n_isolated} latents alone", fontsize=8)
    fig.suptitle(f"{title}, threshold {cl.threshold:.3g} (largest ≤ {max_size})"
                 + _progress_note(len(done), total), fontsize=10)
    fig.distpen_clusters = cl
    return fig


def latent_partners(store, latent: int, measures=("jaccard", "npmi", "phi", "pearson", "lift"), top: int = 8) -> dict:
    """A latent's strongest partners under each measure: ``{measure: [(partner, value), …]}``.

    Reads only the tiles of the latent's row and column block (in this process).
    """
    from ..coactivation.stats import MEASURES

    stats, msg = _open_stats(store)
    if stats is None:
        raise InvalidArgumentError(msg)
    K = stats.k_atoms
    if not isinstance(latent, (int, np.integer)) or not 0 <= int(latent) < K:
        raise InvalidArgumentError(f"latent must be an atom index in [0, {K}), got {latent!r}")
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise InvalidArgumentError(f"unknown measures {bad}; expected a subset of {MEASURES}")
    T = stats.tile_size
    b = int(latent) // T
    out = {}
    for measure in measures:
        vals = np.full(K, -np.inf)
        for other in range(stats.n_blocks):
            I, J = min(b, other), max(b, other)
            M, ok = stats._tile_measure(I, J, measure, 0.0, 0)
            row = (int(latent) - b * T) if I == b else None
            c0 = other * T
            if I == b:
                vals[c0:c0 + M.shape[1]] = np.where(ok[row], M[row], -np.inf)
            else:
                col = int(latent) - b * T
                vals[c0:c0 + M.shape[0]] = np.where(ok[:, col], M[:, col], -np.inf)
        vals[int(latent)] = -np.inf
        order = np.lexsort((np.arange(K), -vals))[:top]
        out[measure] = [(int(p), float(vals[p])) for p in order if np.isfinite(vals[p])]
    return out


def format_latent_partners(store, latent: int, **kwargs) -> str:
    """:func:`latent_partners` as a text table, one column per measure."""
    parts = latent_partners(store, latent, **kwargs)
    measures = list(parts)
    depth = max((len(v) for v in parts.values()), default=0)
    lines = [f"latent {latent}: strongest partners", "  ".join(f"{m:>16}" for m in measures)]
    for i in range(depth):
        lines.append("  ".join(f"{parts[m][i][0]:>7} {parts[m][i][1]:>8.3g}" if i < len(parts[m]) else " " * 16
                               for m in measures))
    return "\n".join(lines)


def _pair_weight_values(stats, measures, max_tiles: int) -> tuple[dict, int]:
    done, _ = _stats_progress(stats)
    nb = stats.n_blocks
    tiles = [(i, j) for i in range(nb) for j in range(i, nb)
             if f"{i}.{j}" in done and f"{i}.{i}" in done and f"{j}.{j}" in done]
    if len(tiles) > max_tiles:  # an even sample of the complete tiles
        tiles = [tiles[i] for i in np.linspace(0, len(tiles) - 1, max_tiles).round().astype(int)]
    vals = {m: [] for m in measures}
    for i, j in tiles:
        for m in measures:
            M, ok = stats._tile_measure(i, j, m, 0.0, 0)
            if i == j:
                ok &= np.triu(np.ones_like(ok), 1).astype(bool)
            vals[m].append(M[ok])
    return {m: (np.concatenate(v) if v else np.zeros(0)) for m, v in vals.items()}, len(tiles)


#: the measures plot_pair_weights shows unless told otherwise (one panel each)
_DEFAULT_MEASURES = ("mean", "count", "jaccard", "cosine", "lift")


def plot_pair_weights(store, measures=None, *, max_tiles: int = 16, bins: int = 40, fig=None):
    """Histograms of the pair weights ``w_jk`` under each measure (log scale), one panel per measure.

    Computed from complete tiles only (a sample of ``max_tiles`` of them on a large store), with the
    same definitions as ``CoactivationStats.pairs`` (``threshold = 0``).

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
    measures : sequence of str, optional
        Any of :data:`distpen.coactivation.MEASURES`. Default: ``("mean", "count", "jaccard",
        "cosine", "lift")``.
    max_tiles : int
    bins : int
    fig : matplotlib.figure.Figure, optional
        Draw into this (empty) figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidArgumentError
        An unknown measure.
    """
    from ..coactivation.stats import MEASURES

    measures = tuple(_DEFAULT_MEASURES if measures is None else ([measures] if isinstance(measures, str) else measures))
    bad = [m for m in measures if m not in MEASURES]
    if bad or not measures:
        raise InvalidArgumentError(f"measures must be a non-empty subset of {MEASURES}, got {measures!r}")
    if fig is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2 * len(measures), 3.2), layout="constrained")
    title = "pair weights per measure"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, fig.add_subplot(), title, msg)
    vals, n_tiles = _pair_weight_values(stats, measures, max_tiles)
    if n_tiles == 0:
        done, total = _stats_progress(stats)
        return _message(fig, fig.add_subplot(), title,
                        f"no tile with its atoms' counts complete yet ({len(done)}/{total} tiles done)")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, m in zip(axes, measures):
        v = vals[m][vals[m] > 0]
        ax.set_title(f"{m}: {v.shape[0]:,} pairs", fontsize=9)
        if v.shape[0] == 0:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
            continue
        lo, hi = v.min(), v.max()
        edges = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, bins + 1) if hi > lo else bins
        ax.hist(v, bins=edges, histtype="stepfilled", color="#9467bd", edgecolor="#5b3f7a", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()  # log-axis minor ticks dominate the drawing time of small panels
        ax.set_xlabel(m, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("pairs")
    done, total = _stats_progress(stats)
    fig.suptitle(f"{title} ({n_tiles} tiles{'' if len(done) >= total else f'; {len(done)}/{total} done'})",
                 fontsize=10)
    return fig


# ============================================================================ tile occupancy
def tile_occupancy_data(store, stage: str = "assembly", *, max_side: int = 256) -> dict:
    """Which tiles of a tiled stage exist, which are pending, and their norms.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    stage : {"assembly", "coactivation"}
        ``"assembly"``: the ``n × n`` curvature ``H`` (tile markers carry the Frobenius norm);
        ``"coactivation"``: the ``K × K`` statistics (upper tiles; markers say whether non-zero).
    max_side : int
        Grids larger than this are pooled into ``max_side × max_side`` cells (norms combined as
        ``sqrt(Σ norm²)``; a cell is "written" if any of its tiles is, else pending if any is).

    Returns
    -------
    dict
        ``norm`` (float64 grid, NaN where nothing was written), ``state`` (int8 grid: 0 not part of
        the job, 1 pending, 2 complete and empty, 3 complete and written), ``n_tiles`` (tiles per
        side before pooling), ``pool`` (tiles per cell), ``tile`` (rows per tile), ``done``,
        ``total``, ``written``, ``stage``.

    Raises
    ------
    InvalidArgumentError
        An unsupported stage.
    StoreError
        The store has no job of that stage.
    """
    if stage not in ("assembly", "coactivation"):
        raise InvalidArgumentError(f"stage must be 'assembly' or 'coactivation', got {stage!r}")
    rs = _as_store(store)
    m = rs.manifest(stage) if rs.exists() else None
    if m is None:
        raise StoreError(f"no {stage} job in {rs.path} yet" + (
            ": run assemble_majorizer(..., out=STORE) (CLI: distpen assemble)" if stage == "assembly"
            else ": run `distpen coactivation GATES --out STORE`"))
    spec = m.get("spec") or {}
    if stage == "assembly":
        if spec.get("format") == "factored" or "tile" not in spec:
            raise StoreError(f"the assembly job in {rs.path} is factored: it writes no tiles of H")
        tile, n = int(spec["tile"]), int(spec["n"])
        prefix = "H."
    else:
        tile, n = int(spec["params"]["tile"]), int(spec["k_atoms"])
        prefix = ""
    nt = max(1, -(-n // tile))
    job = rs.job(stage)
    markers = job.markers()
    pool = max(1, -(-nt // max_side))
    side = -(-nt // pool)
    sq = np.zeros((side, side))
    state = np.zeros((side, side), dtype=np.int8)
    done = written = total = 0
    for u in job.units:
        if not u.startswith(prefix) or (prefix == "" and u.count(".") != 1):
            continue
        try:
            I, J = (int(x) for x in u[len(prefix):].split("."))
        except ValueError:
            continue
        total += 1
        ci, cj = I // pool, J // pool
        mk = markers.get(u)
        if mk is None:
            if state[ci, cj] != 3:
                state[ci, cj] = 1
            continue
        done += 1
        info = mk.get("info") or {}
        wrote = bool(info.get("written", info.get("nonzero", True)))
        if wrote:
            written += 1
            sq[ci, cj] += float(info.get("norm", 1.0)) ** 2
            state[ci, cj] = 3
        elif state[ci, cj] == 0:
            state[ci, cj] = 2
    has_norm = stage == "assembly"
    norm = np.where(state == 3, np.sqrt(sq), np.nan) if has_norm else np.where(state == 3, 1.0, np.nan)
    return {"norm": norm, "state": state, "n_tiles": nt, "pool": pool, "tile": tile, "done": done,
            "total": total, "written": written, "stage": stage, "has_norm": has_norm}


def plot_tile_occupancy(store, stage: str = "assembly", *, ax=None, max_side: int = 256):
    """Map of a tiled array: written tiles coloured by Frobenius norm, pending tiles grey, empty tiles pale.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    stage : {"assembly", "coactivation"}
        The curvature ``H`` (default) or the co-activation statistics.
    ax : matplotlib.axes.Axes, optional
    max_side : int
        See :func:`tile_occupancy_data`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    fig, ax = _new_axes(ax, (6.0, 5.2))
    what = "curvature H" if stage == "assembly" else "co-activation statistics"
    title = f"tile occupancy of the {what}"
    try:
        d = tile_occupancy_data(store, stage, max_side=max_side)
    except StoreError as exc:
        return _message(fig, ax, title, str(exc))
    base = np.ma.masked_where(d["state"] == 3, d["state"])
    ax.imshow(base, cmap=ListedColormap(["#ffffff", "#bdbdbd", "#e8f1f8", "#000000"]), vmin=-0.5, vmax=3.5,
              interpolation="nearest")
    nz = np.ma.masked_invalid(d["norm"])
    if nz.count():
        if d["has_norm"] and nz.max() > 0:
            im = ax.imshow(nz, cmap="magma_r", norm=LogNorm(vmin=max(nz.min(), nz.max() * 1e-12), vmax=nz.max()),
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, label="tile Frobenius norm")
        else:
            ax.imshow(nz, cmap=ListedColormap(["#1f77b4"]), interpolation="nearest")
    cell = f"{d['pool']}×{d['pool']} tiles per cell, " if d["pool"] > 1 else ""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"tile column J ({cell}{d['tile']} rows per tile)")
    ax.set_ylabel("tile row I")
    ax.set_title(f"{title}: {d['done']}/{d['total']} tiles complete, {d['written']} non-empty", fontsize=10)
    ax.legend(handles=[Patch(color="#bdbdbd", label="pending"), Patch(facecolor="#e8f1f8", edgecolor="#999",
                                                                     label="complete, all zero (not stored)")],
              loc="upper right", fontsize=7, framealpha=0.8)
    return fig


# ============================================================================ Newton and schedules
def _residuals_from(source) -> tuple[list, str | None, dict]:
    if hasattr(source, "residuals") and hasattr(source, "iterations"):  # a NewtonResult
        return list(source.residuals), None, {"converged": source.converged}
    if isinstance(source, (list, tuple, np.ndarray)):
        return [float(x) for x in source], None, {}
    rs = _as_store(source)
    m = rs.manifest(NEWTON_STAGE) if rs.exists() else None
    if m is None:
        return [], (f"no Newton step recorded in {rs.path} yet: pass the NewtonResult, or save it with "
                    "distpen.curvature.newton.save_newton_result(store, result)"), {}
    p = rs.job(NEWTON_STAGE).progress()
    res = p.get("residuals") or []
    if not res:
        return [], f"the Newton step in {rs.path} is {m.get('status')}; no residuals recorded yet", {}
    return [float(x) for x in res], None, {"converged": p.get("converged"), "precond": p.get("precond")}


def plot_newton_residuals(source, *, ax=None, tol: float | None = None):
    """Relative residual ``‖r_i‖/‖rhs‖`` of the Newton step's PCG iterations (log scale).

    Parameters
    ----------
    source : NewtonResult, sequence of float, or a run store
        A store is read from its ``newton`` stage (``distpen.curvature.newton.save_newton_result``).
    ax : matplotlib.axes.Axes, optional
    tol : float, optional
        Draw the tolerance as a horizontal line.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax, (6.0, 3.8))
    title = "Newton step: PCG residual history"
    res, msg, meta = _residuals_from(source)
    if msg:
        return _message(fig, ax, title, msg)
    r = np.asarray(res, dtype=np.float64)
    pos = r > 0
    ax.semilogy(np.arange(r.shape[0])[pos], r[pos], marker="o", markersize=3, color="#2ca02c")
    if tol is not None:
        ax.axhline(tol, color="#d62728", linestyle="--", linewidth=1, label=f"tol {tol:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("PCG iteration")
    ax.set_ylabel("‖r‖ / ‖rhs‖")
    conv = meta.get("converged")
    extra = "" if conv is None else (" — converged" if conv else " — not converged")
    pre = f", {meta['precond']} preconditioner" if meta.get("precond") else ""
    ax.set_title(f"PCG residuals{extra} ({r.shape[0] - 1} iterations{pre})", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def penalty_schedule_values(penalty, t, rho, schedule, iterations: int = 30) -> dict:
    """The penalty's value at each iteration of a weight schedule (in memory).

    Parameters
    ----------
    penalty : Penalty
        An in-memory penalty (it is not modified).
    t : array of shape (n,)
    rho : array of shape (penalty.rho_count,)
    schedule : ScalarWeightSchedule
    iterations : int
        Iterations ``0 … iterations-1``.

    Returns
    -------
    dict
        ``iterations`` (list of int), ``weights`` and ``values`` (lists of float).

    Raises
    ------
    InvalidArgumentError
        ``iterations`` < 1.
    ScheduleError
        ``schedule`` is not a ScalarWeightSchedule.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InvalidArgumentError(f"iterations must be a positive integer, got {iterations!r}")
    pen = penalty.with_weight_schedule(schedule)
    its, weights, values = [], [], []
    for it in range(int(iterations)):
        pen.apply_schedule(it)
        its.append(it)
        weights.append(float(schedule.current_weight(it)))
        values.append(float(pen.value(t, rho)))
    return {"iterations": its, "weights": weights, "values": values}


def record_penalty_schedule(store, history: dict, *, label: str = "penalty") -> None:
    """Save a schedule history (:func:`penalty_schedule_values`) into the run store's ``schedule`` stage.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    history : dict
        ``iterations``, ``values`` and optionally ``weights`` (equal-length lists).
    label : str
        Shown in the plot's legend.

    Raises
    ------
    InvalidArgumentError
        Missing keys or lists of different lengths.
    """
    its, vals = history.get("iterations"), history.get("values")
    if its is None or vals is None or len(its) != len(vals) or (
            history.get("weights") is not None and len(history["weights"]) != len(its)):
        raise InvalidArgumentError(
            "history must hold equal-length 'iterations' and 'values' (and optionally 'weights'); "
            "use penalty_schedule_values(...) to build it"
        )
    rs = _as_store(store)
    data = {"label": str(label), "iterations": [int(i) for i in its], "values": [float(v) for v in vals],
            "weights": None if history.get("weights") is None else [float(w) for w in history["weights"]]}
    job = rs.begin_job(SCHEDULE_STAGE, {"kind": "penalty_schedule", **data}, ["values"], overwrite=True)
    job.mark_done("values")
    job.finish(**data)


def plot_penalty_schedule(source, *, ax=None):
    """Penalty value against schedule iteration (and the schedule's weight on a second axis).

    Parameters
    ----------
    source : dict or run store
        A :func:`penalty_schedule_values` dict, or a store with a ``schedule`` stage
        (:func:`record_penalty_schedule`).
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax, (6.0, 3.8))
    title = "penalty value against schedule iteration"
    if isinstance(source, dict):
        h, label = source, source.get("label", "penalty")
    else:
        rs = _as_store(source)
        if not rs.exists() or rs.manifest(SCHEDULE_STAGE) is None:
            return _message(fig, ax, title, f"no schedule history in {rs.path} yet: record one with "
                            "distpen.dashboard.record_penalty_schedule(store, penalty_schedule_values(...))")
        h = rs.job(SCHEDULE_STAGE).progress()
        label = h.get("label", "penalty")
    its, vals = h.get("iterations") or [], h.get("values") or []
    if not its:
        return _message(fig, ax, title, "the schedule history is empty")
    ax.plot(its, vals, marker="o", markersize=3, color="#1f77b4", label=f"{label} value")
    ax.set_xlabel("schedule iteration")
    ax.set_ylabel("penalty value", color="#1f77b4")
    if h.get("weights"):
        ax2 = ax.twinx()
        ax2.plot(its, h["weights"], linestyle="--", color="#ff7f0e", label="weight")
        ax2.set_ylabel("schedule weight", color="#ff7f0e")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig
