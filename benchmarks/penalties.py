"""Penalty benchmarks: distpen against naive and autodiff peers, printed side by side.

Run ``python benchmarks/penalties.py`` for the full problems (a few minutes on 2 cores) or
``python benchmarks/penalties.py --quick`` for a small smoke run (< 20 s).

1. Decoder incoherence, K = 2048 atoms, M_k = 4, p_out = 256, 20 000 random pairs, float64:
   distpen vs a naive per-pair numpy loop and vs torch.func autodiff (when torch is importable)
   for value, grad, hvp and psd_majorizer_hvp, with achieved GFLOP/s next to a GEMM peak.
2. Dense Gauss-Newton assembly, K = 64, M = 4, p_out = 32, 500 pairs: block scatter vs a probe loop
   over psd_majorizer_hvp.
1b. The same decoder with normalize="frobenius": value+grad, hvp and the Gauss-Newton product against
   the unnormalised ops (target ≤ 1.3× their time) and against the seed engine gamfit when it is
   importable (an optional peer: skipped with a note otherwise).
3. NestedPrefixPenalty value + grad + hessian_diag on a 200 000 × 1 024 target: GB/s of target read
   vs the memcpy bandwidth, and vs plain numpy.
4. NestedPrefixPenalty.value_grad_diag (one fused pass, out= buffers) on 100 000 × 1 024 against the
   three separate calls and the memcpy bandwidth (target ≥ 40%).
5. dp.collinearity_gate on 10⁶ random candidate pairs, K = 32 768, M = 4, p_out = 256, β in Zarr (zstd and
   uncompressed), 2 workers, and collinearity_gate_local in process: pairs/s (target ≥ 10⁶/s on 2 workers),
   the workers' CPU seconds, one task's phases and GFLOP/s against a GEMM (``--only gate``).

Every distpen result is checked against the plain reference (≤ 1e-10 relative) before timing.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import check as _check, rel_err, fmt_ms, gemm_peak, machine_line, memcpy_bandwidth, print_table, time_best  # noqa: E402

import distpen as dp  # noqa: E402

RTOL = 1e-10

# flops per pair, in units of M_j·M_k·p (the minimal count, shared by every implementation):
#   value  C = B_j B_kᵀ                                         2
#   grad   C, then C B_k and Cᵀ B_j                               2 + 2 + 2 = 6
#   hvp    C, dC = V_j B_kᵀ + B_j V_kᵀ, dC B_k + C V_k, and the k side   2 + 4 + 4 + 4 = 14
#   GN     dC, dC B_k, dCᵀ B_j                                    4 + 2 + 2 = 8
# (distpen's CSR kernels recompute C / dC once per direction: 2 / 8 / 20 / 12 actually executed.)
FLOPS_PER_MMP = {"value": 2, "grad": 6, "hvp": 14, "psd_majorizer_hvp": 8}


def check(name: str, got, ref, rtol: float = RTOL) -> float:
    return _check(name, got, ref, rtol)


def random_pairs(rng, k_atoms: int, n_pairs: int):
    n_all = k_atoms * (k_atoms - 1) // 2
    codes = np.sort(rng.choice(n_all, size=n_pairs, replace=False))
    jj, kk = np.triu_indices(k_atoms, 1)
    return jj[codes].astype(np.int64), kk[codes].astype(np.int64), rng.uniform(0.1, 1.0, n_pairs)


# ------------------------------------------------------------------ 1. the decoder penalty
class NaiveDecoder:
    """Plain per-pair numpy loop: the obviously-correct reference and the "naive loop" peer."""

    def __init__(self, j, k, w, s, block_sizes, p):
        self.J, self.K, self.W = j.tolist(), k.tolist(), (s * w).tolist()
        self.m = np.asarray(block_sizes)
        self.off = np.concatenate([[0], np.cumsum(self.m * p)])
        self.p = p

    def blocks(self, x):
        return [x[self.off[i]:self.off[i + 1]].reshape(self.m[i], self.p) for i in range(len(self.m))]

    def value(self, t):
        B = self.blocks(t)
        s = 0.0
        for j, k, w in zip(self.J, self.K, self.W):
            C = B[j] @ B[k].T
            s += w * float(np.vdot(C, C))
        return 0.5 * s

    def grad(self, t):
        B = self.blocks(t)
        g = np.zeros_like(t)
        G = self.blocks(g)
        for j, k, w in zip(self.J, self.K, self.W):
            C = w * (B[j] @ B[k].T)
            G[j] += C @ B[k]
            G[k] += C.T @ B[j]
        return g

    def product(self, t, v, exact: bool):
        B, V = self.blocks(t), self.blocks(v)
        h = np.zeros_like(t)
        H = self.blocks(h)
        for j, k, w in zip(self.J, self.K, self.W):
            dC = w * (V[j] @ B[k].T + B[j] @ V[k].T)
            if exact:
                C = w * (B[j] @ B[k].T)
                H[j] += dC @ B[k] + C @ V[k]
                H[k] += dC.T @ B[j] + C.T @ V[j]
            else:
                H[j] += dC @ B[k]
                H[k] += dC.T @ B[j]
        return h


def torch_ops(j, k, w, s, k_atoms, m, p):
    """torch.func versions (homogeneous blocks): batched gathers + bmm, autodiff for the rest."""
    try:
        import torch
        from torch.func import grad, jvp, vjp
    except ImportError:
        return None
    J = torch.from_numpy(np.array(j))  # writable copies (the pair table is read-only)
    Kt = torch.from_numpy(np.array(k))
    Wt = torch.from_numpy(s * w)
    sqW = Wt.sqrt()[:, None, None]

    def cross(x):
        B = x.view(k_atoms, m, p)
        return torch.bmm(B[J], B[Kt].transpose(1, 2))

    def value(x):
        C = cross(x)
        return 0.5 * (Wt * (C * C).sum(dim=(1, 2))).sum()

    def resid(x):  # P = ½‖r‖², so the Gauss-Newton matrix is JᵀJ
        return sqW * cross(x)

    g = grad(value)

    def hvp(x, v):
        return jvp(g, (x,), (v,))[1]

    def gn(x, v):
        _, jv = jvp(resid, (x,), (v,))
        _, pull = vjp(resid, x)
        return pull(jv)[0]

    to = torch.from_numpy
    return {
        "value": lambda t, v: float(value(to(t))),
        "grad": lambda t, v: g(to(t)).numpy(),
        "hvp": lambda t, v: hvp(to(t), to(v)).numpy(),
        "psd_majorizer_hvp": lambda t, v: gn(to(t), to(v)).numpy(),
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def bench_decoder(args, summary):
    rng = np.random.default_rng(0)
    if args.quick:
        k_atoms, m, p, n_pairs = 128, 4, 64, 500
    else:
        k_atoms, m, p, n_pairs = 2048, 4, 256, 20000
    reps = 2 if args.quick else args.repeat
    slow_reps = 1 if args.quick else 3
    j, k, w = random_pairs(rng, k_atoms, n_pairs)
    weight = 0.7
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), np.full(k_atoms, m), p, weight=weight)
    n = pen.n_coef
    t = rng.standard_normal(n) / np.sqrt(p)
    v = rng.standard_normal(n) / np.sqrt(p)
    naive = NaiveDecoder(pen.pairs.j, pen.pairs.k, pen.pairs.w, weight, pen.block_sizes, p)
    mmp = float(np.sum(pen.block_sizes[pen.pairs.j] * pen.block_sizes[pen.pairs.k])) * p

    ours = {
        "value": lambda: pen.value(t),
        "grad": lambda: pen.grad_target(t),
        "hvp": lambda: pen.hvp(t, None, v),
        "psd_majorizer_hvp": lambda: pen.psd_majorizer_hvp(t, None, v),
    }
    loop = {
        "value": lambda: naive.value(t),
        "grad": lambda: naive.grad(t),
        "hvp": lambda: naive.product(t, v, True),
        "psd_majorizer_hvp": lambda: naive.product(t, v, False),
    }
    tops = None if args.no_torch else torch_ops(pen.pairs.j, pen.pairs.k, pen.pairs.w, weight, k_atoms, m, p)

    print(f"\n[1] DecoderIncoherencePenalty: K = {k_atoms}, M_k = {m}, p_out = {p}, {n_pairs} pairs, "
          f"float64 ({n * 8 / 2**20:.0f} MiB of β)")
    # correctness first: distpen and torch against the per-pair reference
    errs = {}
    for op in ours:
        ref = loop[op]()
        errs[op] = check(f"distpen {op}", ours[op](), ref)
        if tops is not None:
            check(f"torch {op}", tops[op](t, v), ref)
    print("    verified against the per-pair numpy reference: "
          + ", ".join(f"{op} {e:.1e}" for op, e in errs.items()) + f" (≤ {RTOL:g} relative)"
          + ("; torch too" if tops is not None else ""))

    peak = gemm_peak(1500 if args.quick else 3000, repeat=2 if args.quick else 3)
    rows = []
    for op in ours:
        td = time_best(ours[op], repeat=reps, warmup=1)
        tl = time_best(loop[op], repeat=slow_reps, warmup=0)
        if tops is not None:
            tt = time_best(lambda: tops[op](t, v), repeat=slow_reps, warmup=1)
        else:
            tt = None
        flops = FLOPS_PER_MMP[op] * mmp
        gf = flops / td.best / 1e9
        rows.append([op, f"{flops / 1e9:.3f}", fmt_ms(tl.best), fmt_ms(tt.best if tt else None), fmt_ms(td.best),
                     f"{tl.best / td.best:.1f}x", f"{tt.best / td.best:.1f}x" if tt else "skipped",
                     f"{gf:.1f}", f"{100 * gf / peak:.0f}%"])
        summary.append([f"decoder {op}", "naive per-pair loop", tl.best, td.best, 5.0])
        if tt is not None:
            summary.append([f"decoder {op}", "torch.func autodiff", tt.best, td.best, 10.0 if op == "hvp" else None])
        elif op == "hvp":
            summary.append([f"decoder {op}", "torch.func autodiff (skipped)", None, td.best, 10.0])
    print_table(["op", "GFLOP", "naive loop", "torch.func", "distpen", "vs loop", "vs torch", "GFLOP/s", "of peak"],
                rows)
    print(f"    float64 GEMM peak measured now: {peak:.1f} GFLOP/s (numpy matmul, square matrices)")
    print("    flops per pair in units of M_j·M_k·p: value 2, grad 6, hvp 14, psd_majorizer_hvp 8 "
          "(minimal counts; distpen executes 2 / 8 / 20 / 12 as it recomputes C, dC per direction)")
    if tops is not None:
        print(f"    torch {tops['version']} CPU, {tops['threads']} threads: value = batched bmm forward, "
              "grad = torch.func.grad, hvp = jvp of grad, GN = vjp of the residual's jvp")
    else:
        print("    torch.func autodiff: skipped (torch is not importable)")


# ------------------------------------------------------------------ 1b. the normalised decoder penalty
def gamfit_ops(pen, weight):
    """The seed engine (``gamfit``) on the same problem, or ``None`` when it is not importable.

    Its registry takes a JSON latent layout and a JSON descriptor list with a dense ``K × K``
    ``coactivation``; the JSON is built once here, outside the timings (the engine parses it on
    every call, which is part of its cost).
    """
    try:
        import json

        import gamfit
        from gamfit import _rust
    except ImportError as exc:
        print(f"    gamfit: skipped ({exc}); pip install gamfit to compare with the seed engine")
        return None
    K = pen.k_atoms
    C = pen.pairs.to_dense()
    latents = json.dumps({"t": {"name": "t", "n": int(pen.block_sizes.sum()), "d": int(pen.p_out)}})
    desc = json.dumps([{"kind": "decoder_incoherence", "target": "t", "weight": float(weight),
                        "block_sizes": pen.block_sizes.tolist(), "p_out": int(pen.p_out),
                        "coactivation": C.reshape(-1).tolist(), "coactivation_shape": [K, K]}])

    def value_grad(t, v):
        val, g, _, _ = _rust.analytic_penalty_value_grad(latents, desc, t, None)
        return float(val), np.asarray(g)

    def hvp(t, v):
        return np.asarray(_rust.analytic_penalty_hvp(latents, desc, t, v, None))

    return {"value+grad": value_grad, "hvp": hvp, "version": getattr(gamfit, "__version__", "?")}


def bench_normalized(args, summary):
    rng = np.random.default_rng(0)
    if args.quick:
        k_atoms, m, p, n_pairs = 128, 4, 64, 500
    else:
        k_atoms, m, p, n_pairs = 2048, 4, 256, 20000
    reps = 2 if args.quick else args.repeat
    j, k, w = random_pairs(rng, k_atoms, n_pairs)
    weight = 0.7
    plain = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), np.full(k_atoms, m), p, weight=weight)
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), np.full(k_atoms, m), p, weight=weight,
                                                  normalize="frobenius")
    n = pen.n_coef
    t = rng.standard_normal(n) / np.sqrt(p)
    v = rng.standard_normal(n) / np.sqrt(p)
    print(f"\n[1b] DecoderIncoherencePenalty(normalize='frobenius'): K = {k_atoms}, M_k = {m}, p_out = {p}, "
          f"{n_pairs} pairs, float64")
    peer = None if args.no_gamfit else gamfit_ops(pen, weight)
    if args.no_gamfit:
        print("    gamfit: skipped (--no-gamfit)")

    def vg(q):
        return q.value(t), q.grad_target(t)

    ours = {"value+grad": lambda: vg(pen), "hvp": lambda: pen.hvp(t, None, v),
            "psd_majorizer_hvp": lambda: pen.psd_majorizer_hvp(t, None, v)}
    base = {"value+grad": lambda: vg(plain), "hvp": lambda: plain.hvp(t, None, v),
            "psd_majorizer_hvp": lambda: plain.psd_majorizer_hvp(t, None, v)}
    if peer is not None:
        val, g = peer["value+grad"](t, v)
        e1 = check("gamfit value", pen.value(t), val)
        e2 = check("gamfit grad", pen.grad_target(t), g)
        e3 = check("gamfit hvp", pen.hvp(t, None, v), peer["hvp"](t, v))
        print(f"    verified against gamfit {peer['version']}: value {e1:.1e}, grad {e2:.1e}, hvp {e3:.1e} "
              f"(≤ {RTOL:g} relative)")
    rows = []
    for op in ours:
        tn = time_best(ours[op], repeat=reps, warmup=1)
        tb = time_best(base[op], repeat=reps, warmup=1)
        tg = None
        if peer is not None and op in peer:
            tg = time_best(lambda: peer[op](t, v), repeat=1 if args.quick else 3, warmup=1)
        rows.append([op, fmt_ms(tb.best), fmt_ms(tn.best), f"{tn.best / tb.best:.2f}x",
                     fmt_ms(tg.best if tg else None), f"{tg.best / tn.best:.1f}x" if tg else "skipped"])
        summary.append([f"normalised {op}", "unnormalised distpen (time ratio ≤ 1.3)", tn.best * 1.0, tb.best,
                        ("le", 1.3)])
        if op in ("value+grad", "hvp"):
            summary.append([f"normalised {op}", "gamfit (seed engine)" + ("" if tg else " (skipped)"),
                            tg.best if tg else None, tn.best, 10.0])
    print_table(["op", "unnormalised", "normalised", "norm/unnorm", "gamfit", "vs gamfit"], rows)


# ------------------------------------------------------------------ 2. dense Gauss-Newton assembly
def bench_dense(args, summary):
    rng = np.random.default_rng(1)
    if args.quick:
        k_atoms, m, p, n_pairs = 8, 2, 8, 12
    else:
        k_atoms, m, p, n_pairs = 64, 4, 32, 500
    j, k, w = random_pairs(rng, k_atoms, n_pairs)
    pen = dp.DecoderIncoherencePenalty.from_pairs((j, k, w), np.full(k_atoms, m), p, weight=0.7)
    n = pen.n_coef
    t = rng.standard_normal(n) / np.sqrt(p)
    print(f"\n[2] Dense Gauss-Newton assembly: K = {k_atoms}, M = {m}, p_out = {p}, {n_pairs} pairs "
          f"-> {n} × {n} matrix ({n * n * 8 / 2**20:.0f} MiB)")
    block = np.empty((n, n))
    probe = np.empty((n, n))
    block.fill(0.0)  # pre-touched
    probe.fill(0.0)

    def probe_loop():
        # H is symmetric, so row i = H e_i: contiguous row writes are the probe loop's best case
        e = np.zeros(n)
        for i in range(n):
            e[i] = 1.0
            probe[i, :] = pen.psd_majorizer_hvp(t, None, e)
            e[i] = 0.0

    pen.psd_majorizer_hvp(t, None, t)  # warm up the kernel
    tp = time_best(probe_loop, repeat=1, warmup=0)
    pen.accumulate_psd_majorizer_dense(t, None, 1.0, block)
    err = check("dense block scatter vs probe loop", block, probe)
    sym = rel_err(block, block.T)
    tb = time_best(lambda: pen.accumulate_psd_majorizer_dense(t, None, 1.0, block), repeat=args.repeat, warmup=0)
    print(f"    verified: block scatter = probe loop to {err:.1e} relative; symmetric to {sym:.1e}")
    print_table(["op", "probe loop", "block scatter", "ratio"],
                [["accumulate_psd_majorizer_dense", fmt_ms(tp.best), fmt_ms(tb.best), f"{tp.best / tb.best:.0f}x"]])
    summary.append(["GN dense assembly", "probe loop over psd_majorizer_hvp", tp.best, tb.best, 100.0])


# ------------------------------------------------------------------ 3. nested prefix penalty
def bench_nested(args, summary):
    rng = np.random.default_rng(2)
    n_rows, F = (5000, 1024) if args.quick else (200_000, 1024)
    reps = 2 if args.quick else 3
    prefixes, weights, eps = [64, 256, 1024], [1.0, 0.5, 0.25], 1e-3
    pen = dp.NestedPrefixPenalty(prefixes, weights, eps=eps, latent_dim=F)
    rho = np.zeros(pen.rho_count)
    t = 0.1 * rng.standard_normal(n_rows * F)
    t2 = t.reshape(n_rows, F)
    W = pen.column_weights(rho)
    e2 = eps * eps
    print(f"\n[3] NestedPrefixPenalty value + grad + hessian_diag: {n_rows} × {F} float64 "
          f"({t.nbytes / 2**30:.2f} GiB target)")

    def np_value():
        X = t2 * t2
        X += e2
        np.sqrt(X, out=X)
        return float(W @ X.sum(axis=0))

    def np_grad():
        X = t2 * t2
        X += e2
        np.sqrt(X, out=X)
        np.divide(t2, X, out=X)
        X *= W
        return X.reshape(-1)

    def np_hdiag():
        X = t2 * t2
        X += e2
        X *= np.sqrt(X)
        np.divide(W * e2, X, out=X)
        return X.reshape(-1)

    ours = {"value": lambda: pen.value(t, rho), "grad": lambda: pen.grad_target(t, rho),
            "hessian_diag": lambda: pen.hessian_diag(t, rho)}
    peers = {"value": np_value, "grad": np_grad, "hessian_diag": np_hdiag}
    for op in ours:
        check(f"nested {op}", ours[op](), peers[op]())
    print(f"    verified against plain numpy (≤ {RTOL:g} relative)")
    copy_bw = memcpy_bandwidth(min(512 << 20, t.nbytes), repeat=5)
    rows = []
    tot_d = tot_n = 0.0
    for op in ours:
        td = time_best(ours[op], repeat=reps, warmup=1)
        tn = time_best(peers[op], repeat=reps, warmup=0)
        tot_d += td.best
        tot_n += tn.best
        rows.append([op, fmt_ms(tn.best), fmt_ms(td.best), f"{tn.best / td.best:.1f}x",
                     f"{t.nbytes / td.best / 1e9:.1f}"])
    read_bw = 3 * t.nbytes / tot_d / 1e9
    rows.append(["all three", fmt_ms(tot_n), fmt_ms(tot_d), f"{tot_n / tot_d:.1f}x", f"{read_bw:.1f}"])
    print_table(["op", "numpy", "distpen", "ratio", "target GB/s read"], rows)
    print(f"    memcpy bandwidth measured now: {copy_bw:.1f} GB/s (np.copyto, bytes read per second); "
          f"distpen reads the target at {read_bw:.1f} GB/s = {100 * read_bw / copy_bw:.0f}% of it")
    print("    (each call allocates its result; grad and hessian_diag also write a target-sized array)")
    summary.append(["nested value+grad+hdiag", "plain numpy", tot_n, tot_d, None])
    summary.append(["nested target read GB/s", "memcpy bandwidth", None, None, ("bw", read_bw, copy_bw, 0.40)])


def bench_nested_fused(args, summary):
    """value_grad_diag (one pass, out= buffers) against the three separate calls, 100 000 × 1 024."""
    rng = np.random.default_rng(3)
    n_rows, F = (5000, 1024) if args.quick else (100_000, 1024)
    reps = 2 if args.quick else 5
    pen = dp.NestedPrefixPenalty([64, 256, 1024], [1.0, 0.5, 0.25], eps=1e-3, latent_dim=F)
    rho = np.zeros(pen.rho_count)
    t = 0.1 * rng.standard_normal(n_rows * F)
    g_buf = np.empty_like(t)
    d_buf = np.empty_like(t)
    g_buf.fill(0.0)  # pre-touched
    d_buf.fill(0.0)
    print(f"\n[4] NestedPrefixPenalty fused value_grad_diag: {n_rows} × {F} float64 "
          f"({t.nbytes / 2**30:.2f} GiB target)")
    val, g, d = pen.value_grad_diag(t, rho, out_grad=g_buf, out_diag=d_buf)
    check("fused value", val, pen.value(t, rho))
    check("fused grad", g, pen.grad_target(t, rho))
    check("fused hessian_diag", d, pen.hessian_diag(t, rho))
    print(f"    verified against the three separate calls (≤ {RTOL:g} relative)")

    def separate():
        pen.value(t, rho)
        pen.grad_target(t, rho)
        pen.hessian_diag(t, rho)

    copy_bw = memcpy_bandwidth(min(512 << 20, t.nbytes), repeat=5)
    ts = time_best(separate, repeat=reps, warmup=1)
    tf = time_best(lambda: pen.value_grad_diag(t, rho, out_grad=g_buf, out_diag=d_buf), repeat=reps, warmup=1)
    ta = time_best(lambda: pen.value_grad_diag(t, rho), repeat=reps, warmup=1)
    rows = []
    for name, tm in (("three separate calls", ts), ("value_grad_diag, out= buffers", tf),
                     ("value_grad_diag, allocating", ta)):
        bw = t.nbytes / tm.best / 1e9
        rows.append([name, fmt_ms(tm.best), f"{ts.best / tm.best:.1f}x", f"{bw:.1f}", f"{100 * bw / copy_bw:.0f}%"])
    print_table(["op", "time", "vs separate", "target GB/s", "of memcpy"], rows)
    print(f"    memcpy bandwidth measured now: {copy_bw:.1f} GB/s (np.copyto, bytes read per second); "
          "the fused pass reads t once and writes two target-sized arrays")
    summary.append(["nested fused value+grad+hdiag", "three separate calls", ts.best, tf.best, None])
    summary.append(["nested fused target GB/s", "memcpy bandwidth", None, None,
                    ("bw", t.nbytes / tf.best / 1e9, copy_bw, 0.40)])


def _worker_cpu():
    import time

    return time.process_time()


def _gate_phases(j, k, z, sizes, p):
    """On a worker: the phases of one gate task timed apart (wall, CPU seconds): reading β from Zarr
    (``_chunkio.read_rows``), the blocks' Gram norms, and the pair kernel."""
    import time

    from distpen._workers import kernel_threads
    from distpen.curvature._span import read_span
    from distpen.curvature._vectors import VectorSource
    from distpen.penalties.collinearity import block_gram_norms, overlap_of

    lay = dp.DecoderLayout(sizes, p)
    j, k = j - 0, k - 0  # writable, as the gate's tasks pass them (numba compiles per read-only flag)
    out = {}
    w, c = time.perf_counter(), time.thread_time()
    t = read_span(VectorSource("zarr", z, lay.n_coef), None, 0, lay.n_coef)
    out["read"] = (time.perf_counter() - w, time.thread_time() - c)
    with kernel_threads(1):  # as in a task of a 1-thread worker on a 2-core machine
        w, c = time.perf_counter(), time.thread_time()
        norms = block_gram_norms(t, lay)
        out["norms"] = (time.perf_counter() - w, time.thread_time() - c)
        w, c = time.perf_counter(), time.thread_time()
        overlap_of(j, k, t, lay, norms)
        out["kernel"] = (time.perf_counter() - w, time.thread_time() - c)
    return out


def bench_collinearity(args, summary):
    """dp.collinearity_gate on 10⁶ candidate pairs, decoder from Zarr, 2 workers, against a GEMM.

    Besides wall time it reports the CPU seconds the busiest worker spent per call (``process_time``
    on the worker, before and after): on a machine shared with other work the wall time mostly
    measures the others, the CPU time is what the call costs; ``n / cpu`` is the rate it would reach
    with the cores to itself. One worker task's phases (read, norms, kernel) are timed apart as well.
    """
    import tempfile
    import time

    import zarr
    from distributed import Client, LocalCluster

    from distpen.penalties.collinearity import collinearity_gate_local

    rng = np.random.default_rng(5)
    K, M, p, n_pairs = (4096, 4, 64, 50_000) if args.quick else (32_768, 4, 256, 1_000_000)
    sizes = np.full(K, M)
    beta = rng.standard_normal(K * M * p)
    a, b = rng.integers(0, K, size=(2, int(1.1 * n_pairs) + 1000))  # random candidates, no K² index arrays
    code = np.unique(np.minimum(a, b) * K + np.maximum(a, b))
    code = rng.permutation(code[(code // K) != (code % K)])
    code = np.sort(code[:n_pairs])
    pairs = dp.PairTable(code // K, code % K, np.ones(code.shape[0]), K)
    n = len(pairs)
    flops = 2.0 * float(np.sum(sizes[pairs.j] * sizes[pairs.k])) * p  # the M_j × M_k products B_j B_kᵀ
    repeat = 1 if args.quick else 3
    print(f"\n[5] collinearity_gate: {n:,} candidate pairs, K = {K}, M = {M}, p_out = {p}, "
          f"decoder {beta.nbytes / 2**20:.0f} MiB in Zarr, 2 workers × 1 thread")
    load = lambda: f"{os.getloadavg()[0]:.1f}"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        zs = {}
        for codec, compressors in (("zstd", "auto"), ("none", None)):  # Zarr's default codec, and none
            zs[codec] = zarr.create_array(f"{tmp}/beta-{codec}.zarr", shape=beta.shape, chunks=(M * p * 1024,),
                                          dtype="f8", compressors=compressors)
            zs[codec][:] = beta
        dp.collinearity_gate(pairs[:1000], zs["zstd"], sizes, p, client=client)  # compile on the workers
        timed, results = {}, {}
        for codec, z in zs.items():
            walls, cpus = [], []
            for _ in range(repeat):
                c0 = client.run(_worker_cpu)
                w0 = time.perf_counter()
                got = dp.collinearity_gate(pairs, z, sizes, p, client=client)
                walls.append(time.perf_counter() - w0)
                c1 = client.run(_worker_cpu)
                cpus.append(max(c1[w] - c0[w] for w in c0))
            timed[codec] = (min(walls), min(cpus), load())
            results[codec] = got
        half = n // 2
        phases = client.submit(_gate_phases, pairs.j[:half], pairs.k[:half], zs["zstd"], sizes, p, pure=False).result()
    ref, _ = collinearity_gate_local(pairs, beta, sizes, p)
    for got in results.values():
        assert np.array_equal(got.j, ref.j) and np.array_equal(got.w, ref.w), "distributed gate differs from in memory"
    lw, lc = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        collinearity_gate_local(pairs, beta, sizes, p)
        lw.append(time.perf_counter() - w0)
        lc.append(time.process_time() - c0)
    load_local = load()
    peak = gemm_peak(1500 if args.quick else 3000, repeat=2 if args.quick else 3)
    load_gemm = load()
    tg, tl, cl = timed["zstd"][0], min(lw), min(lc)
    rate = n / tg
    rows = []
    for codec, label in (("zstd", "collinearity_gate, 2 workers (Zarr β, zstd)"),
                         ("none", "collinearity_gate, 2 workers (Zarr β, uncompressed)")):
        w, c, ld = timed[codec]
        rows.append([label, fmt_ms(w), f"{n / w / 1e6:.2f} M/s", f"{flops / w / 1e9:.1f}", f"{c:.2f} s",
                     f"{n / c / 1e6:.2f} M/s", ld])
    rows.append(["collinearity_gate_local, in process (2 threads)", fmt_ms(tl), f"{n / tl / 1e6:.2f} M/s",
                 f"{flops / tl / 1e9:.1f}", f"{cl:.2f} s", f"{2 * n / cl / 1e6:.2f} M/s", load_local])
    print_table(["path", "time", "pairs/s", "GFLOP/s", "CPU/call", "pairs/s at that CPU", "load"], rows)
    print("    CPU/call: the busiest worker's CPU seconds per call (2 workers), or the process's over its 2 "
          "threads in process; the last rate is n / that (in process: 2n / CPU), what idle cores would give")
    ph = ", ".join(f"{name} {w * 1e3:.0f} ms wall / {c * 1e3:.0f} ms CPU" for name, (w, c) in phases.items())
    print(f"    one worker task on {half:,} pairs: {ph}")
    print(f"    float64 GEMM measured now: {peak:.1f} GFLOP/s (all cores, load {load_gemm}); the gate reached "
          f"{flops / tg / 1e9 / peak:.0%} of it on 2 workers, {flops / tl / 1e9 / peak:.0%} in process; "
          f"{len(ref):,} pairs kept at low = 0.5; equal to the in-memory kernel")
    summary.append(["collinearity_gate, s per 10⁶ pairs", "10⁶ pairs/s target", 1.0, 1e6 / rate, 1.0])


def print_summary(summary):
    rows = []
    for op, peer, tp, td, target in summary:
        if isinstance(target, tuple) and target[0] == "le":  # our time over a baseline, at most target[1]
            ratio = tp / td
            rows.append([op, peer, fmt_ms(td), fmt_ms(tp), f"{ratio:.2f}x", f"≤ {target[1]:g}x",
                         "yes" if ratio <= target[1] else "NO"])
            continue
        if isinstance(target, tuple):  # bandwidth fraction row
            _, bw, ref, frac = target
            rows.append([op, peer, f"{ref:.1f} GB/s", f"{bw:.1f} GB/s", f"{bw / ref:.0%}", f"≥ {frac:.0%}",
                         "yes" if bw / ref >= frac else "NO"])
            continue
        if tp is None:
            rows.append([op, peer, "skipped", fmt_ms(td), "-", f"≥ {target:g}x" if target else "-", "skipped"])
            continue
        ratio = tp / td
        met = "-" if target is None else ("yes" if ratio >= target else "NO")
        rows.append([op, peer, fmt_ms(tp), fmt_ms(td), f"{ratio:.1f}x", f"≥ {target:g}x" if target else "-", met])
    print_table(["op", "peer", "peer time", "distpen time", "ratio", "target", "met"], rows, title="Summary")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small problems: a smoke run of < 20 s")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs of the fast implementations (best is kept)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.func comparison")
    ap.add_argument("--no-gamfit", action="store_true", help="skip the gamfit (seed engine) comparison")
    ap.add_argument("--only", choices=["decoder", "normalized", "dense", "nested", "fused", "collinearity", "gate"],
                    action="append",
                    help="run only these sections (repeatable)")
    args = ap.parse_args(argv)
    if args.only:  # "gate" names the collinearity_gate case too
        args.only = ["collinearity" if name == "gate" else name for name in args.only]
    if args.quick:
        args.repeat = min(args.repeat, 3)
    print(f"distpen penalty benchmarks{' (--quick)' if args.quick else ''}: {machine_line()}")
    summary = []
    sections = {"decoder": bench_decoder, "normalized": bench_normalized, "dense": bench_dense,
                "nested": bench_nested, "fused": bench_nested_fused, "collinearity": bench_collinearity}
    for name, fn in sections.items():
        if args.only is None or name in args.only:
            fn(args, summary)
    print_summary(summary)


if __name__ == "__main__":
    main()
