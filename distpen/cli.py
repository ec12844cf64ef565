"""The ``distpen`` command."""

from __future__ import annotations

import argparse
import sys

from .errors import DistpenError

__all__ = ["main", "build_parser"]


def _cmd_demo(args) -> int:
    echo = (lambda *a, **k: None) if args.quiet else print
    if args.penalties_only:
        from .demo import run_penalty_demo

        res = run_penalty_demo(k_atoms=args.atoms, p_out=args.p_out, n_pairs=args.pairs, seed=args.seed, echo=echo)
        return 0 if res["ok"] else 1
    import os

    from .demo import run_pipeline_demo
    from .security import resolve_security

    security = resolve_security(args.tls, args.tls_ca_file, args.tls_cert, args.tls_key,
                                address=args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    res = run_pipeline_demo(args.out, n_tokens=args.tokens, k_atoms=args.atoms, p_out=args.p_out,
                            seed=args.seed, scheduler=args.scheduler, security=security, echo=echo,
                            progress=not args.quiet)
    return 0 if res["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distpen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic data (embedded default)")
    demo.add_argument("--out", default="distpen-run", help="run directory (replaced if it holds an earlier demo)")
    demo.add_argument("--tokens", type=int, default=1_000_000, help="synthetic tokens N")
    demo.add_argument("--atoms", type=int, default=4096, help="number of SAE atoms K")
    demo.add_argument("--p-out", type=int, default=64, help="decoder output width")
    demo.add_argument("--pairs", type=int, default=8_000, help="pairs of the in-memory demo (--penalties-only)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scheduler", help="Dask scheduler address (default: embedded LocalCluster)")
    demo.add_argument("--penalties-only", action="store_true",
                      help="only the in-memory penalty demo (every operation, finite-difference checks)")
    demo.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    demo.set_defaults(func=_cmd_demo)

    from . import _cli_penalty, _cli_stats

    _cli_stats.add_tls_arguments(demo)

    _cli_stats.register(sub)
    _cli_penalty.register(sub)
    return parser


def dispatch(args) -> int:
    """Run a parsed command; a :class:`DistpenError` becomes one ``distpen: error:`` line and exit 2."""
    try:
        return int(args.func(args) or 0)
    except DistpenError as exc:
        print(f"distpen: error: {exc}", file=sys.stderr)
        return 2
    finally:
        # a command's broadcast inputs are not reused after it: release them while the client is up
        from ._broadcast import BROADCASTS

        BROADCASTS.clear()


def main(argv=None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
