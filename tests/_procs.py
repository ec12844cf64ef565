"""Real processes for the deployment, fault, TLS and soak tests.

:class:`ProcCluster` starts ``dask scheduler`` and ``dask worker`` — the commands the compose file
and the Kubernetes manifests run — as child processes on loopback (``--port 0`` and a scheduler
file, so no port is guessed), each in its own session, with its output in a log file. ``close()``
(also called by the fixtures on failure) ends exactly those processes: SIGTERM, then SIGKILL.
:func:`run_distpen` runs the ``distpen`` command in a child process with a time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

BIN = os.path.dirname(sys.executable)
DASK = os.path.join(BIN, "dask")
DISTPEN = os.path.join(BIN, "distpen")

#: time limits (s); generous because the test machine is small and shared
START_TIMEOUT = 90
JOB_TIMEOUT = 180
TEST_TIMEOUT = 300


@pytest.fixture(autouse=True)
def time_limit(request):
    """Fail a test that runs over TEST_TIMEOUT s (SIGALRM interrupts any wait in the main thread),
    dumping every thread's stack first, so a hang never stalls the suite. Import it into a test
    module to apply it there."""
    import faulthandler

    def on_alarm(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} ran over {TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    faulthandler.dump_traceback_later(TEST_TIMEOUT - 5, exit=False)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def _env(extra=None):
    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))   # workers can unpickle test helpers by reference
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def _die_with_parent():
    """In the child, before exec: SIGTERM when the test process dies, even if it is killed
    (Linux PR_SET_PDEATHSIG), so no scheduler or worker outlives an aborted test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        pass


def _stop(proc, grace=5.0):
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)   # the group of this child only (own session)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(grace)


class ProcCluster:
    """A scheduler and workers as separate processes on 127.0.0.1.

    Parameters
    ----------
    workdir : pathlib.Path
        Logs, the scheduler file and the workers' local directories go here.
    tls : dict, optional
        ``{"ca_file", "cert", "key"}``: start everything with ``--protocol tls`` and these files.
    worker_env : dict, optional
        Extra environment of the worker processes.
    """

    def __init__(self, workdir, *, tls=None, worker_env=None, memory_limit="1GiB"):
        self.workdir = workdir
        self.tls = tls
        self.worker_env = worker_env or {}
        self.memory_limit = memory_limit
        self.scheduler = None
        self.workers = {}          # name -> Popen
        self.address = None
        self._n = 0

    def _tls_args(self):
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls["ca_file"], "--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]]

    def _popen(self, args, name, env=None):
        log = open(self.workdir / f"{name}.log", "ab")
        try:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(env),
                                    start_new_session=True, preexec_fn=_die_with_parent, cwd=self.workdir)
        finally:
            log.close()

    def start(self, n_workers=2):
        sfile = self.workdir / "scheduler.json"
        args = [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(sfile),
                "--dashboard-address", "127.0.0.1:0"]
        if self.tls:
            args += ["--protocol", "tls", *self._tls_args()]
        self.scheduler = self._popen(args, "scheduler")
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {self.log('scheduler')[-2000:]}")
            if sfile.exists():
                try:
                    self.address = json.loads(sfile.read_text())["address"]
                    break
                except (ValueError, KeyError):
                    pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"dask scheduler did not start: {self.log('scheduler')[-2000:]}")
        for _ in range(n_workers):
            self.add_worker()
        self.wait_for_workers(n_workers)
        return self

    def add_worker(self, name=None):
        self._n += 1
        name = name or f"w{self._n}"
        args = [DASK, "worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
                "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                "--memory-limit", self.memory_limit,
                "--local-directory", str(self.workdir / f"local-{name}"), "--death-timeout", "60",
                *self._tls_args()]
        self.workers[name] = self._popen(args, name, self.worker_env)
        return name

    def client(self, **kwargs):
        from distributed import Client

        sec = None
        if self.tls:
            from distpen.security import security_from_files

            sec = security_from_files(self.tls["ca_file"], self.tls["cert"], self.tls["key"])
        return Client(self.address, security=sec, set_as_default=False, timeout=START_TIMEOUT, **kwargs)

    def wait_for_workers(self, n, timeout=START_TIMEOUT):
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, name, sig=signal.SIGKILL):
        proc = self.workers.pop(name)
        os.kill(proc.pid, sig)
        proc.wait(30)

    def log(self, name) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self):
        for proc in list(self.workers.values()):
            _stop(proc)
        self.workers.clear()
        if self.scheduler is not None:
            _stop(self.scheduler)
            self.scheduler = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def distpen_args(*args):
    return [DISTPEN, *map(str, args)]


def run_distpen(*args, timeout=JOB_TIMEOUT, env=None, check=True):
    """Run ``distpen ARGS`` to completion in a child process; returns the CompletedProcess."""
    proc = subprocess.Popen(distpen_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(env), start_new_session=True, preexec_fn=_die_with_parent, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, grace=2)
        out, err = proc.communicate()
        raise AssertionError(f"distpen {' '.join(map(str, args))} took over {timeout} s\n{err[-3000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and res.returncode != 0:
        raise AssertionError(f"distpen {' '.join(map(str, args))} exited {res.returncode}:\n{err[-3000:]}")
    return res


def start_distpen(*args, env=None):
    """Start ``distpen ARGS`` in the background (own session); stop it with :func:`stop`."""
    return subprocess.Popen(distpen_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(env), start_new_session=True, preexec_fn=_die_with_parent, text=True)


def stop(proc):
    _stop(proc, grace=2)


def wait_until(pred, timeout, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def markers(store) -> set:
    """Unit ids with a completion marker in a coactivation run store."""
    d = os.path.join(str(store), "_distpen", "coactivation", "units")
    try:
        return {n[:-5] for n in os.listdir(d) if n.endswith(".json") and not n.startswith(".tmp-")}
    except FileNotFoundError:
        return set()


def reference_stats(gates):
    """numpy reference: pair_sum, pair_count, fire_count, gate_sum, gate_sq_sum of dense gates
    (a numpy array or a scipy.sparse matrix)."""
    import numpy as np
    import scipy.sparse as sp

    g = sp.csr_matrix(gates, dtype=np.float64)
    b = g.copy()
    b.data = (b.data > 0).astype(np.float64)
    return {"pair_sum": (g.T @ g).toarray(), "pair_count": np.rint((b.T @ b).toarray()).astype(np.int64),
            "fire_count": np.asarray(b.sum(0)).ravel().astype(np.int64), "gate_sum": np.asarray(g.sum(0)).ravel(),
            "gate_sq_sum": np.asarray(g.multiply(g).sum(0)).ravel()}


def topk_to_sparse(indices, values, k_atoms):
    """Top-k gates as a scipy.sparse CSR matrix of shape (n_tokens, k_atoms)."""
    import numpy as np
    import scipy.sparse as sp

    n = indices.shape[0]
    rows = np.repeat(np.arange(n), indices.shape[1])
    idx, val = indices.ravel(), values.ravel().astype(np.float64)
    ok = (idx >= 0) & (val != 0)
    return sp.csr_matrix((val[ok], (rows[ok], idx[ok])), shape=(n, k_atoms))


def write_topk_gates(path, n_tokens, k_atoms, k, *, seed=0, row_chunk=2000, poison_row=None):
    """Write top-k gates as a ``distpen.gates`` Zarr group (the layout ``distpen synth`` writes) and
    return ``(indices, values)``. Indices in a row are distinct (strictly increasing offsets mod K);
    ``poison_row`` gets a NaN value in its first slot."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(seed)
    steps = rng.integers(1, max(2, k_atoms // k), size=(n_tokens, k))
    idx = ((rng.integers(k_atoms, size=(n_tokens, 1)) + np.cumsum(steps, axis=1)) % k_atoms).astype(np.int32)
    val = (rng.random((n_tokens, k)) + 0.01).astype(np.float32)
    idx[:, -1] = np.where(rng.random(n_tokens) < 0.2, -1, idx[:, -1])      # some empty slots
    val[idx < 0] = 0
    if poison_row is not None:
        val[poison_row, 0] = np.nan
    g = zarr.open_group(str(path), mode="w")
    g.create_array("indices", shape=idx.shape, chunks=(row_chunk, k), dtype="int32", fill_value=-1)[:] = idx
    g.create_array("values", shape=val.shape, chunks=(row_chunk, k), dtype="float32", fill_value=0)[:] = val
    g.attrs.update({"format": "distpen.gates", "format_version": 1, "form": "topk", "k_atoms": k_atoms,
                    "n_tokens": n_tokens, "topk": k, "index_range": [-1, k_atoms - 1], "complete": True})
    return idx, val


def assert_matches(store, ref, *, exact=None):
    """The statistics in ``store`` equal the numpy reference ``ref`` (and, bit for bit, the
    statistics store ``exact`` if given)."""
    import numpy as np

    import distpen as dp

    st = dp.open_stats(store)
    K = st.k_atoms
    ps = st.block(0, K, 0, K, "pair_sum")
    pc = st.block(0, K, 0, K, "pair_count")
    np.testing.assert_allclose(ps, ref["pair_sum"], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(pc, ref["pair_count"])
    np.testing.assert_array_equal(st.fire_count, ref["fire_count"])
    np.testing.assert_allclose(st.gate_sum, ref["gate_sum"], rtol=1e-9)
    np.testing.assert_allclose(st.gate_sq_sum, ref["gate_sq_sum"], rtol=1e-9)
    if exact is not None:
        other = dp.open_stats(exact)
        np.testing.assert_array_equal(ps, other.block(0, K, 0, K, "pair_sum"))
        np.testing.assert_array_equal(pc, other.block(0, K, 0, K, "pair_count"))
        for name in ("fire_count", "gate_sum", "gate_sq_sum"):
            np.testing.assert_array_equal(getattr(st, name), getattr(other, name))
    return st
