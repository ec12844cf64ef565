"""Where gates come from: dense and top-k gate arrays, gate stores, and synthetic gates.

:mod:`.gates`
    :class:`DenseGates`, :class:`TopKGates`, :func:`open_gates`;
:mod:`.synth`
    :func:`synth_gates`, synthetic gates written on the workers.
"""

from .gates import DenseGates, TopKGates, as_gates, open_gates
from .synth import synth_gates

__all__ = ["DenseGates", "TopKGates", "as_gates", "open_gates", "synth_gates"]
