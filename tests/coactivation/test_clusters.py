"""Groups of latents (coactivation/clusters.py): the banded threshold search against the bisection
over every pair (docs/design.md, section 3.5)."""

from __future__ import annotations

import numpy as np
import pytest

import distpen as dp
from distpen.coactivation import clusters as clusters_mod
from distpen.coactivation.clusters import find_clusters, stats_clusters
from distpen.errors import InvalidArgumentError


# --------------------------------------------------------------------------- the reference
def bisection_clusters(table, measure, *, threshold=None, max_size=200, method="components", seed=0):
    """The code before the banded search: every positive pair in memory, bisection over all unique weights."""
    n = table.k_atoms
    j, k, w = table.j, table.k, table.w
    if threshold is None:
        if method != "components":
            threshold = 0.0
        else:
            cand = np.concatenate([[0.0], np.unique(w)])
            lo, hi = 0, cand.shape[0] - 1
            while lo < hi:
                mid = (lo + hi) // 2
                keep = w > cand[mid]
                if clusters_mod._largest(clusters_mod._components(j[keep], k[keep], n)) <= max_size:
                    hi = mid
                else:
                    lo = mid + 1
            threshold = float(cand[lo])
    keep = w > threshold
    return clusters_mod._groups(j[keep], k[keep], w[keep], n, threshold, measure, method, seed)


def assert_same(got, want):
    assert got.threshold == want.threshold
    assert (got.measure, got.method, got.n_isolated) == (want.measure, want.method, want.n_isolated)
    assert len(got.rows) == len(want.rows)
    for a, b in zip(got.rows, want.rows):
        assert a["members"].tolist() == b["members"].tolist()
        assert (a["cluster"], a["size"], a["edges"], a["density"], a["hub"]) == \
            (b["cluster"], b["size"], b["edges"], b["density"], b["hub"])


def tied_gates(n=2000, k=40, seed=5, noise=0.02):
    """Planted groups, some of whose latents fire on exactly the same tokens (Jaccard 1, equal counts:
    ties), rare latents (Jaccard 1/2, 1/3, …: ties again) and background noise."""
    rng = np.random.default_rng(seed)
    G = (rng.random((n, k)) < noise) * rng.exponential(1.0, (n, k))
    for g in (range(7), range(7, 11), range(12, 15), range(20, 29)):
        on = rng.random(n) < 0.08
        for a in g:
            G[on & (rng.random(n) < 0.85), a] = 1.0 + rng.random()
    G[:, 3] = G[:, 2] * 0.5         # 2, 3 and 4 fire together: ties at the top
    G[:, 4] = G[:, 2] * 2.0
    G[:, 9] = G[:, 8]
    rare = np.zeros((n, 4))
    rare[[0, 1, 2], 0] = rare[[1, 2], 1] = rare[[2, 3], 2] = rare[[5, 6], 3] = 1.0
    G[:, 33:37] = rare
    return G


def disjoint_gates(n=1500, k=30, seed=6):
    """Groups of at most 6 latents that never fire with another group: the largest component is 6."""
    rng = np.random.default_rng(seed)
    G = np.zeros((n, k))
    which = rng.integers(0, 5, n)
    for g, atoms in enumerate((range(6), range(6, 10), range(10, 15), range(15, 17), range(20, 26))):
        for a in atoms:
            G[(which == g) & (rng.random(n) < 0.7), a] = 1.0 + rng.random()
    return G


def planted_gates(n=3000, k=48, seed=2):
    """Groups of latents that fire together, plus background noise (as in test_coactivation_stats)."""
    rng = np.random.default_rng(seed)
    G = (rng.random((n, k)) < 0.02) * rng.exponential(1.0, (n, k))
    for g in (range(6), range(6, 10), range(10, 13), range(20, 28), range(30, 32)):
        on = rng.random(n) < 0.1
        for a in g:
            fire = on & (rng.random(n) < 0.9)
            G[fire, a] = 1.0 + rng.random(int(fire.sum()))
    return G


@pytest.fixture(scope="module")
def tied_store(tmp_path_factory, dask_client):
    return dp.coactivation_stats(tied_gates(), tmp_path_factory.mktemp("tied") / "st", row_chunk=500, tile=8,
                                 client=dask_client)


# --------------------------------------------------------------------------- the search
@pytest.mark.parametrize("measure, max_size, top_m, budget", [
    ("jaccard", 3, None, None), ("jaccard", 6, None, 1), ("jaccard", 10, None, 4), ("jaccard", 200, None, 2),
    ("count", 4, None, 1), ("count", 12, None, 3), ("npmi", 5, None, 2), ("mean", 5, None, 2),
    ("jaccard", 4, 3, 1), ("cosine", 8, 2, None),
])
def test_banded_search_equals_the_bisection_over_every_pair(client, tied_store, measure, max_size, top_m, budget):
    """Budgets of one or a few edges per tile: many bands, ties cut through; max_size 200 > K is never
    exceeded (threshold 0, every edge)."""
    table = tied_store.pairs(measure=measure, top_m=top_m)
    want = bisection_clusters(table, measure, max_size=max_size)
    got = stats_clusters(tied_store, measure, max_size=max_size, top_m=top_m, budget=budget)
    assert_same(got, want)
    assert_same(tied_store.clusters(measure, max_size=max_size, top_m=top_m), want)
    assert_same(find_clusters(table, measure, max_size=max_size), want)
    if max_size == 200:
        assert want.threshold == 0.0
    else:
        assert want.threshold > 0.0 and np.unique(table.w).size > 10


def test_weights_tie_at_the_threshold(client, tied_store):
    """The threshold is an edge weight shared by several pairs; all of them are left out together."""
    table = tied_store.pairs(measure="count")
    hits = 0
    for max_size in range(2, 16):
        want = bisection_clusters(table, "count", max_size=max_size)
        if np.sum(table.w == want.threshold) >= 2:
            hits += 1
        for budget in (1, 2, 5):
            assert_same(stats_clusters(tied_store, "count", max_size=max_size, budget=budget, client="local"), want)
    assert hits >= 3


def test_largest_component_never_exceeds_max_size(client, tmp_path):
    st = dp.coactivation_stats(disjoint_gates(), tmp_path / "st", row_chunk=500, tile=8)
    table = st.pairs(measure="jaccard")
    for max_size in (6, 7, 30):
        want = bisection_clusters(table, "jaccard", max_size=max_size)
        assert want.threshold == 0.0 and want.rows[0]["size"] == 6
        for budget in (None, 1, 3):
            assert_same(stats_clusters(st, "jaccard", max_size=max_size, budget=budget), want)
    got = stats_clusters(st, "jaccard", max_size=5, budget=1)
    assert_same(got, bisection_clusters(table, "jaccard", max_size=5))
    assert got.threshold > 0.0 and got.rows[0]["size"] <= 5


def test_explicit_threshold_and_louvain_gather_only_edges_above_it(client, tied_store, monkeypatch):
    for measure, thr, top_m in (("jaccard", 0.3, None), ("npmi", 0.2, 3), ("jaccard", 0.0, None)):
        table = tied_store.pairs(measure=measure, top_m=top_m)
        for method in ("components", "louvain"):
            want = bisection_clusters(table, measure, threshold=thr, method=method, seed=1)
            assert_same(tied_store.clusters(measure, threshold=thr, method=method, top_m=top_m, seed=1), want)
    assert_same(tied_store.clusters("jaccard", method="louvain", seed=2),
                bisection_clusters(tied_store.pairs(measure="jaccard"), "jaccard", method="louvain", seed=2))
    sent = []
    real = clusters_mod._tile_band

    def counting(*args):
        out = real(*args)
        sent.append(out[2])
        return out

    monkeypatch.setattr(clusters_mod, "_tile_band", counting)
    table = tied_store.pairs(measure="jaccard", client="local")
    stats_clusters(tied_store, "jaccard", threshold=0.3, client="local")
    w = np.concatenate(sent)
    assert w.size == int(np.sum(table.w > 0.3)) and (w > 0.3).all()


def test_search_gathers_the_strongest_edges_only(client, tmp_path, monkeypatch):
    """With a small budget the tiles send a few edges each, far from every pair, and the result holds."""
    st = dp.coactivation_stats(planted_gates(), tmp_path / "st", row_chunk=700, tile=16)
    table = st.pairs(measure="jaccard", client="local")
    sent = []
    real = clusters_mod._tile_band

    def counting(*args):
        out = real(*args)
        sent.append(out[2].size)
        return out

    monkeypatch.setattr(clusters_mod, "_tile_band", counting)
    got = stats_clusters(st, "jaccard", max_size=6, budget=4, client="local")
    assert_same(got, bisection_clusters(table, "jaccard", max_size=6))
    assert 0 < sum(sent) < len(table) / 4


def test_clusters_arguments_are_checked(client, tied_store):
    with pytest.raises(InvalidArgumentError, match="measure must be one of"):
        stats_clusters(tied_store, "overlap")
    with pytest.raises(InvalidArgumentError, match="max_size must be ≥ 2"):
        stats_clusters(tied_store, max_size=1)
    with pytest.raises(InvalidArgumentError, match="threshold must be ≥ 0"):
        tied_store.clusters(threshold=-0.1)
    with pytest.raises(InvalidArgumentError, match="budget"):
        stats_clusters(tied_store, budget=0)
    with pytest.raises(InvalidArgumentError, match="method must be one of"):
        find_clusters(tied_store.pairs(), "mean", method="leiden")


def test_band_tiles_are_the_pair_tables_tiles_bit_for_bit(client, tied_store, tmp_path):
    """The compiled Jaccard pass and the counts-only reads give the bits of ``_tile_measure``."""
    edge = dp.coactivation_stats(disjoint_gates(), tmp_path / "st", row_chunk=500, tile=8)  # K = 30: a 6-wide edge
    for st in (tied_store, edge):
        for measure in ("jaccard", "count", "npmi", "mean"):
            for I, J in st.nonzero_tiles():
                M, ok = st._tile_measure(I, J, measure, 0.0, 0)
                if I == J:
                    ok = np.triu(ok, 1)
                j, k, w, cut = clusters_mod._tile_band(st, (I, J), measure, 0.0, None, np.inf, None)
                a, b = np.nonzero(ok)
                T = st.tile_size
                assert cut == 0.0
                np.testing.assert_array_equal(j, a + I * T)
                np.testing.assert_array_equal(k, b + J * T)
                assert w.tobytes() == M[a, b].tobytes()
