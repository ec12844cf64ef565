"""``distpen evaluate | assemble | newton | demo`` through ``distpen.cli.main``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

import distpen as dp
from distpen.cli import main
from distpen.cli.demo import synthetic_decoder_problem


@pytest.fixture
def problem(tmp_path):
    bs, pairs, beta = synthetic_decoder_problem(30, 4, 80, max_block=3, seed=1)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, bs, 4, 2.0, learnable_weight=True)
    spec = tmp_path / "penalty.json"
    spec.write_text(json.dumps(pen.to_spec()))
    pairs.save(str(tmp_path / "pairs"))
    z = zarr.create_array(str(tmp_path / "beta.zarr"), shape=beta.shape, chunks=(100,), dtype="f8")
    z[:] = beta
    return pen, beta, str(spec), str(tmp_path / "pairs"), str(tmp_path / "beta.zarr")


def test_evaluate_command_writes_results(client, tmp_path, problem, capsys):
    pen, beta, spec, pairs, t = problem
    out = str(tmp_path / "run")
    rc = main(["evaluate", "--penalty", spec, "--pairs", pairs, "--t", t, "--rho", "0.5",
               "--ops", "value,grad,grad_rho", "--out", out, "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    rho = np.array([0.5])
    assert printed["value"] == pytest.approx(pen.value(beta, rho), rel=1e-12)
    assert printed["grad_rho"] == pytest.approx(list(pen.grad_rho(beta, rho)), rel=1e-12)
    np.testing.assert_allclose(zarr.open_array(os.path.join(out, "grad"))[...], pen.grad_target(beta, rho),
                               rtol=0, atol=1e-12)
    assert dp.RunStore(out).manifest("evaluate")["status"] == "done"


def test_evaluate_command_takes_a_normalised_penalty_spec(client, tmp_path, problem, capsys):
    """The penalty JSON carries ``normalize``: the command evaluates the degree-0 form."""
    _, beta, _, pairs, t = problem
    bs, table, _ = synthetic_decoder_problem(30, 4, 80, max_block=3, seed=1)
    pen = dp.DecoderIncoherencePenalty.from_pairs(table, bs, 4, 2.0, normalize="frobenius")
    spec = tmp_path / "normalised.json"
    spec.write_text(json.dumps(pen.to_spec()))
    assert json.loads(spec.read_text())["normalize"] == "frobenius"
    out = str(tmp_path / "run-n")
    assert main(["evaluate", "--penalty", str(spec), "--pairs", pairs, "--t", t, "--ops", "value,grad",
                 "--out", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["value"] == pytest.approx(pen.value(beta, np.zeros(0)), rel=1e-12)
    plain = dp.DecoderIncoherencePenalty.from_pairs(table, bs, 4, 2.0)
    assert printed["value"] != pytest.approx(plain.value(beta, np.zeros(0)), rel=1e-3)
    np.testing.assert_allclose(zarr.open_array(os.path.join(out, "grad"))[...], pen.grad_target(beta, np.zeros(0)),
                               rtol=0, atol=1e-12)


def test_assemble_and_newton_commands(client, tmp_path, problem, capsys):
    pen, beta, spec, pairs, t = problem
    out = str(tmp_path / "run")
    assert main(["assemble", "--penalty", spec, "--pairs", pairs, "--t", t, "--out", out, "--tile", "64",
                 "--quiet"]) == 0
    n = beta.shape[0]
    H = np.zeros((n, n))
    pen.accumulate_psd_majorizer_dense(beta, np.zeros(1), 1.0, H)
    np.testing.assert_allclose(zarr.open_array(os.path.join(out, "H"))[...], H, atol=1e-12)
    assert main(["newton", "--penalty", spec, "--pairs", pairs, "--t", t, "--damping", "0.1",
                 "--tol", "1e-10", "--maxiter", "500", "--out", out]) == 0
    assert "converged=True" in capsys.readouterr().out
    x = zarr.open_array(os.path.join(out, "newton_x"))[...]
    want = np.linalg.solve(H + 0.1 * np.eye(n), -pen.grad_target(beta, np.zeros(1)))
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-7 * np.abs(want).max())
    residuals = dp.RunStore(out).job("newton").progress()["residuals"]
    assert residuals[0] == 1.0 and residuals[-1] <= 1e-10


def test_penalty_commands_refuse_bad_input(client, tmp_path, problem, capsys):
    pen, beta, spec, pairs, t = problem
    assert main(["evaluate", "--penalty", spec, "--t", t]) == 2
    assert "needs --pairs" in capsys.readouterr().err
    assert main(["evaluate", "--penalty", spec, "--pairs", pairs, "--t", t, "--ops", "value,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distpen: error: unknown op 'nope'") and err.count("\n") == 1
    assert main(["evaluate", "--penalty", str(tmp_path / "missing.json"), "--t", t]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["assemble", "--penalty", spec, "--pairs", pairs, "--t", t, "--out", str(tmp_path / "r"),
                 "--tile", "0"]) == 2
    assert "tile must be > 0" in capsys.readouterr().err
    assert main(["evaluate", "--penalty", spec, "--pairs", pairs, "--t", pairs]) == 2
    assert "is a Zarr group" in capsys.readouterr().err


def test_demo_pipeline_small(client, tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = main(["demo", "--out", out, "--tokens", "20000", "--atoms", "256", "--p-out", "16"])
    printed = capsys.readouterr().out
    assert rc == 0
    for stage in ("co-activation statistics", "decoder: every operation", "Gauss-Newton tiles",
                  "Newton step"):
        assert stage in printed
    store = dp.RunStore(out)
    assert {"coactivation", "evaluate", "assembly", "newton"} <= set(store.stages())
    assert all(s["status"] == "done" for s in store.status()["stages"].values())
    # a second demo into the same directory replaces the first
    assert main(["demo", "--out", out, "--tokens", "20000", "--atoms", "256", "--p-out", "16", "--quiet"]) == 0


def test_penalties_only_demo_checks_derivatives(capsys):
    assert main(["demo", "--penalties-only", "--atoms", "64", "--p-out", "8", "--pairs", "300"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 4 and "FAILED" not in out
