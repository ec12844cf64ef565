"""plan_coactivation: the forecast plans exactly what the job runs, and its time model is sane."""

from __future__ import annotations

import json

import pytest

import distpen as dp
from distpen.cli import main
from distpen.cluster import worker_memory_limit
from distpen.coactivation.forecast import DEFAULT_RATES, calibrate, plan_atom_major
from distpen.errors import InvalidArgumentError


@pytest.mark.parametrize("n, k, topk, tile", [(20_000, 700, 8, 128), (30_000, 1500, 4, None), (5_000, 300, 16, 64)])
def test_forecast_has_the_jobs_tiles_groups_and_chunks(client, tmp_path, n, k, topk, tile):
    g = dp.synth_gates(tmp_path / "g", n, k, topk=topk, seed=1, row_chunk=2000)
    seen = {}
    dp.coactivation_stats(g, tmp_path / "st", tile=tile, client=client, progress=seen.update)
    mem = worker_memory_limit(client)
    plan = dp.plan_coactivation(n, k, topk=topk, n_workers=2, memory_limit=mem, tile=tile, stored_chunk=2000)
    assert (plan.tile, plan.row_chunk, plan.split_every, plan.n_groups) == \
        (seen["tile"], seen["row_chunk"], seen["split_every"], seen["n_groups"])
    assert plan.n_tiles == seen["units_total"]
    assert sum(plan.tiles_per_group) == plan.n_tiles
    assert plan.pair_updates == n * topk * (topk + 1) / 2 and plan.predicted_s > 0


def test_time_model_scales_with_tokens_and_workers():
    a = dp.plan_coactivation(10**7, 32768, topk=32, n_workers=2, memory_limit=12 * 2**30)
    b = dp.plan_coactivation(10**8, 32768, topk=32, n_workers=2, memory_limit=12 * 2**30)
    c = dp.plan_coactivation(10**8, 32768, topk=32, n_workers=8, memory_limit=12 * 2**30)
    assert b.predicted_s > 9 * a.predicted_s            # more tokens, and the cache holds less of them
    assert c.predicted_s < b.predicted_s / 2            # 8 groups on 8 workers, one round
    # a group's accumulators fit the budget the job gives a task
    assert b.accumulator_bytes_per_task <= 12 * 2**30 / 2
    dense = dp.plan_coactivation(200_000, 1024, density=0.02, n_workers=2, memory_limit=2**31)
    assert dense.slots_per_token == pytest.approx(20.48)


def test_atom_major_forecast_reads_less_on_a_large_cluster():
    r = plan_atom_major(10**9, 131072, topk=32, n_workers=64, memory_limit=8 * 2**30)
    assert r["bytes_read_per_worker"] < r["row_major_bytes_read_per_worker"] / 4
    assert r["speedup"] > 2 and r["n_tasks"] > 64


def test_calibration_measures_every_rate():
    r = calibrate(rows=4000, tile=256, large_tiles=6)
    assert set(r) >= {k for k in DEFAULT_RATES if k.startswith("t_")}   # every rate is measured
    for key in ("t_pair_small", "t_pair_large", "t_slot", "t_read", "t_zero", "t_write_full", "t_write_empty",
                "t_transpose", "t_sort"):
        assert 1e-11 < r[key] < 1e-5, (key, r[key])
    plan = dp.plan_coactivation(10**6, 4096, topk=16, rates=r)
    assert all(plan.rates[k] == v for k, v in r.items())
    assert r["t_write_empty"] < r["t_write_full"]     # an almost empty tile encodes to almost nothing
    # walking a slot outside the span costs far less than reading and validating it (with numba's
    # cache empty, a timed first call of the bucket kernel made t_slot include its compilation)
    assert r["t_slot"] < r["t_read"]


def test_tile_costs_grow_with_fill_and_tiles():
    """Writing and zeroing cost every tile's bytes; a tile's write cost grows as its pairs fill."""
    sparse = dp.plan_coactivation(10**4, 32768, topk=4, n_workers=2, memory_limit=12 * 2**30)
    dense = dp.plan_coactivation(10**8, 32768, topk=32, n_workers=2, memory_limit=12 * 2**30)
    per_byte = [p.breakdown_s["tile zeroing and writes"] * 2 / (p.n_tiles * 16 * p.tile**2) for p in (sparse, dense)]
    r = DEFAULT_RATES
    assert per_byte[0] == pytest.approx(r["t_zero"] + r["t_write_empty"], rel=0.01)
    assert per_byte[1] == pytest.approx(r["t_zero"] + r["t_write_full"], rel=0.01)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of topk"),
    ({"topk": 8, "density": 0.1}, "exactly one of topk"),
    ({"topk": 5000}, "topk = 5000 exceeds k_atoms = 4096"),
    ({"density": 2.0}, r"density must lie in \(0, 1\]"),
    ({"topk": 8, "n_workers": 0}, "n_workers"),
])
def test_forecast_refuses_bad_input(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        dp.plan_coactivation(1000, 4096, **kwargs)


def test_plan_command(capsys):
    assert main(["plan", "--tokens", "100000000", "--atoms", "32768", "--topk", "32", "--memory", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "528 tiles" in out and "predicted" in out and "tokens/s" in out
    assert main(["plan", "--tokens", "1000000000", "--atoms", "131072", "--topk", "32", "--workers", "64",
                 "--memory", "8GiB", "--atom-major", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["n_tiles"] == 8256 and doc["atom_major"]["speedup"] > 2
    with pytest.raises(SystemExit):
        main(["plan", "--tokens", "10", "--atoms", "10", "--topk", "2", "--memory", "lots"])
    assert "expected a size such as 8GiB" in capsys.readouterr().err
