"""distpen: co-activation statistics and second-order SAE penalties at cluster scale.

See ``DESIGN.md`` for the math and the public contract.
"""

from . import errors
from .layout import DecoderLayout, PenaltyTier, PsiSlice
from .pairs import PairTable
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty, Penalty, penalty_from_spec
from .weights import Geometric, Linear, ReciprocalIter, ScalarWeightSchedule, resolve_learnable_weight

# --- distributed co-activation statistics (issue 3) ---
from .cluster import connect
from .coactivation import CoactivationStats, coactivation_stats, merge_stats, open_stats
from .gates import DenseGates, TopKGates, open_gates, synth_gates
# --- end co-activation statistics ---
from .assembly import FactoredMajorizer, assemble_majorizer, evaluate
from .newton import NewtonResult, newton_recorder, newton_step, save_newton_result
from .store import RunStore

__version__ = "0.1.0"

__all__ = [
    "errors",
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
    # co-activation statistics (issue 3)
    "connect",
    "DenseGates",
    "TopKGates",
    "open_gates",
    "synth_gates",
    "coactivation_stats",
    "open_stats",
    "merge_stats",
    "CoactivationStats",
    # distributed evaluation, curvature assembly, Newton steps (issue 4)
    "evaluate",
    "assemble_majorizer",
    "FactoredMajorizer",
    "newton_step",
    "NewtonResult",
    "save_newton_result",
    "newton_recorder",
    "RunStore",
]
