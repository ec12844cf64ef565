"""A delphi latent cache larger than the workers' memory limit, streamed by workers that stay under it."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

import distpen as dp

sys.path.insert(0, os.path.dirname(__file__))
from _procs import time_limit  # noqa: E402,F401  (autouse: a hung test fails instead of stalling)
from test_coactivation_stats import _rss_peak, _rss_sampler  # noqa: E402

LIMIT = 300 * 2**20


def _write_big_cache(folder, n_seq, ctx, width, n_splits, seed=0):
    """A delphi-layout cache with 8 latents on every token: latent j·32 + base (base < 32 per token);
    shard s holds latents [16s, 16s + 16), so it holds latent 32·(s // 2) + base of the tokens whose
    base is < 16 (s even) or ≥ 16 (s odd)."""
    assert width == 256 and n_splits == 16
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    T = n_seq * ctx
    base = rng.integers(0, 32, T).astype(np.int64)
    low = np.flatnonzero(base < 16), np.flatnonzero(base >= 16)
    fire = np.zeros(width, np.int64)
    for s in range(n_splits):
        lo = 16 * s
        tok = low[s % 2]
        off = base[tok] - 16 * (s % 2)
        fire[lo:lo + 16] = np.bincount(off, minlength=16)
        loc = np.empty((tok.size, 3), np.uint16)
        loc[:, 0], loc[:, 1], loc[:, 2] = tok // ctx, tok % ctx, off
        act = rng.uniform(0.1, 3.0, tok.size).astype(np.float16)
        save_file({"locations": loc, "activations": act}, os.path.join(folder, f"{lo}_{lo + 15}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"cache_ctx_len": ctx, "n_tokens": T, "batch_size": 1, "n_splits": n_splits,
                   "model_name": "m", "dataset_repo": "d"}, f)
    return fire


def _dir_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _cluster():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=LIMIT,
                           dashboard_address=":0", host="127.0.0.1")
    return cluster, Client(cluster, set_as_default=False)


def _run_measured(c, fn):
    pids = c.run(os.getpid)
    c.run(_rss_sampler)
    out = fn()
    peaks = c.run(_rss_peak)
    assert c.run(os.getpid) == pids                          # no worker was killed and restarted
    assert max(peaks.values()) < LIMIT, {a: p / 2**20 for a, p in peaks.items()}
    return out


def warm_up(client, job):
    """Run ``job`` once on the session's roomy workers: numba compiles the kernels there and writes
    its disk cache, so the memory-limited workers below load compiled code instead of compiling
    (compiling takes more than their limit on a fresh checkout, and a paused worker never resumes)."""
    job(client)


def test_cache_larger_than_worker_memory(client, tmp_path):
    small = str(tmp_path / "small" / "layers.0")
    _write_big_cache(small, 200, 16, 256, n_splits=16)
    warm_up(client, lambda c: dp.coactivation_stats(small, tmp_path / "small-st", client=c))
    cache = str(tmp_path / "latents" / "layers.0")
    n_seq, ctx, width = 40_000, 128, 256
    fire = _write_big_cache(cache, n_seq, ctx, width, n_splits=16)
    assert _dir_bytes(cache) > LIMIT
    cluster, c = _cluster()
    with cluster, c:
        st = _run_measured(c, lambda: dp.coactivation_stats(cache, tmp_path / "st", client=c))
    assert st.n_tokens == n_seq * ctx
    np.testing.assert_array_equal(st.fire_count, fire)
    pc = st.block(0, width, 0, width, "pair_count")
    np.testing.assert_array_equal(np.diag(pc), fire)
    assert pc.sum() == n_seq * ctx * 64                      # 8 latents a token: 64 ordered pairs
