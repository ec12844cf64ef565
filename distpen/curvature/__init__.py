"""Penalty evaluation and Gauss-Newton curvature on a Dask cluster.

:mod:`._vectors`
    where ``t`` and probe vectors come from (numpy, dask, Zarr) and how workers read ranges of them;
:mod:`._common`
    what every curvature job shares (operation names, checks, progress, cancellation);
:mod:`.plan`
    owner-computes partitions of a decoder penalty over atom ranges;
:mod:`.evaluate`
    :func:`evaluate`, every penalty operation, equal to the in-memory penalty's;
:mod:`.tiles`
    :func:`assemble_majorizer`, the Gauss-Newton majorizer as Zarr tiles;
:mod:`.factored`
    :class:`FactoredMajorizer`, the same majorizer as per-atom blocks plus pairs;
:mod:`.newton`
    :func:`newton_step`, preconditioned CG on ``(H_GN + damping·I) x = rhs``;
:mod:`._pcg`, :mod:`.resident`
    what both PCG loops share; the PCG whose vectors stay on the workers;
:mod:`.handle`
    :class:`Resident`, a penalty and ``t`` kept on the workers across calls;
:mod:`.collinearity`
    :func:`collinearity_gate`, pair selection by the overlap of decoder blocks.

The math stays in the penalty classes (:mod:`distpen.penalties`): tasks call their methods.
"""

from ._common import OPS
from .collinearity import collinearity_gate
from .evaluate import evaluate
from .factored import FactoredMajorizer
from .newton import NewtonResult, newton_recorder, newton_step, save_newton_result
from .plan import DecoderPlan, partition_atoms
from .handle import Resident
from .tiles import assemble_majorizer

__all__ = ["OPS", "evaluate", "assemble_majorizer", "FactoredMajorizer", "newton_step", "NewtonResult",
           "newton_recorder", "save_newton_result", "DecoderPlan", "partition_atoms", "collinearity_gate",
           "Resident"]
