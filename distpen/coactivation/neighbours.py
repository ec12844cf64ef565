"""Each latent's strongest co-occurring partners, and delphi's co-occurrence neighbour file.

delphi (EleutherAI/delphi, ``delphi/latents/neighbours.py``, read at commit d3d643b) lists, per
latent, its ``number_of_neighbours`` strongest Jaccard partners and saves them with ``json.dump`` as
``{"<latent>": [[score, neighbour], …]}`` — score first, the order its loader reads
(``Neighbour(distance=neighbour[0], latent_index=neighbour[1])`` in ``latents.py``), strongest first —
to ``neighbours/<hookpoint>-co-occurrence.json``. It builds a dense ``K × K`` count matrix on a
GPU to do so. Here the lists come from the statistics store tile by tile
(:meth:`CoactivationStats.pairs` with ``top_m``), so no dense matrix exists anywhere, and the file
is standard JSON: a latent that never fires gets an empty list (delphi writes ``NaN`` scores).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError
from ..store import publish_file

__all__ = ["neighbour_lists", "write_delphi_neighbours"]


def neighbour_lists(stats, measure: str = "jaccard", top_m: int = 250, *, client=None) -> dict:
    """``{latent: [(score, partner), …]}`` for every latent: its ``top_m`` strongest partners under
    ``measure``, strongest first (ties by the lower partner index); pairs whose measure is ≤ 0 or
    undefined are no partners, so a latent may have fewer than ``top_m`` (none if it never fires)."""
    top_m = check_positive_int(top_m, "top_m")
    table = stats.pairs(measure=measure, top_m=top_m, client=client)
    indptr, nbr, w = table.directed()
    out = {}
    for a in range(stats.k_atoms):
        lo, hi = int(indptr[a]), int(indptr[a + 1])
        if hi == lo:
            out[a] = []
            continue
        p, s = nbr[lo:hi], w[lo:hi]
        order = np.lexsort((p, -s))[:top_m]  # by score descending, then by partner
        out[a] = list(zip(s[order].tolist(), p[order].tolist()))
    return out


def write_delphi_neighbours(lists: dict, path) -> str:
    """Write ``lists`` as delphi's neighbour JSON at ``path`` (published by rename: never half-written).

    A directory ``path`` gets delphi's file name for an unnamed hookpoint, ``co-occurrence.json``;
    pass the full name (``neighbours/<hookpoint>-co-occurrence.json``) to match delphi's layout.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "co-occurrence.json")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"cannot write neighbours to {path!r}: directory {parent!r} does not exist")
    doc = {str(a): [[float(s), int(p)] for s, p in lst] for a, lst in lists.items()}
    data = json.dumps(doc, allow_nan=False).encode()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    publish_file(f"{path}.tmp-{os.getpid()}", path, write)
    return path
