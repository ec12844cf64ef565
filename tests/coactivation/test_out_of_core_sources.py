"""A delphi latent cache and an activation bank larger than the workers' memory limit, streamed by
workers that stay under it."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

import distpen as dp

sys.path.insert(0, os.path.dirname(__file__))
from test_coactivation_stats import _rss_peak, _rss_sampler  # noqa: E402

LIMIT = 300 * 2**20


def _write_big_cache(folder, n_seq, ctx, width, n_splits, seed=0):
    """A delphi-layout cache with 8 latents on every token: latent j·32 + base (base per token)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    T = n_seq * ctx
    base = rng.integers(0, 32, T).astype(np.int16)
    L = base[:, None] + (np.arange(8, dtype=np.int16) * 32)[None, :]
    fire = np.zeros(width, np.int64)
    step = width // n_splits
    for s in range(n_splits):
        lo, hi = s * step, (s + 1) * step
        tok, j = np.nonzero((L >= lo) & (L < hi))
        lat = L[tok, j].astype(np.int64)
        fire += np.bincount(lat, minlength=width)
        loc = np.stack([tok // ctx, tok % ctx, lat - lo], axis=1).astype(np.uint16)
        act = rng.uniform(0.1, 3.0, tok.shape[0]).astype(np.float16)
        save_file({"locations": loc, "activations": act}, os.path.join(folder, f"{lo}_{hi - 1}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"cache_ctx_len": ctx, "n_tokens": T, "batch_size": 1, "n_splits": n_splits,
                   "model_name": "m", "dataset_repo": "d"}, f)
    return fire


def _dir_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def test_cache_and_bank_larger_than_worker_memory(tmp_path):
    from distributed import Client, LocalCluster

    cache = str(tmp_path / "latents" / "layers.0")
    n_seq, ctx, width = 40_000, 128, 256
    fire = _write_big_cache(cache, n_seq, ctx, width, n_splits=16)
    assert _dir_bytes(cache) > LIMIT

    rng = np.random.default_rng(1)
    d_in, d_sae, n_rows = 256, 128, 320_000
    bank = tmp_path / "bank"
    bank.mkdir()
    for i in range(4):
        save_file({"acts": rng.standard_normal((n_rows // 4, d_in)).astype(np.float32)},
                  str(bank / f"part_{i}.safetensors"))
    assert _dir_bytes(bank) > LIMIT
    W = (rng.standard_normal((d_in, d_sae)) / 16).astype(np.float32)
    sae = dp.SAE(W, np.zeros(d_sae, np.float32), activation="topk", k=4)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=LIMIT,
                      dashboard_address=":0", host="127.0.0.1") as cluster, \
            Client(cluster, set_as_default=False) as c:
        pids = c.run(os.getpid)
        c.run(_rss_sampler)
        st = dp.coactivation_stats(cache, tmp_path / "st", client=c)
        enc = dp.coactivation_stats(dp.EncodedGates(str(bank / "*.safetensors"), sae), tmp_path / "enc", client=c)
        peaks = c.run(_rss_peak)
        assert c.run(os.getpid) == pids                      # no worker was killed and restarted
    assert max(peaks.values()) < LIMIT, {a: p / 2**20 for a, p in peaks.items()}
    assert st.n_tokens == n_seq * ctx
    np.testing.assert_array_equal(st.fire_count, fire)
    pc = st.block(0, width, 0, width, "pair_count")
    np.testing.assert_array_equal(np.diag(pc), fire)
    assert pc.sum() == n_seq * ctx * 64                      # 8 latents a token: 64 ordered pairs
    assert enc.n_tokens == n_rows
    assert enc.fire_count.sum() == n_rows * 4
