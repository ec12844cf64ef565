"""``distpen encode`` and ``distpen coactivation`` on latent caches and on activations with ``--sae``."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import distpen as dp
from distpen.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sources"))
from _sae_fixtures import dense_gates, random_sae_weights, write_delphi_cache, write_saelens  # noqa: E402


@pytest.fixture
def addr(client):
    return client.scheduler.address


@pytest.fixture
def bank_and_sae(tmp_path):
    W, b, Wd, bd, thr = random_sae_weights(12, 32, seed=2)
    acts = np.random.default_rng(3).standard_normal((400, 12)).astype(np.float32)
    save_file({"hook": acts[:250]}, str(tmp_path / "a_0.safetensors"))
    save_file({"hook": acts[250:]}, str(tmp_path / "a_1.safetensors"))
    folder = write_saelens(str(tmp_path / "sae"), W, b, Wd, bd, architecture="jumprelu", threshold=thr)
    return acts, str(tmp_path / "a_*.safetensors"), folder


def test_encode_then_coactivation_with_progress(addr, tmp_path, capsys, bank_and_sae):
    acts, bank, sae_dir = bank_and_sae
    out = str(tmp_path / "g")
    assert main(["encode", bank, "--sae", sae_dir, "--out", out, "--row-chunk", "100", "--scheduler", addr]) == 0
    cap = capsys.readouterr()
    assert "encode: 400/400 tok (100%)" in cap.err and "wrote SparseGates" in cap.out
    sae = dp.load_sae(sae_dir)
    st_dir = str(tmp_path / "st")
    assert main(["coactivation", out, "--out", st_dir, "--tile", "8", "--fire-threshold", "sae",
                 "--scheduler", addr, "--quiet"]) == 2          # no --sae: its thresholds are unknown
    assert "--fire-threshold sae needs a JumpReLU SAE's thresholds, but no --sae was given" in capsys.readouterr().err
    assert main(["coactivation", out, "--out", st_dir, "--tile", "8", "--scheduler", addr]) == 0
    assert "400 tokens × 32 atoms" in capsys.readouterr().out
    direct = str(tmp_path / "direct")
    assert main(["coactivation", bank, "--sae", sae_dir, "--out", direct, "--tile", "8",
                 "--fire-threshold", "sae", "--quiet", "--scheduler", addr]) == 0
    a, b = dp.open_stats(st_dir), dp.open_stats(direct)
    np.testing.assert_array_equal(a.fire_count, b.fire_count)
    np.testing.assert_array_equal(a.fire_count, (sae.encode(acts) > 0).sum(0))
    rel = str(tmp_path / "rel")
    assert main(["coactivation", out, "--out", rel, "--fire-threshold", "relative:0.5", "--quiet",
                 "--scheduler", addr]) == 0
    assert dp.open_stats(rel).attrs["fire_threshold"] == {"kind": "relative", "rho": 0.5}


def test_coactivation_on_a_latent_cache(addr, tmp_path, capsys):
    G = dense_gates(6, 8, 20, density=0.1, seed=1)
    d = write_delphi_cache(str(tmp_path / "latents"), "h", G, 6, 8)
    assert main(["coactivation", str(tmp_path / "latents"), "--out", str(tmp_path / "st"), "--quiet",
                 "--scheduler", addr]) == 0
    st = dp.open_stats(tmp_path / "st")
    np.testing.assert_array_equal(st.fire_count, (G > 0).sum(0))
    assert os.path.isdir(d)


@pytest.mark.parametrize("argv, match", [
    (["encode", "{bank}", "--sae", "{tmp}/nope", "--out", "{tmp}/g"], "nope"),
    (["encode", "{tmp}/missing.safetensors", "--sae", "{sae}", "--out", "{tmp}/g"], "missing.safetensors"),
    (["coactivation", "{bank}", "--sae", "{sae}", "--out", "{tmp}/st", "--fire-threshold", "abc"],
     "--fire-threshold 'abc': expected a number, relative:RHO or sae"),
    (["coactivation", "{bank}", "--sae", "{sae}", "--out", "{tmp}/st", "--fire-threshold", "relative:2"],
     "0 ≤ rho < 1"),
    (["encode", "{bank}", "--sae", "{sae}", "--out", "{tmp}/g", "--key", "other"], "other"),
])
def test_bad_input_is_one_line_and_exit_2(addr, tmp_path, capsys, bank_and_sae, argv, match):
    _, bank, sae_dir = bank_and_sae
    argv = [a.format(bank=bank, sae=sae_dir, tmp=tmp_path) for a in argv] + ["--scheduler", addr]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distpen: error:") and match in err[0], err
    assert not os.path.exists(tmp_path / "g") and not os.path.exists(tmp_path / "st")
