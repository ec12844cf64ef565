"""The plan of a co-activation job: tiles, tile groups, row chunks and their default sizes.

* The ``K × K`` statistics are cut into tiles ``(I, J)``, ``I ≤ J``, of ``tile × tile`` atoms; a tile
  is one Zarr chunk of ``pair_sum`` (float64) and of ``pair_count`` (int64), and one unit of the job
  (named ``"I.J"``). Tiles still to compute are packed into *groups* whose accumulators fit the
  memory budget of one task (:func:`_group_tiles`).
* The tokens are read by row chunks of ``row_chunk`` rows (:func:`_sources` says, per chunk, where a
  task reads it from). A leaf task reads ``split_every`` consecutive row chunks; leaves are
  tree-summed with fan-in ``split_every``. When the tiles alone make enough groups to keep workers
  busy, the default ``split_every`` (:func:`default_split_every`) covers every row chunk, so each
  group is one *streaming* task.
* Defaults (:func:`default_tile`, :func:`default_row_chunk`) come from the workers' memory limit and
  ``N``, never from the number of workers, so a given job gives the same bits on any cluster. Only
  the number of streaming tile groups follows the workers (:func:`_group_tiles`), and grouping
  never changes a bit.
"""

from __future__ import annotations

import math

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError
from ..sources.gates import DenseGates

STAGE = "coactivation"
_FORMAT = "distpen.coactivation"
_FORMAT_VERSION = 1
DEFAULT_SPLIT_EVERY = 4
_MIN_STREAM_GROUPS = 4
#: dense gates at most this dense (sampled) count as sparse for the plan; chunks up to the scan's
#: limit (12.5%) keep their sparse rows in the workers' chunk cache
_SPARSE_DENSITY = 0.05
_TILE_ALIGN = 128
_MAX_DEFAULT_TILE = 1024
_MAX_ROW_CHUNK = 1 << 20


# ============================================================================ parameters
def _check_split_every(split_every) -> int:
    if split_every is None:
        return DEFAULT_SPLIT_EVERY
    se = check_positive_int(split_every, "split_every")
    if se < 2:
        raise InvalidArgumentError(f"split_every must be ≥ 2 (the fan-in of the reduction tree), got {se}")
    return se


def _partial_bytes(tile: int) -> int:
    return 16 * tile * tile


def _fan_in(n_tokens: int, row_chunk: int, split_every: int) -> int:
    """Most partials any task holds at once: a combine's inputs (1 when there is no combine)."""
    n_leaves = math.ceil(math.ceil(n_tokens / row_chunk) / split_every)
    return max(1, min(split_every, n_leaves)) if n_leaves > 1 else 1


def _partial_budget(memory_limit: int, fan_in: int) -> float:
    """Bytes one partial may take: half a worker's memory shared by the ``fan_in`` inputs of a
    combine, its output and the write task's symmetrised copy."""
    return memory_limit / 2 / (fan_in + 2)


def default_tile(memory_limit: int, k_atoms: int, fan_in: int) -> int:
    """Largest tile (multiple of 128, ≤ 1024, ≤ K) whose partial (``16·tile²`` bytes) fits the budget.

    The 1024 cap keeps one tile's accumulators (16 MiB) in a core's share of the cache while pair
    products are scattered into them."""
    t = int(math.sqrt(_partial_budget(memory_limit, fan_in) / 16))
    t = max(_TILE_ALIGN, (t // _TILE_ALIGN) * _TILE_ALIGN)
    return int(min(k_atoms, t, _MAX_DEFAULT_TILE))


def default_row_chunk(memory_limit: int, gates, split_every: int) -> int:
    """Rows per chunk: an eighth of a worker's memory for one chunk and its float64/CSR copies,
    at most ``N / (8·split_every)`` (so that there are at least 8 leaves to share out), aligned to the
    input's chunks. Depends on ``N`` and the memory limit, not on the number of workers."""
    width = gates.row_width()
    per_row = 24 * width if gates.form == "dense" else 40 * width
    per_row = max(per_row, int(getattr(gates, "bytes_per_row", 0) or 0))  # e.g. activations to encode
    rc = max(1, int(memory_limit / 8 / per_row))
    rc = min(rc, max(1, math.ceil(gates.n_tokens / (8 * split_every))), _MAX_ROW_CHUNK)
    hint = gates.row_chunk_hint()
    if hint and rc >= hint:
        rc = (rc // hint) * hint
    elif hint and hint * per_row <= memory_limit / 4:
        rc = hint  # one stored chunk per row chunk: never decompress a chunk twice
    align = int(getattr(gates, "row_align", 1) or 1)
    if align > 1:  # whole sequences per chunk
        rc = max(align, (rc // align) * align)
    return int(min(rc, gates.n_tokens))


def _tiles(n_blocks: int):
    return [(i, j) for i in range(n_blocks) for j in range(i, n_blocks)]


def _unit(i: int, j: int) -> str:
    return f"{i}.{j}"


def _parse_unit(u: str):
    a, b = u.split(".")
    return int(a), int(b)


# ============================================================================ firing thresholds
class RelativeThreshold:
    """A firing threshold relative to each token's largest gate: atom ``a`` fires on token ``n``
    when ``g[n, a] > rho · max_b g[n, b]`` (``0 ≤ rho < 1``).

    Examples
    --------
    >>> RelativeThreshold(1e-3)
    RelativeThreshold(0.001)
    """

    __slots__ = ("rho",)

    def __init__(self, rho):
        from .._validation import check_finite_scalar

        rho = check_finite_scalar(rho, "relative fire_threshold rho")
        if not 0 <= rho < 1:
            raise InvalidArgumentError(
                f"a relative fire_threshold needs 0 ≤ rho < 1 (a fraction of the token's largest gate), "
                f"got {rho}"
            )
        self.rho = float(rho)

    def __repr__(self) -> str:
        return f"RelativeThreshold({self.rho!r})"

    def __eq__(self, other):
        return isinstance(other, RelativeThreshold) and other.rho == self.rho

    def __hash__(self):
        return hash(("RelativeThreshold", self.rho))


def check_fire_threshold(fire_threshold, k_atoms: int):
    """Normalise ``fire_threshold`` to ``(kernel threshold, spec)``; ``spec`` is None for the default.

    Accepted: a scalar ``t ≥ 0``; an array of shape ``(k_atoms,)`` of finite values ≥ 0 (a JumpReLU
    SAE's ``threshold``); :class:`RelativeThreshold` or ``{"relative": rho}``.
    """
    import hashlib

    from .._validation import check_finite_scalar

    if isinstance(fire_threshold, dict):
        if set(fire_threshold) != {"relative"}:
            raise InvalidArgumentError(
                f"fire_threshold as a dict must be {{'relative': rho}}, got keys {sorted(fire_threshold)}"
            )
        fire_threshold = RelativeThreshold(fire_threshold["relative"])
    if isinstance(fire_threshold, RelativeThreshold):
        return ("relative", fire_threshold.rho), {"kind": "relative", "rho": fire_threshold.rho}
    if np.ndim(fire_threshold) == 0:
        t = check_finite_scalar(fire_threshold, "fire_threshold")
        if t < 0:
            raise InvalidArgumentError(f"fire_threshold must be ≥ 0 (gates are ≥ 0), got {t}")
        if t == 0:
            return None, None
        return ("scalar", float(t)), {"kind": "scalar", "value": float(t)}
    arr = np.asarray(fire_threshold)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgumentError(f"fire_threshold array has dtype {arr.dtype}; expected floats")
    arr = arr.astype(np.float64)
    if arr.shape != (k_atoms,):
        raise InvalidArgumentError(
            f"fire_threshold array has shape {arr.shape}; expected one threshold per atom, ({k_atoms},)"
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        raise InvalidArgumentError(
            f"fire_threshold[{int(bad[0])}] is {arr[bad[0]]}; per-atom thresholds must be finite and ≥ 0"
        )
    digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()
    return ("per_atom", arr), {"kind": "per_atom", "n": int(k_atoms), "blake2b": digest}


# ============================================================================ planning
def _sources(gates, row_chunk: int, client, scattered=None):
    """Per row chunk: ``(r0, r1, data, base)`` where a task reads ``data[r0-base:r1-base]``.

    Zarr arrays are read by the tasks themselves; numpy arrays are scattered to the workers once;
    dask arrays are rechunked by rows and their blocks passed as dependencies.
    """
    N = gates.n_tokens
    starts = list(range(0, N, row_chunk))
    spans = [(r0, min(N, r0 + row_chunk)) for r0 in starts]

    def one(arr, kind, width):
        if kind == "zarr":
            return [(arr, 0) for _ in spans]
        if kind == "numpy":
            fut = client.scatter(arr, broadcast=False, hash=True)
            return [(fut, 0) for _ in spans]
        rows = (row_chunk,) * (N // row_chunk) + ((N % row_chunk,) if N % row_chunk else ())
        darr = arr.rechunk((rows, (width,)))
        blocks = darr.to_delayed().ravel().tolist()
        return [(blk, r0) for blk, (r0, _) in zip(blocks, spans)]

    if gates.form == "sparse" or getattr(gates, "kind", None) == "windows":
        # the source object itself (windows: their lazy array), sent to the workers once
        fut = scattered if scattered is not None else client.scatter(gates, broadcast=False, hash=True)
        return [(r0, r1, fut, 0) for r0, r1 in spans]
    if isinstance(gates, DenseGates):
        src = one(gates.array, gates.kind, gates.k_atoms)
        return [(r0, r1, d, b) for (r0, r1), (d, b) in zip(spans, src)]
    isrc = one(gates.indices, gates._ikind, gates.k)
    vsrc = one(gates.values, gates._vkind, gates.k)
    return [(r0, r1, (di, dv), (bi, bv)) for (r0, r1), (di, bi), (dv, bv) in zip(spans, isrc, vsrc)]


def _group_tiles(pending, tile: int, memory_limit: int, fan_in: int, min_groups: int = 1, multiple_of: int = 1):
    """Consecutive runs of ``pending`` tiles whose accumulators fit one task, of balanced sizes,
    at least ``min_groups`` of them (when there are that many tiles).

    With ``multiple_of`` = the number of workers (streaming jobs: one task per group), the number of
    groups is rounded up to a multiple of it, as far as there are tiles: 5 groups on 2 workers
    run in 3 rounds, the last with one worker idle, where 6 smaller groups take 2.5 rounds' time.
    Which tiles share a group never changes a bit of the results: every tile's sums are added in
    token order whatever the group (see :func:`~distpen.coactivation._kernels.scatter_group`).
    """
    if not pending:
        return []
    per_tile = _partial_bytes(tile)
    max_tiles = max(1, int(_partial_budget(memory_limit, fan_in) // per_tile))
    n_groups = max(math.ceil(len(pending) / max_tiles), min(min_groups, len(pending)))
    m = max(1, int(multiple_of))
    n_groups = min(len(pending), math.ceil(n_groups / m) * m)
    base, extra = divmod(len(pending), n_groups)  # sizes differ by at most one tile
    bounds = np.cumsum([0] + [base + (g < extra) for g in range(n_groups)])
    return [pending[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def default_split_every(memory_limit: int, k_atoms: int, n_chunks: int, tile: int | None,
                        sparse: bool = False, input_bytes: float = 0.0) -> int:
    """Fan-in of the reduction tree when the caller gives none.

    Each tile group becomes one task that streams every row chunk into its accumulators and writes
    its tiles itself (``split_every`` = the number of row chunks) when there are at least
    :data:`_MIN_STREAM_GROUPS` tiles and either

    * the tiles need that many groups anyway (one accumulator per task), or
    * the gates are sparse (top-k, or dense with at most :data:`_SPARSE_DENSITY` non-zeros) and the
      reduction tree would allocate more than twice the gates' bytes (``input_bytes``) in leaf
      accumulators (``16·tile²`` bytes per tile per leaf): every group then reads the tokens, but
      a worker keeps the sparse rows of the chunks it read (:func:`_topk_chunk`,
      :func:`_dense_chunk`), so re-reading is cheap. (Measured: dense 2% gates 50k × 4096 in 13
      leaves of 160 MB, 4.4 s as a tree against 3.1 s streamed; top-k 10⁶ × 4096 in 2 leaves,
      5.2 s as a tree against 7.6 s streamed.)

    Otherwise row chunks are spread over leaves tree-summed with fan-in :data:`DEFAULT_SPLIT_EVERY`.
    Depends on ``K``, the row chunks, the memory limit and the gates, not on the number of workers.
    """
    if n_chunks <= 1:
        return DEFAULT_SPLIT_EVERY
    T = min(tile, k_atoms) if tile is not None else default_tile(memory_limit, k_atoms, 1)
    nb = math.ceil(k_atoms / T)
    n_tiles = nb * (nb + 1) // 2
    max_tiles = max(1, int(_partial_budget(memory_limit, 1) // _partial_bytes(T)))
    if n_tiles < _MIN_STREAM_GROUPS:
        return DEFAULT_SPLIT_EVERY
    if math.ceil(n_tiles / max_tiles) >= _MIN_STREAM_GROUPS:
        return max(2, n_chunks)
    tree_bytes = math.ceil(n_chunks / DEFAULT_SPLIT_EVERY) * n_tiles * _partial_bytes(T)
    if sparse and tree_bytes > 2 * input_bytes:
        return max(2, n_chunks)
    return DEFAULT_SPLIT_EVERY


def _sample_density(gates, rows: int) -> float:
    """Fraction of non-zero gates in the first ``rows`` tokens (1.0 for top-k: not needed)."""
    if not isinstance(gates, DenseGates):
        return 0.0
    m = max(1, min(rows, gates.n_tokens, int(getattr(gates, "sample_rows", 4096))))
    x = gates.array[:m]
    x = np.asarray(x.compute() if hasattr(x, "compute") else x)
    return float(np.count_nonzero(x)) / max(1, x.size)


def choose_parameters(memory_limit: int, gates, row_chunk=None, tile=None, split_every=None,
                      sparse: bool | None = None) -> dict:
    """The parameters a job over ``gates`` runs with: given values, defaults for the rest.

    ``gates`` needs ``n_tokens``, ``k_atoms``, ``form``, ``dtype``, ``row_width()`` and
    ``row_chunk_hint()`` (a gate source, or a stand-in for a forecast). ``sparse`` (dense gates at
    most :data:`_SPARSE_DENSITY` non-zero) is measured by the caller when ``None`` is not enough.
    Returns ``row_chunk``, ``split_every``, ``fan_in``, ``tile``, ``n_blocks``, ``n_chunks``,
    ``n_leaves`` and ``streaming``.
    """
    N, K = gates.n_tokens, gates.k_atoms
    se = _check_split_every(split_every)
    rc = min(row_chunk, N) if row_chunk is not None else default_row_chunk(memory_limit, gates, se)
    if split_every is None:
        if sparse is None:
            sparse = gates.form != "dense"
        width = gates.row_width() * (np.dtype(gates.dtype).itemsize if gates.form == "dense" else 8)
        se = default_split_every(memory_limit, K, math.ceil(N / rc), tile, sparse, float(N) * width)
    fan = _fan_in(N, rc, se)
    T = min(tile, K) if tile is not None else default_tile(memory_limit, K, fan)
    n_chunks = math.ceil(N / rc)
    n_leaves = math.ceil(n_chunks / se)
    return {"row_chunk": int(rc), "split_every": int(se), "fan_in": int(fan), "tile": int(T),
            "n_blocks": math.ceil(K / T), "n_chunks": int(n_chunks), "n_leaves": int(n_leaves),
            "streaming": n_leaves == 1}
