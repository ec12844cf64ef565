"""``distpen evaluate | assemble | newton``: the penalty subcommands of the CLI.

A penalty is named by the JSON spec its ``to_spec()`` writes (``--penalty spec.json``); the decoder
penalty's pairs come from a PairTable store (``--pairs``). Arrays are Zarr arrays (or ``.npy`` files).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import InvalidArgumentError
from ._common import Bar, add_common_arguments, client_for

__all__ = ["register", "run_evaluate", "run_assemble", "run_newton", "load_penalty", "open_vector"]


def load_penalty(spec_path: str, pairs_path: str | None = None):
    """Rebuild a penalty from its JSON spec (and, for the decoder penalty, its PairTable store)."""
    from ..pairs import PairTable
    from ..penalties import penalty_from_spec

    try:
        with open(spec_path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise InvalidArgumentError(f"--penalty: no such file {spec_path!r}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--penalty: {spec_path!r} is not JSON ({exc})") from None
    pairs = None
    if isinstance(spec, dict) and spec.get("kind_tag") == "decoder_incoherence":
        if pairs_path is None:
            raise InvalidArgumentError("a decoder_incoherence penalty needs --pairs PAIRS (a PairTable store)")
        pairs = PairTable.open(pairs_path)
    return penalty_from_spec(spec, pairs)


def open_vector(path: str, name: str):
    """A Zarr array (opened lazily) or a ``.npy`` file (memory-mapped)."""
    import zarr

    if path is None:
        return None
    if path.endswith(".npy"):
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"{name}: no such file {path!r}")
        return np.load(path, mmap_mode="r")
    try:
        node = zarr.open(path, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError if hasattr(zarr.errors, "NodeNotFoundError") else FileNotFoundError):
        raise InvalidArgumentError(f"{name}: no Zarr array at {path!r}") from None
    if isinstance(node, zarr.Group):
        arrays = sorted(node.array_keys())
        raise InvalidArgumentError(f"{name}: {path!r} is a Zarr group; name one of its arrays: {arrays}")
    return node


def _join(out: str, name: str) -> str:
    """Where ``name`` lies in the store ``out`` (a path or a URL)."""
    from ..store import is_url

    return out.rstrip("/") + "/" + name if is_url(out) else os.path.join(out, name)


def _parse_floats(text: str | None, name: str) -> np.ndarray:
    if text is None or text == "":
        return np.zeros(0)
    try:
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise InvalidArgumentError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _inputs(args):
    """The penalty, target and ρ slice every penalty command names (ρ defaults to zeros)."""
    pen = load_penalty(args.penalty, args.pairs)
    t = open_vector(args.t, "--t")
    rho = _parse_floats(args.rho, "--rho") if args.rho is not None else np.zeros(pen.rho_count)
    return pen, t, rho


def _bar(desc, quiet):
    return Bar(desc, "task", quiet)


class _Out:
    """``--out`` as a local directory: an fsspec URL store (``s3://``, ``gs://``...) is staged in a
    local directory the workers share and mirrored back when the command ends — after a failure
    too, as for ``distpen coactivation``: completed tiles and parts carry their markers, so a re-run
    resumes from the URL. A local path, or no ``--out``, is used as it is."""

    def __init__(self, out, client):
        from ..store import staged_store

        self.url, self.client = out, client
        self._staged = None if out is None else staged_store(out)

    def __enter__(self):
        from ..store import check_workers_see, is_url

        if self._staged is None:
            return None
        local = self._staged.__enter__()
        if is_url(self.url):
            try:
                check_workers_see(self.client, local)
            except BaseException:
                self._staged.push = False
                self._staged.__exit__(None, None, None)
                raise
        return local

    def __exit__(self, exc_type, exc, tb):
        if self._staged is None:
            return False
        return self._staged.__exit__(exc_type, exc, tb)


def run_evaluate(args) -> int:
    from ..curvature.evaluate import evaluate

    pen, t, rho = _inputs(args)
    v = open_vector(args.v, "--v")
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    client = client_for(args)
    bar = _bar("evaluate", args.quiet)
    summary = {}
    try:
        with _Out(args.out, client) as out:
            res = evaluate(pen, t, rho, ops=ops, v=v, out=out, overwrite=args.overwrite,
                           progress=lambda label, done, total: bar.update(done, total))
            for name, val in res.items():  # summarised while a staged store is still there
                if val is None:
                    summary[name] = None
                elif name == "value":
                    summary[name] = val
                elif name == "grad_rho":
                    summary[name] = [float(x) for x in np.asarray(val)]
                elif args.out is not None and hasattr(val, "store"):
                    summary[name] = _join(args.out, name)
                else:
                    summary[name] = {"norm": float(np.linalg.norm(np.asarray(val)))}
    finally:
        bar.close()
    if not args.quiet:
        print(json.dumps(summary, indent=1) if args.json else
              "\n".join(f"{k:<20} {v}" for k, v in summary.items()))
    return 0


def run_assemble(args) -> int:
    from ..curvature.tiles import assemble_majorizer

    pen, t, rho = _inputs(args)
    client = client_for(args)
    bar = _bar("assemble", args.quiet)
    try:
        with _Out(args.out, client) as out:
            H = assemble_majorizer(pen, t, rho, out, scale=args.scale, tile=args.tile, format=args.format,
                                   overwrite=args.overwrite,
                                   progress=lambda label, done, total: bar.update(done, total, phase=label))
            if args.format == "factored":
                line = f"factored majorizer of {pen.n_coef:,} coefficients: S, pairs and decoder in {args.out}"
            else:
                a = dict(H.attrs)
                line = (f"{_join(args.out, 'H')}: {H.shape[0]:,} × {H.shape[1]:,} in {H.chunks[0]}² tiles, "
                        f"{a.get('tiles_written')} of {a.get('tiles_total')} tiles written "
                        f"({a.get('tiles_computed_this_run')} computed now)")
    finally:
        bar.close()
    if not args.quiet:
        print(line)
    return 0


def run_newton(args) -> int:
    from ..curvature.evaluate import evaluate
    from ..curvature.newton import newton_step

    pen, t, rho = _inputs(args)
    client = client_for(args)
    t_np = np.asarray(t[...] if hasattr(t, "store") else t, dtype=np.float64).ravel()
    if args.rhs is not None:
        rhs = np.asarray(open_vector(args.rhs, "--rhs")[...], dtype=np.float64).ravel()
    else:
        rhs = -np.asarray(evaluate(pen, t_np, rho, ops=("grad",))["grad"])
    bar = _bar("newton", args.quiet)
    try:
        with _Out(args.out, client) as out:
            def callback(it, r):
                bar.update(it, args.maxiter, residual=f"{r:.2e}")

            # with a store the workers write x into it and the stage records the residuals as it runs
            res = newton_step(pen, t_np, rho, rhs, damping=args.damping, tol=args.tol, maxiter=args.maxiter,
                              precond=args.precond, callback=callback, out=out)
    finally:
        bar.close()
    if not args.quiet:
        where = f"; x in {_join(args.out, 'newton_x')}" if args.out else ""
        print(f"newton ({args.precond}): {res.iterations} iterations, converged={res.converged}, "
              f"relative residual {res.residuals[-1]:.2e}, {res.seconds:.2f} s{where}")
    return 0 if res.converged else 1


def register(sub) -> None:
    def common(p, out_required=False):
        p.add_argument("--penalty", required=True, help="penalty spec JSON (from penalty.to_spec())")
        p.add_argument("--pairs", help="PairTable store (decoder penalty)")
        p.add_argument("--t", required=True, help="target vector: Zarr array or .npy")
        p.add_argument("--rho", help="comma-separated ρ slice (default zeros)")
        p.add_argument("--out", required=out_required,
                       help="run store: a directory, or an fsspec URL (s3://, gs://...) staged locally")
        p.add_argument("--overwrite", action="store_true", help="replace a different job in --out")
        add_common_arguments(p)  # --scheduler, --quiet and the TLS options, as for every command

    p = sub.add_parser("evaluate", help="evaluate penalty operations on the cluster")
    common(p)
    p.add_argument("--ops", default="value,grad", help="comma-separated operations")
    p.add_argument("--v", help="probe vector for hvp / psd_majorizer_hvp")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("assemble", help="assemble the Gauss-Newton majorizer into Zarr tiles")
    common(p, out_required=True)
    p.add_argument("--tile", type=int, help="tile edge (default: 2048 or one decoder block)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--format", choices=("tiles", "factored"), default="tiles")
    p.set_defaults(func=run_assemble)

    p = sub.add_parser("newton", help="preconditioned CG on (H_GN + damping·I) x = rhs")
    common(p)
    p.add_argument("--rhs", help="right-hand side (default: −gradient, the Newton direction)")
    p.add_argument("--damping", type=float, required=True)
    p.add_argument("--precond", choices=("none", "jacobi", "block"), default="block")
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--maxiter", type=int, default=200)
    p.set_defaults(func=run_newton)
