"""``JobMonitor``: a run store's jobs as a live view.

``str()`` is the text table; in Jupyter it displays a widget that refreshes while a job runs and
stops when it finishes; given a scheduler, it adds the cluster's workers, memory and dashboard link.
``watch()`` follows a job from a terminal.
"""

from __future__ import annotations

import html as _html
import math
import threading
import time

from ..errors import InvalidArgumentError
from .status import _as_store, _without_ages, cluster_info, format_status, format_status_html, status_json

__all__ = ["JobMonitor"]


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


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None
