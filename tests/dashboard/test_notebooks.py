"""The dashboards' notebooks, executed headless with nbclient against runs the tests create.

* ``tour.ipynb`` runs the whole pipeline into a fresh run store;
* ``monitor.ipynb`` is executed on that finished run (with the scheduler), exported to HTML with
  nbconvert, rendered in headless Chromium (found, or installed on first use by :mod:`_browser`)
  and checked for its plots (with ``DISTPEN_UPDATE_SCREENSHOT=1`` the picture also replaces
  ``docs/monitor.png``, the README's);
* ``monitor.ipynb`` is executed again while a co-activation job is still running in this process;
* ``checkpoint_to_clusters.ipynb`` writes a sparsify checkpoint and an activation bank, encodes them
  on its own embedded cluster, and asserts in its cells that the statistics, neighbours and clusters
  recover the groups of latents it planted.

Every notebook is stored without outputs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import _browser
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import distpen as dp
from distpen import dashboard as db

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOT = ROOT / "docs" / "monitor.png"
KERNEL = "distpen-test"
N_PLOTS = 8  # figures in monitor.ipynb


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec running this interpreter (so the kernel imports this checkout's distpen)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "distpen tests", "language": "python"}))
    return {"JUPYTER_PATH": str(root), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def execute(name: str, env: dict, cwd, timeout: int = 240):
    """Execute ``notebooks/<name>`` in a fresh kernel whose environment adds ``env``; returns the notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, kind=None):
    for cell in nb.cells:
        if cell.cell_type == "code":
            for out in cell.outputs:
                if kind is None or out.output_type == kind:
                    yield out


def stream_text(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


def png_arrays(nb) -> list:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))).convert("RGB"), dtype=float)
            for o in outputs(nb) if "image/png" in o.get("data", {})]


def widget_html(nb) -> list[str]:
    """Values of the HTML widgets whose state nbclient saved (the live monitor's last refresh)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return [m["state"].get("value", "") for m in state.values() if m.get("model_name") == "HTMLModel"]


@pytest.fixture(scope="module")
def tour(dask_client, kernel_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("tour") / "run"
    run.mkdir()
    env = dict(kernel_env, DISTPEN_TOUR_DIR=str(run), DASK_SCHEDULER_ADDRESS=dask_client.scheduler.address)
    nb = execute("tour.ipynb", env, run.parent)
    return run, nb


def test_tour_runs_the_whole_pipeline(tour):
    run, nb = tour
    st = db.status_json(run, verify=True)
    assert {s: v["status"] for s, v in st["summary"].items()} == {
        "coactivation": "done", "assembly": "done", "newton": "done", "schedule": "done"}
    assert st["verify"]["ok"]
    text = stream_text(nb)
    dist, local = text.split("distributed value ")[1].split("\n")[0].split("  (in memory ")
    assert float(dist) == pytest.approx(float(local.rstrip(")")), rel=1e-9)
    assert "converged=True" in text
    before, after = text.split("P(β) = ")[-1].split("\n")[0].split(" → P(β + x) = ")
    assert float(after) < float(before)  # the Newton step lowers the penalty
    imgs = png_arrays(nb)
    assert len(imgs) == 6 and all(a.std() > 20 for a in imgs)  # one per plot cell


def render(html_path: Path, png_path: Path, profile: Path, size=(1100, 4600)) -> np.ndarray:
    from PIL import Image

    cmd = [_browser.chromium(), *_browser.FLAGS, f"--user-data-dir={profile}", f"--screenshot={png_path}",
           f"--window-size={size[0]},{size[1]}", html_path.as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and png_path.exists(), res.stderr[-2000:]
    return np.asarray(Image.open(png_path).convert("RGB"), dtype=float)


def test_monitor_on_finished_run_renders_in_chromium(tour, kernel_env, dask_client, tmp_path):
    from nbconvert import HTMLExporter

    run, _ = tour
    env = dict(kernel_env, DISTPEN_RUN=str(run), DISTPEN_SCHEDULER=dask_client.scheduler.address)
    nb = execute("monitor.ipynb", env, tmp_path)
    # the live widget was created in the kernel and shows the finished jobs and the cluster
    (live,) = widget_html(nb)
    assert "coactivation" in live and "assembly" in live and live.count(">done<") == 4
    assert "2 workers" in live and dask_client.dashboard_link in live
    text = stream_text(nb)
    assert f"run store {run}" in text and "newton: " in text
    imgs = png_arrays(nb)
    assert len(imgs) == N_PLOTS and all(a.std() > 20 for a in imgs)

    # offline export: drop the widget state (its renderer loads from a CDN) so the HTML snapshot shows
    nb.metadata.pop("widgets", None)
    html, _ = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                           exclude_output_prompt=True).from_notebook_node(nb)
    assert html.count('src="data:image/png;base64,') == N_PLOTS and 'class="distpen-mon"' in html
    page = tmp_path / "monitor.html"
    page.write_text(html)
    shot = render(page, tmp_path / "monitor.png", tmp_path / "chromium-profile")
    assert shot.std() > 25  # not a blank page
    # plots are colourful; text and page chrome are grey: count saturated pixels, band by band
    sat = shot.max(axis=2) - shot.min(axis=2) > 60
    assert sat.mean() > 0.03, f"only {sat.mean():.2%} coloured pixels: are the plots missing?"
    bands = np.array_split(sat, 12, axis=0)
    assert sum(b.mean() > 0.01 for b in bands) >= 6, "the plots do not fill the page"
    if os.environ.get("DISTPEN_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture on request only
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "monitor.png", SCREENSHOT)


def test_monitor_while_a_job_is_running(tour, kernel_env, dask_client, tmp_path):
    run, _ = tour
    gates = dp.open_gates(run / "gates")
    store = tmp_path / "live"
    # an interrupted job: 3 of 10 tiles complete
    dp.coactivation_stats(gates, store, tile=64, client=dask_client, _units=["0.0", "0.1", "1.1"])
    entered, release = threading.Event(), threading.Event()
    result = {}

    def hold(info):  # the resumed job reports progress, then waits until the notebook has read the store
        if not entered.is_set():
            entered.set()
            release.wait(300)

    def resume():
        try:
            result["stats"] = dp.coactivation_stats(gates, store, client=dask_client, progress=hold)
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - reported by the assertion below
            result["error"] = exc

    job = threading.Thread(target=resume, daemon=True)
    job.start()
    try:
        assert entered.wait(60), "the resumed job did not start"
        assert db.status_json(store)["summary"]["coactivation"]["status"] == "running"
        nb = execute("monitor.ipynb", dict(kernel_env, DISTPEN_RUN=str(store)), tmp_path)
    finally:
        release.set()
        job.join(120)
    assert "error" not in result, result.get("error")
    text = stream_text(nb)
    row = next(line for line in text.splitlines() if line.startswith("coactivation"))
    assert row.split()[:3] == ["coactivation", "running", "3/10"]
    (live,) = widget_html(nb)
    assert ">running<" in live and "3/10" in live
    imgs = png_arrays(nb)
    assert len(imgs) == N_PLOTS and all(a.std() > 5 for a in imgs)
    # the job then finishes normally
    st = db.status_json(store)["summary"]["coactivation"]
    assert (st["status"], st["units_done"]) == ("done", 10)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_checkpoint_to_clusters_recovers_the_planted_groups(kernel_env, tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)  # the notebook starts its own LocalCluster
    work = tmp_path / "work"
    nb = execute("checkpoint_to_clusters.ipynb", dict(kernel_env, DISTPEN_CLUSTERS_DIR=str(work)), tmp_path)
    text = stream_text(nb)  # the notebook's own asserts passed; these lines come after them
    assert "encoded 5/5 chunks, 20,000 rows" in text
    assert "the same pair_count, fire_count and pair_sum as from the gates store" in text
    assert "the 104 strongest pairs are the pairs inside planted groups" in text
    assert "all 8 planted groups recovered" in text
    # the inputs are in the tools' layouts, the outputs where the notebook says
    sae = dp.load_sae(work / "checkpoints" / "layers.6")
    assert (sae.metadata["format"], sae.d_in, sae.d_sae, sae.k) == ("sparsify", 256, 512, 16)
    acts = dp.open_activations(str(work / "activations" / "*.safetensors"))
    assert (acts.n_rows, len(acts.paths)) == (20_000, 5)
    assert dp.open_gates(work / "gates").n_tokens == 20_000
    assert db.status_json(work / "stats", verify=True)["verify"]["ok"]
    doc = json.loads((work / "neighbours" / "layers.6-co-occurrence.json").read_text())
    assert sorted(map(int, doc)) == list(range(512))
    assert all(0 < len(v) <= 10 and all(isinstance(b, int) for _, b in v) for v in doc.values())
    imgs = png_arrays(nb)
    assert len(imgs) == 2 and all(a.std() > 20 for a in imgs)  # the heatmap and the pair weights
