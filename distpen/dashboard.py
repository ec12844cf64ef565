"""Dashboards for distpen run stores: a job monitor (text, HTML, live Jupyter widget) and plots.

The Dask dashboard shows tasks; these views show what a job is *about*. Everything here reads a
run store (:mod:`distpen.store`) — manifests, unit markers, ``progress.json`` and the output arrays —
so it works on a finished store, on one a job is still writing, and on an empty or absent one
(a clear message instead of a traceback). Nothing here writes to a store except
:func:`record_penalty_schedule`.

Views
-----
:class:`JobMonitor`
    Per-stage progress (units done/total, rows, throughput, ETA, failures, times) and, given a
    scheduler, the cluster's workers, memory and dashboard link. ``str()`` is a text table; in
    Jupyter it displays a widget that refreshes while the job runs and stops when it finishes.
:func:`format_status`, :func:`status_json`
    The text table and the JSON data behind ``distpen status RUN [--json]``.
Plots (matplotlib, so they survive export to HTML)
    :func:`plot_coactivation_heatmap`, :func:`plot_firing_rates`, :func:`plot_pair_weights`,
    :func:`plot_tile_occupancy`, :func:`plot_newton_residuals`, :func:`plot_penalty_schedule`.
    Each returns a :class:`matplotlib.figure.Figure`; when the store holds no data for it yet, the
    figure shows a one-line message (also available as ``fig.distpen_message``).

Examples
--------
>>> from distpen.dashboard import JobMonitor, plot_firing_rates     # doctest: +SKIP
>>> mon = JobMonitor("distpen-run")                                 # doctest: +SKIP
>>> print(mon)                                                      # doctest: +SKIP
>>> plot_firing_rates("distpen-run")                                # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import math
import os
import threading
import time

import numpy as np

from .errors import InvalidArgumentError, StoreError
from .store import RunStore

__all__ = [
    "JobMonitor",
    "status_json",
    "format_status",
    "format_status_html",
    "cluster_info",
    "plot_coactivation_heatmap",
    "plot_firing_rates",
    "plot_pair_weights",
    "plot_tile_occupancy",
    "plot_newton_residuals",
    "plot_penalty_schedule",
    "penalty_schedule_values",
    "record_penalty_schedule",
    "coactivation_heatmap_data",
    "tile_occupancy_data",
]

#: statuses after which a stage's job no longer changes
FINISHED = ("done", "incomplete", "failed")
#: a running job whose progress has not been updated for this long is flagged as possibly dead
STALE_AFTER_S = 120.0
SCHEDULE_STAGE = "schedule"
NEWTON_STAGE = "newton"
_NO_STATS = ("no co-activation statistics in {path} yet: run "
             "`distpen coactivation GATES --out {path}` (or dp.coactivation_stats) first")


# ============================================================================ store access
def _as_store(store) -> RunStore:
    if isinstance(store, RunStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        if not os.fspath(store):
            raise InvalidArgumentError(
                "the run store path is empty; set DISTPEN_RUN or pass the path of a run directory"
            )
        return RunStore(store)
    if hasattr(store, "path") and isinstance(getattr(store, "path"), str):  # CoactivationStats & co
        return RunStore(store.path)
    raise InvalidArgumentError(
        f"store must be a path, a RunStore or a CoactivationStats, got {type(store).__name__}: {store!r}"
    )


def _parse_time(s) -> _dt.datetime | None:
    if not s:
        return None
    try:
        return _dt.datetime.fromisoformat(str(s))
    except ValueError:
        return None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _stage_summary(name: str, s: dict, now: _dt.datetime) -> dict:
    """Derived, display-ready figures for one stage of ``RunStore.status()``."""
    p = s.get("progress") or {}
    status = s.get("status") or p.get("status") or "?"
    total, done = int(s.get("units_total") or 0), int(s.get("units_done") or 0)
    started, updated = _parse_time(p.get("started")), _parse_time(p.get("updated"))
    finished = _parse_time(p.get("finished"))
    running = status == "running"
    end = now if running else (finished or updated)
    elapsed = (end - started).total_seconds() if (started and end) else p.get("elapsed_s")
    age = (now - updated).total_seconds() if updated else None
    rows_done, rows_total = p.get("rows_processed"), p.get("rows_total")
    rows_rate = p.get("throughput_rows_per_s")
    if not running and p.get("seconds") is not None:  # the job's own timing (assembly, newton)
        elapsed = float(p["seconds"])
    computed = done - int(p.get("units_skipped") or 0)
    units_rate = computed / elapsed if (elapsed and elapsed >= 0.5 and computed > 0) else None
    eta = None
    if running:
        if rows_total and rows_rate and rows_done is not None and rows_rate > 0:
            eta = max(0.0, (rows_total - rows_done) / rows_rate)
        elif units_rate:
            eta = (total - done) / units_rate
        elif p.get("phase_total") and p.get("phase_done") and elapsed:
            eta = elapsed * (p["phase_total"] - p["phase_done"]) / p["phase_done"]
    out = {
        "stage": name, "status": status, "units_done": done, "units_total": total,
        "fraction": (done / total) if total else (1.0 if status == "done" else 0.0),
        "phase": p.get("phase"), "phase_done": p.get("phase_done"), "phase_total": p.get("phase_total"),
        "rows_processed": rows_done, "rows_total": rows_total, "rows_per_s": rows_rate,
        "units_per_s": units_rate, "elapsed_s": elapsed, "eta_s": eta,
        "started": p.get("started"), "updated": p.get("updated"), "finished": p.get("finished"),
        "seconds_since_update": age, "stale": bool(running and age is not None and age > STALE_AFTER_S),
        "failures": list(p.get("failures") or []), "run": p.get("run"),
    }
    if name == NEWTON_STAGE and p.get("residuals"):
        out.update(iterations=p.get("iterations"), final_residual=p["residuals"][-1],
                   converged=p.get("converged"))
    return out


def status_json(store, *, verify: bool = False, now: _dt.datetime | None = None) -> dict:
    """The status of a run store as JSON data: ``RunStore.status()`` plus derived figures.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
        The run store (it may not exist yet).
    verify : bool
        Also check that every complete unit's files exist (``RunStore.verify``), under ``"verify"``.
    now : datetime, optional
        The time to compute ages and ETAs against (default: now, UTC).

    Returns
    -------
    dict
        ``{"path", "exists", "stages": {stage: {...as RunStore.status()...}}, "summary": {stage: {...}},
        "finished": bool}``. ``summary`` holds, per stage, ``status``, ``units_done``, ``units_total``,
        ``fraction``, ``rows_processed``, ``rows_total``, ``rows_per_s``, ``units_per_s``,
        ``elapsed_s``, ``eta_s`` (None unless running), ``seconds_since_update``, ``stale`` and
        ``failures``. ``finished`` is True when at least one stage exists and none is running.

    Raises
    ------
    InvalidArgumentError
        ``store`` is not a path or RunStore.
    StoreCorruptError
        A manifest or progress file is not valid JSON.

    Examples
    --------
    >>> status_json("distpen-run")["summary"]["coactivation"]["status"]    # doctest: +SKIP
    'done'
    """
    rs = _as_store(store)
    now = now or _now()
    status = rs.status()
    status["summary"] = {name: _stage_summary(name, s, now) for name, s in status["stages"].items()}
    status["finished"] = bool(status["stages"]) and all(
        s["status"] in FINISHED for s in status["summary"].values())
    if verify and status["stages"]:
        status["verify"] = rs.verify()
    return status


# ---------------------------------------------------------------------------- formatting
def _fmt_seconds(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    if x < 60:
        return f"{x:.1f}s"
    if x < 3600:
        return f"{int(x // 60)}m{int(x % 60):02d}s"
    return f"{int(x // 3600)}h{int(x % 3600 // 60):02d}m"


def _fmt_count(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}" if x != int(x) else f"{int(x)}"


def _fmt_bytes(x) -> str:
    if not x:
        return "-"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return f"{x:.1f} TiB"  # pragma: no cover


def _bar(fraction: float, width: int = 12) -> str:
    f = min(1.0, max(0.0, fraction))
    full = int(round(f * width))
    return "#" * full + "." * (width - full)


def _stage_rows(summary: dict) -> list[tuple]:
    rows = []
    for name, s in summary.items():
        work = "-"
        if s["rows_total"]:
            work = f"{_fmt_count(s['rows_processed'])}/{_fmt_count(s['rows_total'])} rows"
        elif s.get("phase"):
            work = f"{s['phase']}: {s.get('phase_done') or 0}/{s.get('phase_total') or 0} tasks"
        rate = f"{_fmt_count(s['rows_per_s'])} rows/s" if s["rows_per_s"] else (
            f"{_fmt_count(s['units_per_s'])} units/s" if s["units_per_s"] else "-")
        upd = "-"
        if s["seconds_since_update"] is not None:
            upd = f"{_fmt_seconds(s['seconds_since_update'])} ago" + (" STALE?" if s["stale"] else "")
        rows.append((name, s["status"], f"{s['units_done']}/{s['units_total']}",
                     f"[{_bar(s['fraction'])}] {100 * s['fraction']:5.1f}%", work, rate,
                     _fmt_seconds(s["elapsed_s"]), _fmt_seconds(s["eta_s"]), upd))
    return rows


_HEADERS = ("stage", "status", "units", "progress", "work", "throughput", "elapsed", "ETA", "updated")


def format_status(store_or_status, *, verify: bool = False, cluster: dict | None = None) -> str:
    """A readable text table of a run store's jobs (what ``distpen status RUN`` prints).

    Parameters
    ----------
    store_or_status : str, os.PathLike, RunStore or dict
        A run store, or the dict :func:`status_json` returned.
    verify : bool
        Check every complete unit's files (only when a store is given).
    cluster : dict, optional
        :func:`cluster_info` output, shown above the table.

    Returns
    -------
    str

    Examples
    --------
    >>> print(format_status("distpen-run"))        # doctest: +SKIP
    run store /home/me/distpen-run
    stage         status   units  progress                work               ...
    coactivation  done     10/10  [############] 100.0%   20k/20k rows       ...
    """
    st = store_or_status if isinstance(store_or_status, dict) else status_json(store_or_status, verify=verify)
    if "summary" not in st:  # a plain RunStore.status() dict
        now = _now()
        st = dict(st, summary={n: _stage_summary(n, s, now) for n, s in st["stages"].items()})
    lines = [f"run store {st['path']}"]
    if cluster:
        lines.extend(_cluster_lines(cluster))
    if not st.get("exists", True):
        lines.append("  (the store does not exist yet: waiting for a job to create it)")
    elif not st["summary"]:
        lines.append("  (no jobs recorded in this store yet)")
    else:
        rows = [_HEADERS] + _stage_rows(st["summary"])
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(_HEADERS))]
        for r in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        for name, s in st["summary"].items():
            if s.get("iterations") is not None:
                lines.append(f"{name}: {s['iterations']} iterations, final relative residual "
                             f"{s['final_residual']:.3g}, converged={s['converged']}")
            for f in s["failures"][-3:]:
                lines.append(f"{name}: failure at {f.get('time')}: {f.get('error')}")
    v = st.get("verify")
    if v is not None:
        for name, r in v["stages"].items():
            bad = r["missing"] + r["mismatched"]
            lines.append(f"verify {name}: {'ok' if not bad else 'DAMAGED'} "
                         f"({r['units_done']} complete units checked)")
            lines.extend(f"  {x}" for x in bad[:5])
    return "\n".join(lines)


def _cluster_lines(c: dict) -> list[str]:
    if c.get("error"):
        return [f"cluster: {c['error']}"]
    return [f"cluster {c['address']}: {c['n_workers']} workers, {c['threads']} threads, memory "
            f"{_fmt_bytes(c['memory_used'])} / {_fmt_bytes(c['memory_limit'])}; dashboard {c['dashboard'] or '-'}"]


_CSS = ("<style>.distpen-mon table{border-collapse:collapse;font-family:monospace;font-size:12px}"
        ".distpen-mon td,.distpen-mon th{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}"
        ".distpen-bar{width:120px;height:10px;background:#eee;display:inline-block;vertical-align:middle}"
        ".distpen-bar>div{height:10px}</style>")
_STATUS_COLOUR = {"done": "#2ca02c", "running": "#1f77b4", "failed": "#d62728", "incomplete": "#ff7f0e"}


def format_status_html(store_or_status, *, cluster: dict | None = None) -> str:
    """The status table as HTML (what the Jupyter widget shows); same arguments as :func:`format_status`."""
    st = store_or_status if isinstance(store_or_status, dict) else status_json(store_or_status)
    esc = _html.escape
    out = [_CSS, '<div class="distpen-mon">', f"<b>run store</b> <code>{esc(st['path'])}</code><br>"]
    if cluster:
        if cluster.get("error"):
            out.append(f"<b>cluster</b>: {esc(cluster['error'])}<br>")
        else:
            link = cluster.get("dashboard")
            dash = f'<a href="{esc(link)}" target="_blank">{esc(link)}</a>' if link else "-"
            out.append(f"<b>cluster</b> <code>{esc(cluster['address'])}</code>: {cluster['n_workers']} workers, "
                       f"{cluster['threads']} threads, memory {_fmt_bytes(cluster['memory_used'])} / "
                       f"{_fmt_bytes(cluster['memory_limit'])}; Dask dashboard {dash}<br>")
    summary = st.get("summary") or {}
    if not st.get("exists", True):
        out.append("<i>the store does not exist yet: waiting for a job to create it</i>")
    elif not summary:
        out.append("<i>no jobs recorded in this store yet</i>")
    else:
        out.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in _HEADERS) + "</tr>")
        for row, s in zip(_stage_rows(summary), summary.values()):
            colour = _STATUS_COLOUR.get(s["status"], "#7f7f7f")
            bar = (f'<span class="distpen-bar"><div style="width:{100 * min(1, s["fraction"]):.1f}%;'
                   f'background:{colour}"></div></span> {100 * s["fraction"]:.1f}%')
            cells = list(row)
            cells[1] = f'<span style="color:{colour};font-weight:bold">{esc(s["status"])}</span>'
            cells[3] = bar
            out.append("<tr>" + "".join(f"<td>{c if i in (1, 3) else esc(str(c))}</td>"
                                        for i, c in enumerate(cells)) + "</tr>")
        out.append("</table>")
        for name, s in summary.items():
            for f in s["failures"][-3:]:
                out.append(f'<div style="color:#d62728">{esc(name)}: failure at {esc(str(f.get("time")))}: '
                           f'{esc(str(f.get("error")))}</div>')
    out.append("</div>")
    return "".join(out)


# ============================================================================ cluster
def cluster_info(client) -> dict:
    """Workers, threads, memory and the dashboard link of a Dask cluster.

    Parameters
    ----------
    client : distributed.Client

    Returns
    -------
    dict
        ``address``, ``dashboard`` (the Dask dashboard link or None), ``n_workers``, ``threads``,
        ``memory_used`` and ``memory_limit`` (bytes, summed over workers) and ``workers`` (a list of
        per-worker dicts: ``name``, ``address``, ``nthreads``, ``memory``, ``memory_limit``, ``cpu``).
        On a connection problem: ``{"error": message}``.
    """
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed
        info = client.scheduler_info()
    except Exception as exc:  # a dead scheduler must not break a dashboard
        return {"error": f"cannot reach the scheduler: {type(exc).__name__}: {exc}"}
    workers = []
    for addr, w in sorted((info.get("workers") or {}).items()):
        metrics = w.get("metrics") or {}
        workers.append({"name": str(w.get("name", addr)), "address": addr, "nthreads": int(w.get("nthreads", 0)),
                        "memory": int(metrics.get("memory") or 0), "memory_limit": int(w.get("memory_limit") or 0),
                        "cpu": metrics.get("cpu")})
    try:
        dashboard = client.dashboard_link
    except Exception:  # no dashboard (bokeh missing or disabled)
        dashboard = None
    return {"address": info.get("address") or getattr(client.scheduler, "address", "?"), "dashboard": dashboard,
            "n_workers": len(workers), "threads": sum(w["nthreads"] for w in workers),
            "memory_used": sum(w["memory"] for w in workers),
            "memory_limit": sum(w["memory_limit"] for w in workers), "workers": workers}


# ============================================================================ monitor
class JobMonitor:
    """Progress of the jobs in a run store, with cluster information when given a scheduler.

    ``str(monitor)`` is a text table. Displayed in Jupyter it is a live ipywidgets widget that
    re-reads the store every ``interval`` seconds while a job runs and stops refreshing when every
    job has finished (done, incomplete or failed). Exported notebooks keep an HTML snapshot.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
        The run store; it may not exist yet (the monitor waits for a job to create it).
    scheduler : str or distributed.Client, optional
        A scheduler address (``tcp://host:8786``) or a client, to show the cluster's workers,
        memory and Dask dashboard link. A monitor that connected by address closes its client in
        :meth:`close`.
    interval : float
        Seconds between refreshes of the live widget (> 0).
    timeout : float, optional
        Stop refreshing after this many seconds even if a job still runs (default: never).

    Raises
    ------
    InvalidArgumentError
        A bad store, interval or timeout.

    Examples
    --------
    >>> mon = JobMonitor("distpen-run", scheduler="tcp://127.0.0.1:8786")   # doctest: +SKIP
    >>> print(mon)          # text table                                    # doctest: +SKIP
    >>> mon                 # in Jupyter: a live widget                     # doctest: +SKIP
    """

    def __init__(self, store, scheduler=None, *, interval: float = 1.0, timeout: float | None = None):
        self.store = _as_store(store)
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise InvalidArgumentError(f"interval must be a positive number of seconds, got {interval!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidArgumentError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.interval, self.timeout = float(interval), timeout
        self._client, self._own_client, self._cluster_error = None, False, None
        if scheduler is not None:
            self._connect(scheduler)
        self._widget = None
        self._thread = None
        self._stop = threading.Event()
        self.refreshes = 0

    def _connect(self, scheduler):
        if isinstance(scheduler, str):
            from distributed import Client

            try:
                self._client = Client(scheduler, timeout="10s", set_as_default=False)
                self._own_client = True
            except Exception as exc:  # shown in the table instead of raised: the store is still readable
                self._cluster_error = f"cannot connect to {scheduler}: {type(exc).__name__}: {exc}"
        elif hasattr(scheduler, "scheduler_info"):
            self._client = scheduler
        else:
            raise InvalidArgumentError(
                f"scheduler must be an address such as 'tcp://host:8786' or a distributed.Client, got {scheduler!r}"
            )

    def __repr__(self) -> str:
        return f"JobMonitor({self.store.path!r})"

    # ------------------------------------------------------------------ data
    def cluster(self) -> dict | None:
        """:func:`cluster_info` of the scheduler, or None without one."""
        if self._cluster_error:
            return {"error": self._cluster_error}
        return None if self._client is None else cluster_info(self._client)

    def status(self) -> dict:
        """:func:`status_json` of the store, plus ``"cluster"``."""
        st = status_json(self.store)
        st["cluster"] = self.cluster()
        return st

    @property
    def finished(self) -> bool:
        """True when the store holds at least one job and none is running."""
        return status_json(self.store)["finished"]

    def __str__(self) -> str:
        st = self.status()
        return format_status(st, cluster=st["cluster"])

    def _repr_html_(self) -> str:
        st = self.status()
        return format_status_html(st, cluster=st["cluster"])

    # ------------------------------------------------------------------ live widget
    def widget(self):
        """The ipywidgets ``HTML`` widget the monitor updates (created on first use)."""
        if self._widget is None:
            import ipywidgets

            self._widget = ipywidgets.HTML(value=self._repr_html_())
        return self._widget

    def refresh(self) -> dict:
        """Re-read the store (and cluster) once and update the widget if there is one; returns the status."""
        st = self.status()
        if self._widget is not None:
            self._widget.value = format_status_html(st, cluster=st["cluster"])
        self.refreshes += 1
        return st

    def start(self) -> None:
        """Refresh the widget in a background thread until every job finished, :meth:`stop` or the timeout."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"distpen-monitor-{self.store.path}", daemon=True)
        self._thread.start()

    def _loop(self):
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                st = self.refresh()
            except Exception as exc:  # e.g. a half-written JSON file: show it, keep going
                if self._widget is not None:
                    self._widget.value = f"<pre>monitor: {_html.escape(f'{type(exc).__name__}: {exc}')}</pre>"
                st = {"finished": False}
            if st["finished"] or (self.timeout is not None and time.monotonic() - t0 > self.timeout):
                break
            self._stop.wait(self.interval)

    @property
    def running(self) -> bool:
        """True while the background refresh is active."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop refreshing (the widget keeps its last content)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the refresh loop ends; returns True if it ended (jobs finished or stopped)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop refreshing and close a client the monitor opened itself."""
        self.stop()
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def watch(self, *, file=None, timeout: float | None = None) -> dict:
        """Print the text table every ``interval`` seconds until every job finished (a terminal's view).

        On a terminal the table is redrawn in place; otherwise (a log file, a pipe) a new table is
        printed only when something changed, so logs stay short.

        Parameters
        ----------
        file : file-like, optional
            Default ``sys.stdout``.
        timeout : float, optional
            Give up after this many seconds (default: the monitor's ``timeout``, or never).

        Returns
        -------
        dict
            The last :meth:`status`.
        """
        import sys

        file = sys.stdout if file is None else file
        tty = bool(getattr(file, "isatty", lambda: False)())
        timeout = self.timeout if timeout is None else timeout
        t0, last, n_lines = time.monotonic(), None, 0
        while True:
            st = self.status()
            text = format_status(st, cluster=st["cluster"])
            key = _without_ages(st)
            if tty:
                if n_lines:
                    file.write(f"\x1b[{n_lines}F\x1b[J")  # move up and clear the previous table
                file.write(text + "\n")
                n_lines = text.count("\n") + 1
            elif key != last:
                file.write(text + "\n\n")
            file.flush()
            last = key
            if st["finished"] or (timeout is not None and time.monotonic() - t0 > timeout):
                return st
            time.sleep(self.interval)

    def _repr_mimebundle_(self, include=None, exclude=None):
        html = self._repr_html_()
        bundle = {"text/plain": str(self), "text/html": html}
        if _in_kernel():
            try:
                w = self.widget()
            except ImportError:  # no ipywidgets: the static table is all we can show
                return bundle
            w.value = html
            bundle.update({k: v for k, v in w._repr_mimebundle_().items() if k != "text/plain"})
            self.start()
        return bundle


def _without_ages(st: dict) -> str:
    """What changed in a status, ignoring the clock (ages, elapsed times, ETAs, cluster memory)."""
    return repr([(n, s["status"], s["units_done"], s["rows_processed"], s.get("phase_done"), len(s["failures"]))
                 for n, s in (st.get("summary") or {}).items()] + [st.get("exists")])


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


# ============================================================================ plot helpers
def _new_axes(ax=None, figsize=(6.0, 4.5)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _message(fig, ax, title: str, msg: str):
    """Draw ``msg`` in place of a plot (no data yet) and record it on the figure."""
    import textwrap

    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(msg, 60), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="#555555", wrap=True)
    fig.distpen_message = msg
    return fig


def _open_stats(store):
    """(CoactivationStats, None) or (None, message) for a store that has no statistics yet."""
    from .coactivation import STAGE, CoactivationStats

    if hasattr(store, "pair_sum") and hasattr(store, "fire_count"):
        return store, None
    rs = _as_store(store)
    if not rs.exists():
        return None, f"no run store at {rs.path} yet"
    if rs.manifest(STAGE) is None:
        return None, _NO_STATS.format(path=rs.path)
    try:
        return CoactivationStats(rs.path, allow_incomplete=True), None
    except StoreError as exc:
        return None, str(exc)


def _stats_progress(stats) -> tuple[set, int]:
    job = stats._job
    return job.done(), len(job.units)


def _progress_note(done: int, total: int) -> str:
    return "" if done >= total else f" — {done}/{total} tiles so far"


# ============================================================================ co-activation plots
def coactivation_heatmap_data(stats, top_n: int = 64) -> dict:
    """The co-activation of the ``top_n`` most frequently firing atoms, in a clustered order.

    Parameters
    ----------
    stats : CoactivationStats
    top_n : int
        Number of atoms (the most frequently firing ones among those with statistics so far).

    Returns
    -------
    dict
        ``atoms`` (int64, the atom ids in display order), ``matrix`` (float64, ``pair_sum/n_tokens``
        of those atoms, diagonal set to NaN), ``tiles_done``, ``tiles_total``.

    Raises
    ------
    InvalidArgumentError
        ``top_n`` < 2.
    StoreError
        No atom has fired yet in the tiles complete so far.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 2:
        raise InvalidArgumentError(f"top_n must be an integer ≥ 2, got {top_n!r}")
    fire = stats.fire_count
    fired = np.flatnonzero(fire > 0)
    if fired.shape[0] < 2:
        raise StoreError(f"fewer than 2 atoms have fired in the statistics of {stats.path} so far; "
                         "wait for more tiles, or check the gates")
    order = fired[np.argsort(-fire[fired], kind="stable")][: int(top_n)]
    atoms = np.sort(order)
    T = stats.tile_size
    M = np.asarray(stats.pair_sum.oindex[atoms, atoms], dtype=np.float64)
    blk = atoms // T
    upper = blk[:, None] <= blk[None, :]  # only tiles I ≤ J are stored; mirror the others
    M = np.where(upper, M, M.T) / stats.n_tokens
    q = stats.gate_sq_sum[atoms] / stats.n_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.sqrt(np.outer(q, q))
        S = np.where(den > 0, M / np.where(den > 0, den, 1.0), 0.0)
    D = np.clip(1.0 - S, 0.0, None)
    np.fill_diagonal(D, 0.0)
    D = 0.5 * (D + D.T)
    perm = leaves_list(linkage(squareform(D, checks=False), method="average", optimal_ordering=atoms.shape[0] <= 256))
    atoms, M = atoms[perm], M[np.ix_(perm, perm)]
    np.fill_diagonal(M, np.nan)
    done, total = _stats_progress(stats)
    return {"atoms": atoms, "matrix": M, "tiles_done": len(done), "tiles_total": total}


def plot_coactivation_heatmap(store, top_n: int = 64, *, ax=None):
    """Heatmap of the mean co-activation of the ``top_n`` most frequently firing atoms, clustered.

    Atoms are ordered by average-linkage clustering of their cosine co-activation, so co-firing
    groups show as blocks on the diagonal. The colour scale is logarithmic; white is 0.

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
        A run store with a (finished or running) ``coactivation`` stage.
    top_n : int
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import LogNorm

    fig, ax = _new_axes(ax, (6.5, 5.5))
    title = f"co-activation of the top {top_n} atoms (clustered)"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, ax, title, msg)
    try:
        d = coactivation_heatmap_data(stats, top_n)
    except StoreError as exc:
        return _message(fig, ax, title, str(exc))
    M = np.ma.masked_invalid(np.where(d["matrix"] > 0, d["matrix"], np.nan))
    if M.count() == 0:
        return _message(fig, ax, title, "these atoms have not co-fired in the tiles complete so far")
    im = ax.imshow(M, norm=LogNorm(vmin=M.min(), vmax=M.max()), cmap="viridis", interpolation="nearest")
    n = d["atoms"].shape[0]
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step), [str(a) for a in d["atoms"][::step]], rotation=90, fontsize=7)
    ax.set_yticks(range(0, n, step), [str(a) for a in d["atoms"][::step]], fontsize=7)
    ax.set_xlabel("atom")
    ax.set_ylabel("atom")
    ax.set_title(title + _progress_note(d["tiles_done"], d["tiles_total"]), fontsize=10)
    fig.colorbar(im, ax=ax, label="mean gate product  Σ g_j g_k / N")
    return fig


def plot_firing_rates(store, *, ax=None, bins: int = 40):
    """Distribution of the atoms' firing rates ``fire_count / n_tokens`` on a log scale.

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
    ax : matplotlib.axes.Axes, optional
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax)
    title = "firing-rate distribution"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, ax, title, msg)
    done, total = _stats_progress(stats)
    T, K = stats.tile_size, stats.k_atoms
    known = np.zeros(K, dtype=bool)  # atoms whose diagonal tile (and so fire_count) is complete
    for b in range(stats.n_blocks):
        if f"{b}.{b}" in done:
            known[b * T:(b + 1) * T] = True
    if not known.any():
        return _message(fig, ax, title, f"no atom's firing count is complete yet in {stats.path} "
                        f"({len(done)}/{total} tiles done)")
    rate = stats.fire_count[known] / max(1, stats.n_tokens)
    live = rate[rate > 0]
    dead = int((rate == 0).sum())
    if live.shape[0] == 0:
        return _message(fig, ax, title, f"none of the {rate.shape[0]} atoms counted so far has fired")
    lo, hi = live.min(), live.max()
    edges = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, bins + 1)
    ax.hist(live, bins=edges, histtype="stepfilled", color="#1f77b4", edgecolor="#0b3c61", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("firing rate (fraction of tokens where the atom's gate > 0)")
    ax.set_ylabel("atoms")
    ax.set_title(f"{title}: {live.shape[0]} live, {dead} dead of {rate.shape[0]} atoms"
                 + ("" if known.all() else f" ({known.sum()}/{K} counted so far)"), fontsize=10)
    ax.axvline(np.median(live), color="#d62728", linestyle="--", linewidth=1, label=f"median {np.median(live):.2g}")
    ax.legend(fontsize=8)
    return fig


def _pair_weight_values(stats, measures, max_tiles: int) -> tuple[dict, int]:
    done, _ = _stats_progress(stats)
    nb = stats.n_blocks
    tiles = [(i, j) for i in range(nb) for j in range(i, nb)
             if f"{i}.{j}" in done and f"{i}.{i}" in done and f"{j}.{j}" in done]
    if len(tiles) > max_tiles:  # an even sample of the complete tiles
        tiles = [tiles[i] for i in np.linspace(0, len(tiles) - 1, max_tiles).round().astype(int)]
    vals = {m: [] for m in measures}
    for i, j in tiles:
        for m in measures:
            M, ok = stats._tile_measure(i, j, m, 0.0, 0)
            if i == j:
                ok &= np.triu(np.ones_like(ok), 1).astype(bool)
            vals[m].append(M[ok])
    return {m: (np.concatenate(v) if v else np.zeros(0)) for m, v in vals.items()}, len(tiles)


def plot_pair_weights(store, measures=None, *, max_tiles: int = 16, bins: int = 40, fig=None):
    """Histograms of the pair weights ``w_jk`` under each measure (log scale), one panel per measure.

    Computed from complete tiles only (a sample of ``max_tiles`` of them on a large store), with the
    same definitions as ``CoactivationStats.pairs`` (``threshold = 0``).

    Parameters
    ----------
    store : str, os.PathLike, RunStore or CoactivationStats
    measures : sequence of str, optional
        Default: all of ``("mean", "count", "jaccard", "cosine", "lift")``.
    max_tiles : int
    bins : int
    fig : matplotlib.figure.Figure, optional
        Draw into this (empty) figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidArgumentError
        An unknown measure.
    """
    from .coactivation import MEASURES

    measures = tuple(MEASURES if measures is None else ([measures] if isinstance(measures, str) else measures))
    bad = [m for m in measures if m not in MEASURES]
    if bad or not measures:
        raise InvalidArgumentError(f"measures must be a non-empty subset of {MEASURES}, got {measures!r}")
    if fig is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2 * len(measures), 3.2), layout="constrained")
    title = "pair weights per measure"
    stats, msg = _open_stats(store)
    if stats is None:
        return _message(fig, fig.add_subplot(), title, msg)
    vals, n_tiles = _pair_weight_values(stats, measures, max_tiles)
    if n_tiles == 0:
        done, total = _stats_progress(stats)
        return _message(fig, fig.add_subplot(), title,
                        f"no tile with its atoms' counts complete yet ({len(done)}/{total} tiles done)")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, m in zip(axes, measures):
        v = vals[m][vals[m] > 0]
        ax.set_title(f"{m}: {v.shape[0]:,} pairs", fontsize=9)
        if v.shape[0] == 0:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
            continue
        lo, hi = v.min(), v.max()
        edges = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, bins + 1) if hi > lo else bins
        ax.hist(v, bins=edges, histtype="stepfilled", color="#9467bd", edgecolor="#5b3f7a", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()  # log-axis minor ticks dominate the drawing time of small panels
        ax.set_xlabel(m, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("pairs")
    done, total = _stats_progress(stats)
    fig.suptitle(f"{title} ({n_tiles} tiles{'' if len(done) >= total else f'; {len(done)}/{total} done'})",
                 fontsize=10)
    return fig


# ============================================================================ tile occupancy
def tile_occupancy_data(store, stage: str = "assembly", *, max_side: int = 256) -> dict:
    """Which tiles of a tiled stage exist, which are pending, and their norms.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    stage : {"assembly", "coactivation"}
        ``"assembly"``: the ``n × n`` curvature ``H`` (tile markers carry the Frobenius norm);
        ``"coactivation"``: the ``K × K`` statistics (upper tiles; markers say whether non-zero).
    max_side : int
        Grids larger than this are pooled into ``max_side × max_side`` cells (norms combined as
        ``sqrt(Σ norm²)``; a cell is "written" if any of its tiles is, else pending if any is).

    Returns
    -------
    dict
        ``norm`` (float64 grid, NaN where nothing was written), ``state`` (int8 grid: 0 not part of
        the job, 1 pending, 2 complete and empty, 3 complete and written), ``n_tiles`` (tiles per
        side before pooling), ``pool`` (tiles per cell), ``tile`` (rows per tile), ``done``,
        ``total``, ``written``, ``stage``.

    Raises
    ------
    InvalidArgumentError
        An unsupported stage.
    StoreError
        The store has no job of that stage.
    """
    if stage not in ("assembly", "coactivation"):
        raise InvalidArgumentError(f"stage must be 'assembly' or 'coactivation', got {stage!r}")
    rs = _as_store(store)
    m = rs.manifest(stage) if rs.exists() else None
    if m is None:
        raise StoreError(f"no {stage} job in {rs.path} yet" + (
            ": run assemble_majorizer(..., out=STORE) (CLI: distpen assemble)" if stage == "assembly"
            else ": run `distpen coactivation GATES --out STORE`"))
    spec = m.get("spec") or {}
    if stage == "assembly":
        if spec.get("format") == "factored" or "tile" not in spec:
            raise StoreError(f"the assembly job in {rs.path} is factored: it writes no tiles of H")
        tile, n = int(spec["tile"]), int(spec["n"])
        prefix = "H."
    else:
        tile, n = int(spec["params"]["tile"]), int(spec["k_atoms"])
        prefix = ""
    nt = max(1, -(-n // tile))
    job = rs.job(stage)
    markers = job.markers()
    pool = max(1, -(-nt // max_side))
    side = -(-nt // pool)
    sq = np.zeros((side, side))
    state = np.zeros((side, side), dtype=np.int8)
    done = written = total = 0
    for u in job.units:
        if not u.startswith(prefix) or (prefix == "" and u.count(".") != 1):
            continue
        try:
            I, J = (int(x) for x in u[len(prefix):].split("."))
        except ValueError:
            continue
        total += 1
        ci, cj = I // pool, J // pool
        mk = markers.get(u)
        if mk is None:
            if state[ci, cj] != 3:
                state[ci, cj] = 1
            continue
        done += 1
        info = mk.get("info") or {}
        wrote = bool(info.get("written", info.get("nonzero", True)))
        if wrote:
            written += 1
            sq[ci, cj] += float(info.get("norm", 1.0)) ** 2
            state[ci, cj] = 3
        elif state[ci, cj] == 0:
            state[ci, cj] = 2
    has_norm = stage == "assembly"
    norm = np.where(state == 3, np.sqrt(sq), np.nan) if has_norm else np.where(state == 3, 1.0, np.nan)
    return {"norm": norm, "state": state, "n_tiles": nt, "pool": pool, "tile": tile, "done": done,
            "total": total, "written": written, "stage": stage, "has_norm": has_norm}


def plot_tile_occupancy(store, stage: str = "assembly", *, ax=None, max_side: int = 256):
    """Map of a tiled array: written tiles coloured by Frobenius norm, pending tiles grey, empty tiles pale.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    stage : {"assembly", "coactivation"}
        The curvature ``H`` (default) or the co-activation statistics.
    ax : matplotlib.axes.Axes, optional
    max_side : int
        See :func:`tile_occupancy_data`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    fig, ax = _new_axes(ax, (6.0, 5.2))
    what = "curvature H" if stage == "assembly" else "co-activation statistics"
    title = f"tile occupancy of the {what}"
    try:
        d = tile_occupancy_data(store, stage, max_side=max_side)
    except StoreError as exc:
        return _message(fig, ax, title, str(exc))
    base = np.ma.masked_where(d["state"] == 3, d["state"])
    ax.imshow(base, cmap=ListedColormap(["#ffffff", "#bdbdbd", "#e8f1f8", "#000000"]), vmin=-0.5, vmax=3.5,
              interpolation="nearest")
    nz = np.ma.masked_invalid(d["norm"])
    if nz.count():
        if d["has_norm"] and nz.max() > 0:
            im = ax.imshow(nz, cmap="magma_r", norm=LogNorm(vmin=max(nz.min(), nz.max() * 1e-12), vmax=nz.max()),
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, label="tile Frobenius norm")
        else:
            ax.imshow(nz, cmap=ListedColormap(["#1f77b4"]), interpolation="nearest")
    cell = f"{d['pool']}×{d['pool']} tiles per cell, " if d["pool"] > 1 else ""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"tile column J ({cell}{d['tile']} rows per tile)")
    ax.set_ylabel("tile row I")
    ax.set_title(f"{title}: {d['done']}/{d['total']} tiles complete, {d['written']} non-empty", fontsize=10)
    ax.legend(handles=[Patch(color="#bdbdbd", label="pending"), Patch(facecolor="#e8f1f8", edgecolor="#999",
                                                                     label="complete, all zero (not stored)")],
              loc="upper right", fontsize=7, framealpha=0.8)
    return fig


# ============================================================================ Newton and schedules
def _residuals_from(source) -> tuple[list, str | None, dict]:
    if hasattr(source, "residuals") and hasattr(source, "iterations"):  # a NewtonResult
        return list(source.residuals), None, {"converged": source.converged}
    if isinstance(source, (list, tuple, np.ndarray)):
        return [float(x) for x in source], None, {}
    rs = _as_store(source)
    m = rs.manifest(NEWTON_STAGE) if rs.exists() else None
    if m is None:
        return [], (f"no Newton step recorded in {rs.path} yet: pass the NewtonResult, or save it with "
                    "distpen.newton.save_newton_result(store, result)"), {}
    p = rs.job(NEWTON_STAGE).progress()
    res = p.get("residuals") or []
    if not res:
        return [], f"the Newton step in {rs.path} is {m.get('status')}; no residuals recorded yet", {}
    return [float(x) for x in res], None, {"converged": p.get("converged"), "precond": p.get("precond")}


def plot_newton_residuals(source, *, ax=None, tol: float | None = None):
    """Relative residual ``‖r_i‖/‖rhs‖`` of the Newton step's PCG iterations (log scale).

    Parameters
    ----------
    source : NewtonResult, sequence of float, or a run store
        A store is read from its ``newton`` stage (``distpen.newton.save_newton_result``).
    ax : matplotlib.axes.Axes, optional
    tol : float, optional
        Draw the tolerance as a horizontal line.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax, (6.0, 3.8))
    title = "Newton step: PCG residual history"
    res, msg, meta = _residuals_from(source)
    if msg:
        return _message(fig, ax, title, msg)
    r = np.asarray(res, dtype=np.float64)
    pos = r > 0
    ax.semilogy(np.arange(r.shape[0])[pos], r[pos], marker="o", markersize=3, color="#2ca02c")
    if tol is not None:
        ax.axhline(tol, color="#d62728", linestyle="--", linewidth=1, label=f"tol {tol:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("PCG iteration")
    ax.set_ylabel("‖r‖ / ‖rhs‖")
    conv = meta.get("converged")
    extra = "" if conv is None else (" — converged" if conv else " — not converged")
    pre = f", {meta['precond']} preconditioner" if meta.get("precond") else ""
    ax.set_title(f"PCG residuals{extra} ({r.shape[0] - 1} iterations{pre})", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def penalty_schedule_values(penalty, t, rho, schedule, iterations: int = 30) -> dict:
    """The penalty's value at each iteration of a weight schedule (in memory).

    Parameters
    ----------
    penalty : Penalty
        An in-memory penalty (it is not modified).
    t : array of shape (n,)
    rho : array of shape (penalty.rho_count,)
    schedule : ScalarWeightSchedule
    iterations : int
        Iterations ``0 … iterations-1``.

    Returns
    -------
    dict
        ``iterations`` (list of int), ``weights`` and ``values`` (lists of float).

    Raises
    ------
    InvalidArgumentError
        ``iterations`` < 1.
    ScheduleError
        ``schedule`` is not a ScalarWeightSchedule.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InvalidArgumentError(f"iterations must be a positive integer, got {iterations!r}")
    pen = penalty.with_weight_schedule(schedule)
    its, weights, values = [], [], []
    for it in range(int(iterations)):
        pen.apply_schedule(it)
        its.append(it)
        weights.append(float(schedule.current_weight(it)))
        values.append(float(pen.value(t, rho)))
    return {"iterations": its, "weights": weights, "values": values}


def record_penalty_schedule(store, history: dict, *, label: str = "penalty") -> None:
    """Save a schedule history (:func:`penalty_schedule_values`) into the run store's ``schedule`` stage.

    Parameters
    ----------
    store : str, os.PathLike or RunStore
    history : dict
        ``iterations``, ``values`` and optionally ``weights`` (equal-length lists).
    label : str
        Shown in the plot's legend.

    Raises
    ------
    InvalidArgumentError
        Missing keys or lists of different lengths.
    """
    its, vals = history.get("iterations"), history.get("values")
    if its is None or vals is None or len(its) != len(vals) or (
            history.get("weights") is not None and len(history["weights"]) != len(its)):
        raise InvalidArgumentError(
            "history must hold equal-length 'iterations' and 'values' (and optionally 'weights'); "
            "use penalty_schedule_values(...) to build it"
        )
    rs = _as_store(store)
    data = {"label": str(label), "iterations": [int(i) for i in its], "values": [float(v) for v in vals],
            "weights": None if history.get("weights") is None else [float(w) for w in history["weights"]]}
    job = rs.begin_job(SCHEDULE_STAGE, {"kind": "penalty_schedule", **data}, ["values"], overwrite=True)
    job.mark_done("values")
    job.finish(**data)


def plot_penalty_schedule(source, *, ax=None):
    """Penalty value against schedule iteration (and the schedule's weight on a second axis).

    Parameters
    ----------
    source : dict or run store
        A :func:`penalty_schedule_values` dict, or a store with a ``schedule`` stage
        (:func:`record_penalty_schedule`).
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _new_axes(ax, (6.0, 3.8))
    title = "penalty value against schedule iteration"
    if isinstance(source, dict):
        h, label = source, source.get("label", "penalty")
    else:
        rs = _as_store(source)
        if not rs.exists() or rs.manifest(SCHEDULE_STAGE) is None:
            return _message(fig, ax, title, f"no schedule history in {rs.path} yet: record one with "
                            "distpen.dashboard.record_penalty_schedule(store, penalty_schedule_values(...))")
        h = rs.job(SCHEDULE_STAGE).progress()
        label = h.get("label", "penalty")
    its, vals = h.get("iterations") or [], h.get("values") or []
    if not its:
        return _message(fig, ax, title, "the schedule history is empty")
    ax.plot(its, vals, marker="o", markersize=3, color="#1f77b4", label=f"{label} value")
    ax.set_xlabel("schedule iteration")
    ax.set_ylabel("penalty value", color="#1f77b4")
    if h.get("weights"):
        ax2 = ax.twinx()
        ax2.plot(its, h["weights"], linestyle="--", color="#ff7f0e", label="weight")
        ax2.set_ylabel("schedule weight", color="#ff7f0e")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig
