"""Collinearity overlap and gate (docs/design.md) against a plain numpy reference with p × p Grams."""

from __future__ import annotations

import numpy as np
import pytest
from _reference import ref_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distpen as dp
from distpen.errors import InvalidArgumentError, ShapeMismatchError
from distpen.penalties.collinearity import collinearity_gate_local, pair_overlap, smoothstep_gate

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_overlap(t, sizes, p, pairs):
    """``⟨G_j, G_k⟩ / (‖G_j‖ ‖G_k‖)`` with the p × p Grams ``G = BᵀB``, pair by pair."""
    B = ref_blocks(t, sizes, p)
    out = []
    for j, k in zip(pairs.j.tolist(), pairs.k.tolist()):
        Gj, Gk = B[j].T @ B[j], B[k].T @ B[k]
        den = np.linalg.norm(Gj) * np.linalg.norm(Gk)
        out.append(float(np.sum(Gj * Gk)) / den if den > 0 else 0.0)
    return np.array(out)


def ref_gate(o, low):
    out = []
    for x in o:
        u = min(max((x - low) / (1 - low), 0.0), 1.0)
        out.append(u * u * (3 - 2 * u))
    return np.array(out)


@st.composite
def problems(draw):
    K = draw(st.integers(2, 8))
    p = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(1, 5), min_size=K, max_size=K))
    allp = [(a, b) for a in range(K) for b in range(a + 1, K)]
    chosen = draw(st.lists(st.sampled_from(allp), unique=True, min_size=1, max_size=len(allp)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    basis = rng.standard_normal((max(1, p // 2), p))
    blocks = []
    for m in sizes:
        r = rng.random()
        if r < 0.3:  # rows from a shared basis: high overlaps
            blocks.append(rng.standard_normal((m, basis.shape[0])) @ basis)
        elif r < 0.4:
            blocks.append(np.zeros((m, p)))
        else:
            blocks.append(rng.standard_normal((m, p)) * draw(st.sampled_from([1e-3, 1.0, 1e3])))
    t = np.concatenate([b.reshape(-1) for b in blocks])
    j = np.array([a for a, _ in chosen]); k = np.array([b for _, b in chosen])
    w = rng.uniform(0.1, 2.0, len(chosen))
    return dp.PairTable(j, k, w, K), t, sizes, p


@SETTINGS
@given(problems(), st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_overlap_and_gate_match_reference(pb, low):
    pairs, t, sizes, p = pb
    o = pair_overlap(pairs, t, dp.DecoderLayout(sizes, p))
    ref = ref_overlap(t, sizes, p, pairs)
    assert o.shape == (len(pairs),) and o.dtype == np.float64
    assert ((0.0 <= o) & (o <= 1.0)).all()
    np.testing.assert_allclose(o, ref, rtol=1e-12, atol=1e-14)
    kept, o2 = collinearity_gate_local(pairs, t, sizes, p, low=low)
    np.testing.assert_array_equal(o2, o)
    g = ref_gate(o, low)
    keep = g > 0
    np.testing.assert_array_equal(kept.j, pairs.j[keep])
    np.testing.assert_array_equal(kept.k, pairs.k[keep])
    np.testing.assert_allclose(kept.w, pairs.w[keep] * g[keep], rtol=1e-14)
    assert kept.k_atoms == pairs.k_atoms


def test_identical_scaled_orthogonal_and_zero_blocks():
    lay = dp.DecoderLayout([2, 2, 1, 2], 3)
    B0 = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    B3 = np.zeros((2, 3))
    t = np.concatenate([B0.ravel(), (-3.0 * B0).ravel(), [0.0, 0.0, 0.0], B3.ravel()])
    # atom 2 is zero too; identical up to scale → 1; with a zero Gram → 0
    pairs = dp.PairTable([0, 0, 1, 2], [1, 3, 2, 3], [1.0, 1.0, 1.0, 1.0], 4)
    o = pair_overlap(pairs, t, lay)
    assert o[0] == pytest.approx(1.0, rel=1e-14)
    assert o[1:].tolist() == [0.0, 0.0, 0.0]
    t2 = np.concatenate([[1.0, 0, 0, 0, 1.0, 0], [0, 0, 1.0, 0, 0, 0], [0, 0, 2.0], [0, 1.0, 0, 0, 0, 0]])
    o2 = pair_overlap(dp.PairTable([0, 1, 0], [1, 2, 3], [1.0, 1.0, 1.0], 4), t2, lay)
    # stored in (j, k) order: (0, 1) orthogonal, (0, 3) one shared direction of two, (1, 2) collinear
    assert o2[0] == 0.0 and o2[1] == pytest.approx(1 / np.sqrt(2), rel=1e-14) and o2[2] == pytest.approx(1.0)


def test_gate_formula_endpoints():
    g = smoothstep_gate([0.0, 0.5, 0.75, 1.0], low=0.5)
    np.testing.assert_allclose(g, [0.0, 0.0, 0.5, 1.0], rtol=1e-15)
    assert smoothstep_gate([0.25], low=0.0)[0] == pytest.approx(0.0625 * 2.5)


def test_empty_candidates():
    kept, o = collinearity_gate_local(dp.PairTable.empty(3), np.ones(3), [1, 1, 1], 1)
    assert len(kept) == 0 and o.shape == (0,)


def test_bad_inputs():
    pairs = dp.PairTable([0], [1], [1.0], 2)
    with pytest.raises(InvalidArgumentError, match=r"low must lie in \[0, 1\)"):
        collinearity_gate_local(pairs, np.ones(2), [1, 1], 1, low=1.0)
    with pytest.raises(ShapeMismatchError, match="k_atoms = 2"):
        collinearity_gate_local(pairs, np.ones(3), [1, 1, 1], 1)
    with pytest.raises(Exception, match="t"):
        collinearity_gate_local(pairs, np.ones(5), [1, 1], 1)


@pytest.mark.parametrize("p", [1, 5, 31, 33, 64, 70])
def test_gate_kernel_matches_pair_kernel_in_any_order(p):
    """The prefetching 4 × 4 kernel (blocks of 4, 8, 12 rows) and the 2 × 4 one (other sizes) give the
    pair kernel's ‖B_j B_kᵀ‖² to rounding, and the same bits whatever order the pairs come in."""
    from distpen._parallel import set_threads
    from distpen.penalties import _decoder_kernels as K
    from distpen.penalties.collinearity import overlap_of

    rng = np.random.default_rng(p)
    sizes = rng.choice([4, 4, 4, 8, 12, 1, 3, 5], size=60)
    lay = dp.DecoderLayout(sizes, p)
    t = rng.standard_normal(lay.n_coef)
    a, b = rng.integers(0, 60, size=(2, 900))
    code = np.unique(np.minimum(a, b)[a != b] * 60 + np.maximum(a, b)[a != b])
    pairs = dp.PairTable(code // 60, code % 60, np.ones(code.shape[0]), 60)
    off, m = lay.offsets, lay.block_sizes
    ref = K.pair_sqnorms(t, off, m, p, pairs.j, pairs.k)
    got = K.gate_sqnorms(t, off, m, p, pairs.j, pairs.k)
    np.testing.assert_allclose(got, ref, rtol=1e-13)
    assert ((m[pairs.j] % 4 == 0) & (m[pairs.k] % 4 == 0)).any() and (m[pairs.j] % 4 != 0).any()
    o = pair_overlap(pairs, t, lay)
    np.testing.assert_allclose(o, ref_overlap(t, sizes, p, pairs), rtol=1e-12, atol=1e-14)
    perm = rng.permutation(len(pairs))  # shuffled: visited grouped by j, returned in the given order
    previous = set_threads(2)
    try:
        shuffled = overlap_of(pairs.j[perm], pairs.k[perm], t, lay)
        set_threads(1)
        np.testing.assert_array_equal(overlap_of(pairs.j[perm], pairs.k[perm], t, lay), shuffled)
    finally:
        set_threads(previous)
    np.testing.assert_array_equal(shuffled, o[perm])


@pytest.mark.parametrize("band", [1, 3, 7, 64])
def test_order_by_band_sorts_pairs_by_band_of_j_then_k_stably(band):
    from distpen.penalties._decoder_kernels import order_by_band

    rng = np.random.default_rng(band)
    j, k = rng.integers(0, 40, size=(2, 500))
    order = order_by_band(j, k, 40, band)
    np.testing.assert_array_equal(order, np.lexsort((np.arange(500), k, j // band)))
