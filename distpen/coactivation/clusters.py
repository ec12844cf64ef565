"""Groups of latents from the pair graph: thresholded connected components, or communities.

sae_cooccurrence (Clarke et al.) builds a dense ``K × K`` Jaccard matrix per firing threshold on a
GPU, then bisects an edge threshold until the largest connected component of the thresholded graph
has at most ~200 latents, and tabulates each component. Here the graph is the sparse pair table of
:meth:`CoactivationStats.pairs` (tile by tile, never dense): the threshold is found exactly by
binary search over the sorted edge weights, each step one ``scipy.sparse.csgraph``
``connected_components`` over the kept edges, and ``method="louvain"`` runs networkx's Louvain
community detection on the weighted graph instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validation import check_finite_scalar, check_positive_int
from ..errors import InvalidArgumentError
from ..pairs import PairTable

__all__ = ["Clusters", "find_clusters", "METHODS"]

METHODS = ("components", "louvain")


@dataclass
class Clusters:
    """Groups of latents with at least two members, largest first.

    Attributes
    ----------
    threshold : float
        The edge threshold used (edges with a measure strictly above it are kept).
    measure, method : str
    rows : list of dict
        One per group: ``cluster``, ``size``, ``edges``, ``density`` (edges over ``size·(size−1)/2``),
        ``hub`` (the member with the largest weighted degree inside the group) and ``members``
        (sorted latent ids).
    n_isolated : int
        Latents in no group (no kept edge).
    """

    threshold: float
    measure: str
    method: str
    rows: list = field(default_factory=list)
    n_isolated: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([r["size"] for r in self.rows], dtype=np.int64)

    def labels(self, k_atoms: int) -> np.ndarray:
        """Cluster id of every latent (−1 for isolated ones)."""
        out = np.full(k_atoms, -1, dtype=np.int64)
        for r in self.rows:
            out[r["members"]] = r["cluster"]
        return out


def _components(j, k, n):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(j.shape[0]), (j, k)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def _largest(labels) -> int:
    return int(np.bincount(labels).max()) if labels.size else 0


def _table(labels, j, k, w, n) -> tuple[list, int]:
    sizes = np.bincount(labels, minlength=labels.max() + 1 if labels.size else 0)
    groups = np.flatnonzero(sizes >= 2)
    same = labels[j] == labels[k]
    edges = np.bincount(labels[j][same], minlength=sizes.shape[0])
    degree = np.bincount(j[same], weights=w[same], minlength=n) + np.bincount(k[same], weights=w[same], minlength=n)
    order = groups[np.lexsort((groups, -sizes[groups]))]  # largest first, then by label
    rows = []
    for cid, g in enumerate(order):
        members = np.flatnonzero(labels == g)
        size = int(members.shape[0])
        hub = int(members[np.argmax(degree[members])])
        rows.append({"cluster": cid, "size": size, "edges": int(edges[g]),
                     "density": float(edges[g]) / (size * (size - 1) / 2), "hub": hub, "members": members})
    return rows, int(np.sum(sizes == 1))


def find_clusters(table: PairTable, measure: str, *, threshold=None, max_size: int = 200,
                  method: str = "components", seed: int = 0) -> Clusters:
    """Groups of the latents of ``table`` (pairs with positive weights); see :meth:`CoactivationStats.clusters`."""
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    max_size = check_positive_int(max_size, "max_size")
    if max_size < 2:
        raise InvalidArgumentError(f"max_size must be ≥ 2 (a group has two latents at least), got {max_size}")
    n = table.k_atoms
    j, k, w = table.j, table.k, table.w
    if threshold is None:
        if method != "components":
            threshold = 0.0
        else:  # the smallest edge threshold whose largest component has at most max_size latents
            ws = np.unique(w)  # candidate thresholds: keep edges strictly above ws[i]
            cand = np.concatenate([[0.0], ws])
            lo, hi = 0, cand.shape[0] - 1  # cand[hi] keeps no edge: always feasible
            while lo < hi:
                mid = (lo + hi) // 2
                keep = w > cand[mid]
                if _largest(_components(j[keep], k[keep], n)) <= max_size:
                    hi = mid
                else:
                    lo = mid + 1
            threshold = float(cand[lo])
    else:
        threshold = check_finite_scalar(threshold, "threshold", nonnegative=True)
    keep = w > threshold
    j, k, w = j[keep], k[keep], w[keep]
    if method == "components":
        labels = _components(j, k, n)
    else:
        g = PairTable(j, k, w, n, _trusted=True).to_networkx()
        import networkx as nx

        labels = np.arange(n, dtype=np.int64)  # isolated latents stay alone
        comms = nx.community.louvain_communities(g, weight="weight", seed=seed)
        for c, members in enumerate(sorted(comms, key=lambda m: (-len(m), min(m)))):
            labels[list(members)] = n + c
        _, labels = np.unique(labels, return_inverse=True)
    rows, isolated = _table(labels, j, k, w, n)
    return Clusters(threshold, measure, method, rows, isolated)
