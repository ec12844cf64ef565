"""dp.collinearity_gate on the cluster: equal to the in-memory kernel and to a p×p-Gram reference,
whatever the chunking and wherever t lives; outputs for plotting; errors before any work."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import distpen as dp
from distpen.errors import InvalidArgumentError, ShapeMismatchError
from distpen.penalties.collinearity import collinearity_gate_local


def problem(seed=0, K=40, p=6, n_pairs=300):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, size=K)
    lay = dp.DecoderLayout(sizes, p)
    beta = rng.standard_normal(lay.n_coef)
    # a few blocks share directions with their neighbour, so some overlaps exceed `low`
    for a in range(0, K - 1, 5):
        beta[lay.offsets[a + 1]:lay.offsets[a + 1] + p] = beta[lay.offsets[a]:lay.offsets[a] + p] * 2.0
    beta[lay.offsets[7]:lay.offsets[8]] = 0.0  # a zero block: overlap 0 with everyone
    j = np.concatenate([rng.integers(0, K, size=n_pairs), np.arange(0, K - 1, 5)])  # random + planted
    k = np.concatenate([rng.integers(0, K, size=n_pairs), np.arange(1, K, 5)])
    keep = j < k
    code = np.unique(j[keep] * K + k[keep])
    pairs = dp.PairTable(code // K, code % K, rng.uniform(0.5, 2.0, size=code.shape[0]), K)
    return sizes, p, beta, pairs


def gram_reference(pairs, beta, sizes, p, low):
    lay = dp.DecoderLayout(sizes, p)
    G = [beta[lay.offsets[a]:lay.offsets[a + 1]].reshape(-1, p) for a in range(lay.k_atoms)]
    G = [b.T @ b for b in G]
    o = np.array([0.0 if not (np.linalg.norm(G[a]) and np.linalg.norm(G[b])) else
                  np.sum(G[a] * G[b]) / (np.linalg.norm(G[a]) * np.linalg.norm(G[b])) for a, b in zip(pairs.j, pairs.k)])
    u = np.clip((o - low) / (1 - low), 0, 1)
    return o, u * u * (3 - 2 * u)


@pytest.mark.parametrize("chunk_pairs", [7, 64, None])
def test_gate_equals_in_memory_kernel_and_gram_reference(client, chunk_pairs):
    sizes, p, beta, pairs = problem()
    kept, o = dp.collinearity_gate(pairs, beta, sizes, p, low=0.3, chunk_pairs=chunk_pairs, return_overlap=True)
    ref_kept, ref_o = collinearity_gate_local(pairs, beta, sizes, p, low=0.3)
    np.testing.assert_array_equal(o, ref_o)
    for name in ("j", "k", "w"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(ref_kept, name))
    go, gg = gram_reference(pairs, beta, sizes, p, 0.3)
    np.testing.assert_allclose(o, go, rtol=1e-12, atol=1e-15)
    assert 0 < len(kept) < len(pairs) and (o >= 0).all() and (o <= 1).all()
    np.testing.assert_allclose(kept.w, (pairs.w * gg)[gg > 0], rtol=1e-12)
    zero = (pairs.j == 7) | (pairs.k == 7)
    assert zero.any() and (o[zero] == 0).all()


def test_gate_reads_a_zarr_decoder_and_writes_what_it_kept(client, tmp_path):
    sizes, p, beta, pairs = problem(seed=1)
    z = zarr.create_array(str(tmp_path / "beta.zarr"), shape=beta.shape, chunks=(97,), dtype="f8")
    z[:] = beta
    kept, o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, out=tmp_path / "gated", return_overlap=True)
    ref_kept, ref_o = dp.collinearity_gate(pairs, beta, sizes, p, return_overlap=True)
    np.testing.assert_array_equal(o, ref_o)
    back = dp.PairTable.open(tmp_path / "gated")
    np.testing.assert_array_equal(back.w, ref_kept.w)
    np.testing.assert_array_equal(kept.j, back.j)
    g = zarr.open_group(str(tmp_path / "gated"), mode="r")
    np.testing.assert_array_equal(g["overlap"][:], o)
    np.testing.assert_array_equal(g["candidate_j"][:], pairs.j)
    np.testing.assert_array_equal(g["candidate_k"][:], pairs.k)


def test_gate_of_no_pairs_and_of_gated_penalty(client):
    sizes, p, beta, pairs = problem(seed=2)
    empty = dp.PairTable([], [], [], pairs.k_atoms)
    assert len(dp.collinearity_gate(empty, beta, sizes, p)) == 0
    kept = dp.collinearity_gate(pairs, beta, sizes, p, low=0.0)
    pen = dp.DecoderIncoherencePenalty.from_pairs(kept, sizes, p, 1.0, normalize="frobenius")
    assert np.isfinite(pen.value(beta, np.zeros(0)))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"low": 1.0}, InvalidArgumentError, r"low must lie in \[0, 1\), got 1.0"),
    ({"chunk_pairs": 0}, InvalidArgumentError, "chunk_pairs"),
    ({"t": "short"}, ShapeMismatchError, r"t has length 5, expected"),
    ({"t": "nan"}, InvalidArgumentError, r"t must be finite, but t\[3\] = nan"),
    ({"sizes": "other"}, ShapeMismatchError, r"pairs index k_atoms = 40 atoms but block_sizes describe 39"),
    ({"pairs": "list"}, InvalidArgumentError, "pairs must be a PairTable, got list"),
])
def test_gate_refuses_bad_input_before_work(client, kwargs, exc, match):
    sizes, p, beta, pairs = problem()
    t = {"short": beta[:5], "nan": np.where(np.arange(beta.size) == 3, np.nan, beta)}.get(kwargs.pop("t", None), beta)
    if kwargs.pop("sizes", None):
        sizes = sizes[:-1]
    if kwargs.pop("pairs", None):
        pairs = [(0, 1, 1.0)]
    with pytest.raises(exc, match=match):
        dp.collinearity_gate(pairs, t, sizes, p, **kwargs)
