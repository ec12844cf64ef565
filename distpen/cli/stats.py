"""``distpen synth | coactivation | plan | pairs | neighbours | clusters | status``: the statistics subcommands of the CLI.

:func:`register` adds them to the ``distpen`` parser; each ``run_*`` function takes the parsed
arguments and returns an exit status, so it can be called (and tested) on its own. Bad input raises
a :class:`~distpen.errors.DistpenError`, which ``distpen.cli.main`` prints as one line
(``distpen: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json

from ..coactivation.stats import MEASURES
from ._common import Bar, add_common_arguments, client_for, dispatch, positive_int

__all__ = ["register", "run_synth", "run_coactivation", "run_pairs", "run_neighbours", "run_clusters", "run_plan", "run_status", "main_for_tests"]


def run_synth(args) -> int:
    from ..sources.synth import synth_gates

    client = client_for(args)
    bar = Bar("synth", "tok", args.quiet)
    try:
        g = synth_gates(args.out, args.tokens, args.atoms, topk=args.topk, density=args.density,
                        seed=args.seed, row_chunk=args.row_chunk, dtype=args.dtype, overwrite=args.overwrite,
                        progress=lambda d, t: bar.update(d, t), client=client)
    finally:
        bar.close()
    if not args.quiet:
        print(f"wrote {g!r} to {args.out}")
    return 0


def run_coactivation(args) -> int:
    from ..coactivation.job import coactivation_stats
    from ..store import check_workers_see, is_url, staged_store
    from .encode import fire_threshold_from, gates_from_args

    gates, sae = gates_from_args(args)  # opened and checked before any work
    threshold = fire_threshold_from(args.fire_threshold, sae)
    client = client_for(args)
    unit = "tok" if args.window is None else "win"
    bars = {"phase": None, "bar": Bar("coactivation", unit, args.quiet)}

    def progress(info):
        phase = info.get("phase")  # an atom-major job: the copy, then the tiles, each with its own bar and rate
        if phase != bars["phase"]:
            bars["bar"].close()
            bars["phase"], bars["bar"] = phase, Bar(f"coactivation ({phase})" if phase else "coactivation",
                                                    unit, args.quiet)
        bars["bar"].update(info.get("rows_processed", 0), max(1, info.get("rows_total", 0) or 1),
                           tiles=f"{info.get('units_done', 0)}/{info.get('units_total', 0)}")

    try:
        # an fsspec URL store is staged in a local directory the workers share, then mirrored back
        with staged_store(args.out) as out:
            if is_url(args.out):
                check_workers_see(client, out)
            st = coactivation_stats(gates, out, row_chunk=args.row_chunk, tile=args.tile,
                                    split_every=args.split_every, fire_threshold=threshold,
                                    window=args.window, seq_len=args.seq_len, decomposition=args.decomposition,
                                    overwrite=args.overwrite, progress=progress, client=client)
            p = st._job.progress()
    finally:
        bars["bar"].close()
    if not args.quiet:
        rows = "tokens" if st.window is None else f"windows of {st.window} tokens"
        print(f"{args.out}: {st.n_tokens} {rows} × {st.k_atoms} atoms, tiles {p.get('units_done')}/"
              f"{p.get('units_total')} ({p.get('units_computed')} computed now), "
              f"{p.get('throughput_rows_per_s', 0):,.0f} {rows.split()[0]}/s")
    return 0


def run_pairs(args) -> int:
    from ..coactivation.stats import open_stats

    st = open_stats(args.stats)
    client = client_for(args)
    table = st.pairs(threshold=args.threshold, top_m=args.top_m, measure=args.measure,
                     min_count=args.min_count, out=args.out, client=client)
    if not args.quiet:
        print(f"wrote {len(table)} pairs ({args.measure}) over {table.k_atoms} atoms to {args.out}")
    return 0


def run_neighbours(args) -> int:
    from ..coactivation.stats import open_stats

    st = open_stats(args.stats)
    client = client_for(args)
    lists = st.neighbours(measure=args.measure, top_m=args.top_m, out=args.out, client=client)
    if not args.quiet:
        n = sum(1 for v in lists.values() if v)
        print(f"wrote the {args.top_m} strongest {args.measure} partners of {n} of {st.k_atoms} latents "
              f"(delphi's neighbour JSON) to {args.out}")
    return 0


def run_clusters(args) -> int:
    from ..coactivation.stats import open_stats

    st = open_stats(args.stats)
    cl = st.clusters(args.measure, threshold=args.threshold, max_size=args.max_size, method=args.method,
                     top_m=args.top_m, client=client_for(args))
    rows = [{**r, "members": r["members"].tolist()} for r in cl.rows]
    if args.out:
        from ..store import publish_file

        doc = {"measure": cl.measure, "method": cl.method, "threshold": cl.threshold,
               "n_isolated": cl.n_isolated, "clusters": rows}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(doc, f)

        publish_file(f"{args.out}.tmp", args.out, write)
    if not args.quiet:
        print(f"{len(rows)} groups of latents ({cl.method}, {cl.measure} > {cl.threshold:.6g}); "
              f"{cl.n_isolated} latents in none")
        print(f"{'cluster':>7} {'size':>5} {'edges':>6} {'density':>7} {'hub':>6}  members")
        for r in rows[:args.show]:
            mem = " ".join(map(str, r["members"][:12])) + (" …" if r["size"] > 12 else "")
            print(f"{r['cluster']:>7} {r['size']:>5} {r['edges']:>6} {r['density']:>7.3f} {r['hub']:>6}  {mem}")
    return 0


def _bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``12e9`` → bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    t = text.strip().lower()
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[:-len(u)]) * f)
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 8GiB or 512MiB, got {text!r}") from None


def run_plan(args) -> int:
    from ..coactivation.forecast import calibrate, plan_atom_major, plan_coactivation

    rates = None
    if args.calibrate:
        rates = calibrate()
        if not args.json:
            print("calibrated per-core rates on this machine: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in rates.items() if k.startswith("t_")))
    plan = plan_coactivation(args.tokens, args.atoms, topk=args.topk, density=args.density, n_workers=args.workers,
                             memory_limit=args.memory, threads_per_worker=args.threads, tile=args.tile,
                             rates=rates)
    alt = None
    if args.atom_major and args.topk is not None:
        alt = plan_atom_major(args.tokens, args.atoms, topk=args.topk, n_workers=args.workers,
                              memory_limit=args.memory, threads_per_worker=args.threads, tile=plan.tile,
                              rates=rates)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "atom_major": alt}, indent=1, default=float))
        return 0
    print(plan)
    if alt is not None:
        gib = 2.0**30
        print(f"atom-major 2-D decomposition (--decomposition atoms): {alt['n_tasks']} tasks of "
              f"{alt['blocks_per_side']}² "
              f"blocks, a one-off copy of {alt['copy_bytes'] / gib:.0f} GiB, "
              f"{alt['bytes_read_per_worker'] / gib:.1f} GiB read per worker "
              f"(row-major: {alt['row_major_bytes_read_per_worker'] / gib:.1f}), predicted {alt['predicted_s']:,.0f} s "
              f"— {alt['speedup']:.1f}× the row-major plan")
    return 0


def run_status(args) -> int:
    import os

    from ..dashboard.status import format_status as dashboard_table
    from ..dashboard.status import status_json
    from ..errors import InvalidArgumentError
    from ..store import is_url, staged_store

    with staged_store(args.store, push=False) as local:  # a URL store is read from a local copy
        if not os.path.isdir(local) or (is_url(args.store) and not os.listdir(local)):
            raise InvalidArgumentError(f"no run store at {args.store!r}")
        # RunStore.status() plus per-stage summaries: fraction, throughput, ETA, staleness
        status = status_json(local, verify=args.verify)
    if is_url(args.store):
        status["path"] = args.store
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True, default=str))
    else:
        print(dashboard_table(status))
    if args.verify and not status.get("verify", {"ok": True})["ok"]:
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``synth``, ``coactivation``, ``pairs``, ``neighbours``, ``clusters`` and ``status`` to an argparse subparsers object."""
    p = subparsers.add_parser("synth", help="write synthetic gates (dense or top-k) to a Zarr group")
    p.add_argument("out", help="output Zarr group")
    p.add_argument("--tokens", type=positive_int, required=True, help="number of tokens N")
    p.add_argument("--atoms", type=positive_int, required=True, help="number of atoms K")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--topk", type=positive_int, default=None, help="top-k gates with k active atoms per token")
    form.add_argument("--density", type=float, default=None, help="dense gates with this fraction of non-zeros")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-chunk", type=positive_int, default=None, help="rows per stored chunk")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--overwrite", action="store_true")
    add_common_arguments(p)
    p.set_defaults(func=run_synth)

    p = subparsers.add_parser("coactivation", help="co-activation statistics of gates into a run store")
    p.add_argument("gates", help="gates Zarr group (from `distpen synth` or `distpen encode`), a 2-D Zarr array, "
                                 "a delphi latent cache directory, or (with --sae) activations to encode; "
                                 "a path or fsspec URL")
    p.add_argument("--sae", default=None, help="SAE checkpoint folder: encode the activations GATES on the workers")
    p.add_argument("--key", default=None, help="with --sae: the tensor or column holding the activations")
    p.add_argument("--fire-threshold", default=None, metavar="T",
                   help="a gate at or below T counts as zero: a number, relative:RHO (RHO times the token's "
                        "largest gate) or sae (the --sae JumpReLU thresholds); default 0")
    p.add_argument("--window", type=positive_int, default=None, metavar="W",
                   help="count co-occurrence per window of W consecutive tokens within a sequence (a latent "
                        "fires in a window if it fires on any of its tokens) instead of per token")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="L",
                   help="with --window: tokens per sequence (default: the source's own, e.g. a delphi "
                        "cache's context length)")
    p.add_argument("--out", required=True,
                   help="statistics run store (Zarr group): a path, or an fsspec URL (s3://, gs://...) staged "
                        "through a local directory the workers share (DISTPEN_STAGING_DIR)")
    p.add_argument("--row-chunk", type=positive_int, default=None)
    p.add_argument("--tile", type=positive_int, default=None)
    p.add_argument("--split-every", type=positive_int, default=None)
    p.add_argument("--decomposition", choices=("rows", "atoms"), default=None,
                   help="rows: tile groups that each read every row chunk; atoms (top-k or CSR gates): an "
                        "atom-major copy of the gates written once, then square tasks that read only their "
                        "atoms' entries (default: atoms when the forecast says it is over 2x faster)")
    p.add_argument("--overwrite", action="store_true", help="replace a different job in --out")
    add_common_arguments(p)
    p.set_defaults(func=run_coactivation)

    p = subparsers.add_parser("pairs", help="atom pairs from co-activation statistics")
    p.add_argument("stats", help="statistics store (from `distpen coactivation`)")
    p.add_argument("--out", required=True, help="output PairTable Zarr group")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--top-m", type=positive_int, default=None)
    p.add_argument("--measure", default="mean", choices=MEASURES,
                   help="pair weight: mean (the penalty's), count, jaccard, cosine, lift, npmi, phi, pearson, dice")
    p.add_argument("--min-count", type=int, default=0)
    add_common_arguments(p)
    p.set_defaults(func=run_pairs)

    p = subparsers.add_parser("neighbours", help="every latent's strongest partners, as delphi's neighbour JSON")
    p.add_argument("stats", help="statistics store (from `distpen coactivation`)")
    p.add_argument("--out", required=True, help="JSON file, e.g. neighbours/<hookpoint>-co-occurrence.json")
    p.add_argument("--measure", default="jaccard", choices=MEASURES)
    p.add_argument("--top-m", type=positive_int, default=250, help="partners per latent (delphi's default: 250)")
    add_common_arguments(p)
    p.set_defaults(func=run_neighbours)

    p = subparsers.add_parser("clusters", help="groups of co-occurring latents (components or Louvain communities)")
    p.add_argument("stats", help="statistics store (from `distpen coactivation`)")
    p.add_argument("--measure", default="jaccard", choices=MEASURES)
    p.add_argument("--method", default="components", choices=("components", "louvain"))
    p.add_argument("--threshold", type=float, default=None,
                   help="edge threshold (default for components: bisected so the largest has ≤ --max-size)")
    p.add_argument("--max-size", type=positive_int, default=200)
    p.add_argument("--top-m", type=positive_int, default=None, help="graph of each latent's top-m partners only")
    p.add_argument("--out", default=None, help="write the table as JSON")
    p.add_argument("--show", type=positive_int, default=20, help="rows to print")
    add_common_arguments(p)
    p.set_defaults(func=run_clusters)

    p = subparsers.add_parser("plan", help="forecast a co-activation job: tile groups, memory, bytes read, time")
    p.add_argument("--tokens", type=positive_int, required=True, help="number of tokens N")
    p.add_argument("--atoms", type=positive_int, required=True, help="number of latents K")
    form = p.add_mutually_exclusive_group(required=True)
    form.add_argument("--topk", type=positive_int, help="active latents per token (top-k gates)")
    form.add_argument("--density", type=float, help="nonzero fraction (dense gates)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--memory", type=_bytes, default=8 * 2**30, help="memory limit per worker, e.g. 8GiB")
    p.add_argument("--threads", type=positive_int, default=1, help="threads per worker")
    p.add_argument("--tile", type=positive_int, default=None)
    p.add_argument("--calibrate", action="store_true", help="measure the per-core rates on this machine first")
    p.add_argument("--atom-major", action="store_true", help="also forecast the 2-D atom-major decomposition")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_plan)

    p = subparsers.add_parser("status", help="progress and completeness of a run store")
    p.add_argument("store", help="run store path or fsspec URL")
    p.add_argument("--verify", action="store_true",
                   help="check that every complete unit's chunks exist with the recorded sizes (exit 1 if not)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common_arguments(p, tls=False)
    p.set_defaults(func=run_status)


def main_for_tests(argv) -> int:
    """Parse ``argv`` with only these subcommands and run, as ``distpen.cli.main`` does."""

    parser = argparse.ArgumentParser(prog="distpen")
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))
