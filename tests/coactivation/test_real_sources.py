"""Statistics from CSR gates, delphi latent caches and SAE-encoded activations, and firing
thresholds, against numpy and against each other (bit for bit where the same rows meet the same
kernels)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import distpen as dp
from distpen.errors import GateDataError, InvalidArgumentError, ShapeMismatchError, StoreConflictError
from distpen.sources import encode as enc_mod

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sources"))
from _sae_fixtures import dense_gates, encode_as_workers, random_sae_weights, write_delphi_cache, write_saelens  # noqa: E402
from test_coactivation_stats import full, reference, to_topk, topk_gates  # noqa: E402

STATS = ("pair_sum", "pair_count")
VECTORS = ("fire_count", "gate_sum", "gate_sq_sum")


def assert_same_bits(a, b):
    for name in STATS:
        assert np.array_equal(full(a, name), full(b, name)), name
    for name in VECTORS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def assert_matches(st, G):
    ref = reference(G)
    np.testing.assert_allclose(full(st, "pair_sum"), ref["pair_sum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(full(st, "pair_count"), ref["pair_count"])
    np.testing.assert_array_equal(st.fire_count, ref["fire_count"])
    np.testing.assert_allclose(st.gate_sum, ref["gate_sum"], rtol=1e-12)
    np.testing.assert_allclose(st.gate_sq_sum, ref["gate_sq_sum"], rtol=1e-12)
    assert st.n_tokens == G.shape[0]


def shuffled_csr(G, seed=0):
    """CSR arrays of G with each row's entries in random order (and a stored zero)."""
    rng = np.random.default_rng(seed)
    m = sp.csr_matrix(G)
    ind, val = m.indices.copy(), m.data.copy()
    for r in range(G.shape[0]):
        a, b = m.indptr[r], m.indptr[r + 1]
        p = rng.permutation(b - a) + a
        ind[a:b], val[a:b] = ind[p], val[p]
    return m.indptr.copy(), ind, val


# --------------------------------------------------------------------------- CSR gates
@pytest.mark.parametrize("args", [dict(row_chunk=100, tile=10, split_every=100),   # streaming, 4 groups
                                  dict(row_chunk=64, tile=30, split_every=2)])     # tree, one group
def test_sparse_gates_equal_topk_and_dense_bit_for_bit(client, tmp_path, args):
    G = topk_gates(n=600, K=60, k=4, seed=21).astype(np.float32)
    idx, val = to_topk(G, 4)
    ip, ind, v = shuffled_csr(G)
    sg = dp.coactivation_stats(dp.SparseGates(ip, ind, v, 60), tmp_path / "s", **args)
    tk = dp.coactivation_stats(dp.TopKGates(idx, val, 60), tmp_path / "k", **args)
    sc = dp.coactivation_stats(sp.csr_array(G), tmp_path / "sc", **args)       # scipy.sparse accepted
    assert_same_bits(sg, tk)
    assert_same_bits(sg, sc)
    assert_matches(sg, G)
    if args["split_every"] == 100:  # sparse dense gates take the scatter route on this plan
        assert_same_bits(sg, dp.coactivation_stats(G, tmp_path / "d", **args))


def test_sparse_gates_in_zarr(client, tmp_path):
    import zarr

    G = topk_gates(n=300, K=29, k=6, seed=3)
    m = sp.csr_matrix(G)
    grp = zarr.open_group(str(tmp_path / "csr"), mode="w")
    zs = {}
    for name, a in (("indptr", m.indptr.astype(np.int64)), ("indices", m.indices), ("values", m.data)):
        zs[name] = grp.create_array(name, shape=a.shape, chunks=(97,), dtype=a.dtype)
        zs[name][:] = a
    st = dp.coactivation_stats(dp.SparseGates(zs["indptr"], zs["indices"], zs["values"], 29),
                               tmp_path / "st", row_chunk=50, tile=8)
    assert_matches(st, G)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: dp.SparseGates([0, 2, 1], [0], [1.0], 3), InvalidArgumentError, "indptr decreases at row 1"),
    (lambda: dp.SparseGates([1, 2], [0], [1.0], 3), InvalidArgumentError, "indptr starts at 1"),
    (lambda: dp.SparseGates([0, 2], [0, 1], [1.0], 3), ShapeMismatchError, "indices have 2 entries but values have 1"),
    (lambda: dp.SparseGates([0, 3], [0, 1], [1.0, 1.0], 3), ShapeMismatchError, "indptr ends at 3"),
    (lambda: dp.SparseGates([0, 1], [5], [1.0], 3), InvalidArgumentError, r"indices hold 5, outside \[0, 3\)"),
    (lambda: dp.SparseGates([0, 1], [0.5], [1.0], 3), dp.errors.InvalidDtypeError, "CSR indices have dtype"),
    (lambda: dp.SparseGates([0, 1], [0], np.array([1], np.int8), 3), dp.errors.InvalidDtypeError, "CSR values"),
    (lambda: dp.SparseGates([0, 1], [0], [1.0], 0), InvalidArgumentError, "k_atoms"),
])
def test_sparse_gates_refuse_bad_arrays(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("values, indices, match", [
    ([1.0, -2.0, 1.0], [0, 1, 2], r"CSR gate at row 1, atom 1 is negative .*row chunk \[0, 3\)"),
    ([1.0, np.nan, 1.0], [0, 1, 2], "is NaN"),
    ([1.0, 2.0, 1.0], [0, 1, 1], "atom 1 is repeated within the row"),
])
def test_bad_csr_data_found_per_chunk(client, tmp_path, values, indices, match):
    g = dp.SparseGates([0, 1, 3, 3], indices, values, 4)
    with pytest.raises(GateDataError, match=match):
        dp.coactivation_stats(g, tmp_path / "st", row_chunk=3, tile=4)


# --------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("form", ["dense", "topk", "sparse"])
def test_every_threshold_form_matches_numpy(client, tmp_path, form):
    G = topk_gates(n=400, K=30, k=5, seed=7)
    idx, val = to_topk(G, 5)
    gates = {"dense": G, "topk": dp.TopKGates(idx, val, 30), "sparse": dp.SparseGates(sp.csr_matrix(G))}[form]
    per_atom = np.linspace(0.0, 1.5, 30)
    for i, thr in enumerate([0.4, per_atom, dp.RelativeThreshold(0.3), {"relative": 0.5}]):
        H = G.copy()
        rho = thr.rho if isinstance(thr, dp.RelativeThreshold) else (thr["relative"] if isinstance(thr, dict) else None)
        cut = rho * H.max(axis=1, keepdims=True) if rho is not None else np.broadcast_to(thr, (30,))[None, :]
        H[H <= cut] = 0
        assert 0 < np.count_nonzero(H) < np.count_nonzero(G)
        st = dp.coactivation_stats(gates, tmp_path / f"st{i}", row_chunk=90, tile=8, split_every=2,
                                   fire_threshold=thr)
        assert_matches(st, H)
        assert st.attrs["fire_threshold"]["kind"] in ("scalar", "per_atom", "relative")


def test_resume_refuses_a_different_threshold(client, tmp_path):
    G = topk_gates(n=200, K=20, k=4, seed=2)
    dp.coactivation_stats(G, tmp_path / "st", row_chunk=50, tile=10, fire_threshold=0.5)
    again = dp.coactivation_stats(G, tmp_path / "st", fire_threshold=0.5)     # the same job: resumes
    assert again._job.progress()["units_skipped"] == 3
    with pytest.raises(StoreConflictError, match="fire_threshold"):
        dp.coactivation_stats(G, tmp_path / "st", fire_threshold=0.7)
    with pytest.raises(StoreConflictError, match="fire_threshold"):
        dp.coactivation_stats(G, tmp_path / "st")


@pytest.mark.parametrize("thr, match", [
    (-1.0, "fire_threshold must be ≥ 0"),
    (np.ones(3), r"shape \(3,\); expected one threshold per atom, \(20,\)"),
    (dict(relative=1.5), "0 ≤ rho < 1"),
    (dict(absolute=1.0), "must be {'relative': rho}"),
])
def test_bad_thresholds_refused_before_work(tmp_path, thr, match):
    with pytest.raises(InvalidArgumentError, match=match):
        dp.coactivation_stats(np.zeros((5, 20)), tmp_path / "st", fire_threshold=thr)
    assert not os.path.exists(tmp_path / "st")


# --------------------------------------------------------------------------- delphi caches
N_SEQ, CTX, WIDTH = 14, 16, 40


@pytest.fixture(scope="module")
def cache_gates():
    return dense_gates(N_SEQ, CTX, WIDTH, density=0.06, seed=5, silent_tokens=(0, 1, 37, 100))


@pytest.mark.parametrize("args", [dict(row_chunk=32, tile=10, split_every=100),   # streaming, several groups
                                  dict(row_chunk=48, tile=40, split_every=2)])    # tree
def test_delphi_cache_equals_sparse_and_dense(client, tmp_path, cache_gates, args):
    G = cache_gates
    d = write_delphi_cache(str(tmp_path / "latents"), "layers.3", G, N_SEQ, CTX, n_splits=3, shuffle=True)
    g = dp.open_gates(d)
    assert isinstance(g, dp.DelphiGates) and g.n_tokens == N_SEQ * CTX and g.k_atoms == WIDTH
    st = dp.coactivation_stats(d, tmp_path / "c", **args)
    assert_matches(st, G)
    assert_same_bits(st, dp.coactivation_stats(sp.csr_matrix(G), tmp_path / "s", **args))
    if args["split_every"] == 100:
        assert_same_bits(st, dp.coactivation_stats(G, tmp_path / "d", **args))
        # the atom-major plan over the same cache: indexed once, copied once, the same bits
        assert_same_bits(st, dp.coactivation_stats(d, tmp_path / "a", decomposition="atoms", _side=2, **args))
        assert not os.path.exists(tmp_path / "a" / "_distpen" / "coactivation" / "scratch")
    assert not os.path.exists(tmp_path / "c" / "_distpen" / "coactivation" / "scratch")  # cleaned up
    # a delphi cache with a threshold
    thr = dp.coactivation_stats(d, tmp_path / "t", fire_threshold=dp.RelativeThreshold(0.4), **args)
    H = G.copy()
    H[H <= 0.4 * H.max(axis=1, keepdims=True)] = 0
    assert_matches(thr, H)


def test_delphi_default_row_chunk_is_whole_sequences_and_bad_ones_refused(client, tmp_path, cache_gates):
    d = write_delphi_cache(str(tmp_path / "latents"), "h", cache_gates, N_SEQ, CTX, force_uint32=True)
    st = dp.coactivation_stats(d, tmp_path / "c")
    assert st.attrs["row_chunk"] % CTX == 0
    assert_matches(st, cache_gates)
    with pytest.raises(InvalidArgumentError, match="row_chunk = 20 is not a whole number of sequences.*multiple of 16"):
        dp.coactivation_stats(d, tmp_path / "c2", row_chunk=20)


def test_delphi_bad_caches_surface_from_coactivation_stats(client, tmp_path, cache_gates):
    from safetensors.numpy import load_file, save_file

    G = cache_gates.copy()
    G[40, 3] = -1.5
    d = write_delphi_cache(str(tmp_path / "neg"), "h", G, N_SEQ, CTX)
    with pytest.raises(GateDataError, match=r"0_12\.safetensors: activation .* is negative .*token row 40, latent 3"):
        dp.coactivation_stats(d, tmp_path / "st")
    assert dp.RunStore(tmp_path / "st").job("coactivation").status == "failed"
    assert not dp.RunStore(tmp_path / "st").job("coactivation").done()

    d = write_delphi_cache(str(tmp_path / "noact"), "h", cache_gates, N_SEQ, CTX)
    shard = os.path.join(d, "13_25.safetensors")
    t = load_file(shard)
    del t["activations"]
    save_file(t, shard)
    with pytest.raises(InvalidArgumentError, match=r"13_25\.safetensors: tensor 'activations' is missing"):
        dp.coactivation_stats(d, tmp_path / "st2")
    assert not os.path.exists(tmp_path / "st2")

    d = write_delphi_cache(str(tmp_path / "overlap"), "h", cache_gates, N_SEQ, CTX)
    shutil.copy(os.path.join(d, "0_12.safetensors"), os.path.join(d, "10_12.safetensors"))
    with pytest.raises(InvalidArgumentError, match=r"10_12\.safetensors: latent range 10\.\.12 overlaps"):
        dp.coactivation_stats(d, tmp_path / "st3")
    assert not os.path.exists(tmp_path / "st3")


# --------------------------------------------------------------------------- SAE-encoded activations
def _encodes(client):
    return sum(client.run(lambda: enc_mod._ENCODES[0]).values())


def _reset_encodes(client):
    def reset():
        enc_mod._ENCODES[0] = 0
    client.run(reset)


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_encoded_gates_equal_encode_gates_then_stats(client, tmp_path, activation):
    W, b, _, bd, thr = random_sae_weights(12, 48, seed=3)
    sae = dp.SAE(W, b, b_dec=bd, activation=activation, k=5 if activation == "topk" else None,
                 threshold=thr if activation == "jumprelu" else None)
    acts = np.random.default_rng(4).standard_normal((700, 12)).astype(np.float32)
    args = dict(row_chunk=100, tile=8, split_every=100)            # 21 tiles: several passes
    _reset_encodes(client)
    direct = dp.coactivation_stats(dp.EncodedGates(acts, sae), tmp_path / "direct", **args)
    assert _encodes(client) == 7                                    # each row chunk encoded once
    assert direct._job.progress()["n_groups"] > 1
    stored = dp.encode_gates(acts, sae, tmp_path / "gates", row_chunk=100)
    assert stored.form == ("topk" if activation == "topk" else "sparse")
    via_store = dp.coactivation_stats(str(tmp_path / "gates"), tmp_path / "via", **args)
    assert_same_bits(direct, via_store)
    assert_matches(direct, encode_as_workers(sae.encode, acts, 100).astype(np.float64))
    # the atom-major plan encodes each chunk once too (in its copy task, nothing spilled) and
    # gives the same bits
    _reset_encodes(client)
    atoms = dp.coactivation_stats(dp.EncodedGates(acts, sae), tmp_path / "atoms", decomposition="atoms", _side=2,
                                  **args)
    assert _encodes(client) == 7 and atoms._job.progress()["n_groups"] > 1
    assert_same_bits(direct, atoms)
    # one pass (one group): encoded on the fly, once per chunk
    _reset_encodes(client)
    one = dp.coactivation_stats(dp.EncodedGates(acts, sae), tmp_path / "one", row_chunk=100, tile=48)
    assert _encodes(client) == 7
    assert_matches(one, encode_as_workers(sae.encode, acts, 100).astype(np.float64))
    if activation == "jumprelu":  # the SAE's own thresholds change nothing: its gates already exceed them
        same = dp.coactivation_stats(dp.EncodedGates(acts, sae), tmp_path / "thr", fire_threshold=sae.threshold, **args)
        assert_same_bits(same, direct)


def test_encoded_gates_refuse_mismatched_d_in_and_unknown_architecture(tmp_path):
    W, b, Wd, bd, _ = random_sae_weights(8, 16)
    sae = dp.SAE(W, b, activation="relu")
    with pytest.raises(ShapeMismatchError, match=r"activations have d_in = 9 .* the SAE has d_in = 8"):
        dp.EncodedGates(np.zeros((10, 9), np.float32), sae)
    with pytest.raises(ShapeMismatchError, match=r"d_in = 9 .* d_in = 8"):
        dp.encode_gates(np.zeros((10, 9), np.float32), sae, tmp_path / "g")
    assert not os.path.exists(tmp_path / "g")
    folder = write_saelens(str(tmp_path / "sae"), W, b, Wd, bd, architecture="gated")
    with pytest.raises(InvalidArgumentError, match="architecture 'gated' is not supported"):
        dp.coactivation_stats(dp.EncodedGates(np.zeros((10, 8), np.float32), folder), tmp_path / "st")
