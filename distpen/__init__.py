"""distpen: co-activation statistics and second-order SAE penalties at cluster scale.

See ``DESIGN.md`` for the math and the public contract.
"""

from . import errors
from .layout import DecoderLayout, PenaltyTier, PsiSlice
from .pairs import PairTable
from .penalties import DecoderIncoherencePenalty, NestedPrefixPenalty, Penalty, penalty_from_spec
from .weights import Geometric, Linear, ReciprocalIter, ScalarWeightSchedule, resolve_learnable_weight

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
]
