"""open_activations over safetensors/npy banks, SAELens Arrow caches, GAMSAE01 shards and arrays."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from distpen.errors import GateDataError, InvalidArgumentError, ShapeMismatchError
from distpen.sources.activations import open_activations

from _sae_fixtures import write_gam_shard, write_saelens_arrow_cache

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


def test_nothing_found(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no activation files"):
        open_activations(tmp_path)
