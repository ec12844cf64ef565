"""Window co-occurrence: the gates of windows of ``W`` consecutive tokens within a sequence.

"The Geometry of Concepts" (Li, Michaud et al., arXiv 2410.19750) counts co-occurrence within
256-token windows rather than per token. :class:`WindowedGates` turns any gate source into one
whose rows are windows, so the statistics job, its plan, its resume and its memory bound are the
per-token ones, only over windows:

* Sequences have ``seq_len`` tokens (a delphi cache knows its context length; otherwise the caller
  says); token ``t`` is position ``t mod seq_len`` of sequence ``t div seq_len``. The last sequence
  may be shorter (``n_tokens`` need not be a multiple of ``seq_len``).
* A sequence is cut into ``ceil(seq_len / W)`` windows ``[s·L + i·W, s·L + min((i+1)·W, L))``; a
  window never crosses a sequence boundary, and a ragged last window (of a sequence, or of the
  short last sequence) counts as a window.
* The window gate of latent ``a`` is the maximum of its gates over the window's tokens, after the
  firing threshold has been applied *per token* (a relative threshold compares a gate with its own
  token's largest gate). So ``a`` fires in a window when it fires on any of its tokens, and every
  statistic (``pair_count``, ``pair_sum``, ``fire_count``, ``gate_sum``, ``gate_sq_sum``,
  ``n_tokens`` = the number of windows) and every measure is per window.

The window rows are dense-form gates, read lazily (``WindowedGates[w0:w1, c0:c1]``): each read
validates the token rows of its windows with the job's own kernels (a NaN, infinite or negative
gate, or a repeated top-k index, is named by its token row), takes the maximum per window, and
hands the job a ``windows × atoms`` block, which then takes the per-tile routes of dense gates
(scatter for sparse tiles, BLAS for dense ones: windows of many tokens are much denser than tokens).
A row chunk of the job is a whole number of sequences of windows, so a task reads whole sequences
of its source.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._chunkio import read_rows
from .._validation import check_positive_int
from ..errors import InvalidArgumentError
from ..sources.gates import DenseGates, TopKGates, as_gates
from . import _kernels as ker

__all__ = ["WindowedGates", "window_count"]


def window_count(n_tokens: int, seq_len: int, window: int) -> int:
    """Number of windows of ``window`` tokens in ``n_tokens`` tokens cut into sequences of
    ``seq_len`` (the last sequence and each sequence's last window may be short)."""
    per_seq = -(-seq_len // window)
    full, rest = divmod(n_tokens, seq_len)
    return full * per_seq + -(-rest // window)


@njit(cache=True, nogil=True)
def _csr_window_max(indptr, cols, vals, t_first, seq_len, window, per_seq, w0, n_w, c0, c1, out):
    """``out[w - w0, a - c0] = max`` over the entries of token rows in window ``w``; row ``r`` of
    the CSR is token ``t_first + r``. Rows outside windows ``[w0, w0 + n_w)`` are skipped."""
    for r in range(indptr.shape[0] - 1):
        t = t_first + r
        w = (t // seq_len) * per_seq + (t % seq_len) // window - w0
        if w < 0 or w >= n_w:
            continue
        for p in range(indptr[r], indptr[r + 1]):
            a = np.int64(cols[p])
            if a >= c0 and a < c1:
                v = vals[p]
                if v > out[w, a - c0]:
                    out[w, a - c0] = v


class WindowedGates(DenseGates):
    """Gates of windows of ``window`` consecutive tokens within sequences of ``seq_len`` tokens.

    Row ``w`` is a window; its gate for latent ``a`` is ``a``'s largest gate over the window's
    tokens after the firing threshold (see the module docstring). It is a dense gate source whose
    array is itself: ``windowed[w0:w1, c0:c1]`` reads and reduces the tokens of those windows.

    Parameters
    ----------
    gates : gate source, path or array
        Anything :func:`~distpen.sources.as_gates` takes: dense, top-k or CSR gates, a delphi
        latent cache, :class:`~distpen.sources.EncodedGates`. Dask arrays are refused (store them in
        Zarr or compute them first).
    window : int
        Tokens per window, ``1 ≤ window ≤ seq_len``.
    seq_len : int, optional
        Tokens per sequence. Default: the source's own (a delphi cache's ``cache_ctx_len``, a
        SAELens activation cache's ``context_size``); required otherwise. A value that differs from
        the source's own is refused.
    threshold : tuple, optional
        The per-token firing threshold in the kernels' form (:func:`~._kernels.threshold_args`).

    Attributes
    ----------
    n_tokens : int
        The number of windows (the rows of this source); ``n_source_tokens`` the source's tokens.
    row_align : int
        Windows per sequence: a row chunk is a whole number of sequences.

    Raises
    ------
    InvalidArgumentError
        A window that is not a positive integer or exceeds ``seq_len``, a missing or conflicting
        ``seq_len``, a source whose rows cannot be cut into whole sequences, dask input.

    Examples
    --------
    >>> g = WindowedGates(np.eye(6, dtype=np.float32), window=2, seq_len=3)
    >>> g.n_tokens, g.row_align        # windows [0,2) [2,3) [3,5) [5,6)
    (4, 2)
    >>> np.asarray(g[0:4, 0:3])
    array([[1., 1., 0.],
           [0., 0., 1.],
           [0., 0., 0.],
           [0., 0., 0.]], dtype=float32)
    """

    kind = "windows"

    def __init__(self, gates, window, seq_len=None, threshold=None):
        g = as_gates(gates)
        if isinstance(g, WindowedGates):
            raise InvalidArgumentError("these gates are already windowed; pass the token-level gates")
        if "dask" in str(getattr(g, "kind", "")):
            raise InvalidArgumentError(
                "window co-occurrence reads token rows on the workers and does not take dask arrays; "
                "store the gates in Zarr (or compute them to numpy) first"
            )
        window = check_positive_int(window, "window")
        own = _source_seq_len(g)
        if seq_len is None:
            if own is None:
                raise InvalidArgumentError(
                    f"window = {window} needs the sequence length: pass seq_len= (tokens per sequence) "
                    f"for {type(g).__name__} gates, which do not know where their sequences end"
                )
            seq_len = own
        seq_len = check_positive_int(seq_len, "seq_len")
        if own is not None and seq_len != own:
            raise InvalidArgumentError(
                f"seq_len = {seq_len} but these gates have sequences of {own} tokens ({type(g).__name__}); "
                "leave seq_len out or pass the source's own"
            )
        if window > seq_len:
            raise InvalidArgumentError(
                f"window = {window} is longer than a sequence (seq_len = {seq_len}); a window never "
                "crosses a sequence boundary, so window must be ≤ seq_len"
            )
        align = int(getattr(g, "row_align", 1) or 1)
        if seq_len % align:
            raise InvalidArgumentError(
                f"seq_len = {seq_len} is not a whole number of the source's {align}-token row units"
            )
        self.inner = g
        self.window, self.seq_len = window, seq_len
        self.per_seq = -(-seq_len // window)
        self.threshold = ker.NO_THRESHOLD if threshold is None else threshold
        self.n_source_tokens = int(g.n_tokens)
        self.n_tokens = window_count(self.n_source_tokens, seq_len, window)
        self.k_atoms = int(g.k_atoms)
        self.dtype = np.dtype(g.dtype)
        self.row_align = self.per_seq
        self.array = self
        w = g.row_width() if g.form != "dense" else g.k_atoms
        entry = 12 if g.form != "dense" else 2 * self.dtype.itemsize
        #: bytes a task holds per window while reading: its tokens' validated rows
        self.bytes_per_row = window * w * entry
        #: windows the plan samples to measure density (about 2¹⁶ tokens)
        self.sample_rows = max(1, (1 << 16) // window)

    # ---------------------------------------------------------------- the gate-source protocol
    shape = property(lambda self: (self.n_tokens, self.k_atoms))
    ndim = 2

    def __repr__(self) -> str:
        return (f"WindowedGates({self.inner!r}, window={self.window}, seq_len={self.seq_len}, "
                f"n_windows={self.n_tokens})")

    def input_spec(self) -> dict:
        return {"form": "windows", "k_atoms": self.k_atoms, "window": self.window, "seq_len": self.seq_len,
                "gates": self.inner.input_spec()}

    def __dask_tokenize__(self):
        import json

        from dask.base import tokenize

        return ("distpen.WindowedGates", json.dumps(self.input_spec(), sort_keys=True, default=str),
                tokenize(self.threshold))

    def row_chunk_hint(self) -> int | None:
        """Windows per stored chunk of the source, when its chunks are whole sequences."""
        hint = self.inner.row_chunk_hint()
        if hint and hint % self.seq_len == 0:
            return hint // self.seq_len * self.per_seq
        return None

    def row_width(self) -> int:
        return self.k_atoms

    def job_source(self, scratch, passes=1, row_chunk=None):
        """The source's own one-off calls (index a delphi cache, spill encoded chunks), on row chunks
        of the job's windows' tokens."""
        if not hasattr(self.inner, "job_source"):
            return self, []
        tokens = None if row_chunk is None else max(1, row_chunk // self.per_seq) * self.seq_len
        inner, calls = self.inner.job_source(scratch, passes, tokens)
        out = WindowedGates.__new__(WindowedGates)
        out.__dict__.update(self.__dict__)
        out.inner, out.array = inner, out
        return out, [(_inner_call, fn, *args) for fn, *args in calls]

    # ---------------------------------------------------------------- reading windows
    def token_span(self, w0: int, w1: int) -> tuple[int, int]:
        """Token rows ``[t0, t1)`` that windows ``[w0, w1)`` cover."""
        if w1 <= w0:
            return 0, 0
        L, W, P = self.seq_len, self.window, self.per_seq
        t0 = (w0 // P) * L + (w0 % P) * W
        s, i = divmod(w1 - 1, P)
        t1 = min(self.n_source_tokens, s * L + min((i + 1) * W, L))
        return t0, t1

    def __getitem__(self, sel):
        rows, cols = (sel if isinstance(sel, tuple) else (sel, slice(None)))
        w0, w1, step = rows.indices(self.n_tokens)
        c0, c1, cstep = cols.indices(self.k_atoms)
        if step != 1 or cstep != 1:
            raise InvalidArgumentError("windowed gates are read by contiguous row and column ranges")
        return self.read(w0, max(w0, w1), c0, max(c0, c1))

    def __array__(self, dtype=None, copy=None):
        x = self.read(0, self.n_tokens, 0, self.k_atoms)
        return x if dtype is None else x.astype(dtype)

    def read(self, w0: int, w1: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Window gates of windows ``[w0, w1)`` and atoms ``[c0, c1)`` (float, C-contiguous)."""
        c1 = self.k_atoms if c1 is None else c1
        out = np.zeros((w1 - w0, c1 - c0), dtype=self.dtype)
        t0, t1 = self.token_span(w0, w1)
        if t1 <= t0 or c1 <= c0:
            return out
        align = int(getattr(self.inner, "row_align", 1) or 1)
        a0 = (t0 // align) * align  # the source is read by whole row units (delphi: sequences)
        a1 = min(self.n_source_tokens, -(-t1 // align) * align)
        g, K, thr = self.inner, self.k_atoms, self.threshold
        rows = (a0, a1)
        if g.form == "dense":
            full = thr[0] == ker.THR_RELATIVE  # a relative threshold needs every atom of a row
            x = read_rows(g.array, t0, t1, None if full else c0, None if full else c1)
            if not (x.flags.owndata and x.flags.writeable):
                x = x.copy()  # the kernels zero gates in place: never in the caller's array
            ker.dense_threshold(x, 0 if full else c0, thr, row0=t0, rows=(t0, t1))
            if full:
                x = x[:, c0:c1]
            starts = self._window_starts(w0, w1) - t0
            np.maximum.reduceat(x, starts, axis=0, out=out)
            return out
        if isinstance(g, TopKGates):
            idx = read_rows(g.indices, a0, a1)
            val = read_rows(g.values, a0, a1)
            ip, cols, vals = ker.topk_block_csr(idx, val, 0, K, K, row0=a0, rows=rows, threshold=thr)
        else:
            ip, ind, val = g.csr_rows(a0, a1)
            ip, cols, vals = ker.sparse_block_csr(ip, ind, val, 0, K, K, row0=a0, rows=rows, threshold=thr)
        _csr_window_max(ip, cols, vals, a0, self.seq_len, self.window, self.per_seq, w0, w1 - w0, c0, c1, out)
        return out

    def _window_starts(self, w0: int, w1: int) -> np.ndarray:
        w = np.arange(w0, w1, dtype=np.int64)
        return (w // self.per_seq) * self.seq_len + (w % self.per_seq) * self.window


def _inner_call(windowed: WindowedGates, fn, *args):
    return fn(windowed.inner, *args)


def _source_seq_len(g) -> int | None:
    """The sequence length a gate source knows (a delphi cache's context length, the SAELens
    activation cache behind an :class:`EncodedGates`), or None."""
    if getattr(g, "kind", None) == "delphi":
        return int(g.row_align)
    acts = getattr(g, "activations", None)
    n = getattr(acts, "seq_len", None)
    return int(n) if n else None
