"""``distpen synth | coactivation | pairs | status``: the statistics subcommands of the CLI.

:func:`register` adds them to the ``distpen`` parser; each ``run_*`` function takes the parsed
arguments and returns an exit status, so it can be called (and tested) on its own. Bad input raises
a :class:`~distpen.errors.DistpenError`, which ``distpen.cli.main`` prints as one line
(``distpen: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register", "run_synth", "run_coactivation", "run_pairs", "run_status", "main_for_tests"]


def _client(args):
    import os

    from .cluster import connect, get_client
    from .security import resolve_security

    address = getattr(args, "scheduler", None)
    security = resolve_security(getattr(args, "tls", False), getattr(args, "tls_ca_file", None),
                                getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                                address=address or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    if security is not None:
        return connect(address, security=security)
    return connect(address) if address else get_client()


class _Bar:
    """Progress on stderr driven by ``update(done, total, **postfix)``: a tqdm bar on a terminal,
    plain lines (at most one every few seconds, and the last) when stderr is not a terminal."""

    PLAIN_EVERY = 5.0

    def __init__(self, desc: str, unit: str, quiet: bool, stream=None):
        self.desc, self.unit, self.quiet, self.bar = desc, unit, quiet, None
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_plain = None
        self._last_line = None

    def update(self, done, total, **postfix):
        if self.quiet:
            return
        if not self.tty:
            self._plain(int(done), int(total), postfix)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=int(total), desc=self.desc, unit=self.unit, unit_scale=True,
                            file=self.stream, dynamic_ncols=True, mininterval=0.2)
        if self.bar.total != int(total):
            self.bar.total = int(total)
        self.bar.n = int(done)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def _plain(self, done: int, total: int, postfix: dict) -> None:
        import time

        now = time.monotonic()
        final = total > 0 and done >= total
        if not final and self._last_plain is not None and now - self._last_plain < self.PLAIN_EVERY:
            return
        pct = f" ({100.0 * done / total:.0f}%)" if total > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in postfix.items())
        line = f"{self.desc}: {done:,}/{total:,} {self.unit}{pct}{extra}"
        if line != self._last_line:
            print(line, file=self.stream, flush=True)
            self._last_line = line
        self._last_plain = now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_synth(args) -> int:
    from .gates import synth_gates

    client = _client(args)
    bar = _Bar("synth", "tok", args.quiet)
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
    from .coactivation import coactivation_stats
    from .gates import open_gates

    from .store import check_workers_see, is_url, staged_store

    gates = open_gates(args.gates)
    client = _client(args)
    bar = _Bar("coactivation", "tok", args.quiet)

    def progress(info):
        bar.update(info.get("rows_processed", 0), max(1, info.get("rows_total", 0) or 1),
                   tiles=f"{info.get('units_done', 0)}/{info.get('units_total', 0)}")

    try:
        # an fsspec URL store is staged in a local directory the workers share, then mirrored back
        with staged_store(args.out) as out:
            if is_url(args.out):
                check_workers_see(client, out)
            st = coactivation_stats(gates, out, row_chunk=args.row_chunk, tile=args.tile,
                                    split_every=args.split_every, overwrite=args.overwrite,
                                    progress=progress, client=client)
            p = st._job.progress()
    finally:
        bar.close()
    if not args.quiet:
        print(f"{args.out}: {st.n_tokens} tokens × {st.k_atoms} atoms, tiles {p.get('units_done')}/"
              f"{p.get('units_total')} ({p.get('units_computed')} computed now), "
              f"{p.get('throughput_rows_per_s', 0):,.0f} tokens/s")
    return 0


def run_pairs(args) -> int:
    from .coactivation import open_stats

    st = open_stats(args.stats)
    client = _client(args)
    table = st.pairs(threshold=args.threshold, top_m=args.top_m, measure=args.measure,
                     min_count=args.min_count, out=args.out, client=client)
    if not args.quiet:
        print(f"wrote {len(table)} pairs ({args.measure}) over {table.k_atoms} atoms to {args.out}")
    return 0


def run_status(args) -> int:
    import os

    from .dashboard import format_status as dashboard_table
    from .dashboard import status_json
    from .errors import InvalidArgumentError
    from .store import is_url, staged_store

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


def format_status(status: dict) -> str:
    """The text table of ``RunStore.status()`` (plus ``verify`` when present)."""
    lines = [f"store {status['path']}"]
    if not status["stages"]:
        lines.append("  (no jobs)")
    for stage, s in status["stages"].items():
        p = s.get("progress") or {}
        lines.append(f"  {stage:<14} {s.get('status', '?'):<10} units {s['units_done']}/{s['units_total']}"
                     f"  rows {p.get('rows_processed', 0)}/{p.get('rows_total', 0)}"
                     f"  {p.get('throughput_rows_per_s', 0):,.0f} tok/s  updated {p.get('updated', '-')}")
        for f in p.get("failures", [])[-3:]:
            lines.append(f"    failure at {f.get('time')}: {f.get('error')}")
    v = status.get("verify")
    if v is not None:
        for stage, r in v["stages"].items():
            state = "ok" if not (r["missing"] or r["mismatched"]) else "DAMAGED"
            lines.append(f"  verify {stage}: {state} ({r['units_done']} complete units checked)")
            for x in (r["missing"] + r["mismatched"])[:5]:
                lines.append(f"    {x}")
    return "\n".join(lines)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _common(p, tls: bool = True):
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or an embedded LocalCluster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    if tls:
        add_tls_arguments(p)


def add_tls_arguments(p) -> None:
    """``--tls``, ``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` (read by :func:`_client`)."""
    g = p.add_argument_group("TLS")
    g.add_argument("--tls", action="store_true",
                   help="encrypt and authenticate with TLS: with --scheduler, the certificates below or "
                        "those of the Dask configuration; without, an embedded cluster with temporary "
                        "self-signed certificates")
    g.add_argument("--tls-ca-file", metavar="PEM", default=None, help="CA certificate(s) of the cluster")
    g.add_argument("--tls-cert", metavar="PEM", default=None, help="this client's certificate")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="this client's private key")


def register(subparsers) -> None:
    """Add ``synth``, ``coactivation``, ``pairs`` and ``status`` to an argparse subparsers object."""
    p = subparsers.add_parser("synth", help="write synthetic gates (dense or top-k) to a Zarr group")
    p.add_argument("out", help="output Zarr group")
    p.add_argument("--tokens", type=_positive_int, required=True, help="number of tokens N")
    p.add_argument("--atoms", type=_positive_int, required=True, help="number of atoms K")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--topk", type=_positive_int, default=None, help="top-k gates with k active atoms per token")
    form.add_argument("--density", type=float, default=None, help="dense gates with this fraction of non-zeros")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-chunk", type=_positive_int, default=None, help="rows per stored chunk")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--overwrite", action="store_true")
    _common(p)
    p.set_defaults(func=run_synth)

    p = subparsers.add_parser("coactivation", help="co-activation statistics of gates into a run store")
    p.add_argument("gates", help="gates Zarr group (from `distpen synth`) or a 2-D Zarr array; a path or fsspec URL")
    p.add_argument("--out", required=True,
                   help="statistics run store (Zarr group): a path, or an fsspec URL (s3://, gs://...) staged "
                        "through a local directory the workers share (DISTPEN_STAGING_DIR)")
    p.add_argument("--row-chunk", type=_positive_int, default=None)
    p.add_argument("--tile", type=_positive_int, default=None)
    p.add_argument("--split-every", type=_positive_int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a different job in --out")
    _common(p)
    p.set_defaults(func=run_coactivation)

    p = subparsers.add_parser("pairs", help="atom pairs from co-activation statistics")
    p.add_argument("stats", help="statistics store (from `distpen coactivation`)")
    p.add_argument("--out", required=True, help="output PairTable Zarr group")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--top-m", type=_positive_int, default=None)
    p.add_argument("--measure", default="mean", choices=("mean", "count", "jaccard", "cosine", "lift"))
    p.add_argument("--min-count", type=int, default=0)
    _common(p)
    p.set_defaults(func=run_pairs)

    p = subparsers.add_parser("status", help="progress and completeness of a run store")
    p.add_argument("store", help="run store path or fsspec URL")
    p.add_argument("--verify", action="store_true",
                   help="check that every complete unit's chunks exist with the recorded sizes (exit 1 if not)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, tls=False)
    p.set_defaults(func=run_status)


def main_for_tests(argv) -> int:
    """Parse ``argv`` with only these subcommands and run, as ``distpen.cli.main`` does."""
    from .cli import dispatch

    parser = argparse.ArgumentParser(prog="distpen")
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))
