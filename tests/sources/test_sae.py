"""SAE encoders against a plain numpy forward pass; SAELens and sparsify checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from distpen.errors import GateDataError, InvalidArgumentError, ShapeMismatchError
from distpen.sources.sae import SAE, load_sae

from _sae_fixtures import random_sae_weights, write_saelens, write_sparsify

D_IN, D_SAE, N = 24, 700, 90


def ref_gates(x, W_enc, b_enc, b_dec, activation, k=None, threshold=None, apply_b_dec=True):
    """The tools' forward pass in plain numpy (float32)."""
    xc = x - b_dec if (apply_b_dec and b_dec is not None) else x
    pre = (xc.astype(np.float32) @ W_enc + b_enc).astype(np.float32)
    if activation == "relu":
        return np.maximum(pre, 0)
    if activation == "jumprelu":
        return np.maximum(pre, 0) * (pre > threshold)
    g = np.maximum(pre, 0)
    order = np.lexsort((np.broadcast_to(np.arange(g.shape[1]), g.shape), -g), axis=1)[:, :k]
    out = np.zeros_like(g)
    np.put_along_axis(out, order, np.take_along_axis(g, order, 1), 1)
    return out


@pytest.fixture
def weights():
    return random_sae_weights(D_IN, D_SAE, seed=1)


@pytest.fixture
def x():
    return np.random.default_rng(2).standard_normal((N, D_IN)).astype(np.float32)


def _dense_from_topk(idx, val, d):
    out = np.zeros((idx.shape[0], d), np.float32)
    for r in range(idx.shape[0]):
        m = idx[r] >= 0
        out[r, idx[r][m]] = val[r][m]
    return out


def _dense_from_csr(indptr, indices, values, d):
    return sp.csr_matrix((values, indices, indptr), shape=(indptr.size - 1, d)).toarray()


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_encode_matches_numpy(weights, x, activation):
    W_enc, b_enc, _, b_dec, thr = weights
    kw = {"k": 9} if activation == "topk" else {"threshold": thr} if activation == "jumprelu" else {}
    sae = SAE(W_enc, b_enc, b_dec=b_dec, activation=activation, **kw)
    ref = ref_gates(x, W_enc, b_enc, b_dec, activation, k=kw.get("k"), threshold=thr)
    np.testing.assert_allclose(sae.encode(x), ref, rtol=1e-5, atol=1e-5)
    dense = _dense_from_csr(*sae.encode_csr(x), D_SAE)
    np.testing.assert_array_equal(dense, sae.encode(x))
    assert (dense >= 0).all()
    if activation == "topk":
        idx, val = sae.encode_topk(x)
        assert idx.dtype == np.int32 and val.dtype == np.float32 and idx.shape == (N, 9)
        np.testing.assert_array_equal(_dense_from_topk(idx, val, D_SAE), sae.encode(x))
        assert np.all(np.diff(val, axis=1) <= 0)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_block_size_invariance(weights, x, activation):
    W_enc, b_enc, _, b_dec, thr = weights
    kw = {"k": 7} if activation == "topk" else {"threshold": thr} if activation == "jumprelu" else {}
    results = []
    for br, bl in [(None, None), (1, 1), (7, 50), (1000, 100000), (13, 513)]:
        sae = SAE(W_enc, b_enc, b_dec=b_dec, activation=activation, block_rows=br,
                  block_latents=bl, **kw)
        results.append((sae.encode(x), *sae.encode_csr(x),
                        *(sae.encode_topk(x) if activation == "topk" else sae.encode_topk(x, k=5))))
    for other in results[1:]:  # the same selections; gates equal up to BLAS rounding (it picks kernels by shape)
        for a, b in zip(results[0], other):
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(a, b)
    # and whatever row chunk the rows arrive in, up to BLAS rounding: BLAS may pick another kernel
    # for another number of rows (OpenBLAS 0.3.31's small-matrix sgemm on an AMD EPYC does)
    sae = SAE(W_enc, b_enc, b_dec=b_dec, activation=activation, **kw)
    parts = np.concatenate([sae.encode(x[a:b]) for a, b in [(0, 1), (1, 40), (40, N)]])
    np.testing.assert_allclose(parts, results[0][0], rtol=1e-5, atol=1e-5)


def test_topk_ties_lower_index_first():
    W = np.zeros((2, 6), np.float32)
    W[0] = [1, 2, 2, 1, 2, 0]
    sae = SAE(W, np.zeros(6), activation="topk", k=3)
    idx, val = sae.encode_topk([[1.0, 0.0]])
    assert idx.tolist() == [[1, 2, 4]] and val.tolist() == [[2.0, 2.0, 2.0]]
    idx, val = SAE(W, np.zeros(6), activation="topk", k=5).encode_topk([[1.0, 0.0]])
    assert idx.tolist() == [[1, 2, 4, 0, 3]]
    # fewer positive gates than k: empty slots are (-1, 0)
    idx, val = SAE(W, np.zeros(6), activation="topk", k=6).encode_topk([[1.0, 0.0], [-1.0, 0.0]])
    assert idx.tolist() == [[1, 2, 4, 0, 3, -1], [-1] * 6] and val[1].tolist() == [0.0] * 6


@pytest.mark.parametrize("k", [1, 3, 32, 130])
@pytest.mark.parametrize("use_thr", [False, True])
def test_topk_kernel_matches_a_sort_over_blocks(k, use_thr):
    """The top-k kernel (segment maxima, the lower bound τ on a row's first block, keys compared
    out of index order) against a plain sort of all the row's gates by (value desc, latent asc):
    ties made common by rounding, rows with fewer positive gates than k, padded blocks."""
    from distpen.sources._encode_kernels import decode_keys, topk_block

    rng = np.random.default_rng(k + 10 * use_thr)
    m, widths = 37, [(1000, 1000), (1024, 700), (300, 300), (4096, 4096)]
    keys = np.zeros((m, k), np.uint64)
    full = []
    l0 = 0
    for b, (L, real) in enumerate(widths):
        pre = rng.standard_normal((m + 3, L)).astype(np.float32)
        pre[: m // 3] = np.round(pre[: m // 3] * 2) / 2        # many exact ties
        pre[m // 3: m // 2] -= 3.5                               # few positive gates
        bias = np.round(rng.standard_normal(real) * 2) / 4
        bias = bias.astype(np.float32)
        thr = (np.abs(rng.standard_normal(real)) * 0.5).astype(np.float32) if use_thr else bias[:0]
        assert topk_block(pre, bias, thr, use_thr, l0, real, keys) == -1
        v = pre[:m, :real] + bias
        keep = (v > 0) & (v > thr) if use_thr else v > 0
        full.append(np.where(keep, v, np.float32(0)))
        l0 += real
    g = np.concatenate(full, axis=1)
    idx, val = decode_keys(keys)
    for r in range(m):
        pos = np.flatnonzero(g[r] > 0)
        order = pos[np.lexsort((pos, -g[r, pos]))][:k]
        want = np.full(k, -1)
        want[: order.size] = order
        assert idx[r].tolist() == want.tolist(), r
        assert val[r, : order.size].tolist() == g[r, order].tolist()


def test_apply_b_dec_false_and_pickle(weights, x):
    W_enc, b_enc, _, b_dec, _ = weights
    sae = SAE(W_enc, b_enc, b_dec=b_dec, apply_b_dec_to_input=False)
    ref = ref_gates(x, W_enc, b_enc, b_dec, "relu", apply_b_dec=False)
    np.testing.assert_allclose(sae.encode(x), ref, rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(sae))
    np.testing.assert_array_equal(clone.encode(x), sae.encode(x))
    from dask.base import tokenize

    assert tokenize(sae) == tokenize(clone)


def _misaligned(a, offset=2):
    raw = np.empty(a.nbytes + offset, np.uint8)
    out = raw[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert a.itemsize == 1 or not out.flags.aligned
    return out


def test_weights_aligned_from_misaligned_buffers(weights, x):
    """Weights from a file buffer or a Dask message can sit at any byte offset; the SAE keeps
    64-byte-aligned copies (numpy's matmul would otherwise copy each block before BLAS)."""
    W_enc, b_enc, _, b_dec, thr = weights
    sae = SAE(np.ascontiguousarray(W_enc.T).T, b_enc, b_dec=b_dec, activation="topk", k=5)
    odd = SAE(_misaligned(np.ascontiguousarray(W_enc.T)).T, _misaligned(b_enc), b_dec=_misaligned(b_dec),
              activation="topk", k=5)
    for s in (sae, odd):
        assert all(a.ctypes.data % 64 == 0 for a in (s._w, s._b_enc, s._b_dec))
    # out-of-band pickle buffers handed back at odd offsets, as a received message would be
    buffers = []
    data = pickle.dumps(sae, protocol=5, buffer_callback=buffers.append)
    views = [memoryview(_misaligned(np.frombuffer(b.raw(), np.uint8), 3)) for b in buffers]
    clone = pickle.loads(data, buffers=views)
    assert all(a.ctypes.data % 64 == 0 for a in (clone._w, clone._b_enc, clone._b_dec))
    for a, b in zip(sae.encode_topk(x) + sae.encode_csr(x), clone.encode_topk(x) + odd.encode_csr(x)):
        np.testing.assert_array_equal(a, b)


def test_constructor_errors(weights):
    W_enc, b_enc, _, b_dec, thr = weights
    with pytest.raises(ShapeMismatchError, match=r"b_enc has shape \(5,\), but W_enc \(24, 700\)"):
        SAE(W_enc, b_enc[:5])
    with pytest.raises(ShapeMismatchError, match=r"b_dec has shape \(3,\).*d_in = 24"):
        SAE(W_enc, b_enc, b_dec=b_dec[:3])
    with pytest.raises(ShapeMismatchError, match=r"W_enc must be 2-D"):
        SAE(W_enc[0], b_enc)
    with pytest.raises(InvalidArgumentError, match="activation must be one of"):
        SAE(W_enc, b_enc, activation="gelu")
    with pytest.raises(InvalidArgumentError, match="needs an integer k"):
        SAE(W_enc, b_enc, activation="topk")
    with pytest.raises(InvalidArgumentError, match=r"k must be in 1\.\.d_sae = 700"):
        SAE(W_enc, b_enc, activation="topk", k=701)
    with pytest.raises(InvalidArgumentError, match="only meaningful with activation='topk'"):
        SAE(W_enc, b_enc, k=3)
    with pytest.raises(InvalidArgumentError, match="needs threshold"):
        SAE(W_enc, b_enc, activation="jumprelu")
    with pytest.raises(ShapeMismatchError, match=r"threshold has shape \(2,\)"):
        SAE(W_enc, b_enc, activation="jumprelu", threshold=thr[:2])
    bad = W_enc.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"W_enc must be finite, but W_enc\[4, 3\]"):
        SAE(bad, b_enc)


def test_encode_errors(weights, x):
    W_enc, b_enc, *_ = weights
    sae = SAE(W_enc, b_enc)
    with pytest.raises(ShapeMismatchError, match=r"shape \(90, 23\), but this SAE has d_in = 24"):
        sae.encode(x[:, :23])
    bad = x.copy()
    bad[41, 2] = np.inf
    with pytest.raises(GateDataError, match="row 41, column 2 is inf"):
        sae.encode_csr(bad)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_pre_activation_overflow_named(weights, x, activation):
    """Finite activations whose pre-activation overflows: the first non-finite one is named."""
    W_enc, b_enc, _, b_dec, thr = weights
    kw = {"k": 7} if activation == "topk" else {"threshold": thr} if activation == "jumprelu" else {}
    big = x.copy()
    big[41] = 3e38 * np.sign(big[41])
    # in float64 nothing overflows: the latents whose float32 sum can overflow are the ones whose
    # exact pre-activation is near float32's largest value (which one BLAS meets first depends on
    # its summation order)
    pre = np.abs(big[41].astype(np.float64) @ W_enc.astype(np.float64) + b_enc)
    near = set(np.flatnonzero(pre > 1e38).tolist())
    first_exact = int(np.flatnonzero(pre > np.finfo(np.float32).max)[0])
    for bl in (None, 512):
        sae = SAE(W_enc, b_enc, activation=activation, block_latents=bl, apply_b_dec_to_input=False, **kw)
        for call in (sae.encode_csr, sae.encode_topk if activation == "topk" else lambda a: sae.encode_topk(a, k=3)):
            with pytest.raises(GateDataError, match=r"overflowed at row 41, latent \d+;") as err:
                call(big)
            latent = int(str(err.value).split("latent ")[1].split(";")[0])
            assert latent in near and latent <= first_exact


# ------------------------------------------------------------------ checkpoints
# pre-6.0 configs knew "standard" and topk via activation_fn_str (+ activation_fn_kwargs.k)
@pytest.mark.parametrize("architecture, old", [("standard", False), ("topk", False),
                                               ("jumprelu", False), ("standard", True),
                                               ("topk", True)])
def test_load_saelens(tmp_path, weights, x, architecture, old):
    W_enc, b_enc, W_dec, b_dec, thr = weights
    k = 11 if architecture == "topk" else None
    write_saelens(tmp_path / "sae", W_enc, b_enc, W_dec, b_dec, architecture=architecture, k=k,
                  threshold=thr if architecture == "jumprelu" else None, old=old)
    sae = load_sae(tmp_path / "sae")
    act = {"standard": "relu"}.get(architecture, architecture)
    assert (sae.activation, sae.k, sae.d_in, sae.d_sae) == (act, k, D_IN, D_SAE)
    assert sae.metadata["hook_name"] == "blocks.6.hook_resid_pre"
    assert sae.metadata["context_size"] == 128
    np.testing.assert_allclose(sae.encode(x), ref_gates(x, W_enc, b_enc, b_dec, act, k, thr),
                               rtol=1e-5, atol=1e-5)


def test_load_saelens_old_bool_normalize_and_apply_b_dec(tmp_path, weights, x):
    W_enc, b_enc, W_dec, b_dec, _ = weights
    write_saelens(tmp_path / "s", W_enc, b_enc, W_dec, b_dec, old=True,
                  normalize_activations=False, apply_b_dec_to_input=False)
    sae = load_sae(tmp_path / "s")
    assert not sae.apply_b_dec_to_input
    np.testing.assert_allclose(sae.encode(x), ref_gates(x, W_enc, b_enc, b_dec, "relu",
                                                        apply_b_dec=False), rtol=1e-5, atol=1e-5)
    write_saelens(tmp_path / "t", W_enc, b_enc, W_dec, b_dec, old=True, normalize_activations=True)
    with pytest.raises(InvalidArgumentError,
                       match=r"t/cfg\.json: normalize_activations='expected_average_only_in'"):
        load_sae(tmp_path / "t")


def test_load_saelens_bf16_and_f16_weights(tmp_path, weights, x):
    import ml_dtypes

    W_enc, b_enc, W_dec, b_dec, _ = weights
    Wb = W_enc.astype(ml_dtypes.bfloat16)
    write_saelens(tmp_path / "s", Wb, b_enc.astype(np.float16), W_dec, b_dec)
    sae = load_sae(tmp_path / "s")
    np.testing.assert_array_equal(sae.W_enc, Wb.astype(np.float32))  # widened exactly
    np.testing.assert_array_equal(sae.b_enc, b_enc.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("cfg_extra, msg", [
    ({"architecture": "gated"}, r"cfg\.json: architecture 'gated' is not supported"),
    ({"architecture": "transcoder"}, "architecture 'transcoder' is not supported"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is not supported"),
    ({"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True},
     "rescale_acts_by_decoder_norm=true is not supported"),
])
def test_saelens_refused_options(tmp_path, weights, cfg_extra, msg):
    W_enc, b_enc, W_dec, b_dec, _ = weights
    write_saelens(tmp_path / "s", W_enc, b_enc, W_dec, b_dec, **cfg_extra)
    with pytest.raises(InvalidArgumentError, match=msg):
        load_sae(tmp_path / "s")


def test_saelens_missing_and_misshapen_tensors(tmp_path, weights):
    W_enc, b_enc, W_dec, b_dec, _ = weights
    write_saelens(tmp_path / "s", W_enc, b_enc, W_dec, b_dec, architecture="jumprelu")
    with pytest.raises(InvalidArgumentError, match=r"tensor 'threshold' is missing; the file holds "
                                                   r"\['W_dec', 'W_enc', 'b_dec', 'b_enc'\]"):
        load_sae(tmp_path / "s")
    write_saelens(tmp_path / "t", W_enc, b_enc[:-1], W_dec, b_dec)
    with pytest.raises(ShapeMismatchError, match=r"tensor 'b_enc' has shape \[699\], expected \[700\]"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("transcode", [False, True])
def test_load_sparsify(tmp_path, weights, x, transcode):
    W_enc, b_enc, _, b_dec, _ = weights
    write_sparsify(tmp_path / "run" / "layers.6", W_enc, b_enc, b_dec, k=13, transcode=transcode,
                   skip_connection=False, multi_topk=True)
    for sae in (load_sae(tmp_path / "run" / "layers.6"), load_sae(tmp_path / "run"),
                load_sae(tmp_path / "run", hookpoint="layers.6")):
        assert (sae.activation, sae.k, sae.apply_b_dec_to_input) == ("topk", 13, not transcode)
        ref = ref_gates(x, W_enc, b_enc, b_dec, "topk", k=13, apply_b_dec=not transcode)
        np.testing.assert_allclose(sae.encode(x), ref, rtol=1e-5, atol=1e-5)


def test_sparsify_parent_with_several_hookpoints_and_refusals(tmp_path, weights):
    W_enc, b_enc, _, b_dec, _ = weights
    write_sparsify(tmp_path / "run" / "layers.6", W_enc, b_enc, b_dec, k=4)
    write_sparsify(tmp_path / "run" / "layers.7", W_enc, b_enc, b_dec, k=4)
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump({"sae": {}}, f)  # the trainer's config.json beside the hookpoints
    with pytest.raises(InvalidArgumentError,
                       match=r"several hookpoints \['layers\.6', 'layers\.7'\]; pass hookpoint"):
        load_sae(tmp_path / "run")
    assert load_sae(tmp_path / "run", hookpoint="layers.7").k == 4
    write_sparsify(tmp_path / "g", W_enc, b_enc, b_dec, k=4, activation="groupmax")
    with pytest.raises(InvalidArgumentError, match=r"g/cfg\.json: activation='groupmax' is not supported"):
        load_sae(tmp_path / "g")
    write_sparsify(tmp_path / "n", W_enc, b_enc, b_dec, k=4, num_latents=D_SAE + 1)
    with pytest.raises(ShapeMismatchError, match=r"'encoder\.weight' has shape \[700, 24\], expected \[701, 24\]"):
        load_sae(tmp_path / "n")
    os.makedirs(tmp_path / "nothing")
    with pytest.raises(InvalidArgumentError, match="not an SAE checkpoint"):
        load_sae(tmp_path / "nothing")
