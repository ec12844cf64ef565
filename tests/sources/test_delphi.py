"""DelphiLatents against dense gates written into delphi's own shard layout."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import save_file

from distpen.errors import GateDataError, InvalidArgumentError, InvalidDtypeError, ShapeMismatchError
from distpen.sources.delphi import DelphiLatents, is_latent_cache

from _sae_fixtures import dense_gates, write_delphi_cache

N_SEQ, CTX, WIDTH = 6, 5, 23


def _csr_dense(indptr, indices, values, n_cols):
    return sp.csr_matrix((values, indices, indptr), shape=(indptr.size - 1, n_cols)).toarray()


@pytest.fixture
def gates():
    return dense_gates(N_SEQ, CTX, WIDTH, density=0.15, seed=3, silent_tokens=(0, 7, 8, 29))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("force_uint32", [False, True])
@pytest.mark.parametrize("n_splits", [1, 3, 4])
def test_read_csr_matches_dense(tmp_path, gates, shuffle, force_uint32, n_splits):
    write_delphi_cache(tmp_path / "latents", "layers.3", gates, N_SEQ, CTX, n_splits=n_splits,
                       shuffle=shuffle, force_uint32=force_uint32)
    cache = DelphiLatents(tmp_path / "latents", index_dir=str(tmp_path / "idx"))
    assert cache.hookpoint == "layers.3"
    assert (cache.k_atoms, cache.seq_len, cache.n_sequences, cache.n_tokens) == (
        WIDTH, CTX, N_SEQ, N_SEQ * CTX)
    for seq0, seq1 in [(0, N_SEQ), (0, 1), (2, 5), (5, 6), (3, 3)]:
        indptr, indices, values = cache.read_csr(seq0, seq1)
        assert indptr.dtype == np.int64 and indices.dtype == np.int32 and values.dtype == np.float32
        assert indptr.size == (seq1 - seq0) * CTX + 1
        for r in range(indptr.size - 1):
            row = indices[indptr[r]:indptr[r + 1]]
            assert np.all(np.diff(row) > 0)
        np.testing.assert_array_equal(_csr_dense(indptr, indices, values, WIDTH),
                                      gates[seq0 * CTX:seq1 * CTX])


def test_uint16_and_uint32_on_disk(tmp_path, gates):
    d16 = write_delphi_cache(tmp_path / "a", "h", gates, N_SEQ, CTX)
    d32 = write_delphi_cache(tmp_path / "b", "h", gates, N_SEQ, CTX, force_uint32=True)
    from distpen.sources._safetensors import read_header

    name = sorted(f for f in os.listdir(d16) if f.endswith(".safetensors"))[0]
    assert read_header(os.path.join(d16, name))[0]["locations"].dtype == "U16"
    assert read_header(os.path.join(d32, name))[0]["locations"].dtype == "U32"


def test_hookpoint_dir_itself_config_and_pickle(tmp_path, gates):
    hook = write_delphi_cache(tmp_path / "latents", "layers.3", gates, N_SEQ, CTX, save_tokens=False,
                              batch_size=3)
    cache = DelphiLatents(hook, index_dir=str(tmp_path / "idx"))
    assert cache.n_sequences == N_SEQ  # from n_tokens // ctx // batch_size · batch_size
    assert is_latent_cache(hook) and is_latent_cache(tmp_path / "latents")
    assert not is_latent_cache(tmp_path)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 20_000
    np.testing.assert_array_equal(clone.read_csr(1, 4)[2], cache.read_csr(1, 4)[2])


def test_index_once_and_reused(tmp_path, gates):
    write_delphi_cache(tmp_path / "latents", "h", gates, N_SEQ, CTX, shuffle=True)
    idx = tmp_path / "idx"
    cache = DelphiLatents(tmp_path / "latents", index_dir=str(idx))
    cache.index()
    files = sorted(os.listdir(idx))
    mtimes = [os.stat(idx / f).st_mtime_ns for f in files]
    cache.read_csr(0, 2)
    assert sorted(os.listdir(idx)) == files
    assert [os.stat(idx / f).st_mtime_ns for f in files] == mtimes


def test_fsspec_memory_url(tmp_path, gates):
    import fsspec

    hook = write_delphi_cache(tmp_path / "latents", "h", gates, N_SEQ, CTX, shuffle=True)
    fs = fsspec.filesystem("memory")
    for f in os.listdir(hook):
        fs.pipe(f"/cache/latents/h/{f}", open(os.path.join(hook, f), "rb").read())
    cache = DelphiLatents("memory://cache/latents", hookpoint="h", index_dir=str(tmp_path / "i"))
    np.testing.assert_array_equal(_csr_dense(*cache.read_csr(0, N_SEQ), WIDTH), gates)


# ------------------------------------------------------------------ bad input
def _shard(d, name, **tensors):
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, name))


def _cfg(d, **kw):
    cfg = {"cache_ctx_len": CTX, "n_tokens": N_SEQ * CTX, "batch_size": 1, "n_splits": 2}
    cfg.update(kw)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _ok(n=4):
    loc = np.array([[0, 0, 0], [1, 2, 3], [2, 4, 1], [5, 1, 2]][:n], dtype=np.uint16)
    return {"locations": loc, "activations": np.ones(n, np.float16)}


def test_overlap_and_gap(tmp_path):
    d = tmp_path / "h"
    _shard(d, "0_9.safetensors", **_ok())
    _shard(d, "5_19.safetensors", **_ok())
    _cfg(d)
    with pytest.raises(InvalidArgumentError, match=r"5_19\.safetensors.*overlaps"):
        DelphiLatents(d)
    os.remove(d / "5_19.safetensors")
    _shard(d, "12_19.safetensors", **_ok())
    with pytest.raises(InvalidArgumentError, match=r"latents 10\.\.11 in no shard"):
        DelphiLatents(d)
    os.remove(d / "0_9.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"latents 0\.\.11 in no shard"):
        DelphiLatents(d)


def test_bad_name_and_not_a_cache(tmp_path):
    d = tmp_path / "h"
    _shard(d, "0_9.safetensors", **_ok())
    _shard(d, "extra.safetensors", **_ok())
    _cfg(d)
    with pytest.raises(InvalidArgumentError, match=r"extra\.safetensors.*\{start\}_\{end\}"):
        DelphiLatents(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match="not a delphi latent cache"):
        DelphiLatents(tmp_path / "empty")


def test_several_hookpoints(tmp_path, gates):
    write_delphi_cache(tmp_path / "latents", "a", gates, N_SEQ, CTX)
    write_delphi_cache(tmp_path / "latents", "b", gates, N_SEQ, CTX)
    with pytest.raises(InvalidArgumentError, match=r"several hookpoints \['a', 'b'\]"):
        DelphiLatents(tmp_path / "latents")
    with pytest.raises(InvalidArgumentError, match=r"no such hookpoint.*\['a', 'b'\]"):
        DelphiLatents(tmp_path / "latents", hookpoint="c")
    assert DelphiLatents(tmp_path / "latents", hookpoint="b").hookpoint == "b"


@pytest.mark.parametrize("drop", ["locations", "activations"])
def test_missing_tensor(tmp_path, drop):
    d = tmp_path / "h"
    t = _ok()
    del t[drop]
    _shard(d, "0_9.safetensors", **t)
    _cfg(d)
    with pytest.raises(InvalidArgumentError, match=rf"0_9\.safetensors: tensor '{drop}' is missing"):
        DelphiLatents(d)


def test_wrong_dtypes_and_shapes(tmp_path):
    d = tmp_path / "h"
    _cfg(d if os.makedirs(d) is None else d)
    cases = [
        ({"locations": np.zeros((2, 3), np.float32), "activations": np.ones(2, np.float16)},
         InvalidDtypeError, "'locations' has dtype F32"),
        ({"locations": np.zeros((2, 2), np.uint16), "activations": np.ones(2, np.float16)},
         ShapeMismatchError, r"'locations' has shape \[2, 2\]"),
        ({"locations": np.zeros((2, 3), np.uint16), "activations": np.ones(2, np.int32)},
         InvalidDtypeError, "'activations' has dtype I32"),
        ({"locations": np.zeros((2, 3), np.uint16), "activations": np.ones(3, np.float16)},
         ShapeMismatchError, r"'activations' has shape \[3\] but 'locations' has 2 rows"),
    ]
    for tensors, exc, msg in cases:
        _shard(d, "0_9.safetensors", **tensors)
        with pytest.raises(exc, match=msg):
            DelphiLatents(d)


def test_unknown_context_length(tmp_path):
    d = tmp_path / "h"
    _shard(d, "0_9.safetensors", **_ok())
    with pytest.raises(InvalidArgumentError, match="context length is unknown"):
        DelphiLatents(d)


@pytest.mark.parametrize("col, value, what", [(0, N_SEQ, "sequence"), (1, CTX, "position"),
                                               (2, 10, "latent offset")])
def test_location_outside(tmp_path, col, value, what):
    d = tmp_path / "h"
    t = _ok()
    t["locations"][1, col] = value
    _shard(d, "0_9.safetensors", **t)
    _cfg(d)
    cache = DelphiLatents(d, index_dir=str(tmp_path / "i"))
    with pytest.raises(GateDataError, match=rf"0_9\.safetensors: entry 1 has {what} {value}, outside"):
        cache.read_csr(0, 1)


@pytest.mark.parametrize("value, msg", [(-1.0, r"negative \(-1\.0\) at token row 7, latent 3"),
                                        (np.inf, "activation 1 is inf at token row 7"),
                                        (np.nan, "activation 1 is nan at token row 7")])
def test_bad_activation_values(tmp_path, value, msg):
    d = tmp_path / "h"
    t = _ok()
    t["activations"][1] = value
    _shard(d, "0_9.safetensors", **t)
    _cfg(d)
    with pytest.raises(GateDataError, match=msg):
        DelphiLatents(d, index_dir=str(tmp_path / "i")).read_csr(0, N_SEQ)


def test_duplicate_entry(tmp_path):
    d = tmp_path / "h"
    t = _ok()
    t["locations"][3] = t["locations"][1]
    _shard(d, "0_9.safetensors", **t)
    _cfg(d)
    with pytest.raises(GateDataError, match=r"token row 7 \(sequence 1, position 2\) has latent 3 twice"):
        DelphiLatents(d, index_dir=str(tmp_path / "i")).read_csr(0, N_SEQ)


def test_bad_sequence_range(tmp_path, gates):
    write_delphi_cache(tmp_path / "l", "h", gates, N_SEQ, CTX)
    with pytest.raises(InvalidArgumentError, match=r"sequence range 2\.\.9 is outside 0\.\.6"):
        DelphiLatents(tmp_path / "l", index_dir=str(tmp_path / "i")).read_csr(2, 9)
