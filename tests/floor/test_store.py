"""The run store: manifests, markers, resume, conflicts, progress, verify (JSON only)."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from distpen.errors import InvalidArgumentError, StoreConflictError, StoreCorruptError, StoreError
from distpen.store import RunStore, fingerprint

SPEC = {"inputs": {"path": "/data/g.zarr", "shape": [100, 8], "chunks": [10, 8]},
        "params": {"row_chunk": 10, "tile": 4}}
UNITS = ["0.0", "0.1", "1.1"]


def _write(store, rel, nbytes):
    full = os.path.join(store.path, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(b"x" * nbytes)


def test_fingerprint_ignores_key_order_and_tuple_vs_list():
    a = {"b": [1, 2], "a": {"y": 1, "x": (3, 4)}}
    b = {"a": {"x": [3, 4], "y": 1}, "b": (1, 2)}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "b": [1, 3]})


def test_begin_mark_resume_finish(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("coactivation", SPEC, UNITS)
    assert job.pending() == UNITS and job.status == "running"
    _write(store, "pair_sum/c/0/0", 40)
    job.mark_done("0.0", outputs=["pair_sum/c/0/0"], info={"nonzero": True})
    assert job.pending() == ["0.1", "1.1"]
    assert job.marker("0.0")["outputs"] == {"pair_sum/c/0/0": 40}
    # same spec: resume, markers kept, run counter incremented
    again = store.begin_job("coactivation", json.loads(json.dumps(SPEC)), UNITS)
    assert again.pending() == ["0.1", "1.1"]
    assert store.manifest("coactivation")["runs"] == 2
    assert again.progress()["units_skipped"] == 1
    for u in ("0.1", "1.1"):
        again.mark_done(u)
    again.finish()
    assert again.status == "done" and again.progress()["status"] == "done"
    # every file of the stage is JSON, no temporary file is left behind
    sdir = tmp_path / "run" / "_distpen" / "coactivation"
    for root, _, files in os.walk(sdir):
        for f in files:
            assert not f.startswith(".tmp-")
            with open(os.path.join(root, f)) as fh:
                json.load(fh)


def test_job_is_picklable_for_worker_tasks(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", SPEC, UNITS)
    remote = pickle.loads(pickle.dumps(job))
    remote.mark_done("1.1")
    assert job.pending() == ["0.0", "0.1"]


def test_different_spec_conflicts_unless_overwrite(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("coactivation", SPEC, UNITS)
    job.mark_done("0.0")
    other = {**SPEC, "params": {"row_chunk": 20, "tile": 4}}
    with pytest.raises(StoreConflictError, match=r"different coactivation job \(params.row_chunk: stored 10, "
                                                 r"requested 20\); pass overwrite=True"):
        store.begin_job("coactivation", other, UNITS)
    job2 = store.begin_job("coactivation", other, UNITS, overwrite=True)
    assert job2.pending() == UNITS                       # old markers are gone


def test_markers_of_another_job_are_not_trusted(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", SPEC, UNITS)
    # a marker left by an earlier job (different fingerprint) in the same directory
    with open(tmp_path / "run" / "_distpen" / "s" / "units" / "0.1.json", "w") as f:
        json.dump({"unit": "0.1", "fingerprint": "f" * 64, "outputs": {}}, f)
    assert job.pending() == UNITS
    assert job.markers() == {}
    job.mark_done("0.0", info={"rows": 3})
    m = job.markers()
    assert list(m) == ["0.0"] and m["0.0"]["info"] == {"rows": 3} and m["0.0"]["fingerprint"] == job.fingerprint


def test_failure_is_recorded_and_units_stay_complete(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", SPEC, UNITS)
    job.mark_done("0.1")
    job.fail("GateDataError: row 5, atom 3 is NaN")
    assert job.status == "failed"
    p = job.progress()
    assert p["status"] == "failed" and p["units_done"] == 1
    assert "atom 3 is NaN" in p["failures"][0]["error"]
    assert job.pending() == ["0.0", "1.1"]


def test_verify_detects_missing_and_truncated_outputs(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", SPEC, UNITS)
    _write(store, "a/c/0", 10)
    _write(store, "a/c/1", 10)
    job.mark_done("0.0", outputs=["a/c/0"])
    job.mark_done("0.1", outputs=["a/c/1"])
    job.mark_done("1.1", outputs=[])                       # a zero tile writes nothing
    assert store.verify() == {"ok": True, "stages": {"s": {"units_done": 3, "units_total": 3,
                                                           "missing": [], "mismatched": []}}}
    os.unlink(tmp_path / "run" / "a" / "c" / "0")
    _write(store, "a/c/1", 7)
    rep = store.verify()
    assert not rep["ok"]
    assert rep["stages"]["s"]["missing"] == ["0.0: a/c/0"]
    assert rep["stages"]["s"]["mismatched"] == ["0.1: a/c/1 has 7 bytes, marker says 10"]
    with pytest.raises(StoreCorruptError, match="is damaged: 2 problem"):
        store.verify(raise_on_error=True)


def test_status_for_dashboards(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.status()["stages"] == {}
    job = store.begin_job("coactivation", SPEC, UNITS)
    job.mark_done("0.0")
    job.update_progress(rows_processed=50, rows_total=100, throughput_rows_per_s=12.5)
    st = store.status()["stages"]["coactivation"]
    assert st["status"] == "running" and st["units_done"] == 1 and st["units_total"] == 3
    assert st["progress"]["rows_processed"] == 50 and st["progress"]["updated"] >= st["progress"]["started"]
    assert st["spec"] == json.loads(json.dumps(SPEC))
    json.dumps(store.status())                              # JSON data throughout


@pytest.mark.parametrize("call, exc, match", [
    (lambda s: s.begin_job("bad stage", SPEC, UNITS), InvalidArgumentError, "stage must be a name"),
    (lambda s: s.begin_job("s", SPEC, ["a/b"]), InvalidArgumentError, "unit ids must be letters"),
    (lambda s: s.begin_job("s", SPEC, ["a", "a"]), InvalidArgumentError, "unit ids must be unique"),
    (lambda s: s.begin_job("s", {"x": object()}, UNITS), TypeError, "a job spec must be JSON data"),
    (lambda s: s.job("nothing"), StoreError, r"has no 'nothing' job; stages present: \[\]"),
])
def test_bad_store_calls(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(RunStore(tmp_path / "run"))


def test_remote_urls_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="only local paths are supported"):
        RunStore("s3://bucket/run")


def test_corrupt_manifest_is_reported(tmp_path):
    store = RunStore(tmp_path / "run")
    store.begin_job("s", SPEC, UNITS)
    with open(tmp_path / "run" / "_distpen" / "s" / "manifest.json", "w") as f:
        f.write("{not json")
    with pytest.raises(StoreCorruptError, match="manifest.json is not valid JSON"):
        store.job("s")
