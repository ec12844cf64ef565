"""SAE encoders: ``SAE`` (ReLU / TopK / JumpReLU) and ``load_sae`` for SAELens and sparsify checkpoints.

The forward pass is ``pre = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc`` in float32 BLAS, in
bounded row × latent blocks (at most ``block_rows × block_latents`` pre-activations live at once, so
a 16 384-wide SAE never needs a ``rows × d_sae`` buffer), then

- ``"relu"``    ``max(pre, 0)`` (SAELens ``standard``);
- ``"topk"``    the ``k`` largest of ``max(pre, 0)`` (SAELens ``topk``: ``relu(topk(pre))``; sparsify:
  ``topk(relu(pre))`` — the same values);
- ``"jumprelu"`` ``max(pre, 0) · [pre > threshold]`` (SAELens ``jumprelu``).

Every output gate is ≥ 0 and finite. **Ties in top-k are broken by the lower latent index**: a row's
slots hold its positive gates in decreasing value, equal values in increasing latent index; slots
beyond the row's positive gates hold value 0 and index −1 (an empty slot). torch's ``topk`` breaks
ties arbitrarily, so on exact ties distpen is deterministic where the tools are not; the *values*
agree always. The same call on the same rows (same block sizes, same number of rows, one BLAS
thread, as in every worker task: ``kernel_threads(1)``) gives the same bits, so a job's gates do not
depend on which worker encodes a chunk. Other block sizes or row counts give the same selections
with gates equal up to BLAS rounding (a few ulp): BLAS picks its kernel by shape and thread count
(measured with OpenBLAS 0.3.31, numpy 2.4, on an AMD EPYC: its small-matrix sgemm and its 2-thread
sgemm each round some entries differently by one ulp). The tests compare a worker's gates with an
in-process encode of the same chunks under one thread.

``encode_topk`` and ``encode_csr`` write each block's GEMM into one float32 scratch buffer reused by
every block of the call, then make one compiled pass over it (``_encode_kernels``: bias, ReLU, the
JumpReLU threshold and the top-k or CSR selection fused; the top-k pass visits only the lanes of
segments whose maximum can enter the row's top k). On one thread ``encode_topk`` takes about the
CPU time of its GEMM alone (d_in 768, k 32, 2026-12-03: 0.96× at d_sae 16 384, 1.15× at 4096;
1.15× and 1.31× with the earlier top-k pass, 1.5× and 1.7× with per-block numpy passes).

Checkpoint layouts (confirmed in each tool's source before coding):

- **SAELens** (jbloomAus/SAELens @ 91ca16cc, version 6.18.0: ``sae_lens/saes/sae.py``,
  ``standard_sae.py``, ``topk_sae.py``, ``jumprelu_sae.py``, ``constants.py``,
  ``loading/pretrained_sae_loaders.py``): folder with ``cfg.json`` and ``sae_weights.safetensors``
  (keys ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
  ``threshold [d_sae]`` for JumpReLU). ``cfg.json`` (≥ 6.0): ``architecture``, ``d_in``, ``d_sae``,
  ``dtype``, ``apply_b_dec_to_input`` (default true), ``normalize_activations`` ("none",
  "expected_average_only_in", "constant_norm_rescale", "layer_norm"), ``reshape_activations``
  ("none" | "hook_z"), ``k`` and ``rescale_acts_by_decoder_norm`` (topk), ``metadata`` (``hook_name``,
  ``context_size``, ``sae_lens_version``, ...). Older configs (no ``sae_lens_version``, or < 6.0) are
  normalised as ``handle_pre_6_0_config`` does: ``hook_point`` → ``hook_name``,
  ``activation_fn_str`` → ``activation_fn``, ``architecture`` defaults to "standard",
  ``activation_fn == "topk"`` with ``activation_fn_kwargs.k`` means architecture "topk",
  ``normalize_activations`` true/false means "expected_average_only_in"/"none", metadata keys at the
  top level.
- **sparsify** (EleutherAI/sparsify @ 9d3b136c: ``sparsify/config.py``, ``sparse_coder.py``,
  ``fused_encoder.py``): per hookpoint a folder with ``cfg.json`` (``SparseCoderConfig`` fields
  ``activation`` "topk"|"groupmax", ``expansion_factor``, ``normalize_decoder``, ``num_latents`` (0 →
  ``d_in · expansion_factor``), ``k``, ``multi_topk``, ``skip_connection``, ``transcode``, plus
  ``d_in``) and ``sae.safetensors`` (``save_model`` of the module: ``encoder.weight [num_latents,
  d_in]``, ``encoder.bias``, ``W_dec``, ``b_dec [d_in]``, ``W_skip`` with a skip connection). Encode is
  ``topk(relu(F.linear(x − b_dec, W, b)))``, with ``x − b_dec`` skipped when ``transcode`` is true
  (distpen does the same: a transcoder encodes the module *input*). ``normalize_decoder`` and
  ``multi_topk`` act only in training and ``skip_connection`` only in decoding, so they do not change
  the encoding and are accepted. ``load_many`` reads a parent folder with one subfolder per
  hookpoint (``hookpoint=`` here). Note: SAELens' own sparsify converter sets
  ``apply_b_dec_to_input = not normalize_decoder``; distpen follows sparsify's ``encode`` instead.

Refused, with the option and file named: SAELens architectures other than standard/topk/jumprelu
(gated, transcoders, ...), ``normalize_activations`` other than "none", topk
``rescale_acts_by_decoder_norm``, sparsify ``activation="groupmax"``.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from ..errors import GateDataError, InvalidArgumentError, InvalidDtypeError, ShapeMismatchError
from . import _safetensors as st
from ._encode_kernels import csr_block, decode_keys, merge_csr_blocks, topk_block

__all__ = ["SAE", "load_sae"]

_ACTIVATIONS = ("relu", "topk", "jumprelu")
_DEFAULT_BLOCK_ELEMS = 1 << 22  # 4 Mi pre-activations (16 MiB float32) per block
# Every GEMM call is at least _TILE_R rows × _TILE_L latents (rows padded with zeros, the encoder
# padded with zero latents): BLAS libraries switch to "small matrix" / GEMV kernels with another
# summation order below some size (OpenBLAS does below ~10^6 multiply-adds, and for one row), and
# that would make a gate depend on the block it was computed in. Above it, each pre-activation is
# the same dot product whatever the call's shape, so results are block-size invariant.
_TILE_R = 128
_TILE_L = 512


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """``a`` itself when it is C-contiguous and starts at an ``align``-byte boundary, else a copy
    that does."""
    if a.flags.c_contiguous and a.flags.aligned and a.ctypes.data % align == 0:
        return a
    raw = np.empty(a.nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _as_float32(x, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f" and arr.dtype.kind not in "iu":
        raise InvalidDtypeError(f"{name} has dtype {arr.dtype}; expected a real float array")
    if arr.ndim != ndim:
        raise ShapeMismatchError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    out = _aligned(np.ascontiguousarray(arr, dtype=np.float32))
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise InvalidArgumentError(
            f"{name} must be finite, but {name}[{', '.join(map(str, bad))}] = {out[tuple(bad)]}"
        )
    return out


class SAE:
    """A sparse-autoencoder encoder (ReLU, TopK or JumpReLU), evaluated in float32 blocks.

    Parameters
    ----------
    W_enc : array of shape (d_in, d_sae)
        Encoder matrix (SAELens orientation; a sparsify ``encoder.weight`` is its transpose).
    b_enc : array of shape (d_sae,)
    b_dec : array of shape (d_in,), optional
        Subtracted from the input first when ``apply_b_dec_to_input`` is true.
    activation : {"relu", "topk", "jumprelu"}
    k : int, required for ``"topk"`` (1 ≤ k ≤ d_sae), refused otherwise
    threshold : array of shape (d_sae,), required for ``"jumprelu"``, refused otherwise
    apply_b_dec_to_input : bool, default True
    block_rows, block_latents : int, optional
        Block shape of the forward pass (memory only; results do not depend on it). Defaults keep
        a block at about 4 Mi float32 pre-activations.
    metadata : dict, optional
        Free-form provenance (``load_sae`` records the checkpoint, ``hook_name``, ``context_size``).

    Raises
    ------
    ShapeMismatchError, InvalidArgumentError, InvalidDtypeError
        Shapes that do not fit (each named with its shape), non-finite weights, a bad ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> sae = SAE(np.eye(3, 4, dtype=np.float32), np.zeros(4), activation="topk", k=2)
    >>> idx, val = sae.encode_topk(np.array([[3.0, 1.0, 2.0]]))
    >>> idx.tolist(), val.tolist()
    ([[0, 2]], [[3.0, 2.0]])
    """

    def __init__(self, W_enc, b_enc, *, b_dec=None, activation="relu", k=None, threshold=None,
                 apply_b_dec_to_input=True, block_rows=None, block_latents=None, metadata=None):
        if activation not in _ACTIVATIONS:
            raise InvalidArgumentError(
                f"activation must be one of {_ACTIVATIONS}, got {activation!r}"
            )
        w = np.asarray(W_enc)
        if w.ndim != 2:
            raise ShapeMismatchError(f"W_enc must be 2-D (d_in, d_sae), got shape {w.shape}")
        d_in, d_sae = w.shape
        if d_in == 0 or d_sae == 0:
            raise ShapeMismatchError(f"W_enc has an empty dimension: shape {w.shape}")
        # stored as (d_sae, d_in) C-contiguous: a latent block is a contiguous slab of rows
        self._w = _as_float32(w.T, "W_enc", 2)
        self._d_sae = d_sae
        pad = _round_up(d_sae, _TILE_L) - d_sae
        if pad:  # zero latents: pre = 0 → gate 0, never reported
            self._w = _aligned(np.concatenate([self._w, np.zeros((pad, d_in), np.float32)]))
        self._b_enc = _as_float32(b_enc, "b_enc", 1)
        if self._b_enc.shape != (d_sae,):
            raise ShapeMismatchError(
                f"b_enc has shape {self._b_enc.shape}, but W_enc {w.shape} has d_sae = {d_sae}; "
                "expected b_enc of shape (d_sae,)"
            )
        self._b_dec = None
        if b_dec is not None:
            self._b_dec = _as_float32(b_dec, "b_dec", 1)
            if self._b_dec.shape != (d_in,):
                raise ShapeMismatchError(
                    f"b_dec has shape {self._b_dec.shape}, but W_enc {w.shape} has d_in = {d_in}; "
                    "expected b_dec of shape (d_in,)"
                )
        self._apply_b_dec = bool(apply_b_dec_to_input)
        self._activation = activation
        self._k = None
        if activation == "topk":
            if k is None or isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise InvalidArgumentError(
                    f"activation='topk' needs an integer k (1 ≤ k ≤ d_sae = {d_sae}), got k={k!r}"
                )
            if not 1 <= int(k) <= d_sae:
                raise InvalidArgumentError(f"k must be in 1..d_sae = {d_sae}, got {k}")
            self._k = int(k)
        elif k is not None:
            raise InvalidArgumentError(
                f"k={k!r} is only meaningful with activation='topk' (got activation={activation!r})"
            )
        self._threshold = None
        if activation == "jumprelu":
            if threshold is None:
                raise InvalidArgumentError(
                    "activation='jumprelu' needs threshold, an array of shape (d_sae,)"
                )
            self._threshold = _as_float32(threshold, "threshold", 1)
            if self._threshold.shape != (d_sae,):
                raise ShapeMismatchError(
                    f"threshold has shape {self._threshold.shape}, expected (d_sae,) = ({d_sae},)"
                )
        elif threshold is not None:
            raise InvalidArgumentError(
                f"threshold is only meaningful with activation='jumprelu' (got {activation!r})"
            )
        if block_rows is not None and (not isinstance(block_rows, numbers.Integral) or block_rows < 1):
            raise InvalidArgumentError(f"block_rows must be a positive integer, got {block_rows!r}")
        if block_latents is not None and (
                not isinstance(block_latents, numbers.Integral) or block_latents < 1):
            raise InvalidArgumentError(f"block_latents must be a positive integer, got {block_latents!r}")
        bl = int(block_latents) if block_latents is not None else 4096
        self.block_latents = min(_round_up(bl, _TILE_L), self._w.shape[0])
        br = (int(block_rows) if block_rows is not None
              else max(1, _DEFAULT_BLOCK_ELEMS // self.block_latents))
        self.block_rows = _round_up(br, _TILE_R)
        self.metadata = dict(metadata or {})
        self._token = None

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self._w.shape[1]

    @property
    def d_sae(self) -> int:
        return self._d_sae

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def k(self):
        return self._k

    @property
    def threshold(self):
        return self._threshold

    @property
    def W_enc(self) -> np.ndarray:
        """Encoder matrix of shape (d_in, d_sae) (a transposed view of the stored weights)."""
        return self._w[: self._d_sae].T

    @property
    def b_enc(self) -> np.ndarray:
        return self._b_enc

    @property
    def b_dec(self):
        return self._b_dec

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self._apply_b_dec

    def __repr__(self) -> str:
        extra = f", k={self._k}" if self._k is not None else ""
        return f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self._activation!r}{extra})"

    def __dask_tokenize__(self):
        if self._token is None:
            h = hashlib.sha1()
            for a in (self._w, self._b_enc, self._b_dec, self._threshold):
                h.update(b"-" if a is None else a.tobytes())
            h.update(repr((self._activation, self._k, self._apply_b_dec)).encode())
            self._token = h.hexdigest()
        return ("distpen.SAE", self._token)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_token"] = None
        return state

    def __setstate__(self, state):
        # Arrays unpickled from a Dask message are views into its frames, at any byte offset: an
        # unaligned W_enc makes every matmul copy its block first (numpy's BLAS path needs aligned
        # operands), which cost a worker ~0.8× the GEMM again. Copy them to aligned memory once.
        for name in ("_w", "_b_enc", "_b_dec", "_threshold"):
            if state.get(name) is not None:
                state[name] = _aligned(state[name])
        self.__dict__.update(state)

    # ------------------------------------------------------------------ forward pass
    def _check_x(self, x) -> np.ndarray:
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.d_in:
            raise ShapeMismatchError(
                f"activations have shape {arr.shape}, but this SAE has d_in = {self.d_in}; "
                "expected (n_rows, d_in): pass the activations of the hook the SAE was trained on"
            )
        if arr.dtype.kind not in "fiu":
            raise InvalidDtypeError(f"activations have dtype {arr.dtype}; expected real floats")
        return arr

    def _row_blocks(self, n):
        br = self.block_rows
        return [(r0, min(n, r0 + br)) for r0 in range(0, n, br)]

    def _lat_blocks(self, min_width=1):
        bl = max(self.block_latents, _round_up(min_width, _TILE_L))
        n = self._w.shape[0]  # padded width
        return [(l0, min(n, l0 + bl)) for l0 in range(0, n, bl)]

    def _prepare(self, x, r0, r1, buf=None) -> np.ndarray:
        """Rows r0..r1 as float32, minus b_dec, zero-padded to a multiple of the row tile (in
        ``buf``, a flat float32 scratch array, when given)."""
        m = r1 - r0
        mp = _round_up(m, _TILE_R)
        if buf is None:
            xb = np.zeros((mp, self.d_in), dtype=np.float32)
        else:
            xb = buf[: mp * self.d_in].reshape(mp, self.d_in)
            xb[m:] = 0
        xb[:m] = x[r0:r1]
        if not np.isfinite(xb[:m]).all():
            bad = np.argwhere(~np.isfinite(xb))[0]
            raise GateDataError(
                f"activations are not finite: row {r0 + bad[0]}, column {bad[1]} is {xb[tuple(bad)]} "
                f"(rows {r0}..{r1} of the chunk); clean or drop those tokens"
            )
        if self._apply_b_dec and self._b_dec is not None:
            xb[:m] -= self._b_dec
        return xb

    def _buffers(self, n, lat_blocks):
        """Scratch reused by every block of one call: the padded input rows and the pre-activations."""
        mp = _round_up(min(n, self.block_rows), _TILE_R)
        width = max(l1 - l0 for l0, l1 in lat_blocks)
        return np.empty(mp * self.d_in, np.float32), np.empty(mp * width, np.float32)

    def _pre(self, xb, l0, l1, buf) -> np.ndarray:
        """``xb @ W[l0:l1].T`` into ``buf`` (the same BLAS call whatever the buffer). An overflow is
        reported by the kernels (GateDataError), not warned about here."""
        pre = buf[: xb.shape[0] * (l1 - l0)].reshape(xb.shape[0], l1 - l0)
        with np.errstate(over="ignore", invalid="ignore"):
            np.matmul(xb, self._w[l0:l1].T, out=pre)
        return pre

    def _pre_blocks(self, xb, lat_blocks, buf):
        """For each latent block with real latents: ``(l0, real, pre, bias, thr)`` — the block's
        pre-activations (:meth:`_pre`, in ``buf``), its bias and its JumpReLU thresholds (empty for
        the other activations)."""
        use_thr = self._activation == "jumprelu"
        for l0, l1 in lat_blocks:
            real = max(0, min(l1, self._d_sae) - l0)
            if real == 0:
                continue
            thr = self._threshold[l0:l0 + real] if use_thr else self._b_enc[:0]
            yield l0, real, self._pre(xb, l0, l1, buf), self._b_enc[l0:l0 + real], thr

    def _overflow(self, r0, l0, flat, width):
        return GateDataError(
            f"the SAE pre-activation overflowed at row {r0 + flat // width}, latent {l0 + flat % width}; "
            "the activations are far outside the SAE's training range"
        )

    def _gates(self, xb, l0, l1, r0, m) -> np.ndarray:
        """Gates of one block: shape (m, l1 − l0), float32, ≥ 0, +0.0 for inactive or padding."""
        pre = (xb @ self._w[l0:l1].T)[:m]
        real = max(0, min(l1, self._d_sae) - l0)
        pre[:, :real] += self._b_enc[l0:l0 + real]
        pre[:, real:] = 0
        if not np.isfinite(pre).all():
            bad = np.argwhere(~np.isfinite(pre))[0]
            raise GateDataError(
                f"the SAE pre-activation overflowed at row {r0 + bad[0]}, latent {l0 + bad[1]}; "
                "the activations are far outside the SAE's training range"
            )
        if self._activation == "jumprelu":
            thr = np.zeros(l1 - l0, np.float32)
            thr[:real] = self._threshold[l0:l0 + real]
            g = np.where(pre > thr, pre, np.float32(0))
            np.maximum(g, 0, out=g)
        else:
            g = np.maximum(pre, 0, out=pre)
        g += np.float32(0)  # −0.0 → +0.0 so the bit patterns order like the values
        return g

    def encode(self, x) -> np.ndarray:
        """Dense gates of shape (n_rows, d_sae), float32 (for small inputs: this one is full width).

        Examples
        --------
        >>> import numpy as np
        >>> SAE(np.eye(2, dtype=np.float32), np.array([0.0, -1.0])).encode([[1.0, 0.5]]).tolist()
        [[1.0, 0.0]]
        """
        x = self._check_x(x)
        n = x.shape[0]
        out = np.zeros((n, self.d_sae), dtype=np.float32)
        if self._activation == "topk":
            idx, val = self.encode_topk(x)
            rows = np.repeat(np.arange(n), self._k)
            keep = idx.ravel() >= 0
            out[rows[keep], idx.ravel()[keep]] = val.ravel()[keep]
            return out
        for r0, r1 in self._row_blocks(n):
            xb = self._prepare(x, r0, r1)
            for l0, l1 in self._lat_blocks():
                hi = min(l1, self._d_sae)
                if hi > l0:
                    out[r0:r1, l0:hi] = self._gates(xb, l0, l1, r0, r1 - r0)[:, : hi - l0]
        return out

    def encode_topk(self, x, k=None):
        """The ``k`` largest gates of each row: ``(indices int32 [n, k], values float32 [n, k])``.

        Slots are ordered by decreasing value, ties by increasing latent index; slots beyond a
        row's positive gates are ``(−1, 0.0)``. For a TopK SAE ``k`` defaults to its own ``k``; for
        ReLU/JumpReLU pass ``k`` to keep the k strongest gates (a truncation).
        """
        k = self._k if k is None else k
        if k is None or isinstance(k, bool) or not isinstance(k, numbers.Integral) \
                or not 1 <= k <= self.d_sae:
            raise InvalidArgumentError(
                f"encode_topk needs k in 1..d_sae = {self.d_sae} (the SAE's own k for a TopK SAE), "
                f"got k={k!r}"
            )
        k = int(k)
        x = self._check_x(x)
        n = x.shape[0]
        out_idx = np.full((n, k), -1, dtype=np.int32)
        out_val = np.zeros((n, k), dtype=np.float32)
        if n == 0:
            return out_idx, out_val
        use_thr = self._activation == "jumprelu"
        lat_blocks = self._lat_blocks(min_width=k)
        xbuf, pbuf = self._buffers(n, lat_blocks)
        for r0, r1 in self._row_blocks(n):
            m = r1 - r0
            xb = self._prepare(x, r0, r1, xbuf)
            keys = np.zeros((m, k), dtype=np.uint64)
            for l0, real, pre, bias, thr in self._pre_blocks(xb, lat_blocks, pbuf):
                bad = topk_block(pre, bias, thr, use_thr, l0, real, keys)
                if bad >= 0:
                    raise self._overflow(r0, l0, bad, pre.shape[1])
            out_idx[r0:r1], out_val[r0:r1] = decode_keys(keys)
        return out_idx, out_val

    def encode_csr(self, x):
        """Positive gates as CSR: ``(indptr int64 [n+1], indices int32 [nnz], values float32 [nnz])``.

        Columns are increasing within each row. A TopK SAE keeps its k strongest gates per row.
        """
        x = self._check_x(x)
        n = x.shape[0]
        if self._activation == "topk":
            idx, val = self.encode_topk(x)
            return _topk_to_csr(idx, val)
        counts = np.zeros(n, dtype=np.int64)
        cols_parts, vals_parts = [], []
        use_thr = self._activation == "jumprelu"
        lat_blocks = self._lat_blocks()
        xbuf, pbuf = self._buffers(n, lat_blocks) if n else (None, None)
        for r0, r1 in self._row_blocks(n):
            m = r1 - r0
            xb = self._prepare(x, r0, r1, xbuf)
            cnt_b, cols_b, vals_b, l0s = [], [], [], []
            for l0, real, pre, bias, thr in self._pre_blocks(xb, lat_blocks, pbuf):
                c, cols, vals, bad = csr_block(pre, bias, thr, use_thr, real, m)
                if bad >= 0:
                    raise self._overflow(r0, l0, bad, pre.shape[1])
                cnt_b.append(c)
                cols_b.append(cols)
                vals_b.append(vals)
                l0s.append(l0)
            counts[r0:r1], cols, vals = merge_csr_blocks(cnt_b, cols_b, vals_b, l0s)
            cols_parts.append(cols)
            vals_parts.append(vals)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.concatenate(cols_parts) if cols_parts else np.zeros(0, np.int32)
        values = np.concatenate(vals_parts) if vals_parts else np.zeros(0, np.float32)
        return indptr, indices.astype(np.int32, copy=False), values.astype(np.float32, copy=False)


def _topk_to_csr(idx, val):
    n, k = idx.shape
    keep = idx >= 0
    counts = keep.sum(axis=1).astype(np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # sort each row's kept slots by column: put empty slots last with a large key
    key = np.where(keep, idx.astype(np.int64), np.int64(1) << 40)
    order = np.argsort(key, axis=1, kind="stable")
    cols = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(val, order, axis=1)
    m = np.take_along_axis(keep, order, axis=1)
    return indptr, cols[m].astype(np.int32), vals[m].astype(np.float32)


# ============================================================================ checkpoint loading
_SAELENS_WEIGHTS = "sae_weights.safetensors"
_SPARSIFY_WEIGHTS = "sae.safetensors"
_CFG = "cfg.json"


def _load_float(info: st.TensorInfo, storage_options=None) -> np.ndarray:
    raw = st.read_tensor(info, storage_options)
    if info.dtype == "F64":
        return raw.astype(np.float32)
    if info.dtype not in ("F32", "F16", "BF16"):
        raise InvalidDtypeError(
            f"{info.path}: tensor {info.name!r} has dtype {info.dtype}; expected a float tensor"
        )
    return st.widen_to_float32(raw, info.dtype)


def _need(tensors: dict, key: str, path: str, shape=None):
    if key not in tensors:
        raise InvalidArgumentError(
            f"{path}: tensor {key!r} is missing; the file holds {sorted(tensors)}"
        )
    info = tensors[key]
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise ShapeMismatchError(
            f"{path}: tensor {key!r} has shape {list(info.shape)}, expected {list(shape)}"
        )
    return info


def _version_major(v) -> int | None:
    try:
        return int(str(v).lstrip("v").split(".")[0])
    except (TypeError, ValueError):
        return None


def _saelens_cfg(cfg: dict) -> dict:
    """Normalise a SAELens cfg.json to the ≥ 6.0 layout, as SAELens' ``handle_config_defaulting`` does."""
    version = cfg.get("sae_lens_version")
    if not version and isinstance(cfg.get("metadata"), dict):
        version = cfg["metadata"].get("sae_lens_version")
    major = _version_major(version) if version else None
    if major is not None and major >= 6:
        out = dict(cfg)
        out["metadata"] = dict(cfg.get("metadata") or {})
        return out
    rename = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
              "activation_fn_str": "activation_fn"}
    new = {rename.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("activation_fn", "relu")
    new.setdefault("architecture", "standard")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    na = new.get("normalize_activations")
    if isinstance(na, bool):
        new["normalize_activations"] = "expected_average_only_in" if na else "none"
    elif na is None:
        new["normalize_activations"] = "none"
    meta_keys = ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path",
                 "prepend_bos", "sae_lens_version", "sae_lens_training_version", "neuronpedia_id")
    new["metadata"] = {k: new[k] for k in meta_keys if k in new}
    new["_pre6"] = True
    return new


def _load_saelens(folder: str, storage_options=None) -> SAE:
    cfg_path = st.join(folder, _CFG)
    wpath = st.join(folder, _SAELENS_WEIGHTS)
    cfg = _saelens_cfg(st.read_json(cfg_path, storage_options))
    arch = cfg.get("architecture")
    if arch not in ("standard", "topk", "jumprelu"):
        raise InvalidArgumentError(
            f"{cfg_path}: architecture {arch!r} is not supported; distpen encodes SAELens "
            "'standard', 'topk' and 'jumprelu' SAEs"
        )
    if cfg.get("_pre6") and arch == "standard" and cfg.get("activation_fn") not in ("relu", None):
        raise InvalidArgumentError(
            f"{cfg_path}: activation_fn {cfg.get('activation_fn')!r} is not supported for the "
            "'standard' architecture; distpen implements 'relu'"
        )
    na = cfg.get("normalize_activations", "none")
    if na != "none":
        raise InvalidArgumentError(
            f"{cfg_path}: normalize_activations={na!r} is not supported (distpen encodes "
            "normalize_activations='none'); fold the normalisation into the weights, or scale the "
            "activations yourself and set it to 'none'"
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise InvalidArgumentError(f"{cfg_path}: reshape_activations={reshape!r} is not supported")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise InvalidArgumentError(
            f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported for topk SAEs"
        )
    tensors, _ = st.read_header(wpath, storage_options)
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    w_info = _need(tensors, "W_enc", wpath)
    if len(w_info.shape) != 2:
        raise ShapeMismatchError(f"{wpath}: W_enc has shape {list(w_info.shape)}, expected 2-D")
    if d_in is None or d_sae is None:
        d_in, d_sae = w_info.shape
    _need(tensors, "W_enc", wpath, (d_in, d_sae))
    b_enc = _load_float(_need(tensors, "b_enc", wpath, (d_sae,)), storage_options)
    b_dec = _load_float(_need(tensors, "b_dec", wpath, (d_in,)), storage_options)
    thr = None
    if arch == "jumprelu":
        thr = _load_float(_need(tensors, "threshold", wpath, (d_sae,)), storage_options)
    W = _load_float(w_info, storage_options)
    meta = dict(cfg.get("metadata") or {})
    meta.update(format="saelens", path=str(folder), architecture=arch)
    k = int(cfg["k"]) if arch == "topk" else None
    if arch == "topk" and cfg.get("k") is None:
        raise InvalidArgumentError(f"{cfg_path}: architecture 'topk' but no k is given")
    return SAE(W, b_enc, b_dec=b_dec, activation={"standard": "relu"}.get(arch, arch), k=k,
               threshold=thr, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
               metadata=meta)


def _load_sparsify(folder: str, storage_options=None) -> SAE:
    cfg_path = st.join(folder, _CFG)
    wpath = st.join(folder, _SPARSIFY_WEIGHTS)
    cfg = st.read_json(cfg_path, storage_options)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise InvalidArgumentError(
            f"{cfg_path}: activation={act!r} is not supported; distpen encodes sparsify 'topk' coders"
        )
    if "d_in" not in cfg or "k" not in cfg:
        raise InvalidArgumentError(f"{cfg_path}: a sparsify cfg.json needs 'd_in' and 'k'")
    d_in = int(cfg["d_in"])
    num = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    tensors, _ = st.read_header(wpath, storage_options)
    w = _load_float(_need(tensors, "encoder.weight", wpath, (num, d_in)), storage_options)
    b = _load_float(_need(tensors, "encoder.bias", wpath, (num,)), storage_options)
    b_dec = _load_float(_need(tensors, "b_dec", wpath, (d_in,)), storage_options)
    transcode = bool(cfg.get("transcode", False))
    meta = {"format": "sparsify", "path": str(folder), "hook_name": str(folder).rstrip("/")
            .replace("\\", "/").rsplit("/", 1)[-1], "transcode": transcode}
    return SAE(w.T, b, b_dec=b_dec, activation="topk", k=int(cfg["k"]),
               apply_b_dec_to_input=not transcode, metadata=meta)


def load_sae(path, *, hookpoint=None, storage_options=None) -> SAE:
    """Load a SAELens or sparsify checkpoint folder as an :class:`SAE`.

    Parameters
    ----------
    path : str or path-like
        A folder with ``cfg.json`` and ``sae_weights.safetensors`` (SAELens) or ``sae.safetensors``
        (sparsify), or a sparsify parent folder with one such subfolder per hookpoint; local or an
        fsspec URL.
    hookpoint : str, optional
        The subfolder to load from a parent folder (required when it holds several).

    Raises
    ------
    InvalidArgumentError
        No checkpoint found, an unknown or unsupported option (named with its file), a missing
        tensor (the keys found are listed).
    ShapeMismatchError
        A tensor's shape disagrees with ``cfg.json``.

    Examples
    --------
    >>> sae = load_sae("checkpoints/run/layers.6")      # doctest: +SKIP
    >>> sae = load_sae("checkpoints/run", hookpoint="layers.6")  # doctest: +SKIP
    """
    folder = path if st.is_url(path) else str(path).removeprefix("file://")
    if hookpoint is not None:
        folder = st.join(folder, hookpoint)
    if not st.isdir(folder, storage_options):
        raise InvalidArgumentError(f"{folder}: no such checkpoint folder")
    names = dict(st.list_files(folder, storage_options))
    if _CFG in names:
        if _SAELENS_WEIGHTS in names:
            return _load_saelens(folder, storage_options)
        if _SPARSIFY_WEIGHTS in names:
            return _load_sparsify(folder, storage_options)
        raise InvalidArgumentError(
            f"{folder}: has cfg.json but neither {_SAELENS_WEIGHTS} (SAELens) nor "
            f"{_SPARSIFY_WEIGHTS} (sparsify); found {sorted(names)}"
        )
    subs = [n for n, is_dir in names.items() if is_dir
            and _CFG in dict(st.list_files(st.join(folder, n), storage_options))]
    if not subs:
        raise InvalidArgumentError(
            f"{folder}: not an SAE checkpoint (no cfg.json here or in a subfolder); expected a "
            "SAELens or sparsify checkpoint folder"
        )
    if len(subs) > 1:
        raise InvalidArgumentError(
            f"{folder}: holds checkpoints for several hookpoints {sorted(subs)}; pass hookpoint=..."
        )
    return load_sae(st.join(folder, subs[0]), storage_options=storage_options)
