"""The ``distpen`` command.

One module per command group, each with a ``register(subparsers)``: :mod:`.demo` (``demo``),
:mod:`.stats` (``synth``, ``coactivation``, ``pairs``, ``status``), :mod:`.encode` (``encode``) and :mod:`.penalty`
(``evaluate``, ``assemble``, ``newton``); :mod:`._common` holds what they share.
"""

from __future__ import annotations

import argparse

from . import demo, encode, penalty, stats
from ._common import dispatch

__all__ = ["main", "build_parser", "dispatch"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distpen", description="Co-activation statistics and second-order SAE penalties on a Dask cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.register(sub)
    stats.register(sub)
    encode.register(sub)
    penalty.register(sub)
    return parser


def main(argv=None) -> int:
    return dispatch(build_parser().parse_args(argv))


