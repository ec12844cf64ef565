"""Gates encoded by an SAE on the workers: ``EncodedGates`` (straight into a job) and ``encode_gates``
(into a gates store that :func:`~distpen.sources.gates.open_gates` reads).

Both read the activations by row chunks on the workers (:class:`~distpen.sources.activations.ActivationSource`
pickles as paths and offsets) and encode each chunk under ``kernel_threads(1)`` (one BLAS thread and
one compiled-kernel thread per task: the workers' tasks already fill the cores). The SAE is sent to
every worker once (``client.scatter(..., broadcast=True, hash=True)``) inside the source object.

**EncodedGates in a statistics job.** A source of the ``"sparse"`` protocol (see
:mod:`distpen.sources.gates`): ``csr_rows`` encodes (``sae.encode_csr``; for a TopK SAE its top-k
as CSR). When the job reads the tokens once (one tile group), each chunk is encoded as it is read.
When it reads them in several passes (several tile groups), :meth:`EncodedGates.job_source` first
encodes each row chunk once, one task per chunk, into the job's scratch directory (raw ``.npz`` of
the CSR rows, published by rename); the passes then read those files, and each worker keeps the
rows it read in its chunk cache. So every row chunk is encoded exactly once per job; a resumed job
reuses the chunks a killed one had spilled.

**The stores encode_gates writes** (a Zarr group that is also a :class:`~distpen.store.RunStore`,
stage ``"encode"``, one unit ``c<i>`` per row chunk ``i``; each chunk written by one task and
then marked):

* TopK SAE → ``form="topk"``: exactly the layout :func:`~distpen.sources.synth.synth_gates`
  writes: ``indices`` (N, k) int32 fill −1 and ``values`` (N, k) float32 fill 0, chunks
  (row_chunk, k); attributes ``format="distpen.gates"``, ``format_version``, ``form``,
  ``k_atoms``, ``n_tokens``, ``topk``, ``index_range``, ``row_chunk``, ``complete``, ``encoder``.
* ReLU / JumpReLU SAE → ``form="sparse"``: a sub-group ``chunks/<i>`` per row chunk holding
  ``indptr`` (rows + 1, int64, from 0), ``indices`` (int32, increasing within a row) and
  ``values`` (float32, > 0). A task writes its chunk into a temporary sibling directory and
  renames it into place, so a chunk is whole or absent. Attributes as above with ``dtype`` and,
  once complete, ``nnz``.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np

from .._validation import check_positive_int
from ..errors import InvalidArgumentError, ShapeMismatchError, StoreConflictError
from .activations import ActivationSource, open_activations
from .gates import _FORMAT, _FORMAT_VERSION, _canonical_spec, open_gates
from .sae import SAE, load_sae

__all__ = ["EncodedGates", "encode_gates"]

STAGE = "encode"
_ENCODE_VERSION = 1
#: row chunks encoded by this process (tests and benchmarks count them across workers)
_ENCODES = [0]


def _as_activations(activations) -> ActivationSource:
    if isinstance(activations, ActivationSource):
        return activations
    return open_activations(activations)


def _as_sae(sae) -> SAE:
    if isinstance(sae, SAE):
        return sae
    if isinstance(sae, (str, os.PathLike)):
        return load_sae(sae)
    raise InvalidArgumentError(f"sae must be an SAE or a checkpoint folder, got {type(sae).__name__}")


def activations_identity(src: ActivationSource) -> dict:
    """JSON identity of an activation source: its files (path, size, mtime), or a content token."""
    from dask.base import tokenize

    parts = []
    for p in src._parts:
        if p.path is None:
            parts.append({"array": tokenize(p.meta.get("array"))})
            continue
        entry = {"path": str(p.path), "rows": int(p.n_rows)}
        local = str(p.path).removeprefix("file://")
        if "://" not in local and os.path.exists(local):
            stt = os.stat(local)
            entry.update(size=int(stt.st_size), mtime_ns=int(stt.st_mtime_ns))
        parts.append(entry)
    return {"n_rows": int(src.n_rows), "d_in": int(src.d_in), "dtype": str(src.dtype), "parts": parts}


class EncodedGates:
    """Gates computed from activations by an SAE, row chunk by row chunk on the workers.

    Parameters
    ----------
    activations : ActivationSource, path, glob or array of shape (n_tokens, d_in)
        Anything :func:`~distpen.sources.open_activations` accepts.
    sae : SAE or path
        The encoder (a checkpoint folder is loaded with :func:`~distpen.sources.load_sae`).

    Attributes
    ----------
    n_tokens, k_atoms : int     ``activations.n_rows`` and ``sae.d_sae``
    form : "sparse"             rows reach the statistics as CSR (a TopK SAE's top-k included)

    Raises
    ------
    ShapeMismatchError
        The activations' ``d_in`` differs from the SAE's (both named).

    Examples
    --------
    >>> g = EncodedGates("acts/*.safetensors", "sae/layers.6")          # doctest: +SKIP
    >>> st = dp.coactivation_stats(g, "stats.zarr")                     # doctest: +SKIP
    """

    form = "sparse"
    row_align = 1

    def __init__(self, activations, sae):
        self.sae = _as_sae(sae)
        self.activations = _as_activations(activations)
        if self.activations.d_in != self.sae.d_in:
            where = self.activations.paths[0] if self.activations.paths else "the activation array"
            raise ShapeMismatchError(
                f"activations have d_in = {self.activations.d_in} ({where}) but the SAE has "
                f"d_in = {self.sae.d_in} ({self.sae!r}); use the activations of the hook the SAE "
                "was trained on"
            )
        if self.activations.n_rows == 0:
            raise ShapeMismatchError("the activations hold no rows")
        self.n_tokens = int(self.activations.n_rows)
        self.k_atoms = int(self.sae.d_sae)
        self.dtype = np.dtype(np.float32)
        self.kind = "encoded"
        #: bytes per row a task holds while encoding: the float32 activations, their centred copy
        self.bytes_per_row = 8 * self.activations.d_in

    def __repr__(self) -> str:
        return f"EncodedGates({self.activations!r}, {self.sae!r})"

    def input_spec(self) -> dict:
        from dask.base import tokenize

        sae = self.sae
        return {"form": "encoded", "k_atoms": self.k_atoms,
                "activations": activations_identity(self.activations),
                "sae": {"token": tokenize(sae), "activation": sae.activation, "k": sae.k,
                        "d_in": sae.d_in, "d_sae": sae.d_sae}}

    def __dask_tokenize__(self):
        return ("distpen.EncodedGates", _canonical_spec(self.input_spec()))

    def row_chunk_hint(self) -> int | None:
        """4096 rows (the job's default row chunk aligns to it): smaller chunks make the encoder's
        GEMMs and each pass's per-chunk work less efficient."""
        return min(self.n_tokens, 4096)

    def row_width(self) -> int:
        """Entries per row: ``k`` for a TopK SAE, else an estimate."""
        return int(self.sae.k) if self.sae.k is not None else min(self.k_atoms, 128)

    def encode_rows(self, r0: int, r1: int):
        """Rows ``[r0, r1)`` read and encoded: top-k ``(indices, values)`` for a TopK SAE, else CSR."""
        from .._workers import kernel_threads

        x = self.activations.read(r0, r1)
        with kernel_threads(1):
            out = self.sae.encode_topk(x) if self.sae.activation == "topk" else self.sae.encode_csr(x)
        _ENCODES[0] += 1
        return out

    def csr_rows(self, r0: int, r1: int):
        """Rows ``[r0, r1)`` encoded, as CSR ``(indptr, indices, values)`` sorted within each row."""
        from .._workers import kernel_threads

        x = self.activations.read(r0, r1)
        with kernel_threads(1):
            out = self.sae.encode_csr(x)
        _ENCODES[0] += 1
        return out

    def job_source(self, scratch: str, passes: int = 1, row_chunk: int | None = None):
        """Itself when the job reads each chunk once; otherwise a reader of chunks encoded once,
        in a first round of tasks, into ``scratch`` (see the module docstring)."""
        if passes <= 1 or row_chunk is None:
            return self, []
        from dask.base import tokenize

        folder = os.path.join(scratch, f"encoded-{tokenize(self, row_chunk)[:16]}")
        os.makedirs(folder, exist_ok=True)
        spans = [(r0, min(self.n_tokens, r0 + row_chunk)) for r0 in range(0, self.n_tokens, row_chunk)]
        src = _SpilledGates(self, folder, row_chunk)
        return src, [(_spill_chunk, r0, r1) for r0, r1 in spans]


class _SpilledGates:
    """Row chunks of an :class:`EncodedGates` spilled once to files (``<r0>-<r1>.npz``)."""

    form = "sparse"
    row_align = 1

    def __init__(self, encoded: EncodedGates, folder: str, row_chunk: int):
        self.encoded, self.folder, self.row_chunk = encoded, folder, int(row_chunk)
        for name in ("n_tokens", "k_atoms", "dtype", "kind", "bytes_per_row"):
            setattr(self, name, getattr(encoded, name))

    def input_spec(self) -> dict:
        return self.encoded.input_spec()

    def __dask_tokenize__(self):
        return ("distpen.SpilledGates", self.encoded.__dask_tokenize__(), self.folder, self.row_chunk)

    def row_chunk_hint(self):
        return self.row_chunk

    def row_width(self) -> int:
        return self.encoded.row_width()

    def _path(self, r0: int, r1: int) -> str:
        return os.path.join(self.folder, f"{r0}-{r1}.npz")

    def csr_rows(self, r0: int, r1: int):
        path = self._path(r0, r1)
        if not os.path.exists(path):  # a chunk the first round did not cover (another chunking)
            return self.encoded.csr_rows(r0, r1)
        with np.load(path) as z:
            return z["indptr"], z["indices"], z["values"]


def _spill_chunk(src: _SpilledGates, r0: int, r1: int) -> int:
    """Encode rows ``[r0, r1)`` once into the spill folder (kept when already there); returns 1 if
    it encoded."""
    from ..store import publish_file

    path = src._path(r0, r1)
    if os.path.exists(path):
        return 0
    ip, ind, val = src.encoded.csr_rows(r0, r1)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, indptr=ip, indices=ind, values=val)

    publish_file(f"{path}.tmp-{os.getpid()}", path, write)
    return 1


# ============================================================================ encode_gates
def _chunk_outputs(out: str, arr, coords) -> list[str]:
    rel = os.path.relpath(os.path.join(str(arr.store.root), arr.path), out) if hasattr(arr.store, "root") \
        else arr.path
    key = arr.metadata.chunk_key_encoding.encode_chunk_key(coords)
    p = os.path.join(rel, key)
    return [p] if os.path.exists(os.path.join(out, p)) else []


def _encode_chunk(src: EncodedGates, out: str, job, c: int, r0: int, r1: int, form: str) -> dict:
    """Encode row chunk ``c`` (rows ``[r0, r1)``), write it, then mark unit ``c<c>`` done."""
    import zarr

    group = zarr.open_group(out, mode="r+")
    if form == "topk":
        idx, val = src.encode_rows(r0, r1)
        ai, av = group["indices"], group["values"]
        ai[r0:r1] = idx
        av[r0:r1] = val
        outputs = _chunk_outputs(out, ai, (c, 0)) + _chunk_outputs(out, av, (c, 0))
        nnz = int(np.count_nonzero(idx >= 0))
    else:
        ip, ind, val = src.encode_rows(r0, r1)
        final = os.path.join(out, "chunks", str(c))
        tmp = os.path.join(out, "chunks", f".tmp-{c}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        g = zarr.open_group(tmp, mode="w")
        for name, a in (("indptr", ip.astype(np.int64)), ("indices", ind.astype(np.int32)),
                        ("values", val.astype(np.float32))):
            z = g.create_array(name, shape=a.shape, chunks=(max(1, a.shape[0]),), dtype=a.dtype)
            if a.size:
                z[:] = a
        shutil.rmtree(final, ignore_errors=True)  # a whole chunk of an earlier, unmarked attempt
        os.replace(tmp, final)
        outputs = []
        for root, _, files in os.walk(final):
            outputs += [os.path.relpath(os.path.join(root, f), out) for f in files]
        nnz = int(ip[-1])
    job.mark_done(f"c{c}", sorted(outputs), info={"rows": r1 - r0, "nnz": nnz})
    return {"unit": f"c{c}", "rows": r1 - r0, "nnz": nnz}


def default_encode_row_chunk(memory_limit: int, src: EncodedGates, workers: int = 1) -> int:
    """Rows per chunk: a sixteenth of a worker's memory for the activations and the encoded rows,
    at most 2¹⁸ rows, and small enough for 16 chunks per task slot (``workers``: the cluster's
    threads; the slot that finishes last then idles the others for half a chunk on average), but
    ≥ 4096 rows; then evened out (a multiple of 128 rows, the encoder's row tile) so
    that the number of chunks is a multiple of the slots when it can be, and no slot runs a last
    chunk alone. Every row is encoded on its own (one BLAS thread per task), so the chunking changes
    the gates by BLAS rounding at most (see :mod:`distpen.sources.sae`), and the selections not."""
    per_row = src.bytes_per_row + 16 * src.row_width()
    w = max(1, int(workers))
    N = int(src.n_tokens)
    rc = min(1 << 18, memory_limit // 16 // per_row, max(4096, math.ceil(N / (16 * w))))
    rc = int(max(1, min(N, rc)))
    n = math.ceil(N / rc)
    if w > 1 and n > 1 and n % w:
        n = -(-n // w) * w
        even = -(-math.ceil(N / n) // 128) * 128
        if math.ceil(N / even) % w == 0:
            rc = even
    return rc


def _task_slots(client) -> int:
    from ..cluster import _workers

    return max(1, sum(int(w.get("nthreads", 1) or 1) for w in _workers(client).values()))


def encode_gates(activations, sae, out, *, row_chunk=None, overwrite=False, progress=None, client=None,
                 _units=None):
    """Encode activations with an SAE into a gates store, chunk by chunk on the workers.

    The store is what :func:`~distpen.sources.open_gates` reads (see the module docstring for its
    layout): top-k gates for a TopK SAE, CSR gates for a ReLU or JumpReLU SAE. The job is
    resumable: re-running the same call computes only the chunks without a completion marker; a
    different job into the same store is refused unless ``overwrite``.

    Parameters
    ----------
    activations : ActivationSource, path, glob or array of shape (n_tokens, d_in)
    sae : SAE or path
    out : str or os.PathLike
        A local directory (the store; created).
    row_chunk : int, optional
        Rows per chunk (one task and one stored chunk each). Default: from the workers' memory
        limit (:func:`default_encode_row_chunk`); when resuming, the stored value.
    overwrite : bool
        Replace whatever ``out`` holds.
    progress : callable, optional
        Called as ``progress(info)`` with the dict written to the store's ``progress.json``
        (``units_done``, ``units_total``, ``rows_processed``, ``rows_total``, ...).
    client : distributed.Client, optional

    Returns
    -------
    TopKGates or a sparse gate source
        The stored gates, as :func:`open_gates` opens them.

    Raises
    ------
    ShapeMismatchError
        ``d_in`` of the activations and of the SAE differ.
    StoreConflictError
        ``out`` holds something else (or another encoding job) and ``overwrite`` is False.
    GateDataError
        Non-finite activations (file and rows named), found while encoding; chunks already
        written stay valid, and re-running resumes.

    Examples
    --------
    >>> g = dp.encode_gates("acts/*.safetensors", "sae/", "gates.zarr")   # doctest: +SKIP
    >>> dp.coactivation_stats(g, "stats.zarr")                            # doctest: +SKIP
    """
    import zarr
    from distributed import as_completed

    from ..cluster import get_client, n_workers, worker_memory_limit
    from ..store import RunStore, local_store_path

    src = EncodedGates(activations, sae)
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidArgumentError(f"out must be a local directory path, got {type(out).__name__}")
    out = local_store_path(out)
    if row_chunk is not None:
        row_chunk = check_positive_int(row_chunk, "row_chunk")
    form = "topk" if src.sae.activation == "topk" else "sparse"
    inputs = src.input_spec()
    store = RunStore(out)
    if os.path.exists(out) and not overwrite:
        old = store.manifest(STAGE) if os.path.isdir(out) else None
        if old is None and (not os.path.isdir(out) or os.listdir(out)):
            raise StoreConflictError(
                f"{out!r} exists and is not a distpen encoded-gates store; pass overwrite=True "
                "(CLI: --overwrite) to replace it, or choose another output path"
            )
        if old is not None and row_chunk is None and old.get("spec", {}).get("inputs") == _roundtrip(inputs):
            row_chunk = old["spec"].get("row_chunk")
    if overwrite and os.path.exists(out):
        shutil.rmtree(out) if os.path.isdir(out) else os.unlink(out)
    client = client or get_client()
    N, K = src.n_tokens, src.k_atoms
    rc = min(row_chunk, N) if row_chunk else default_encode_row_chunk(worker_memory_limit(client), src,
                                                                       _task_slots(client))
    n_chunks = math.ceil(N / rc)
    units = [f"c{i}" for i in range(n_chunks)]
    spec = {"kind": "encode", "version": _ENCODE_VERSION, "inputs": inputs, "form": form,
            "row_chunk": rc, "n_tokens": N, "k_atoms": K}
    job = store.begin_job(STAGE, spec, units, overwrite=overwrite)
    group = zarr.open_group(out, mode="a")
    have = set(group.keys())
    if form == "topk":
        k = int(src.sae.k)
        for name, dtype, fill in (("indices", "int32", -1), ("values", "float32", 0)):
            if name not in have:
                group.create_array(name, shape=(N, k), chunks=(rc, k), dtype=dtype, fill_value=fill)
    elif "chunks" not in have:
        group.create_group("chunks")
    else:  # a resumed job: drop what writers of an earlier run left behind mid-write
        cdir = os.path.join(out, "chunks")
        for name in os.listdir(cdir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(cdir, name), ignore_errors=True)
    attrs = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "form": form, "k_atoms": K,
             "n_tokens": N, "row_chunk": rc, "dtype": "float32", "complete": False,
             "encoder": {"sae": repr(src.sae), "activation": src.sae.activation, "d_in": src.sae.d_in,
                         "metadata": {k: v for k, v in src.sae.metadata.items()
                                      if isinstance(v, (str, int, float, bool))}}}
    if form == "topk":
        attrs.update(topk=int(src.sae.k), index_range=[-1, K - 1])
    group.attrs.update(attrs)

    pending = [int(u[1:]) for u in job.pending()]
    if _units is not None:  # test hook: encode only these chunks (simulates a killed job)
        pending = [c for c in pending if c in set(_units)]
    skipped = n_chunks - len(job.pending())
    state = {"done": skipped, "rows": 0, "computed": 0}
    t0 = time.time()

    def report():
        el = max(time.time() - t0, 1e-9)
        info = job.update_progress(units_done=state["done"], units_total=n_chunks, units_skipped=skipped,
                                   units_computed=state["computed"], rows_processed=state["rows"],
                                   rows_total=sum(min(N, (c + 1) * rc) - c * rc for c in pending),
                                   elapsed_s=round(el, 3), throughput_rows_per_s=round(state["rows"] / el, 1),
                                   row_chunk=rc, form=form)
        if progress is not None:
            progress(info)

    report()
    if pending:
        # the SAE goes to every worker before the first task (replicated peer to peer): a task that
        # fetched it from a peer waited for that peer, busy encoding, to serve it (~2 s, loaded)
        fut_src = client.scatter(src, broadcast=True, hash=True)
        in_flight = max(2, 2 * n_workers(client))
        ac = as_completed(loop=client.loop)
        it = iter(pending)

        def submit_next():
            c = next(it, None)
            if c is not None:
                r0, r1 = c * rc, min(N, (c + 1) * rc)
                ac.add(client.submit(_encode_chunk, fut_src, out, job, c, r0, r1, form, pure=False,
                                     key=f"distpen-encode-{job.fingerprint[:16]}-{c}-{time.time_ns()}"))

        try:
            for _ in range(in_flight):
                submit_next()
            for fut in ac:
                res = fut.result()
                fut.release()
                state["done"] += 1
                state["computed"] += 1
                state["rows"] += res["rows"]
                report()
                submit_next()
        except BaseException as exc:
            # let the chunks in flight (at most a few) finish, so that nothing still writes into the
            # store once this call has returned; their markers stay valid
            from distributed import wait

            rest = list(ac.futures)
            ac.clear()
            try:
                wait(rest, timeout=300)
            except Exception:  # noqa: BLE001 - best effort; the failure below is what matters
                pass
            for f in rest:
                f.release()
            job.fail(f"{type(exc).__name__}: {exc}", units_computed=state["computed"])
            raise
    if not job.pending():
        if form == "sparse":
            group.attrs["nnz"] = int(sum(m.get("info", {}).get("nnz", 0) for m in job.markers().values()))
        group.attrs["complete"] = True
    job.finish(units_computed=state["computed"])
    report()
    return open_gates(out)


def _roundtrip(obj):
    import json

    from ..store import _canonical

    return json.loads(_canonical(obj))
