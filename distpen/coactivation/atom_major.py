"""The atom-major decomposition of a co-activation job: a copy of the gates by atom block, and square tasks.

The row-major plan (:func:`.plan._group_tiles`) gives each task a run of tiles and has it read every
row chunk: with ``G`` groups the corpus is read ``G`` times. This decomposition reads it once:

1. **The copy** (:func:`write_copy`, one task per row chunk). Each chunk's validated sparse rows
   (threshold applied) are sorted by atom block, stably, and written to one file of the job's
   scratch directory: four ``.npy`` arrays written one after the other with :func:`numpy.save`,

   ``offsets`` (``n_blocks + 1``, int64)
       block ``b``'s entries are ``[offsets[b], offsets[b+1])``;
   ``rows`` (int32)
       each entry's row, local to the chunk (within a block, entries are in row order and, in a
       row, in atom order);
   ``cols`` (int32, or int64 past 2³¹ atoms)
       global atom ids;
   ``vals`` (float32 for float32 gates, else float64)
       the gates.

   The file is written under a temporary name and renamed, so a file that exists is complete: a
   re-run copies only the chunks that have none.
2. **Square tasks** (:func:`square_groups`). Block rows are cut into ranges of ``side`` blocks;
   the task of ranges ``(P, Q)``, ``P ≤ Q``, owns the tiles ``(I, J)`` with ``I`` in ``P``, ``J`` in
   ``Q`` (``I ≤ J``), and reads only the entries of the blocks in ``P ∪ Q`` from each chunk's copy:
   two contiguous byte ranges (:func:`read_chunk`). It rebuilds the chunk's sparse rows restricted to
   those atoms (a counting sort on the row: rows come out sorted by atom) and hands them to the
   same scatter kernel as the row-major plan. Each tile receives the same products in the same
   (token) order, so the sums are bit-identical to a streaming row-major job's.

A task's accumulators are ``side²`` tiles, chosen from the worker's memory as the row-major groups
are (:func:`default_side`). Every task reads ``2·side / n_blocks`` of the entries of every chunk
(``side / n_blocks`` on the diagonal), so the corpus is read about ``n_blocks / side`` times in all,
against once per group.
"""

from __future__ import annotations

import math
import os
import uuid

import numpy as np
from numba import njit

from .plan import _partial_budget, _partial_bytes

__all__ = ["square_groups", "default_side", "block_ranges", "copy_dir", "copy_path", "by_block", "write_copy",
           "read_chunk"]

_OPTS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


# ============================================================================ decomposition
def default_side(memory_limit: int, tile: int, n_blocks: int) -> int:
    """Blocks per side of a square task: the most whose ``side²`` tiles fit one partial's budget
    (as a streaming row-major group's do), at most ``n_blocks``."""
    max_tiles = max(1, int(_partial_budget(memory_limit, 1) // _partial_bytes(tile)))
    return max(1, min(int(n_blocks), math.isqrt(max_tiles)))


def block_ranges(n_blocks: int, side: int) -> list[tuple[int, int]]:
    """The block ranges ``[b0, b1)`` of ``side`` blocks each (the last may be shorter)."""
    side = max(1, int(side))
    return [(b, min(n_blocks, b + side)) for b in range(0, n_blocks, side)]


def square_groups(pending, n_blocks: int, side: int) -> list[tuple[list, list]]:
    """The square tasks that cover ``pending`` tiles, largest first.

    Returns ``(tiles, ranges)`` per task: its pending tiles (row-major order) and the block ranges
    it reads (one range on the diagonal, two off it).
    """
    ranges = block_ranges(n_blocks, side)
    where = {}
    for p, (b0, b1) in enumerate(ranges):
        for b in range(b0, b1):
            where[b] = p
    by_square: dict = {}
    for i, j in pending:
        by_square.setdefault((where[i], where[j]), []).append((i, j))
    out = []
    for (p, q), tiles in by_square.items():
        rs = [ranges[p]] if p == q else [ranges[p], ranges[q]]
        if p != q and ranges[p][1] == ranges[q][0]:
            rs = [(ranges[p][0], ranges[q][1])]  # adjacent: one contiguous read
        out.append((sorted(tiles), rs))
    out.sort(key=lambda t: (-len(t[0]), t[0][0]))
    return out


# ============================================================================ the copy
def copy_dir(scratch: str, fingerprint: str) -> str:
    """Where a job's copy lives (inside its scratch directory, named by the job)."""
    return os.path.join(scratch, f"atom-major-{fingerprint[:16]}")


def copy_path(directory: str, r0: int, r1: int) -> str:
    """The copy file of row chunk ``[r0, r1)``."""
    return os.path.join(directory, f"rows-{r0}-{r1}.npy")


@njit(**_OPTS)
def _by_block(indptr, cols, vals, T, offsets, fill, out_rows, out_cols, out_vals):
    nb = offsets.shape[0] - 1
    n = indptr.shape[0] - 1
    offsets[:] = 0
    for p in range(indptr[0], indptr[n]):
        offsets[cols[p] // T + 1] += 1
    for b in range(nb):
        offsets[b + 1] += offsets[b]
        fill[b] = offsets[b]
    for r in range(n):
        for p in range(indptr[r], indptr[r + 1]):
            b = cols[p] // T
            e = fill[b]
            out_rows[e] = r
            out_cols[e] = cols[p]
            out_vals[e] = vals[p]
            fill[b] = e + 1


def by_block(csr, tile: int, n_blocks: int, workspace=None):
    """Sparse rows (global, sorted atom ids) sorted by atom block, stably: ``(offsets, rows, cols, vals)``."""
    indptr, cols, vals = csr
    nnz = int(indptr[-1] - indptr[0])
    get = workspace.get if workspace is not None else (lambda name, size, dt: np.empty(size, dtype=dt))
    offsets = np.empty(n_blocks + 1, dtype=np.int64)
    out_rows = get("am_rows", nnz, np.int32)
    out_cols = get(f"am_cols_{cols.dtype.name}", nnz, cols.dtype)
    out_vals = get(f"am_vals_{vals.dtype.name}", nnz, vals.dtype)
    _by_block(indptr, cols, vals, int(tile), offsets, get("am_fill", n_blocks, np.int64), out_rows, out_cols, out_vals)
    return offsets, out_rows, out_cols, out_vals


def write_copy(path: str, csr, tile: int, n_blocks: int, workspace=None) -> int:
    """Write one row chunk's copy (see the module docstring) to ``path`` atomically; returns its entries."""
    offsets, rows, cols, vals = by_block(csr, tile, n_blocks, workspace)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            for arr in (offsets, rows, cols, vals):
                np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return int(offsets[-1])


def _layout(f) -> list[tuple[int, np.dtype, int]]:
    """``(byte offset, dtype, length)`` of the four arrays of an open copy file."""
    out = []
    for _ in range(4):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        start, n = f.tell(), int(shape[0])
        out.append((start, dtype, n))
        f.seek(start + n * dtype.itemsize)
    return out


def _read_into(f, start: int, buf: np.ndarray) -> None:
    f.seek(start)
    view = memoryview(buf).cast("B")
    got = f.readinto(view)
    if got != view.nbytes:
        raise OSError(f"{f.name}: expected {view.nbytes} bytes at offset {start}, got {got} (a truncated copy file)")


@njit(**_OPTS)
def _rows_csr(n_rows, rows, cols, vals, indptr, out_cols, out_vals, fill):
    indptr[:] = 0
    for e in range(rows.shape[0]):
        indptr[rows[e] + 1] += 1
    for r in range(n_rows):
        indptr[r + 1] += indptr[r]
        fill[r] = indptr[r]
    for e in range(rows.shape[0]):  # entries are in block order, so each row comes out sorted by atom
        r = rows[e]
        q = fill[r]
        out_cols[q] = cols[e]
        out_vals[q] = vals[e]
        fill[r] = q + 1


def read_chunk(path: str, n_rows: int, ranges, workspace):
    """The sparse rows of a chunk's copy restricted to the atoms of blocks ``ranges`` (a list of
    ``[b0, b1)``, ascending), as ``(indptr, cols, vals)`` in ``workspace``'s buffers (valid until
    its next use). Only those blocks' entries are read from the file."""
    with open(path, "rb") as f:
        (o_off, o_dt, o_n), (r_off, r_dt, _), (c_off, c_dt, _), (v_off, v_dt, _) = _layout(f)
        offsets = np.empty(o_n, dtype=o_dt)
        _read_into(f, o_off, offsets)
        spans = [(int(offsets[b0]), int(offsets[b1])) for b0, b1 in ranges]
        total = sum(e1 - e0 for e0, e1 in spans)
        rows = workspace.get("am_in_rows", total, r_dt)
        cols = workspace.get(f"am_in_cols_{c_dt.name}", total, c_dt)
        vals = workspace.get(f"am_in_vals_{v_dt.name}", total, v_dt)
        at = 0
        for e0, e1 in spans:
            m = e1 - e0
            if m:
                _read_into(f, r_off + e0 * r_dt.itemsize, rows[at:at + m])
                _read_into(f, c_off + e0 * c_dt.itemsize, cols[at:at + m])
                _read_into(f, v_off + e0 * v_dt.itemsize, vals[at:at + m])
            at += m
    indptr = workspace.get("csr_indptr", n_rows + 1, np.int64)
    out_cols = workspace.get(f"csr_cols_{c_dt.name}", total, c_dt)
    out_vals = workspace.get(f"csr_vals_{v_dt.name}", total, v_dt)
    fill = workspace.get("am_fill_rows", n_rows, np.int64)
    _rows_csr(int(n_rows), rows, cols, vals, indptr, out_cols, out_vals, fill)
    return indptr, out_cols, out_vals
