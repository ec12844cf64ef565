"""Fixtures laid out exactly as delphi, SAELens, sparsify and the seed engine write them.

Each writer follows the tool's own code (see the module docstrings of ``distpen.sources.*`` for
the files read): ``safetensors.numpy.save_file`` for every safetensors file, pyarrow's IPC *stream*
writer for the ``datasets`` Arrow files (``ArrowWriter._WRITER_CLASS = pa.RecordBatchStreamWriter``).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from safetensors.numpy import save_file


# ------------------------------------------------------------------ delphi
def dense_gates(n_seq, ctx, width, *, density=0.05, seed=0, silent_tokens=()):
    """A dense (n_seq·ctx, width) float32 gate array with float16-exact positive values."""
    rng = np.random.default_rng(seed)
    g = np.where(rng.random((n_seq * ctx, width)) < density,
                 rng.uniform(0.1, 4.0, (n_seq * ctx, width)), 0.0)
    g = g.astype(np.float16).astype(np.float32)
    for t in silent_tokens:
        g[t] = 0
    return g


def write_delphi_cache(root, hookpoint, gates, n_seq, ctx, *, n_splits=3, batch_size=2,
                       shuffle=False, force_uint32=False, save_tokens=True, seed=0):
    """Write ``root/<hookpoint>/{start}_{end}.safetensors`` + ``config.json`` as save_splits does."""
    width = gates.shape[1]
    g3 = gates.reshape(n_seq, ctx, width)
    nz = np.argwhere(np.abs(g3) > 1e-5)  # torch.nonzero order: (seq, pos, latent) ascending
    acts = g3[nz[:, 0], nz[:, 1], nz[:, 2]]
    tokens = np.random.default_rng(seed).integers(0, 50000, (n_seq, ctx)).astype(np.int64)
    boundaries = np.linspace(0, width, n_splits + 1).astype(np.int64)  # torch.linspace(...).long()
    module_dir = os.path.join(root, hookpoint)
    os.makedirs(module_dir, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    for start, end in zip(boundaries[:-1], boundaries[1:] - 1):
        mask = (nz[:, 2] >= start) & (nz[:, 2] <= end)
        loc = nz[mask].copy()
        act = acts[mask].astype(np.float16)
        loc[:, 2] -= start
        if shuffle:
            perm = rng.permutation(loc.shape[0])
            loc, act = loc[perm], act[perm]
        small = loc.size == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16)
        loc = loc.astype(np.uint16 if small and not force_uint32 else np.uint32)
        data = {"locations": loc, "activations": act}
        if save_tokens:
            data["tokens"] = tokens
        save_file(data, os.path.join(module_dir, f"{start}_{end}.safetensors"))
    cfg = {"dataset_repo": "EleutherAI/SmolLM2-135M-10B", "dataset_split": "train[:1%]",
           "dataset_name": "", "dataset_column": "text", "batch_size": batch_size,
           "cache_ctx_len": ctx, "n_tokens": n_seq * ctx, "n_splits": n_splits,
           "model_name": "EleutherAI/pythia-70m"}
    with open(os.path.join(module_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=4)
    return module_dir


# ------------------------------------------------------------------ SAE checkpoints
def random_sae_weights(d_in, d_sae, seed=0):
    rng = np.random.default_rng(seed)
    W_enc = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    b_enc = (rng.standard_normal(d_sae) * 0.1 - 0.05).astype(np.float32)
    W_dec = np.ascontiguousarray(W_enc.T)
    b_dec = (rng.standard_normal(d_in) * 0.2).astype(np.float32)
    thr = np.abs(rng.standard_normal(d_sae) * 0.2).astype(np.float32)
    return W_enc, b_enc, W_dec, b_dec, thr


def write_saelens(folder, W_enc, b_enc, W_dec, b_dec, *, architecture="standard", k=None,
                  threshold=None, apply_b_dec_to_input=True, normalize_activations="none",
                  old=False, **extra):
    """A SAELens ≥ 6 folder (``SAE.save_model``) or, with ``old=True``, a pre-6.0 flat cfg.json."""
    os.makedirs(folder, exist_ok=True)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold
    save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
    d_in, d_sae = W_enc.shape
    if old:
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6,
               "context_size": 128, "model_name": "gpt2-small",
               "activation_fn_str": "topk" if architecture == "topk" else "relu",
               "apply_b_dec_to_input": apply_b_dec_to_input,
               "normalize_activations": normalize_activations, "sae_lens_training_version": None}
        if architecture == "topk":
            cfg["activation_fn_kwargs"] = {"k": k}
        cfg.update(extra)
    else:
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec_to_input,
               "normalize_activations": normalize_activations, "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0",
                            "hook_name": "blocks.6.hook_resid_pre", "context_size": 128,
                            "model_name": "gpt2-small"},
               "architecture": architecture}
        if architecture == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
        cfg.update(extra)
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def write_sparsify(folder, W_enc, b_enc, b_dec, *, k, transcode=False, **extra):
    """A sparsify folder as ``SparseCoder.save_to_disk`` writes it (``encoder.weight`` is W_encᵀ)."""
    os.makedirs(folder, exist_ok=True)
    d_in, d_sae = W_enc.shape
    tensors = {"encoder.weight": np.ascontiguousarray(W_enc.T), "encoder.bias": b_enc,
               "W_dec": np.ascontiguousarray(W_enc.T), "b_dec": b_dec}
    save_file(tensors, os.path.join(folder, "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": d_sae, "k": k, "multi_topk": False, "skip_connection": False,
           "transcode": transcode, "d_in": d_in}
    cfg.update(extra)
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def encode_as_workers(method, x, row_chunk=None):
    """An in-process dense or top-k encode (``sae.encode``, ``sae.encode_topk``) as the worker tasks of
    a job with ``row_chunk`` run it: one BLAS thread, one call per row chunk, results concatenated.
    BLAS picks its kernels by shape and thread count, so a row's gates may differ in the last bit
    with the rows encoded with it (seen with OpenBLAS 0.3.31's small-matrix and threaded sgemm on
    an AMD EPYC); the same calls give the same bits."""
    from distpen._workers import kernel_threads

    n = len(x)
    rc = row_chunk or max(1, n)
    with kernel_threads(1):
        parts = [method(x[r:r + rc]) for r in range(0, n, rc)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(a) for a in zip(*parts))
    return np.concatenate(parts)


# ------------------------------------------------------------------ activation banks
def write_gam_shard(path, rows):
    """A ``GAMSAE01`` v1 shard (``encode_shard_bytes``: 32-byte header, row-major float32)."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    with open(path, "wb") as f:
        f.write(b"GAMSAE01" + struct.pack("<QQII", rows.shape[0], rows.shape[1], 0, 0))
        f.write(rows.tobytes())


def bf16_grid(rows):
    """``rows`` as float32 values that bfloat16 holds exactly (low 16 bits cleared)."""
    u = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def write_gam_bf16_harvest(folder, rows, *, rows_per_shard, meta=None):
    """A seed-engine bf16 harvest as ``ShardWriter`` (SauersML/gam ``examples/residual_shard_io.py``)
    leaves it: ``shard_00000.bf16``, … of raw little-endian uint16 bf16 bit patterns (the top half
    of each float32, rounded to nearest even), ``rows_per_shard`` rows each (the last short), and
    ``manifest.json`` with the format fields, the shard list, per-dimension ``stats`` and ``meta``
    merged at top level."""
    os.makedirs(folder, exist_ok=True)
    x = np.ascontiguousarray(rows, dtype=np.float32)
    u = x.view(np.uint32)
    bits = ((u + ((u >> 16) & np.uint32(1)) + np.uint32(0x7FFF)) >> 16).astype("<u2")
    bits[np.isnan(x)] = 0x7FC0
    shards = []
    for i, r0 in enumerate(range(0, x.shape[0], rows_per_shard)):
        block = bits[r0:r0 + rows_per_shard]
        name = f"shard_{i:05d}.bf16"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(block.tobytes())
        shards.append({"file": name, "rows": int(block.shape[0]), "bytes": int(block.nbytes)})
    x64 = x.astype(np.float64)
    manifest = {"format": "residual_shard_bf16", "format_version": 1, "dtype": "bfloat16",
                "byte_order": "little", "d_model": int(x.shape[1]), "rows_per_shard": int(rows_per_shard),
                "total_tokens": int(x.shape[0]), "shards": shards,
                "stats": {"mean": x64.mean(axis=0).astype(np.float32).tolist(),
                          "norm": np.sqrt((x64 ** 2).mean(axis=0)).astype(np.float32).tolist()}}
    manifest.update(meta or {})
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def write_saelens_arrow_cache(folder, hook_name, acts, token_ids, *, n_files=2, batch_rows=3):
    """A ``datasets.save_to_disk`` directory as SAELens' CacheActivationsRunner leaves it.

    One column named by the hook, ``Array2D(shape=(context_size, d_in))`` (stored as
    ``list<list<float32>>``), plus ``token_ids`` ``Sequence(int32, length=context_size)``; files
    ``data-XXXXX-of-YYYYY.arrow`` in IPC stream format, ``state.json`` listing them,
    ``dataset_info.json``.
    """
    import pyarrow as pa

    os.makedirs(folder, exist_ok=True)
    n_seq, ctx, d_in = acts.shape
    bounds = np.linspace(0, n_seq, n_files + 1).astype(int)
    files = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = f"data-{i:05d}-of-{n_files:05d}.arrow"
        schema = pa.schema([(hook_name, pa.list_(pa.list_(pa.float32()))),
                            ("token_ids", pa.list_(pa.int32()))])
        with pa.OSFile(os.path.join(folder, name), "wb") as sink, \
                pa.ipc.new_stream(sink, schema) as w:
            for r0 in range(a, b, batch_rows):
                r1 = min(b, r0 + batch_rows)
                col = pa.array([[list(map(float, t)) for t in s] for s in acts[r0:r1]],
                               type=pa.list_(pa.list_(pa.float32())))
                tok = pa.array([list(map(int, s)) for s in token_ids[r0:r1]],
                               type=pa.list_(pa.int32()))
                w.write_batch(pa.record_batch([col, tok], schema=schema))
        files.append({"filename": name})
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": files, "_fingerprint": None, "_format_columns": None,
                   "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                   "_split": None}, f, indent=2)
    info = {"features": {hook_name: {"shape": [ctx, d_in], "dtype": "float32", "_type": "Array2D"},
                         "token_ids": {"feature": {"dtype": "int32", "_type": "Value"},
                                       "length": ctx, "_type": "Sequence"}}}
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return folder
