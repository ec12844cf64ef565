"""What every ``distpen`` subcommand shares: the client, the progress bar, common arguments, dispatch.

A subcommand module registers its parsers with :func:`add_common_arguments` (``--scheduler``,
``--quiet`` and the TLS options), connects with :func:`client_for`, shows progress with :class:`Bar`,
and raises a :class:`~distpen.errors.DistpenError` on bad input, which :func:`dispatch` prints as one
``distpen: error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DistpenError

__all__ = ["Bar", "client_for", "positive_int", "add_common_arguments", "add_tls_arguments", "dispatch"]


def client_for(args):
    """The client a command runs on: ``--scheduler`` (with the TLS options), else the current or embedded one."""
    import os

    from ..cluster import connect, get_client
    from ..security import resolve_security

    address = getattr(args, "scheduler", None)
    security = resolve_security(getattr(args, "tls", False), getattr(args, "tls_ca_file", None),
                                getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                                address=address or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    if security is not None:
        return connect(address, security=security)
    return connect(address) if address else get_client()


class Bar:
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


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_common_arguments(p, tls: bool = True):
    """``--scheduler``, ``--quiet`` and (unless ``tls=False``) the TLS options."""
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS or an embedded LocalCluster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    if tls:
        add_tls_arguments(p)


def add_tls_arguments(p) -> None:
    """``--tls``, ``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` (read by :func:`client_for`)."""
    g = p.add_argument_group("TLS")
    g.add_argument("--tls", action="store_true",
                   help="encrypt and authenticate with TLS: with --scheduler, the certificates below or "
                        "those of the Dask configuration; without, an embedded cluster with temporary "
                        "self-signed certificates")
    g.add_argument("--tls-ca-file", metavar="PEM", default=None, help="CA certificate(s) of the cluster")
    g.add_argument("--tls-cert", metavar="PEM", default=None, help="this client's certificate")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="this client's private key")


def dispatch(args) -> int:
    """Run a parsed command; a :class:`DistpenError` becomes one ``distpen: error:`` line and exit 2."""
    try:
        return int(args.func(args) or 0)
    except DistpenError as exc:
        print(f"distpen: error: {exc}", file=sys.stderr)
        return 2
    finally:
        # a command's broadcast inputs are not reused after it: release them while the client is up
        from .._broadcast import BROADCASTS

        BROADCASTS.clear()
