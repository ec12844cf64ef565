"""The run store: job manifests, completion markers and live progress next to a job's Zarr output.

A run store is a directory (a Zarr group) that holds a job's output arrays and, under
``_distpen/<stage>/``, JSON files only (nothing is ever unpickled):

``manifest.json``       the job: stage, spec (inputs — path, shape, chunks, dtype — and parameters),
                        fingerprint (SHA-256 of the canonical JSON spec), unit ids, status, times
``progress.json``       written by the client while the job runs: units done/total, rows processed,
                        throughput, start/update times, failures — a dashboard can poll it
``units/<unit>.json``   one marker per complete unit, written by the task that produced the unit
                        *after* its output chunks (atomic rename), listing the files it wrote and
                        their sizes, and the job fingerprint it belongs to

A unit is whatever a stage calls its unit of output (a tile ``"3.7"``, a pair chunk ``"12"``).
Re-running a job with the same spec resumes it: units with a marker of that fingerprint are kept,
all others are recomputed (and their chunks overwritten). A job with a different spec is refused
with :class:`~distpen.errors.StoreConflictError` unless ``overwrite=True``.

Examples
--------
>>> store = RunStore(tmp_path / "run")                                  # doctest: +SKIP
>>> job = store.begin_job("coactivation", {"n": 10}, ["0.0", "0.1"])   # doctest: +SKIP
>>> job.pending()                                                      # doctest: +SKIP
['0.0', '0.1']
>>> job.mark_done("0.0", outputs=["pair_sum/c/0/0"])                   # doctest: +SKIP
>>> job.pending()                                                      # doctest: +SKIP
['0.1']
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile

from .errors import InvalidArgumentError, StoreConflictError, StoreCorruptError, StoreError

__all__ = ["RunStore", "Job", "fingerprint", "is_url", "staged_store", "local_store_path"]

_META = "_distpen"
_FORMAT = "distpen.run"
_FORMAT_VERSION = 1
_UNIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"a job spec must be JSON data; got {type(obj).__name__}: {obj!r}")


def fingerprint(spec: dict) -> str:
    """SHA-256 of the canonical JSON form of ``spec`` (key order and tuples vs lists do not matter)."""
    return hashlib.sha256(_canonical(spec).encode()).hexdigest()


def publish_file(tmp: str, path: str, write) -> None:
    """``write(tmp)``, then rename ``tmp`` onto ``path`` (readers see the old file or the whole new
    one, never a part); on any failure ``tmp`` is removed and the error raised."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_json_atomic(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    os.close(fd)
    text = json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, default=_json_default)

    def write(p):
        with open(p, "w") as f:
            f.write(text)

    publish_file(tmp, path, write)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # never anything but JSON (a pickle is refused)
        raise StoreCorruptError(f"{path} is not valid JSON ({exc}); delete it or re-run with overwrite=True") from None


def _safe_join(root: str, rel) -> str:
    """``root/rel`` for a path ``rel`` recorded in (or read from) a store; refuses any path that
    could leave ``root``: absolute, drive-qualified, with a ``..`` component, or through a symlink."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise StoreCorruptError(f"store {root}: output path {rel!r} is not a relative path inside the store")
    parts = rel.split("/")
    if rel.startswith("/") or os.path.isabs(rel) or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise StoreCorruptError(
            f"store {root}: output path {rel!r} escapes the store directory; paths must be relative, "
            "without '..', '.' or empty components"
        )
    full = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise StoreCorruptError(f"store {root}: output path {rel!r} leads outside the store (through a symlink)")
    return full


def _spec_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if _canonical(a) != _canonical(b):
            if isinstance(a, dict) and isinstance(b, dict):
                out.extend(f"{key}.{d}" for d in _spec_diff(a, b))
            else:
                out.append(f"{key}: stored {a!r}, requested {b!r}")
    return out


class RunStore:
    """A job store rooted at a local directory (see the module docstring for the layout).

    Parameters
    ----------
    path : str or os.PathLike
        The store's directory (created on :meth:`begin_job` if absent).
    """

    def __init__(self, path):
        if hasattr(path, "store") and hasattr(path.store, "root"):  # a zarr group on a LocalStore
            path = os.path.join(str(path.store.root), path.path or "")
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"a run store path must be a local path, got {path!r}")
        path = os.fspath(path)
        if "://" in path and not path.startswith("file://"):
            raise InvalidArgumentError(
                f"run store {path!r}: only local paths are supported by RunStore; stage an fsspec URL "
                "with distpen.store.staged_store(url) (the CLI does this), or mount the storage locally"
            )
        self.path = os.path.abspath(path.removeprefix("file://"))

    def __repr__(self) -> str:
        return f"RunStore({self.path!r})"

    def __reduce__(self):
        return (RunStore, (self.path,))

    # ------------------------------------------------------------------ paths
    def _stage_dir(self, stage: str) -> str:
        if not isinstance(stage, str) or not _STAGE_RE.match(stage):
            raise InvalidArgumentError(f"stage must be a name of letters, digits, '_' or '-', got {stage!r}")
        return os.path.join(self.path, _META, stage)

    def stages(self) -> list[str]:
        """Names of the stages that have a manifest."""
        meta = os.path.join(self.path, _META)
        if not os.path.isdir(meta):
            return []
        return sorted(s for s in os.listdir(meta)
                      if os.path.isfile(os.path.join(meta, s, "manifest.json")))

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None if the stage never started."""
        return _read_json(os.path.join(self._stage_dir(stage), "manifest.json"))

    # ------------------------------------------------------------------ jobs
    def begin_job(self, stage: str, spec: dict, units, *, overwrite: bool = False) -> "Job":
        """Start or resume the job of ``stage`` with ``spec`` over ``units``.

        When resuming, a unit whose marker lists an output that is now missing, has another size,
        or lies outside the store loses its marker (it will be recomputed); their ids are in the
        progress field ``units_repaired``.

        Parameters
        ----------
        stage : str
            Stage name (e.g. ``"coactivation"``).
        spec : dict
            JSON data describing the job's inputs and parameters; its fingerprint identifies the job.
        units : sequence of str
            Every unit id of the job (letters, digits, ``_ . -``).
        overwrite : bool
            Replace a different job of the same stage (its markers are deleted). The caller deletes
            its own output arrays.

        Returns
        -------
        Job

        Raises
        ------
        StoreConflictError
            The stage holds a job with a different spec and ``overwrite`` is False.
        """
        units = [str(u) for u in units]
        bad = [u for u in units if not _UNIT_RE.match(u)]
        if bad:
            raise InvalidArgumentError(f"unit ids must be letters, digits, '_', '.' or '-'; got {bad[0]!r}")
        if len(set(units)) != len(units):
            raise InvalidArgumentError("unit ids must be unique")
        fp = fingerprint(spec)
        sdir = self._stage_dir(stage)
        old = self.manifest(stage)
        if old is not None and old.get("fingerprint") != fp:
            if not overwrite:
                diff = "; ".join(_spec_diff(old.get("spec", {}), json.loads(_canonical(spec)))[:4])
                raise StoreConflictError(
                    f"store {self.path} already holds a different {stage} job ({diff}); "
                    "pass overwrite=True (CLI: --overwrite) to replace it, or choose another output path"
                )
            self.reset(stage)
            old = None
        os.makedirs(os.path.join(sdir, "units"), exist_ok=True)
        meta = os.path.join(self.path, _META)
        for d in (meta, sdir):
            zj = os.path.join(d, "zarr.json")
            if not os.path.exists(zj):
                _write_json_atomic(zj, _GROUP_JSON)
        now = _now()
        manifest = {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "stage": stage,
            "spec": json.loads(_canonical(spec)), "fingerprint": fp, "units": units,
            "created": old.get("created", now) if old else now, "status": "running",
            "runs": (old.get("runs", 0) if old else 0) + 1,
        }
        _write_json_atomic(os.path.join(sdir, "manifest.json"), manifest)
        job = Job(self, stage, fp, units)
        repaired = self._repair(job) if old is not None else []
        done = job.done()
        job.update_progress(status="running", units_total=len(units), units_done=len(done),
                            units_skipped=len(done), units_computed=0, started=now, failures=[],
                            run=manifest["runs"], units_repaired=repaired)
        return job

    def job(self, stage: str) -> "Job":
        """The existing job of ``stage`` (raises :class:`StoreError` if there is none)."""
        m = self.manifest(stage)
        if m is None:
            raise StoreError(f"store {self.path} has no {stage!r} job; stages present: {self.stages()}")
        return Job(self, stage, m["fingerprint"], m["units"])

    def reset(self, stage: str) -> None:
        """Delete the stage's manifest, markers and progress."""
        sdir = self._stage_dir(stage)
        if os.path.isdir(sdir):
            shutil.rmtree(sdir)

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict:
        """Everything a dashboard or ``distpen status`` shows, as JSON data.

        Returns
        -------
        dict
            ``{"path": ..., "stages": {stage: {"status", "units_total", "units_done", "fingerprint",
            "spec", "progress"}}}``.
        """
        out = {"path": self.path, "exists": self.exists(), "stages": {}}
        for stage in self.stages():
            m = self.manifest(stage)
            job = Job(self, stage, m["fingerprint"], m["units"])
            progress = job.progress()
            out["stages"][stage] = {
                "status": m.get("status"), "units_total": len(m["units"]),
                "units_done": len(job.done()), "fingerprint": m["fingerprint"],
                "created": m.get("created"), "spec": m.get("spec"), "progress": progress,
            }
        return out

    def verify(self, stage: str | None = None, *, raise_on_error: bool = False) -> dict:
        """Check that every unit marked complete still has the files (and sizes) its marker lists.

        Returns
        -------
        dict
            ``{"ok": bool, "stages": {stage: {"units_done", "missing": [...], "mismatched": [...]}}}``.

        Raises
        ------
        StoreCorruptError
            With ``raise_on_error=True``, if anything is missing or has changed size.
        """
        stages = [stage] if stage is not None else self.stages()
        report = {"ok": True, "stages": {}}
        for s in stages:
            job = self.job(s)
            missing, mismatched = [], []
            markers = job.markers()
            for unit, marker in markers.items():
                miss, mism = self._check_marker(unit, marker)
                missing += miss
                mismatched += mism
            report["stages"][s] = {"units_done": len(markers), "units_total": len(job.units),
                                   "missing": missing, "mismatched": mismatched}
            if missing or mismatched:
                report["ok"] = False
        if raise_on_error and not report["ok"]:
            bad = [f"{s}: {x}" for s, r in report["stages"].items() for x in r["missing"] + r["mismatched"]]
            raise StoreCorruptError(
                f"store {self.path} is damaged: {len(bad)} problem(s), e.g. {bad[0]}; re-run the same "
                "job to recompute the damaged units (or re-run with overwrite=True)"
            )
        return report


    def _check_marker(self, unit: str, marker: dict):
        """(missing, mismatched) problems of one unit's recorded outputs."""
        missing, mismatched = [], []
        outputs = marker.get("outputs") or {}
        if not isinstance(outputs, dict):
            return [], [f"{unit}: marker outputs are not a mapping of path to size"]
        for rel, size in outputs.items():
            try:
                full = _safe_join(self.path, rel)
            except StoreCorruptError as exc:
                mismatched.append(f"{unit}: {exc}")
                continue
            try:
                actual = os.path.getsize(full)
            except OSError:
                missing.append(f"{unit}: {rel}")
                continue
            if size is not None and actual != size:
                mismatched.append(f"{unit}: {rel} has {actual} bytes, marker says {size}")
        return missing, mismatched

    def _repair(self, job: "Job") -> list[str]:
        """Forget the units whose recorded outputs are missing, truncated or outside the store, so
        that the job recomputes them; returns their ids."""
        damaged = []
        for unit, marker in job.markers().items():
            miss, mism = self._check_marker(unit, marker)
            if miss or mism:
                job.clear(unit)
                damaged.append(unit)
        return sorted(damaged)


class Job:
    """One stage's job in a :class:`RunStore`; picklable, so tasks can mark their units done."""

    def __init__(self, store: RunStore, stage: str, fingerprint: str, units):
        self.store, self.stage, self.fingerprint = store, stage, fingerprint
        self.units = list(units)
        self._dir = store._stage_dir(stage)

    def __reduce__(self):
        # units stay on the client: a task only needs to know where to write its marker
        return (_restore_job, (self.store.path, self.stage, self.fingerprint))

    def __repr__(self) -> str:
        return f"Job({self.store.path!r}, stage={self.stage!r}, units={len(self.units)})"

    # ------------------------------------------------------------------ markers
    def _marker_path(self, unit: str) -> str:
        unit = str(unit)
        if not _UNIT_RE.match(unit):
            raise InvalidArgumentError(f"invalid unit id {unit!r}")
        return os.path.join(self._dir, "units", unit + ".json")

    def markers(self) -> dict:
        """Every completed unit's marker (``{unit: marker}``), for the markers of this job only.

        A marker holds the unit id, the job's fingerprint, the sizes of the files the unit wrote
        (``outputs``), the unit's ``info`` and the time it completed.
        """
        udir = os.path.join(self._dir, "units")
        out = {}
        try:
            names = os.listdir(udir)
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".json") or name.startswith(".tmp-"):
                continue
            m = _read_json(os.path.join(udir, name))
            if m is not None and m.get("fingerprint") == self.fingerprint:
                out[name[:-5]] = m
        return out

    def done(self) -> set:
        """Ids of the units whose marker belongs to this job."""
        return set(self.markers())

    def marker(self, unit) -> dict | None:
        m = _read_json(self._marker_path(unit))
        return m if m is not None and m.get("fingerprint") == self.fingerprint else None

    def pending(self, units=None) -> list:
        """The units (all of the job's by default) without a marker, in the given order."""
        done = self.done()
        return [u for u in (self.units if units is None else units) if str(u) not in done]

    def mark_done(self, unit, outputs=None, info: dict | None = None) -> None:
        """Record that ``unit`` is complete; call right after its output chunks are written.

        Parameters
        ----------
        unit : str
        outputs : iterable of str, optional
            Files the unit wrote, relative to the store root; their sizes are recorded so
            :meth:`RunStore.verify` can detect a missing or truncated chunk.
        info : dict, optional
            Small JSON data (e.g. ``{"rows": 1000, "nonzero": True}``).
        """
        sizes = {}
        for rel in outputs or ():
            full = _safe_join(self.store.path, rel)
            sizes[rel] = os.path.getsize(full) if os.path.exists(full) else None
        _write_json_atomic(self._marker_path(unit), {
            "unit": str(unit), "fingerprint": self.fingerprint, "outputs": sizes,
            "info": info or {}, "time": _now(),
        })

    def clear(self, unit) -> None:
        """Forget that ``unit`` is complete (it will be recomputed)."""
        try:
            os.unlink(self._marker_path(unit))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ progress
    def progress(self) -> dict:
        return _read_json(os.path.join(self._dir, "progress.json")) or {}

    def update_progress(self, **fields) -> dict:
        """Merge ``fields`` into ``progress.json`` (client side only: one writer) and stamp the time."""
        p = self.progress()
        p.update(fields)
        p["updated"] = _now()
        _write_json_atomic(os.path.join(self._dir, "progress.json"), p)
        return p

    def _set_status(self, status: str) -> None:
        path = os.path.join(self._dir, "manifest.json")
        m = _read_json(path)
        if m is None:
            raise StoreCorruptError(f"the manifest of {self.stage!r} in {self.store.path} disappeared")
        m["status"] = status
        m["updated"] = _now()
        _write_json_atomic(path, m)

    def finish(self, **fields) -> None:
        """Mark the job done (all units complete) or leave it incomplete if some are pending."""
        pending = self.pending()
        status = "done" if not pending else "incomplete"
        fields.setdefault("units_done", len(self.units) - len(pending))
        self.update_progress(status=status, finished=_now(), **fields)
        self._set_status(status)

    def fail(self, error: str, **fields) -> None:
        """Record a failure; units already complete stay valid."""
        p = self.progress()
        failures = list(p.get("failures", [])) + [{"time": _now(), "error": str(error)[:2000]}]
        fields.setdefault("units_done", len(self.done()))
        self.update_progress(status="failed", failures=failures, **fields)
        self._set_status("failed")

    @property
    def status(self) -> str:
        m = self.store.manifest(self.stage) or {}
        return m.get("status", "absent")


def _restore_job(path, stage, fp):
    job = Job.__new__(Job)
    job.store = RunStore(path)
    job.stage, job.fingerprint, job.units = stage, fp, []
    job._dir = job.store._stage_dir(stage)
    return job


# ============================================================================ fsspec URLs
def is_url(path) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://``, ``gs://``, ``memory://``...)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_store_path(out) -> str:
    """The absolute local path of a store argument: ``file://`` is stripped; any other URL is refused
    (``os.path.abspath`` would otherwise turn ``s3://b/x`` into a local directory ``./s3:/b/x``)."""
    p = os.fspath(out)
    if isinstance(p, str) and is_url(p):
        raise InvalidArgumentError(
            f"store {p!r} is an fsspec URL; the Python API writes local paths: stage it with "
            "`with distpen.store.staged_store(url) as local: ...` (the CLI does this), or mount it locally"
        )
    if isinstance(p, str):
        p = p.removeprefix("file://")
    return os.path.abspath(p)


def _fs(url: str, storage_options):
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec comes with dask[array]
        raise InvalidArgumentError(f"{url!r}: fsspec URLs need the 'fsspec' package") from None
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot open {url!r} with fsspec ({exc}); install the filesystem's package "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://)"
        ) from None


def _local_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def _check_remote_rel(url: str, rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreCorruptError(f"{url}: object {rel!r} would land outside the staging directory")
    return rel


def pull_store(url: str, local: str, *, storage_options=None) -> bool:
    """Copy the store at ``url`` into the local directory ``local``; False if there is none."""
    fs, root = _fs(url, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        return False
    rels, remotes = [], []
    for full in fs.find(root):
        rel = full[len(root):].lstrip("/") if full.startswith(root) else None
        if rel is None:
            continue
        rels.append(_check_remote_rel(url, rel))
        remotes.append(full)
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(local, rel)) or local, exist_ok=True)
    if remotes:
        fs.get(remotes, [os.path.join(local, *r.split("/")) for r in rels])
    return True


def push_store(local: str, url: str, *, storage_options=None) -> int:
    """Mirror the local store directory ``local`` to ``url``: Zarr chunks and metadata first, the
    ``_distpen/`` JSON (manifest, markers) last, so the remote copy never holds a marker for a chunk
    it lacks; objects absent locally are then deleted. Returns the number of files copied."""
    fs, root = _fs(url, storage_options)
    root = root.rstrip("/")
    files = _local_files(local)
    data = [f for f in files if not f.startswith(_META + "/")]
    meta = [f for f in files if f.startswith(_META + "/") and not os.path.basename(f).startswith(".tmp-")]
    for batch in (data, meta):
        if batch:
            fs.put([os.path.join(local, *f.split("/")) for f in batch], [f"{root}/{f}" for f in batch])
    keep = set(data) | set(meta)
    if fs.exists(root):
        stale = [full for full in fs.find(root)
                 if full.startswith(root + "/") and full[len(root) + 1:] not in keep]
        if stale:
            fs.rm(stale)
    return len(keep)


class staged_store:
    """Context manager: a local directory standing for the store at an fsspec URL.

    On entry the store at ``url`` (if any) is copied into a new local staging directory; the job
    runs there (the workers write its tiles and markers, so they must see that directory: one
    machine, or a shared filesystem — set ``DISTPEN_STAGING_DIR`` to a directory they share); on
    exit — also after an error, so completed tiles are kept for a resume — the staging directory is
    mirrored back to ``url`` (chunks first, markers last) and deleted. A local path or ``file://``
    URL is passed through unchanged.

    Parameters
    ----------
    url : str
        ``s3://bucket/run.zarr``, ``gs://...``, ``memory://...`` or a local path.
    storage_options : dict, optional
        Passed to fsspec (credentials, endpoint...).
    push : bool
        Mirror the staging directory back on exit (False for read-only use such as ``status``).

    Examples
    --------
    >>> with staged_store("s3://bucket/stats.zarr") as local:          # doctest: +SKIP
    ...     dp.coactivation_stats(gates, local)
    """

    def __init__(self, url, *, storage_options=None, push: bool = True):
        self.url, self.storage_options, self.push = url, storage_options, push
        self.local = None
        self._tmp = None

    def __enter__(self) -> str:
        if not is_url(self.url):
            self.local = os.fspath(self.url).removeprefix("file://") if isinstance(self.url, str) else self.url
            return self.local
        _fs(self.url, self.storage_options)  # a clear error before creating anything
        self._tmp = tempfile.mkdtemp(prefix="distpen-stage-", dir=os.environ.get("DISTPEN_STAGING_DIR"))
        self.local = os.path.join(self._tmp, "store")
        pull_store(self.url, self.local, storage_options=self.storage_options)
        os.makedirs(self.local, exist_ok=True)  # an empty directory: a new store
        return self.local

    def __exit__(self, exc_type, exc, tb):
        if self._tmp is None:
            return False
        try:
            if self.push and os.path.isdir(self.local):
                push_store(self.local, self.url, storage_options=self.storage_options)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return False


def check_workers_see(client, path: str) -> None:
    """Raise :class:`InvalidArgumentError` unless every worker of ``client`` can read ``path``."""
    seen = client.run(os.path.isdir, path)
    blind = [w for w, ok in seen.items() if not ok]
    if blind:
        raise InvalidArgumentError(
            f"workers {blind[:3]} cannot see the staging directory {path!r} of an fsspec URL store; "
            "set DISTPEN_STAGING_DIR to a directory shared by the client and the workers, or give "
            "--out a path on a shared filesystem"
        )
