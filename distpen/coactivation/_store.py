"""The statistics store: its arrays, their codecs, and creating or reopening it for a job.

A statistics store is a Zarr group with ``pair_sum`` (float64) and ``pair_count`` (int64) of shape
``(K, K)`` chunked by ``tile × tile`` (upper tiles only), ``fire_count``, ``gate_sum`` and
``gate_sq_sum`` of shape ``(K,)``, its attributes (``format``, ``n_tokens``, ``tile``, …) and the
job's manifest and markers under ``_distpen/`` (:mod:`distpen.store`).
"""

from __future__ import annotations

import os
import shutil

from .._chunkio import sweep_temporaries
from ..errors import StoreConflictError, StoreCorruptError
from ..store import RunStore
from .plan import _FORMAT, _FORMAT_VERSION, STAGE

_RESUME_HINT = ("tiles already complete are kept; fix the input and re-run the same command "
                "(same gates, out, row_chunk, tile, split_every) to compute only the missing tiles")


_ARRAYS = ("pair_sum", "pair_count", "fire_count", "gate_sum", "gate_sq_sum")


#: dimension names of the statistics arrays, so ``xarray.open_zarr(store)`` names their axes
_DIMS = {1: ("latent",), 2: ("latent", "partner")}


def _stats_codecs(name: str):
    """Codecs of a statistics array: LZ4, bit-shuffled for the counts.

    Written tiles are the bulk of a job's output (16 bytes per pair of atoms) and the disk is the
    slowest part of a write. Measured on one 1024² tile of a top-k run: ``pair_count`` bit-shuffled
    LZ4 takes 7 ms to 6% of its size (zstd: 17 ms, 6%); ``pair_sum`` plain LZ4 takes 20 ms to 58%
    (zstd: 43 ms, 49%; bit-shuffled LZ4: 25 ms, 87% — shuffling float64 sums spoils the runs of
    zeros). Tiles that are mostly zero shrink to almost nothing either way. The vectors keep
    Zarr's default.
    """
    from zarr.codecs import BloscCodec

    if name == "pair_sum":
        return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    if name == "pair_count":
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return "auto"


def _prepare_store(out: str, spec: dict, units, meta: dict, overwrite: bool):
    """Create (or reopen, to resume) the statistics group and its job; returns ``(group, job)``."""
    import zarr

    store = RunStore(out)
    existing = os.path.exists(out)
    # a run store shared with other stages (a Zarr group) is fine; anything else must be empty
    shared_group = os.path.isfile(os.path.join(out, "zarr.json"))
    if existing and not overwrite:
        old = store.manifest(STAGE) if os.path.isdir(out) else None
        if old is None and not shared_group and (not os.path.isdir(out) or os.listdir(out)):
            raise StoreConflictError(
                f"{out!r} exists and is not a distpen coactivation store; pass overwrite=True "
                "(CLI: --overwrite) to replace it, or choose another output path"
            )
    if overwrite and existing:
        if shared_group:  # replace only this stage's arrays and job, keep the other stages
            for name in _ARRAYS:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            store.reset(STAGE)
        elif os.path.isdir(out):
            shutil.rmtree(out)
        else:
            os.unlink(out)
    job = store.begin_job(STAGE, spec, units, overwrite=overwrite)
    group = zarr.open_group(out, mode="a")
    K, T = meta["k_atoms"], meta["tile"]
    want = {
        "pair_sum": ((K, K), (T, T), "float64"), "pair_count": ((K, K), (T, T), "int64"),
        "fire_count": ((K,), (T,), "int64"), "gate_sum": ((K,), (T,), "float64"),
        "gate_sq_sum": ((K,), (T,), "float64"),
    }
    have = set(group.array_keys())
    for name, (shape, chunks, dtype) in want.items():
        if name in have:
            a = group[name]
            if tuple(a.shape) != shape or tuple(a.chunks) != chunks or str(a.dtype) != dtype:
                raise StoreCorruptError(
                    f"store {out!r}: array {name} has shape {a.shape}, chunks {a.chunks}, dtype {a.dtype}; "
                    f"the manifest's job needs {shape}, {chunks}, {dtype}; re-run with overwrite=True"
                )
        else:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               compressors=_stats_codecs(name), dimension_names=_DIMS[len(shape)])
    group.attrs.update({"format": _FORMAT, "format_version": _FORMAT_VERSION, **meta})
    if job.done():  # a resumed job: drop what writers killed mid-write left behind
        for name in ("pair_sum", "pair_count"):
            sweep_temporaries(os.path.join(out, name))
    return group, job


def _json_roundtrip(obj):
    import json

    from ..store import _canonical

    return json.loads(_canonical(obj))
