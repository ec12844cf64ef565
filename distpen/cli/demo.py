"""``distpen demo``: the whole pipeline on synthetic data, and every penalty operation checked in memory."""

from __future__ import annotations

import time

import numpy as np

from ..pairs import PairTable
from ..penalties import DecoderIncoherencePenalty, NestedPrefixPenalty
from ._common import add_tls_arguments

__all__ = ["register", "run_pipeline_demo", "run_penalty_demo", "synthetic_decoder_problem"]


def synthetic_decoder_problem(k_atoms: int = 512, p_out: int = 64, n_pairs: int = 8_000,
                              max_block: int = 8, seed: int = 0):
    """A random decoder with mixed block sizes and a random, heavy-tailed pair set.

    Returns ``(block_sizes, pairs, beta)``.
    """
    rng = np.random.default_rng(seed)
    block_sizes = rng.integers(1, max_block + 1, size=k_atoms)
    # heavy-tailed partner choice: a few hub atoms co-fire with many others
    popularity = 1.0 / np.arange(1, k_atoms + 1) ** 0.8
    popularity /= popularity.sum()
    j = rng.choice(k_atoms, size=3 * n_pairs, p=popularity)
    k = rng.integers(0, k_atoms, size=3 * n_pairs)
    lo, hi = np.minimum(j, k), np.maximum(j, k)
    keep = lo < hi
    key = np.unique(lo[keep] * k_atoms + hi[keep])[:n_pairs]
    rng.shuffle(key)
    w = rng.exponential(1e-3, size=key.shape[0])
    pairs = PairTable(key // k_atoms, key % k_atoms, w, k_atoms)
    beta = rng.standard_normal(int(block_sizes.sum()) * p_out) / np.sqrt(p_out)
    return block_sizes, pairs, beta


def _timed(fn, *args):
    fn(*args)  # the first call may load compiled kernels; time the second
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _fd_check(value, grad, x, rng, h=1e-5):
    """Relative error of the directional derivative ``gradᵀu`` against a central difference."""
    u = rng.standard_normal(x.shape[0])
    u /= np.linalg.norm(u)
    fd = (value(x + h * u) - value(x - h * u)) / (2 * h)
    an = float(np.dot(grad, u))
    return abs(fd - an) / max(abs(fd), abs(an), 1e-300)


def run_penalty_demo(k_atoms: int = 512, p_out: int = 64, n_pairs: int = 8_000, seed: int = 0,
                     echo=print) -> dict:
    """Evaluate every operation of both penalties, check gradients by finite differences, print a summary.

    Returns a dict of results (timings in seconds, FD errors) so callers and tests can inspect it.
    """
    rng = np.random.default_rng(seed + 1)
    block_sizes, pairs, beta = synthetic_decoder_problem(k_atoms, p_out, n_pairs, seed=seed)
    pen = DecoderIncoherencePenalty.from_pairs(pairs, block_sizes, p_out, weight=10.0,
                                               learnable_weight=True)
    rho = np.array([0.25])
    v = rng.standard_normal(beta.shape[0])
    rows = []
    results = {"decoder": {}, "nested": {}}
    ops = [("value", pen.value, (beta, rho)), ("grad_target", pen.grad_target, (beta, rho)),
           ("grad_rho", pen.grad_rho, (beta, rho)), ("hvp", pen.hvp, (beta, rho, v)),
           ("psd_majorizer_hvp", pen.psd_majorizer_hvp, (beta, rho, v)),
           ("psd_majorizer_diag", pen.psd_majorizer_diag, (beta, rho)),
           ("hessian_diag", pen.hessian_diag, (beta, rho))]
    for name, fn, args in ops:
        out, dt = _timed(fn, *args)
        results["decoder"][name] = dt
        rows.append(("decoder", name, dt, _summary(out)))
    g = pen.grad_target(beta, rho)
    fd_beta = _fd_check(lambda x: pen.value(x, rho), g, beta, rng)
    fd_rho = abs(pen.grad_rho(beta, rho)[0]
                 - (pen.value(beta, rho + 1e-6) - pen.value(beta, rho - 1e-6)) / 2e-6) / abs(pen.value(beta, rho))
    hv = pen.hvp(beta, rho, v)
    fd_hvp = np.linalg.norm((pen.grad_target(beta + 1e-6 * v, rho) - pen.grad_target(beta - 1e-6 * v, rho)) / 2e-6 - hv) \
        / np.linalg.norm(hv)

    # nested prefix penalty on a latent code of the same width as the decoder has atoms
    n_rows = 2_000
    prefixes = np.array([k_atoms // 8, k_atoms // 4, k_atoms // 2, k_atoms])
    nested = NestedPrefixPenalty(prefixes, [1.0, 0.5, 0.25, 0.125], eps=1e-3, latent_dim=k_atoms)
    psi = rng.standard_normal(n_rows * k_atoms) * (rng.random(n_rows * k_atoms) < 0.05)
    nrho = np.zeros(4)
    vn = rng.standard_normal(psi.shape[0])
    nops = [("value", nested.value, (psi, nrho)), ("grad_target", nested.grad_target, (psi, nrho)),
            ("grad_rho", nested.grad_rho, (psi, nrho)), ("hvp", nested.hvp, (psi, nrho, vn)),
            ("psd_majorizer_hvp", nested.psd_majorizer_hvp, (psi, nrho, vn)),
            ("psd_majorizer_diag", nested.psd_majorizer_diag, (psi, nrho)),
            ("hessian_diag", nested.hessian_diag, (psi, nrho))]
    for name, fn, args in nops:
        out, dt = _timed(fn, *args)
        results["nested"][name] = dt
        rows.append(("nested", name, dt, _summary(out)))
    fd_psi = _fd_check(lambda x: nested.value(x, nrho), nested.grad_target(psi, nrho), psi, rng)

    results["fd"] = {"decoder_grad": fd_beta, "decoder_grad_rho": fd_rho, "decoder_hvp": fd_hvp,
                     "nested_grad": fd_psi}
    echo(f"distpen demo — decoder: K = {k_atoms} atoms, block sizes {block_sizes.min()}–{block_sizes.max()} "
         f"rows, p_out = {p_out}, β = {beta.shape[0]:,} coefficients, {len(pairs):,} pairs")
    echo(f"               nested:  {n_rows:,} rows × F = {k_atoms}, prefixes {prefixes.tolist()}")
    echo("")
    echo(f"{'penalty':<9} {'operation':<20} {'time':>10}  result")
    for pen_name, name, dt, summ in rows:
        echo(f"{pen_name:<9} {name:<20} {dt * 1e3:>8.2f} ms  {summ}")
    echo("")
    echo("finite-difference checks (relative error):")
    for name, err in results["fd"].items():
        echo(f"  {name:<18} {err:.2e}  {'ok' if err < 1e-5 else 'FAILED'}")
    results["ok"] = all(err < 1e-5 for err in results["fd"].values())
    return results


def _summary(out) -> str:
    if out is None:
        return "None (not available in closed form)"
    if isinstance(out, float):
        return f"{out:.6g}"
    out = np.asarray(out)
    return f"shape {out.shape}, ‖·‖ = {np.linalg.norm(out):.6g}"


# --------------------------------------------------------------------------- the whole pipeline
_DEMO_ATTR = "distpen_demo"


def _check_run_dir(out: str) -> tuple[str, bool]:
    """``(absolute path, holds an earlier demo)``; an error if ``out`` holds something else."""
    import json
    import os

    from ..errors import StoreConflictError

    out = os.path.abspath(out)
    earlier_demo = False
    if os.path.exists(out):
        try:
            with open(os.path.join(out, "zarr.json")) as f:
                earlier_demo = bool(json.load(f).get("attributes", {}).get(_DEMO_ATTR))
        except (OSError, ValueError):
            earlier_demo = False
        if not earlier_demo and os.listdir(out):
            raise StoreConflictError(
                f"--out {out!r} exists and is not a distpen demo run; choose another directory"
            )
    return out, earlier_demo


def _prepare_run_dir(out: str) -> str:
    import shutil

    out, earlier_demo = _check_run_dir(out)
    if earlier_demo:
        shutil.rmtree(out)  # a previous demo run: replace it
    import zarr

    root = zarr.open_group(out, mode="w")  # one run store: every stage writes into this group
    root.attrs[_DEMO_ATTR] = True
    return out


def _dense_from_topk(idx_block, val_block, k_atoms):
    out = np.zeros((idx_block.shape[0], k_atoms))
    rows = np.repeat(np.arange(idx_block.shape[0]), idx_block.shape[1])
    cols = idx_block.ravel().astype(np.int64)
    vals = val_block.ravel().astype(np.float64)
    ok = cols >= 0
    out[rows[ok], cols[ok]] = vals[ok]
    return out


def run_pipeline_demo(out: str = "distpen-run", *, n_tokens: int = 1_000_000, k_atoms: int = 4096,
                      topk: int = 32, p_out: int = 64, top_m: int = 8, tile_atoms: int = 128,
                      latent_rows: int = 8192, seed: int = 0, scheduler: str | None = None,
                      security=None, echo=print, progress: bool = True) -> dict:
    """The whole pipeline on the embedded default (or ``scheduler``), into one run directory.

    ``security`` (a ``distributed.security.Security``, or True for temporary certificates on the
    embedded cluster) is passed to :func:`~distpen.cluster.connect`.

    synthetic top-k gates → co-activation statistics → pairs → decoder penalty on a random decoder →
    every operation of both penalties → Gauss-Newton tiles (and the factored form) → a Newton step.
    Returns a dict of timings and locations; prints a summary.
    """
    import json
    import os

    import dask.array as da

    from ..cluster import connect
    from ..coactivation.job import coactivation_stats
    from ..curvature.evaluate import evaluate
    from ..curvature.newton import newton_step, save_newton_result
    from ..curvature.tiles import assemble_majorizer
    from ..penalties import DecoderIncoherencePenalty, NestedPrefixPenalty
    from ..sources.synth import synth_gates

    _check_run_dir(out)  # a bad --out fails before any cluster starts; nothing is written ...
    client = connect(scheduler) if security is None else connect(scheduler, security=security)
    run = _prepare_run_dir(out)  # ... until the cluster answers
    workers = client.scheduler_info()["workers"]
    rng = np.random.default_rng(seed)
    rows, info = [], {"run": run, "dashboard": client.dashboard_link}

    def stage(name, fn, size, where, unit=None):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        rate = f"{size / dt:,.0f} {unit}/s" if unit else ""
        rows.append((name, dt, rate, where))
        info[name] = dt
        if progress:
            echo(f"  {name:<26} {dt:7.2f} s  {rate}")
        return res

    echo(f"distpen demo: {len(workers)} workers on {client.scheduler.address}; run directory {run}")
    echo(f"  dashboard: {client.dashboard_link}")
    gates = stage("synthetic gates", lambda: synth_gates(os.path.join(run, "gates"), n_tokens, k_atoms,
                                                          topk=topk, seed=seed, overwrite=True),
                  n_tokens, f"{run}/gates", "tokens")
    stats = stage("co-activation statistics", lambda: coactivation_stats(gates, run), n_tokens, run, "tokens")
    pairs = stage("pairs (mean, top-m)", lambda: stats.pairs(top_m=top_m, measure="mean",
                                                            out=os.path.join(run, "pairs")),
                  k_atoms, f"{run}/pairs", "atoms")
    block_sizes = rng.integers(1, 5, size=k_atoms)
    pen = DecoderIncoherencePenalty.from_pairs(pairs, block_sizes, p_out, weight=1e3, learnable_weight=True)
    beta = rng.standard_normal(pen.n_coef) / np.sqrt(p_out)
    v = rng.standard_normal(pen.n_coef)
    rho = np.array([0.0])
    import zarr

    root = zarr.open_group(run, mode="a")
    root.create_array("decoder", data=beta, chunks=(min(beta.shape[0], 1 << 20),), overwrite=True)
    with open(os.path.join(run, "penalty.json"), "w") as f:
        json.dump(pen.to_spec(), f)

    ops = ("value", "grad", "grad_rho", "hvp", "psd_majorizer_hvp", "psd_majorizer_diag", "hessian_diag")
    ev = stage("decoder: every operation", lambda: evaluate(pen, root["decoder"], rho, ops=ops, v=v, out=run),
               len(pairs), run, "pairs")
    local = pen.value(beta, rho)
    if not abs(ev["value"] - local) <= 1e-10 * abs(local):
        raise RuntimeError(f"distributed value {ev['value']!r} differs from the in-memory {local!r}")

    # the nested penalty on the first latent_rows tokens' gates, read from Zarr as a dense n × K code
    idx = da.from_zarr(gates.indices)[:latent_rows]
    val = da.from_zarr(gates.values)[:latent_rows]
    code = da.map_blocks(_dense_from_topk, idx, val, k_atoms, dtype=np.float64,
                         chunks=(idx.chunks[0], (k_atoms,)))
    prefixes = [k_atoms // 16, k_atoms // 4, k_atoms]
    nested = NestedPrefixPenalty(prefixes, [1.0, 0.5, 0.25], eps=1e-3, latent_dim=k_atoms)
    nrho = np.zeros(3)
    nv = da.ones_like(code)
    nev = stage("nested: every operation", lambda: evaluate(nested, code, nrho, ops=ops, v=nv,
                                                            out=os.path.join(run, "nested")),
                latent_rows * k_atoms, f"{run}/nested", "entries")

    # Gauss-Newton curvature: tiles for the most connected atoms' sub-problem, factored for all
    deg = pairs.degree()
    hub = np.sort(np.argsort(-deg, kind="stable")[:tile_atoms])
    keep = np.isin(pairs.j, hub) & np.isin(pairs.k, hub)
    from ..pairs import PairTable

    sub = PairTable(np.searchsorted(hub, pairs.j[keep]), np.searchsorted(hub, pairs.k[keep]), pairs.w[keep],
                    hub.shape[0])
    sub_pen = pen.with_pairs(sub, pen.layout.subset(hub))
    sub_beta = pen.layout.gather(beta, hub)
    H = stage("Gauss-Newton tiles", lambda: assemble_majorizer(sub_pen, sub_beta, rho, run, tile=2048),
              sub_pen.n_coef, f"{run}/H", "rows")
    stage("Gauss-Newton factored", lambda: assemble_majorizer(pen, beta, rho, os.path.join(run, "factored"),
                                                              format="factored"),
          k_atoms, f"{run}/factored", "atoms")

    rhs = -np.asarray(ev["grad"][...])
    damping = 0.1 * float(np.mean(np.asarray(ev["psd_majorizer_diag"][...]))) + 1e-12
    res = stage("Newton step (block PCG)", lambda: newton_step(pen, beta, rho, rhs, damping=damping,
                                                               tol=1e-6, maxiter=300, precond="block"),
                pen.n_coef, f"{run}/newton_x", "coef")
    save_newton_result(run, res)

    n_h = sub_pen.n_coef
    echo("")
    echo(f"sizes: {n_tokens:,} tokens × {k_atoms:,} atoms (top-{topk}); {len(pairs):,} pairs; "
         f"β = {pen.n_coef:,} coefficients (p_out = {p_out}, blocks 1–4 rows)")
    echo(f"       nested code {latent_rows:,} × {k_atoms:,}; curvature tiles for {tile_atoms} hub atoms: "
         f"H is {n_h:,} × {n_h:,} ({n_h * n_h * 8 / 2**30:.1f} GiB logical), "
         f"{H.attrs['tiles_written']} of {H.attrs['tiles_total']} tiles written")
    echo(f"values: decoder P = {ev['value']:.6g} (in-memory {local:.6g}); nested P = {nev['value']:.6g}; "
         f"Newton: {res.iterations} iterations, residual {res.residuals[-1]:.1e}, converged={res.converged}")
    echo("")
    echo(f"{'stage':<28} {'time':>9}  {'throughput':<22} where")
    for name, dt, rate, where in rows:
        echo(f"{name:<28} {dt:8.2f}s  {rate:<22} {where}")
    echo("")
    echo(f"dashboard: {client.dashboard_link}   status: distpen status {run}")
    info.update(ok=bool(res.converged), value=ev["value"], newton_iterations=res.iterations)
    return info


def run_demo(args) -> int:
    """``distpen demo``: the pipeline demo, or with ``--penalties-only`` the in-memory one."""
    echo = (lambda *a, **k: None) if args.quiet else print
    if args.penalties_only:
        res = run_penalty_demo(k_atoms=args.atoms, p_out=args.p_out, n_pairs=args.pairs, seed=args.seed, echo=echo)
        return 0 if res["ok"] else 1
    import os

    from ..security import resolve_security

    security = resolve_security(args.tls, args.tls_ca_file, args.tls_cert, args.tls_key,
                                address=args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    res = run_pipeline_demo(args.out, n_tokens=args.tokens, k_atoms=args.atoms, p_out=args.p_out,
                            seed=args.seed, scheduler=args.scheduler, security=security, echo=echo,
                            progress=not args.quiet)
    return 0 if res["ok"] else 1


def register(sub) -> None:
    """Add ``demo`` to an argparse subparsers object."""
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
    add_tls_arguments(demo)
    demo.set_defaults(func=run_demo)
