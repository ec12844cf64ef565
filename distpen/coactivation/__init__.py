"""Co-activation statistics of SAE gates on a Dask cluster, written to a Zarr run store.

Modules, in the order data flows through them:

:mod:`.plan`
    tiles, tile groups, row chunks and their default sizes;
:mod:`._kernels`
    per-chunk numba kernels (validation, sparse rows, scatter and BLAS routes), pure functions of arrays;
:mod:`.atom_major`
    the atom-major copy of top-k or CSR gates (by atom block) and the square tasks over it;
:mod:`._tasks`
    the worker tasks (leaves, the atom-major copy, combine, the tile writer, the chunk cache);
:mod:`._store`
    the statistics store's arrays and its creation or reopening;
:mod:`.job`
    :func:`coactivation_stats`, the job itself;
:mod:`.stats`
    :class:`CoactivationStats`, the read side, measures and pair selection;
:mod:`.merge`
    :func:`merge_stats`;
:mod:`.forecast`
    :func:`plan_coactivation` and :func:`~.forecast.plan_atom_major`, what a job will do on a
    given cluster and how long it takes;
:mod:`.windows`
    :class:`WindowedGates`, gates of windows of consecutive tokens (``coactivation_stats(window=W)``);
:mod:`.neighbours`, :mod:`.clusters`
    analyses of a finished store: delphi's neighbour lists, groups of latents.
"""

from .forecast import CoactivationPlan, plan_coactivation
from .job import coactivation_stats
from .merge import merge_stats
from .plan import STAGE, RelativeThreshold
from .stats import MEASURES, CoactivationStats, Tile, open_stats
from .windows import WindowedGates

__all__ = ["coactivation_stats", "open_stats", "merge_stats", "CoactivationStats", "Tile", "MEASURES", "STAGE",
           "plan_coactivation", "CoactivationPlan", "RelativeThreshold", "WindowedGates"]
