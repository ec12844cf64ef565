"""distpen.dashboard: status table/JSON, JobMonitor (text, HTML, live refresh, watch) and the plots,
on a finished run store, a partially complete one, a running one and an empty/absent one."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pytest
import zarr

import distpen as dp
from distpen import dashboard as db
from distpen.curvature.newton import NewtonResult, save_newton_result
from distpen.curvature.tiles import assemble_majorizer
from distpen.dashboard import plots as plots_mod
from distpen.dashboard import status as status_mod
from distpen.errors import InvalidArgumentError, ScheduleError
from distpen.store import RunStore

N_TOKENS, K_ATOMS, TILE = 20_000, 256, 64
ALL_PLOTS = {
    "heatmap": lambda s: db.plot_coactivation_heatmap(s, top_n=32),
    "firing": db.plot_firing_rates,
    "pair_weights": db.plot_pair_weights,
    "occupancy_stats": lambda s: db.plot_tile_occupancy(s, "coactivation"),
    "occupancy_H": db.plot_tile_occupancy,
    "newton": db.plot_newton_residuals,
    "schedule": db.plot_penalty_schedule,
    "clusters": lambda s: db.plot_clusters(s, max_size=20),
}


def png_pixels(fig) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def gates(dask_client, tmp_path_factory):
    path = tmp_path_factory.mktemp("dash") / "gates"
    return dp.synth_gates(path, N_TOKENS, K_ATOMS, topk=16, seed=1, client=dask_client)


@pytest.fixture(scope="module")
def finished_run(dask_client, gates, tmp_path_factory):
    """A run store with every stage the dashboards read: statistics, curvature tiles, Newton, schedule."""
    from distributed.client import _set_global_client

    _set_global_client(dask_client)
    run = str(tmp_path_factory.mktemp("dash") / "run")
    zarr.open_group(run, mode="w")
    stats = dp.coactivation_stats(gates, run, tile=TILE, client=dask_client)
    pairs = stats.pairs(top_m=4, client=dask_client)
    rng = np.random.default_rng(0)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, rng.integers(1, 3, size=K_ATOMS), 4, weight=10.0)
    beta = rng.standard_normal(pen.n_coef)
    assemble_majorizer(pen, beta, np.zeros(0), run, tile=256)
    save_newton_result(run, NewtonResult(np.zeros(pen.n_coef), [1.0, 0.1, 1e-3, 1e-7], 3, True, "block", 0.5))
    sched = dp.ScalarWeightSchedule(1.0, 10.0, dp.Linear(5))
    db.record_penalty_schedule(run, db.penalty_schedule_values(pen, beta, np.zeros(0), sched, 8), label="dec")
    return {"run": run, "stats": stats, "pen": pen, "beta": beta, "sched": sched}


@pytest.fixture(scope="module")
def partial_run(dask_client, gates, tmp_path_factory):
    """Statistics with 3 of 10 tiles complete (an interrupted job): status 'incomplete'."""
    run = str(tmp_path_factory.mktemp("dash") / "partial")
    dp.coactivation_stats(gates, run, tile=TILE, client=dask_client, _units=["0.0", "0.1", "1.1"])
    return run


# ----------------------------------------------------------------------------- status
def test_status_json_and_table_of_finished_run(finished_run):
    st = db.status_json(finished_run["run"], verify=True)
    json.dumps(st, allow_nan=False)  # JSON data, as `distpen status --json` prints it
    assert st["finished"] and st["verify"]["ok"]
    assert set(st["summary"]) == {"coactivation", "assembly", "newton", "schedule"}
    co = st["summary"]["coactivation"]
    assert (co["status"], co["units_done"], co["units_total"], co["fraction"]) == ("done", 10, 10, 1.0)
    assert co["rows_processed"] == co["rows_total"] == N_TOKENS and co["eta_s"] is None
    assert st["summary"]["newton"]["iterations"] == 3
    text = db.format_status(finished_run["run"], verify=True)
    lines = text.splitlines()
    assert lines[0] == f"run store {finished_run['run']}"
    assert lines[1].split()[:4] == ["stage", "status", "units", "progress"]
    row = next(line for line in lines if line.startswith("coactivation"))
    assert row.split()[:3] == ["coactivation", "done", "10/10"] and "100.0%" in row and "20k/20k rows" in row
    assert "newton: 3 iterations, final relative residual 1e-07, converged=True" in text
    assert "verify coactivation: ok (10 complete units checked)" in text
    # a plain RunStore.status() dict (what the CLI has) formats the same table
    plain = db.format_status(RunStore(finished_run["run"]).status()).splitlines()
    assert [line.split()[:5] for line in plain[1:6]] == [line.split()[:5] for line in lines[1:6]]


def test_status_of_running_job_has_eta_and_flags_a_stale_one(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("coactivation", {"n": 1}, [f"{i}" for i in range(8)])
    job.mark_done("0")
    job.mark_done("1")
    p = job.update_progress(rows_processed=5_000, rows_total=20_000, throughput_rows_per_s=1_000.0)
    now = dt.datetime.fromisoformat(p["updated"]) + dt.timedelta(seconds=3)
    s = db.status_json(store, now=now)["summary"]["coactivation"]
    assert s["status"] == "running" and (s["units_done"], s["units_total"]) == (2, 8)
    assert s["eta_s"] == pytest.approx(15.0) and not s["stale"]
    assert not db.status_json(store, now=now)["finished"]
    later = now + dt.timedelta(seconds=status_mod.STALE_AFTER_S + 1)
    assert db.status_json(store, now=later)["summary"]["coactivation"]["stale"]
    assert "STALE?" in db.format_status(db.status_json(store, now=later))
    # an atom-major job's copy phase: its rows, named, and the phase's ETA
    job.update_progress(rows_processed=10_000, rows_total=20_000, throughput_rows_per_s=2_000.0,
                        phase="atom-major copy", phase_done=10_000, phase_total=20_000)
    s = db.status_json(store, now=now)["summary"]["coactivation"]
    assert s["phase"] == "atom-major copy" and s["eta_s"] == pytest.approx(5.0)
    assert "atom-major copy: 10" in db.format_status(db.status_json(store, now=now))
    job.fail("RuntimeError: boom")
    text = db.format_status(store)
    assert "failed" in text and "coactivation: failure at" in text and "RuntimeError: boom" in text
    assert db.status_json(store)["finished"]  # failed is final


@pytest.mark.parametrize("kind", ["absent", "empty"])
def test_status_of_absent_and_empty_store(tmp_path, kind):
    path = tmp_path / "run"
    if kind == "empty":
        zarr.open_group(path, mode="w")
    text = str(db.JobMonitor(path))
    want = ("  (the store does not exist yet: waiting for a job to create it)" if kind == "absent"
            else "  (no jobs recorded in this store yet)")
    assert text.splitlines() == [f"run store {path}", want]
    assert not db.status_json(path)["finished"]


# ----------------------------------------------------------------------------- monitor
def test_monitor_cluster_info_and_html(finished_run, client):
    mon = db.JobMonitor(finished_run["run"], scheduler=client)
    c = mon.cluster()
    assert c["n_workers"] == 2 and c["threads"] == 2 and c["memory_limit"] == 2 * 2 * 2**30
    assert c["dashboard"] == client.dashboard_link
    assert f"cluster {client.scheduler.address}: 2 workers, 2 threads" in str(mon)
    html = mon._repr_html_()
    assert "<table>" in html and client.dashboard_link in html and html.count("<tr>") == 5
    bundle = mon._repr_mimebundle_()  # outside a kernel: no widget, no refresh thread
    assert set(bundle) == {"text/plain", "text/html"} and not mon.running


def test_monitor_refreshes_while_running_and_stops_when_finished(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("assembly", {"n": 1}, ["H.0.0", "H.0.1"])
    mon = db.JobMonitor(store, interval=0.05)
    w = mon.widget()
    assert "running" in w.value and "0/2" in w.value
    mon.start()
    job.mark_done("H.0.0", info={"norm": 1.0, "written": True})
    job.update_progress(phase="tiles", phase_done=1, phase_total=2)
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while "1/2" not in w.value and dt.datetime.now() < deadline:
        mon.wait(0.05)
    assert "1/2" in w.value and mon.running  # refreshed, still watching
    job.mark_done("H.0.1", info={"norm": 0.0, "written": False})
    job.finish()
    assert mon.wait(10), "the refresh loop did not stop after the job finished"
    assert "done" in w.value and "2/2" in w.value and not mon.running
    mon.close()


def test_watch_prints_a_table_per_change_until_finished(tmp_path, capsys):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("coactivation", {"n": 1}, ["0.0"])
    job.mark_done("0.0")
    job.finish()
    st = db.JobMonitor(store, interval=0.01).watch()
    out = capsys.readouterr().out
    assert st["finished"] and out.count(f"run store {store.path}") == 1  # not a tty: printed once
    assert "coactivation  done" in out and "1/1" in out


def test_monitor_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match="interval must be a positive number"):
        db.JobMonitor(tmp_path, interval=0)
    with pytest.raises(InvalidArgumentError, match="scheduler must be an address"):
        db.JobMonitor(tmp_path, scheduler=42)
    with pytest.raises(InvalidArgumentError, match="run store path is empty; set DISTPEN_RUN"):
        db.JobMonitor("")
    with pytest.raises(InvalidArgumentError, match="store must be a path"):
        db.status_json(3.5)


# ----------------------------------------------------------------------------- plots
def test_every_plot_draws_a_finished_run(finished_run):
    for name, plot in ALL_PLOTS.items():
        fig = plot(finished_run["run"])
        assert not hasattr(fig, "distpen_message"), (name, getattr(fig, "distpen_message", ""))
        px = png_pixels(fig)
        assert px.std() > 20, name  # not blank


@pytest.mark.parametrize("kind", ["absent", "empty"])
def test_every_plot_explains_an_empty_store(tmp_path, kind):
    path = tmp_path / "run"
    if kind == "empty":
        zarr.open_group(path, mode="w")
    for name, plot in ALL_PLOTS.items():
        fig = plot(path)
        msg = fig.distpen_message
        assert str(path) in msg and ("no " in msg), (name, msg)
        assert any(msg.split(":")[0][:30] in t.get_text().replace("\n", " ") for a in fig.axes for t in a.texts)
        png_pixels(fig)  # renders


def test_heatmap_data_is_the_clustered_coactivation_of_the_top_atoms(finished_run):
    stats = finished_run["stats"]
    d = db.coactivation_heatmap_data(stats, top_n=40)
    top = np.argsort(-stats.fire_count, kind="stable")[:40]
    assert sorted(d["atoms"].tolist()) == sorted(top.tolist())
    C = stats.coactivation_dense()[np.ix_(d["atoms"], d["atoms"])]
    np.fill_diagonal(C, np.nan)
    np.testing.assert_allclose(d["matrix"], C, rtol=1e-12, equal_nan=True)
    assert (d["tiles_done"], d["tiles_total"]) == (10, 10)
    with pytest.raises(InvalidArgumentError, match="top_n must be an integer ≥ 2"):
        db.coactivation_heatmap_data(stats, top_n=1)


def test_tile_occupancy_norms_match_the_stored_tiles(finished_run):
    d = db.tile_occupancy_data(finished_run["run"])
    H = zarr.open_group(finished_run["run"], mode="r")["H"]
    T = H.chunks[0]
    assert d["tile"] == T and d["n_tiles"] == -(-H.shape[0] // T) and d["done"] == d["total"]
    assert d["written"] == H.attrs["tiles_written"] and (d["state"] == 1).sum() == 0
    for I, J in zip(*np.nonzero(d["state"] == 3)):
        block = H[I * T:(I + 1) * T, J * T:(J + 1) * T]
        assert d["norm"][I, J] == pytest.approx(np.linalg.norm(block), rel=1e-12)
    for I, J in zip(*np.nonzero(d["state"] != 3)):
        assert not H[I * T:(I + 1) * T, J * T:(J + 1) * T].any()
    pooled = db.tile_occupancy_data(finished_run["run"], max_side=4)
    assert pooled["norm"].shape == (4, 4) and pooled["pool"] == -(-d["n_tiles"] // 4)
    assert np.nansum(pooled["norm"] ** 2) == pytest.approx(np.nansum(d["norm"] ** 2))
    with pytest.raises(InvalidArgumentError, match="stage must be 'assembly' or 'coactivation'"):
        db.tile_occupancy_data(finished_run["run"], "newton")


def test_plots_on_a_partially_complete_store(partial_run):
    st = db.status_json(partial_run)["summary"]["coactivation"]
    assert (st["status"], st["units_done"], st["units_total"]) == ("incomplete", 3, 10)
    occ = db.tile_occupancy_data(partial_run, "coactivation")
    assert (occ["done"], occ["total"], (occ["state"] == 1).sum()) == (3, 10, 7)
    assert (occ["state"][np.tril_indices(4, -1)] == 0).all()  # lower tiles are not part of the job
    heat = db.plot_coactivation_heatmap(partial_run, top_n=32)
    assert "3/10 tiles so far" in heat.axes[0].get_title()
    fire = db.plot_firing_rates(partial_run)
    assert "(128/256 counted so far)" in fire.axes[0].get_title()  # diagonal tiles 0 and 1 complete
    pw = db.plot_pair_weights(partial_run, measures=("mean", "jaccard"))
    assert "3 tiles; 3/10 done" in pw.get_suptitle()
    for fig in (heat, fire, pw):
        assert not hasattr(fig, "distpen_message") and png_pixels(fig).std() > 20


def test_pair_weights_match_coactivation_pairs(finished_run, client):
    stats = finished_run["stats"]
    vals, n = plots_mod._pair_weight_values(stats, ("mean", "lift"), max_tiles=100)
    assert n == 10
    for m in ("mean", "lift"):
        want = np.sort(stats.pairs(measure=m, client=client).w)
        np.testing.assert_allclose(np.sort(vals[m][vals[m] > 0]), want, rtol=1e-12)
    with pytest.raises(InvalidArgumentError, match="measures must be a non-empty subset"):
        db.plot_pair_weights(finished_run["run"], measures=("mean", "pmi"))


def test_newton_residuals_from_result_list_and_store(finished_run):
    fig = db.plot_newton_residuals(finished_run["run"], tol=1e-6)
    y = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_array_equal(y, [1.0, 0.1, 1e-3, 1e-7])
    assert "converged" in fig.axes[0].get_title()
    res = NewtonResult(np.zeros(3), [1.0, 0.5, 0.0], 2, False)
    fig = db.plot_newton_residuals(res)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [1.0, 0.5])  # 0 is off a log axis
    assert "not converged" in fig.axes[0].get_title()
    assert db.plot_newton_residuals([1.0, 0.3]).axes[0].lines[0].get_ydata().tolist() == [1.0, 0.3]


def test_penalty_schedule_values_scale_with_the_weight(finished_run):
    pen, beta, sched = finished_run["pen"], finished_run["beta"], finished_run["sched"]
    h = db.penalty_schedule_values(pen, beta, np.zeros(0), sched, 8)
    assert h["iterations"] == list(range(8))
    assert h["weights"] == pytest.approx([1.0, 2.8, 4.6, 6.4, 8.2, 10.0, 10.0, 10.0])
    unit = pen.value(beta, np.zeros(0)) / pen.weight  # the decoder penalty is linear in its weight
    np.testing.assert_allclose(h["values"], np.array(h["weights"]) * unit, rtol=1e-12)
    assert pen.schedule is None  # the caller's penalty is untouched
    fig = db.plot_penalty_schedule(finished_run["run"])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), h["values"], rtol=1e-12)
    with pytest.raises(InvalidArgumentError, match="iterations must be a positive integer"):
        db.penalty_schedule_values(pen, beta, np.zeros(0), sched, 0)
    with pytest.raises(ScheduleError):
        db.penalty_schedule_values(pen, beta, np.zeros(0), "linear", 3)
    with pytest.raises(InvalidArgumentError, match="equal-length 'iterations' and 'values'"):
        db.record_penalty_schedule(finished_run["run"], {"iterations": [0, 1], "values": [1.0]})


def test_cluster_view_draws_the_largest_groups_of_the_store(finished_run, client):
    fig = db.plot_clusters(finished_run["run"], "jaccard", max_size=20, n_show=4)
    cl = fig.distpen_clusters
    want = finished_run["stats"].clusters("jaccard", max_size=20)
    assert cl.threshold == want.threshold and [r["members"].tolist() for r in cl.rows] == \
        [r["members"].tolist() for r in want.rows]
    assert len(fig.axes) == min(4, len(cl)) + 1 and png_pixels(fig).std() > 20


def test_latent_lookup_lists_the_strongest_partners_under_each_measure(finished_run, client):
    stats = finished_run["stats"]
    a = int(np.argmax(stats.fire_count))
    got = db.latent_partners(finished_run["run"], a, measures=("jaccard", "npmi"), top=5)
    for measure in ("jaccard", "npmi"):
        want = stats.neighbours(measure, top_m=5)[a]
        assert [p for p, _ in got[measure]] == [p for _, p in want]
        np.testing.assert_allclose([v for _, v in got[measure]], [v for v, _ in want], rtol=1e-12)
    text = db.format_latent_partners(finished_run["run"], a, measures=("jaccard", "npmi"), top=5)
    assert text.splitlines()[0] == f"latent {a}: strongest partners" and "jaccard" in text and "npmi" in text
    with pytest.raises(InvalidArgumentError, match=r"latent must be an atom index in \[0, 256\)"):
        db.latent_partners(finished_run["run"], 256)
