"""distpen: co-activation statistics and second-order SAE penalties at cluster scale.

The layers, from the floor up (a module imports only from layers below its own; see
``docs/design.md``):

* the floor — :mod:`~distpen.errors`, :mod:`~distpen.store`, :mod:`~distpen.cluster`,
  :mod:`~distpen.security` and private helpers (validation, chunk I/O, buffers, threads);
* core types — :mod:`~distpen.weights`, :mod:`~distpen.layout`, :mod:`~distpen.pairs`;
* :mod:`distpen.penalties` — the math, in memory;
* :mod:`distpen.sources` — where gates come from;
* :mod:`distpen.coactivation` and :mod:`distpen.curvature` — the distributed jobs;
* :mod:`distpen.dashboard` — status, monitor and plots;
* :mod:`distpen.cli` — the ``distpen`` command.
"""

from . import errors
from .cluster import connect
from .coactivation import (CoactivationStats, RelativeThreshold, WindowedGates, coactivation_stats, merge_stats,
                           open_stats, plan_coactivation)
from .curvature import (FactoredMajorizer, NewtonResult, Resident, assemble_majorizer, collinearity_gate,
                        evaluate, newton_recorder, newton_step, save_newton_result)
from .layout import DecoderLayout, PenaltyTier, PsiSlice
from .pairs import PairTable
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty, Penalty, penalty_from_spec
from .sources import (SAE, ActivationSource, DelphiGates, DelphiLatents, DenseGates, EncodedGates, SparseGates,
                      TopKGates, encode_gates, load_sae, open_activations, open_gates, synth_gates)
from .store import RunStore
from .weights import Geometric, Linear, ReciprocalIter, ScalarWeightSchedule, resolve_learnable_weight

__version__ = "0.1.0"

__all__ = [
    "errors",
    # weights, layouts, pairs, penalties (in memory)
    "resolve_learnable_weight",
    "ScalarWeightSchedule",
    "Geometric",
    "Linear",
    "ReciprocalIter",
    "PenaltyTier",
    "PsiSlice",
    "DecoderLayout",
    "PairTable",
    "Penalty",
    "DecoderIncoherencePenalty",
    "NestedPrefixPenalty",
    "penalty_from_spec",
    # gate sources and co-activation statistics
    "connect",
    "DenseGates",
    "TopKGates",
    "SparseGates",
    "DelphiGates",
    "open_gates",
    "synth_gates",
    "DelphiLatents",
    "SAE",
    "load_sae",
    "ActivationSource",
    "open_activations",
    "EncodedGates",
    "encode_gates",
    "coactivation_stats",
    "RelativeThreshold",
    "open_stats",
    "merge_stats",
    "CoactivationStats",
    "plan_coactivation",
    "WindowedGates",
    "Resident",
    # distributed evaluation, curvature assembly, Newton steps
    "evaluate",
    "assemble_majorizer",
    "FactoredMajorizer",
    "newton_step",
    "NewtonResult",
    "save_newton_result",
    "newton_recorder",
    "collinearity_gate",
    "RunStore",
]
