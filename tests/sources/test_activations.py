"""open_activations over safetensors/npy banks, SAELens Arrow caches, GAMSAE01 shards, seed-engine bf16
harvests and arrays."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from distpen.errors import GateDataError, InvalidArgumentError, InvalidDtypeError, ShapeMismatchError
from distpen.sources.activations import open_activations

from _sae_fixtures import bf16_grid, write_gam_bf16_harvest, write_gam_shard, write_saelens_arrow_cache

D = 6


def _rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _check(src, ref):
    assert (src.n_rows, src.d_in) == ref.shape
    n = ref.shape[0]
    for r0, r1 in [(0, n), (0, 1), (min(3, n), min(11, n)), (n - 2, n), (min(5, n), min(5, n))]:
        got = src.read(r0, r1)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref[r0:r1])
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read(2, min(9, n)), ref[2:9])
    assert 1 <= src.row_chunk_hint() <= src.n_rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_safetensors_bank_many_files(tmp_path, dtype):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    parts = [_rows(n, seed=i).astype(np_dtype) for i, n in enumerate([7, 1, 12])]
    for i, p in enumerate(parts):  # names sort in row order: 00, 01, 02
        save_file({"activations": p}, str(tmp_path / f"acts_{i:02d}.safetensors"))
    ref = np.concatenate([p.astype(np.float32) for p in parts])  # exact widening
    src = open_activations(str(tmp_path))
    assert src.dtype == dtype
    _check(src, ref)
    _check(open_activations(str(tmp_path / "acts_*.safetensors")), ref)


def test_safetensors_key_and_errors(tmp_path):
    save_file({"a": _rows(5), "b": _rows(5), "c": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InvalidArgumentError, match=r"holds tensors \['a', 'b', 'c'\]; several are 2-D"):
        open_activations(tmp_path / "x.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"no tensor 'z'; the file holds \['a', 'b', 'c'\]"):
        open_activations(tmp_path / "x.safetensors", key="z")
    with pytest.raises(ShapeMismatchError, match=r"tensor 'c' has shape \[3\]; expected 2-D"):
        open_activations(tmp_path / "x.safetensors", key="c")
    _check(open_activations(tmp_path / "x.safetensors", key="b"), _rows(5))


def test_d_in_mismatch(tmp_path):
    save_file({"x": _rows(4)}, str(tmp_path / "a.safetensors"))
    save_file({"x": np.zeros((4, D + 1), np.float32)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"b\.safetensors: activations have d_in = 7, but .*a\.safetensors has d_in = 6"):
        open_activations(tmp_path)


def test_non_finite_named_at_read(tmp_path):
    bad = _rows(10)
    bad[6, 1] = np.nan
    save_file({"x": _rows(4)}, str(tmp_path / "a.safetensors"))
    save_file({"x": bad}, str(tmp_path / "b.safetensors"))
    src = open_activations(tmp_path)  # opening does not read data
    np.testing.assert_array_equal(src.read(0, 8), np.concatenate([_rows(4), bad[:4]]))
    with pytest.raises(GateDataError, match=r"b\.safetensors: activation row 6 \(global row 10, in rows 0\.\.10"):
        src.read(2, 14)


def test_npy_bank(tmp_path):
    a, b = _rows(9, 1), _rows(4, 2)
    np.save(tmp_path / "0.npy", a)
    np.save(tmp_path / "1.npy", b.astype(np.float16))
    _check(open_activations(tmp_path), np.concatenate([a, b.astype(np.float16).astype(np.float32)]))


def test_gam_shards(tmp_path):
    a, b = _rows(8, 3), _rows(5, 4)
    write_gam_shard(tmp_path / "s0.shard", a)
    write_gam_shard(tmp_path / "s1.shard", b)
    _check(open_activations(tmp_path), np.concatenate([a, b]))
    (tmp_path / "bad").mkdir()
    with open(tmp_path / "bad" / "x.shard", "wb") as f:
        f.write(b"NOTMAGIC" + bytes(24))
    with pytest.raises(InvalidArgumentError, match="not a GAMSAE01 shard"):
        open_activations(tmp_path / "bad")
    raw = open(tmp_path / "s0.shard", "rb").read()
    with open(tmp_path / "bad" / "x.shard", "wb") as f:
        f.write(raw[:-4])
    with pytest.raises(InvalidArgumentError, match=r"truncated: header expects 224 bytes, file has 220"):
        open_activations(tmp_path / "bad")


def test_gam_bf16_harvest(tmp_path):
    ref = bf16_grid(_rows(13, 11))                      # exact in bf16: the writer's rounding is the identity
    meta = {"model_name": "gpt2", "layer": 6, "seq_len": 129}
    write_gam_bf16_harvest(tmp_path / "h", ref, rows_per_shard=5, meta=meta)   # shards of 5, 5, 3 rows
    src = open_activations(tmp_path / "h")
    assert src.dtype == "bfloat16" and [os.path.basename(p) for p in src.paths] == \
        ["shard_00000.bf16", "shard_00001.bf16", "shard_00002.bf16"]
    _check(src, ref)
    _check(pickle.loads(pickle.dumps(src)), ref)
    assert src.metadata["model_name"] == "gpt2" and src.metadata["d_model"] == D
    assert len(src.metadata["stats"]["mean"]) == D and "shards" not in src.metadata
    assert src.seq_len is None  # the harvester drops each sequence's first token: rows are not whole sequences
    # rounding to nearest even on write, widened exactly on read
    x = np.array([[1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -2.5, 3.0 + 2.0 ** -20, 0.0, -0.0]], np.float32)
    write_gam_bf16_harvest(tmp_path / "r", x, rows_per_shard=4)
    got = open_activations(tmp_path / "r").read(0, 1)
    np.testing.assert_array_equal(got, [[1.0, 1.0 + 2.0 ** -6, -2.5, 3.0, 0.0, -0.0]])


def _edit_manifest(folder, **changes):
    path = os.path.join(folder, "manifest.json")
    m = json.load(open(path))
    m.update(changes)
    json.dump(m, open(path, "w"))
    return m


def test_gam_bf16_harvest_bad_input(tmp_path):
    ref = _rows(7, 12)
    write_gam_bf16_harvest(tmp_path / "h", ref, rows_per_shard=4)
    man = _edit_manifest(tmp_path / "h", total_tokens=8)
    with pytest.raises(InvalidArgumentError, match=r"manifest.json: total_tokens = 8, but its shards hold 7 rows"):
        open_activations(tmp_path / "h")
    _edit_manifest(tmp_path / "h", total_tokens=7, format_version=2)
    with pytest.raises(InvalidArgumentError, match="format_version 2 of residual_shard_bf16; only version 1"):
        open_activations(tmp_path / "h")
    _edit_manifest(tmp_path / "h", format_version=1, byte_order="big")
    with pytest.raises(InvalidDtypeError, match="byte_order 'big'"):
        open_activations(tmp_path / "h")
    _edit_manifest(tmp_path / "h", byte_order="little", shards=[man["shards"][0], {"file": "x.bf16"}])
    with pytest.raises(InvalidArgumentError, match=r"shards\[1\] must be \{'file': name, 'rows': n >= 0\}"):
        open_activations(tmp_path / "h")
    _edit_manifest(tmp_path / "h", shards=man["shards"])
    raw = open(tmp_path / "h" / "shard_00001.bf16", "rb").read()
    with open(tmp_path / "h" / "shard_00001.bf16", "wb") as f:
        f.write(raw[:-2])
    with pytest.raises(InvalidArgumentError, match=r"shard_00001.bf16: shard is truncated: the manifest gives 3 rows "
                                                   r"of d_model 6 \(36 bytes\), the file has 34"):
        open_activations(tmp_path / "h")
    with open(tmp_path / "h" / "shard_00001.bf16", "wb") as f:  # a provisional shard still growing: longer is fine
        f.write(raw + raw)
    _check(open_activations(tmp_path / "h"), bf16_grid_round(ref))
    os.remove(tmp_path / "h" / "shard_00001.bf16")
    with pytest.raises(InvalidArgumentError, match=r"shard_00001.bf16: shard listed in .*manifest.json is missing"):
        open_activations(tmp_path / "h")
    bad = ref.copy()
    bad[5, 2] = np.nan                                       # the writer stores NaN as 0x7FC0
    write_gam_bf16_harvest(tmp_path / "n", bad, rows_per_shard=4)
    src = open_activations(tmp_path / "n")
    with pytest.raises(GateDataError, match=r"shard_00001.bf16: activation row 1 \(global row 5"):
        src.read(0, 7)
    (tmp_path / "other").mkdir()                             # a manifest.json of another tool is not a harvest
    json.dump({"format": "something_else"}, open(tmp_path / "other" / "manifest.json", "w"))
    with pytest.raises(InvalidArgumentError, match="no activation files"):
        open_activations(tmp_path / "other")


def bf16_grid_round(x):
    """float32 rounded to nearest even bfloat16, computed through float64 (independent of the writer's bits)."""
    x = np.asarray(x, np.float64)
    e = np.floor(np.log2(np.abs(x)))
    q = 2.0 ** (e - 7)                                      # spacing of bf16 (8 significant bits) at |x|
    return (np.round(x / q) * q).astype(np.float32)          # np.round: half to even


def test_saelens_arrow_cache(tmp_path):
    n_seq, ctx = 7, 4
    acts = np.random.default_rng(5).standard_normal((n_seq, ctx, D)).astype(np.float32)
    toks = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx)
    hook = "blocks.0.hook_resid_pre"
    write_saelens_arrow_cache(tmp_path / "cache", hook, acts, toks, n_files=2, batch_rows=2)
    src = open_activations(tmp_path / "cache")
    assert src.row_chunk_hint() % ctx == 0
    _check(src, acts.reshape(-1, D))
    _check(open_activations(tmp_path / "cache", key=hook), acts.reshape(-1, D))
    with pytest.raises(InvalidArgumentError, match=r"no column 'nope'; the columns are \['blocks"):
        open_activations(tmp_path / "cache", key="nope")


def test_arrays(tmp_path):
    import dask.array as da
    import zarr

    ref = _rows(20, 7)
    _check(open_activations(ref), ref)
    _check(open_activations(da.from_array(ref, chunks=(6, D))), ref)
    z = zarr.create_array(str(tmp_path / "z.zarr"), shape=ref.shape, chunks=(7, D), dtype="f4")
    z[:] = ref
    _check(open_activations(z), ref)
    with pytest.raises(ShapeMismatchError, match=r"must be 2-D \(n_rows, d_in\), got shape \(20,\)"):
        open_activations(ref[:, 0])


def test_fsspec_memory_url(tmp_path):
    import fsspec

    a = _rows(6, 9)
    save_file({"x": a}, str(tmp_path / "a.safetensors"))
    write_gam_shard(tmp_path / "b.shard", a)
    fs = fsspec.filesystem("memory")
    for f in ("a.safetensors", "b.shard"):
        fs.pipe(f"/bank/{f}", open(tmp_path / f, "rb").read())
    _check(open_activations("memory://bank"), np.concatenate([a, a]))
    write_gam_bf16_harvest(tmp_path / "h", bf16_grid(a), rows_per_shard=4)
    for f in os.listdir(tmp_path / "h"):
        fs.pipe(f"/harvest/{f}", open(tmp_path / "h" / f, "rb").read())
    _check(open_activations("memory://harvest"), bf16_grid(a))


def test_nothing_found(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no activation files"):
        open_activations(tmp_path)
