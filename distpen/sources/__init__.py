"""Where gates come from: gate arrays and stores, the latent caches and SAEs users already have.

:mod:`.gates`
    :class:`DenseGates`, :class:`TopKGates`, :class:`SparseGates` (CSR), :class:`DelphiGates` (a
    delphi latent cache as gates), :func:`open_gates`;
:mod:`.synth`
    :func:`synth_gates`, synthetic gates written on the workers;
:mod:`.delphi`
    :class:`DelphiLatents`, a delphi latent cache read as sparse token rows;
:mod:`.sae`
    :class:`SAE` encoders (ReLU, TopK, JumpReLU) and :func:`load_sae` for SAELens and sparsify
    checkpoints;
:mod:`.encode`
    :class:`EncodedGates` (activations encoded on the workers, straight into a job) and
    :func:`encode_gates` (into a gates store);
:mod:`.activations`
    :func:`open_activations`: activation banks (safetensors, ``.npy``), SAELens Arrow caches, the
    seed engine's corpus shards, and arrays.
"""

from .activations import ActivationSource, open_activations
from .delphi import DelphiLatents, is_latent_cache
from .gates import DelphiGates, DenseGates, SparseGates, TopKGates, as_gates, open_gates
from .encode import EncodedGates, encode_gates
from .sae import SAE, load_sae
from .synth import synth_gates

__all__ = ["DenseGates", "TopKGates", "SparseGates", "DelphiGates", "as_gates", "open_gates", "synth_gates", "DelphiLatents",
           "is_latent_cache", "SAE", "load_sae", "ActivationSource", "open_activations",
           "EncodedGates", "encode_gates"]
