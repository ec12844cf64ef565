"""An activation bank larger than the workers' memory limit, encoded into statistics by workers that
stay under it."""

from __future__ import annotations

import os
import sys

import numpy as np
from safetensors.numpy import save_file

import distpen as dp

sys.path.insert(0, os.path.dirname(__file__))
from _procs import time_limit  # noqa: E402,F401  (autouse: a hung test fails instead of stalling)
from test_out_of_core_sources import LIMIT, _cluster, _dir_bytes, _run_measured, warm_up  # noqa: E402


def test_bank_larger_than_worker_memory(client, tmp_path):
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
    small = tmp_path / "small"
    small.mkdir()
    save_file({"acts": rng.standard_normal((5000, d_in)).astype(np.float32)}, str(small / "part_0.safetensors"))
    warm_up(client, lambda c: dp.coactivation_stats(dp.EncodedGates(str(small / "*.safetensors"), sae),
                                                    tmp_path / "small-enc", client=c))
    cluster, c = _cluster()
    with cluster, c:
        enc = _run_measured(c, lambda: dp.coactivation_stats(
            dp.EncodedGates(str(bank / "*.safetensors"), sae), tmp_path / "enc", client=c))
    assert enc.n_tokens == n_rows
    assert enc.fire_count.sum() == n_rows * 4
    # the fire counts of the first rows, encoded here, are a lower bound of the job's
    x = dp.open_activations(str(bank / "*.safetensors")).read(0, 2000)
    idx, _ = sae.encode_topk(x)
    assert (np.bincount(idx[idx >= 0], minlength=d_sae) <= enc.fire_count).all()
