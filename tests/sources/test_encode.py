"""encode_gates: the stores it writes, resume after a killed job, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _sae_fixtures import encode_as_workers, random_sae_weights, write_gam_bf16_harvest
from safetensors.numpy import save_file

import distpen as dp
from distpen.errors import GateDataError, StoreConflictError
from distpen.sources import encode as enc_mod
from distpen.store import RunStore


def _encodes(client):
    return sum(client.run(lambda: enc_mod._ENCODES[0]).values())


def _reset(client):
    def reset():
        enc_mod._ENCODES[0] = 0
    client.run(reset)


def _sae(activation, d_in=10, d_sae=40):
    W, b, _, bd, thr = random_sae_weights(d_in, d_sae, seed=1)
    return dp.SAE(W, b, b_dec=bd, activation=activation, k=4 if activation == "topk" else None,
                  threshold=thr if activation == "jumprelu" else None)


def _bank(tmp_path, n=530, d_in=10, files=2):
    acts = np.random.default_rng(2).standard_normal((n, d_in)).astype(np.float32)
    cuts = np.linspace(0, n, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        save_file({"activations": acts[a:b]}, str(tmp_path / f"bank_{i:02d}.safetensors"))
    return acts, str(tmp_path / "bank_*.safetensors")


def test_topk_store_has_synth_gates_layout(client, tmp_path):
    import zarr

    acts, glob = _bank(tmp_path)
    sae = _sae("topk")
    g = dp.encode_gates(glob, sae, tmp_path / "g", row_chunk=100)
    assert isinstance(g, dp.TopKGates)
    grp = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert grp.attrs["format"] == "distpen.gates" and grp.attrs["form"] == "topk"
    assert grp.attrs["complete"] is True and grp.attrs["index_range"] == [-1, 39]
    assert grp["indices"].dtype == np.int32 and grp["indices"].chunks == (100, 4)
    assert grp["values"].dtype == np.float32 and grp["indices"].fill_value == -1
    idx, val = encode_as_workers(sae.encode_topk, acts, 100)
    np.testing.assert_array_equal(grp["indices"][:], idx)
    np.testing.assert_array_equal(grp["values"][:], val)


def test_encode_from_seed_engine_bf16_harvest(client, tmp_path):
    """A bf16 harvest (manifest.json + shard_*.bf16) is encoded on the workers like any bank: the
    same gates as encoding its rows, widened, in memory."""
    acts = np.random.default_rng(3).standard_normal((300, 10)).astype(np.float32)
    write_gam_bf16_harvest(tmp_path / "h", acts, rows_per_shard=128, meta={"model_name": "m"})
    ref = dp.open_activations(tmp_path / "h").read(0, 300)
    assert np.abs(ref - acts).max() <= 2.0 ** -8 * np.abs(acts).max()      # bf16: 8 significant bits
    sae = _sae("topk")
    g = dp.encode_gates(str(tmp_path / "h"), sae, tmp_path / "g", row_chunk=100)
    idx, val = encode_as_workers(sae.encode_topk, ref, 100)
    np.testing.assert_array_equal(g.indices[:], idx)
    np.testing.assert_array_equal(g.values[:], val)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_csr_store_round_trips(client, tmp_path, activation):
    acts, glob = _bank(tmp_path)
    sae = _sae(activation)
    g = dp.encode_gates(glob, sae, tmp_path / "g", row_chunk=128)
    assert g.form == "sparse" and g.n_tokens == 530 and g.k_atoms == 40
    again = dp.open_gates(tmp_path / "g")
    ip, ind, val = again.csr_rows(90, 400)              # across stored chunks
    dense = np.zeros((310, 40), np.float32)
    dense[np.repeat(np.arange(310), np.diff(ip)), ind] = val
    np.testing.assert_array_equal(dense, encode_as_workers(sae.encode, acts, 128)[90:400])
    assert again.nnz == int(np.count_nonzero(encode_as_workers(sae.encode, acts, 128)))


def test_killed_encode_job_resumes_only_missing_chunks(client, tmp_path):
    acts, glob = _bank(tmp_path)
    sae = _sae("relu")
    _reset(client)
    dp.encode_gates(glob, sae, tmp_path / "g", row_chunk=100, _units=[0, 3])   # "killed" after 2 chunks
    assert _encodes(client) == 2
    job = RunStore(tmp_path / "g").job("encode")
    assert job.status == "incomplete" and job.done() == {"c0", "c3"}
    seen = []
    _reset(client)
    g = dp.encode_gates(glob, sae, tmp_path / "g", progress=seen.append)      # row_chunk from the store
    assert _encodes(client) == 4                                               # 6 chunks, 2 were done
    assert seen[-1]["units_done"] == 6 and seen[-1]["units_skipped"] == 2
    ip, ind, val = g.csr_rows(0, 530)
    dense = np.zeros((530, 40), np.float32)
    dense[np.repeat(np.arange(530), np.diff(ip)), ind] = val
    np.testing.assert_array_equal(dense, encode_as_workers(sae.encode, acts, 100))
    # a different encoder into the same store is refused
    with pytest.raises(StoreConflictError, match="different encode job"):
        dp.encode_gates(glob, _sae("topk"), tmp_path / "g")


def test_non_finite_activations_named_and_nothing_half_written(client, tmp_path):
    acts = np.random.default_rng(0).standard_normal((300, 10)).astype(np.float32)
    acts[250, 3] = np.inf
    save_file({"activations": acts}, str(tmp_path / "a.safetensors"))
    with pytest.raises(GateDataError, match=r"a\.safetensors: activation row 250 .* is not finite"):
        dp.encode_gates(str(tmp_path / "a.safetensors"), _sae("relu"), tmp_path / "g", row_chunk=100)
    job = RunStore(tmp_path / "g").job("encode")
    assert job.status == "failed" and "c2" not in job.done()
    assert not os.path.exists(tmp_path / "g" / "chunks" / "2")
    acts[250, 3] = 0.5                                            # fixed: the same job resumes
    save_file({"activations": acts}, str(tmp_path / "a.safetensors"))
    with pytest.raises(StoreConflictError):  # the file changed (size/mtime are its identity) ...
        dp.encode_gates(str(tmp_path / "a.safetensors"), _sae("relu"), tmp_path / "g")
    g = dp.encode_gates(str(tmp_path / "a.safetensors"), _sae("relu"), tmp_path / "g", overwrite=True)
    assert g.n_tokens == 300                                      # ... so it is replaced
    assert not [f for f in os.listdir(tmp_path / "g" / "chunks") if f.startswith(".tmp")]


def test_existing_directory_refused(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x").write_text("x")
    with pytest.raises(StoreConflictError, match="not a distpen encoded-gates store"):
        dp.encode_gates(np.zeros((4, 10), np.float32), _sae("relu"), tmp_path / "g")
