"""Shared helpers of the benchmarks: best-of-N timing, machine peaks, tables.

Every benchmark reports the *best* of ``repeat`` timed runs after ``warmup`` untimed ones (the
first call of a numba kernel compiles or loads it from the cache; warming up keeps that out of
the numbers). Best-of-N is the least noisy statistic on a shared machine: noise only adds time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["Timing", "time_best", "gemm_peak", "memcpy_bandwidth", "disk_write_bandwidth", "print_table", "fmt_ms",
           "machine_line"]


@dataclass
class Timing:
    """Seconds of the best and median of the timed runs."""

    best: float
    median: float
    runs: int

    @property
    def ms(self) -> float:
        return self.best * 1e3


def time_best(fn, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> Timing:
    """Call ``fn()`` ``warmup`` times, then at least ``repeat`` times (and until ``min_time`` seconds
    have passed); return the best and median wall time of the timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(min(times), float(np.median(times)), len(times))


def gemm_peak(n: int = 3000, repeat: int = 3) -> float:
    """Float64 GEMM rate in GFLOP/s: ``A @ B`` of ``n × n`` matrices (``2n³`` flops), best of ``repeat``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    c = np.empty((n, n))
    t = time_best(lambda: np.matmul(a, b, out=c), repeat=repeat, warmup=1)
    return 2.0 * n**3 / t.best / 1e9


def memcpy_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Copy bandwidth in GB/s of *bytes read* (the bytes copied per second; as many are written),
    by ``np.copyto`` between two preallocated, pre-touched float64 arrays of ``nbytes`` each."""
    n = nbytes // 8
    src = np.empty(n)
    dst = np.empty(n)
    src.fill(1.0)
    dst.fill(0.0)
    t = time_best(lambda: np.copyto(dst, src), repeat=repeat, warmup=1)
    return n * 8 / t.best / 1e9


def disk_write_bandwidth(directory: str, nbytes: int = 1 << 30, block: int = 64 << 20, repeat: int = 2) -> float:
    """Sequential write bandwidth in GB/s of the file system holding ``directory``: ``nbytes`` of
    incompressible bytes written in ``block``-byte writes to a new file, then ``fsync``ed (the
    time includes the fsync), best of ``repeat``. The file is deleted afterwards."""
    buf = np.random.default_rng(0).integers(0, 256, size=block, dtype=np.uint8).tobytes()
    n_blocks = max(1, nbytes // block)
    path = os.path.join(directory, f".disk_write_bandwidth.{os.getpid()}")
    best = float("inf")
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            with open(path, "wb", buffering=0) as f:
                for _ in range(n_blocks):
                    f.write(buf)
                os.fsync(f.fileno())
            best = min(best, time.perf_counter() - t0)
            os.unlink(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return n_blocks * block / best / 1e9


_FILE_WRITER = """
import os, sys, numpy as np
d, n, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
for i in range(n):
    with open(os.path.join(d, f"{seed}.{i}"), "wb", buffering=0) as f:
        f.write(buf.data)
        os.fsync(f.fileno())
"""


def file_write_bandwidth(directory: str, file_bytes: int, n_files: int, n_procs: int = 2) -> float:
    """GB/s of ``n_procs`` processes writing ``n_files`` new files of ``file_bytes`` each (split
    between them, each file ``fsync``ed), as a tile store does: the file system's rate for
    chunk-per-file layouts, without Zarr. The files are deleted afterwards."""
    import subprocess

    d = tempfile.mkdtemp(prefix="filebw-", dir=directory)
    try:
        per = max(1, n_files // n_procs)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _FILE_WRITER, d, str(per), str(file_bytes), str(i)])
                 for i in range(n_procs)]
        for pr in procs:
            if pr.wait() != 0:
                raise RuntimeError("file writer failed")
        sec = time.perf_counter() - t0
        return per * n_procs * file_bytes / sec / 1e9
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1e3:.1f} µs"


def print_table(headers, rows, title: str | None = None) -> None:
    """Print ``rows`` (lists of cells, converted with ``str``) as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(cells[0], widths))
    print(line)
    print("-" * len(line))
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def machine_line() -> str:
    """One line naming the machine and the thread settings the numbers were measured with."""
    try:
        import numba

        nthreads = numba.get_num_threads()
    except Exception:  # pragma: no cover - numba is a dependency
        nthreads = "?"
    try:
        load = ", load average %.2f" % os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = ""
    return f"{os.cpu_count()} CPUs, numba threads {nthreads}, numpy {np.__version__}{load}"


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    scale = max(float(np.abs(b).max()), 1e-300)
    return float(np.abs(a - b).max()) / scale


def check(name: str, got, ref, rtol: float) -> float:
    """Assert agreement with the reference before anything is timed; return the error."""
    err = rel_err(got, ref)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g} against the reference"
    return err
