"""In-memory penalties: the single source of truth for the math (docs/design.md)."""

from ._base import Penalty
from .decoder import DecoderIncoherencePenalty
from .nested import NestedPrefixPenalty

__all__ = ["Penalty", "DecoderIncoherencePenalty", "NestedPrefixPenalty", "penalty_from_spec"]


def penalty_from_spec(spec: dict, pairs=None) -> Penalty:
    """Rebuild a penalty from ``to_spec()``; the decoder penalty also needs its ``pairs``."""
    from ..errors import InvalidArgumentError

    tag = spec.get("kind_tag") if isinstance(spec, dict) else None
    if tag == DecoderIncoherencePenalty.kind_tag:
        if pairs is None:
            raise InvalidArgumentError("a decoder_incoherence spec needs its pairs (they travel separately)")
        return DecoderIncoherencePenalty.from_spec(spec, pairs)
    if tag == NestedPrefixPenalty.kind_tag:
        return NestedPrefixPenalty.from_spec(spec)
    raise InvalidArgumentError(
        f"unknown penalty kind_tag {tag!r}; expected 'decoder_incoherence' or 'nested_prefix'"
    )
