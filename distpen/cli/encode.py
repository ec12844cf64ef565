"""``distpen encode``: activations encoded by an SAE into a gates store, on the cluster.

Also :func:`gates_from_args` and :func:`fire_threshold_from`, which ``distpen coactivation`` uses
to read gates from a latent cache, a gates store or activations plus ``--sae``, and to parse
``--fire-threshold``.
"""

from __future__ import annotations

from ._common import Bar, add_common_arguments, client_for, positive_int

__all__ = ["register", "run_encode", "gates_from_args", "fire_threshold_from"]


def run_encode(args) -> int:
    from ..sources.activations import open_activations
    from ..sources.encode import EncodedGates, encode_gates
    from ..sources.sae import load_sae

    # everything is opened and checked on the client before any task runs
    source = EncodedGates(open_activations(args.activations, key=args.key), load_sae(args.sae))
    client = client_for(args)
    bar = Bar("encode", "tok", args.quiet)

    def progress(info):
        bar.update(info.get("rows_processed", 0), max(1, info.get("rows_total", 0) or 1),
                   chunks=f"{info.get('units_done', 0)}/{info.get('units_total', 0)}")

    try:
        g = encode_gates(source.activations, source.sae, args.out, row_chunk=args.row_chunk,
                         overwrite=args.overwrite, progress=progress, client=client)
    finally:
        bar.close()
    if not args.quiet:
        print(f"wrote {g!r} to {args.out}")
    return 0


def fire_threshold_from(text, sae=None):
    """``--fire-threshold``: a float, ``relative:RHO``, or ``sae`` (the SAE's JumpReLU thresholds)."""
    from ..coactivation.plan import RelativeThreshold
    from ..errors import InvalidArgumentError

    if text is None:
        return 0.0
    t = str(text).strip()
    if t == "sae":
        if sae is None or sae.threshold is None:
            what = "no --sae was given" if sae is None else f"the SAE is {sae.activation!r}, not JumpReLU"
            raise InvalidArgumentError(f"--fire-threshold sae needs a JumpReLU SAE's thresholds, but {what}")
        return sae.threshold
    if t.startswith("relative:"):
        try:
            rho = float(t.split(":", 1)[1])
        except ValueError:
            raise InvalidArgumentError(f"--fire-threshold {t!r}: expected relative:RHO with RHO a number") from None
        return RelativeThreshold(rho)
    try:
        return float(t)
    except ValueError:
        raise InvalidArgumentError(
            f"--fire-threshold {t!r}: expected a number, relative:RHO or sae") from None


def gates_from_args(args):
    """The gates of ``distpen coactivation``: activations encoded with ``--sae``, else ``open_gates``."""
    from ..sources.gates import open_gates

    if getattr(args, "sae", None):
        from ..sources.activations import open_activations
        from ..sources.encode import EncodedGates
        from ..sources.sae import load_sae

        sae = load_sae(args.sae)
        return EncodedGates(open_activations(args.gates, key=getattr(args, "key", None)), sae), sae
    return open_gates(args.gates), None


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode activations with an SAE into a gates store")
    p.add_argument("activations", help="activation bank: .safetensors/.npy/.shard files, a directory, a glob, "
                                       "a SAELens Arrow cache directory, or a seed-engine bf16 harvest "
                                       "(manifest.json + shard_*.bf16)")
    p.add_argument("--sae", required=True, help="SAE checkpoint folder (SAELens or sparsify)")
    p.add_argument("--out", required=True, help="output gates store (a local directory)")
    p.add_argument("--key", default=None, help="tensor or column holding the activations, when a file has several")
    p.add_argument("--row-chunk", type=positive_int, default=None, help="rows per chunk (one task each)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    add_common_arguments(p)
    p.set_defaults(func=run_encode)
