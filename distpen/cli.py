"""The ``distpen`` command."""

from __future__ import annotations

import argparse
import sys

from .errors import DistpenError

__all__ = ["main", "build_parser"]


def _cmd_demo(args) -> int:
    from .demo import run_penalty_demo

    res = run_penalty_demo(k_atoms=args.atoms, p_out=args.p_out, n_pairs=args.pairs, seed=args.seed,
                           echo=(lambda *a, **k: None) if args.quiet else print)
    return 0 if res["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distpen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic data (embedded default)")
    demo.add_argument("--atoms", type=int, default=512, help="number of SAE atoms K")
    demo.add_argument("--p-out", type=int, default=64, help="decoder output width")
    demo.add_argument("--pairs", type=int, default=8_000, help="number of co-activating pairs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    demo.set_defaults(func=_cmd_demo)

    try:
        from . import _cli_stats
    except ImportError:  # pragma: no cover - optional while modules are being added
        pass
    else:
        _cli_stats.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DistpenError as exc:
        print(f"distpen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
