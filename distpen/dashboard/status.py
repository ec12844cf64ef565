"""Status of a run store: per-stage summaries (JSON), the text table and its HTML form.

Everything here reads a run store (:mod:`distpen.store`) — manifests, unit markers and
``progress.json`` — so it works on a finished store, on one a job is still writing, and on an empty
or absent one. :func:`status_json` is what ``distpen status --json`` prints; :func:`format_status`
the table ``distpen status`` prints.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import os

from ..errors import InvalidArgumentError
from ..store import RunStore

__all__ = ["status_json", "format_status", "format_status_html", "cluster_info"]


#: statuses after which a stage's job no longer changes
FINISHED = ("done", "incomplete", "failed")
#: a running job whose progress has not been updated for this long is flagged as possibly dead
STALE_AFTER_S = 120.0
SCHEDULE_STAGE = "schedule"
NEWTON_STAGE = "newton"


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
        if s["rows_total"]:  # a job of phases (an atom-major copy, then the tiles) names the current one
            work = f"{_fmt_count(s['rows_processed'])}/{_fmt_count(s['rows_total'])} rows"
            if s.get("phase"):
                work = f"{s['phase']}: {work}"
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


def _without_ages(st: dict) -> str:
    """What changed in a status, ignoring the clock (ages, elapsed times, ETAs, cluster memory)."""
    return repr([(n, s["status"], s["units_done"], s["rows_processed"], s.get("phase_done"), len(s["failures"]))
                 for n, s in (st.get("summary") or {}).items()] + [st.get("exists")])
