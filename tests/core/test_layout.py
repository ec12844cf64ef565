"""distpen.layout: PenaltyTier, PsiSlice, DecoderLayout (the β layout of docs/design.md)."""

from __future__ import annotations

import numpy as np
import pytest
from _reference import random_block_sizes, ref_blocks, ref_offsets

import distpen as dp
from distpen.errors import InvalidArgumentError, ShapeMismatchError

# --------------------------------------------------------------------------- PenaltyTier


@pytest.mark.parametrize("value, tier", [("beta", dp.PenaltyTier.BETA), ("PSI", dp.PenaltyTier.PSI),
                                         ("Rho", dp.PenaltyTier.RHO), (dp.PenaltyTier.PSI, dp.PenaltyTier.PSI)])
def test_tier_parse(value, tier):
    assert dp.PenaltyTier.parse(value) is tier


def test_tier_parse_rejects_unknown():
    with pytest.raises(InvalidArgumentError, match="tier must be one of .*'gamma'"):
        dp.PenaltyTier.parse("gamma")


# --------------------------------------------------------------------------- PsiSlice


def test_psi_slice_properties_and_take():
    s = dp.PsiSlice(10, 22, latent_dim=4)
    assert (s.size, s.n_rows, s.latent_dim) == (12, 3, 4)
    psi = np.arange(30.0)
    view = s.take(psi)
    np.testing.assert_array_equal(view, np.arange(10.0, 22.0))
    assert np.shares_memory(view, psi)
    assert s.as_slice() == slice(10, 22)
    assert dp.PsiSlice(0, 5).n_rows == 1


def test_psi_slice_errors():
    with pytest.raises(InvalidArgumentError, match="PsiSlice.stop must be > start, got start=5, stop=5"):
        dp.PsiSlice(5, 5)
    with pytest.raises(InvalidArgumentError, match="PsiSlice.start must be ≥ 0, got -1"):
        dp.PsiSlice(-1, 5)
    with pytest.raises(ShapeMismatchError, match="size 10 is not a multiple of latent_dim 4"):
        dp.PsiSlice(0, 10, latent_dim=4)
    with pytest.raises(ShapeMismatchError, match="too short"):
        dp.PsiSlice(0, 10).take(np.zeros(9))


# --------------------------------------------------------------------------- DecoderLayout


@pytest.mark.parametrize("sizes, p_out", [([1, 2], 3), ([3, 1, 4, 1, 5], 2), ([1, 1], 1), ([8, 2, 2], 5)])
def test_layout_offsets_and_counts(sizes, p_out):
    lay = dp.DecoderLayout(sizes, p_out)
    offs = ref_offsets(sizes, p_out)
    assert lay.offsets.tolist() == offs
    assert lay.row_offsets.tolist() == [o // p_out for o in offs]
    assert lay.n_coef == offs[-1] == sum(sizes) * p_out
    assert lay.n_rows == sum(sizes)
    assert lay.k_atoms == len(sizes)
    assert lay.max_block == max(sizes)
    assert lay.block_sizes.dtype == np.int64 and lay.offsets.dtype == np.int64


def test_layout_arrays_read_only():
    lay = dp.DecoderLayout([2, 3], 4)
    for arr in (lay.block_sizes, lay.offsets, lay.row_offsets):
        with pytest.raises(ValueError):
            arr[0] = 7


def test_layout_does_not_freeze_the_callers_array():
    # The layout must not change the caller's array (making it read-only is a side effect).
    sizes = np.array([2, 3, 1], dtype=np.int64)
    dp.DecoderLayout(sizes, 4)
    sizes[0] = 5  # must still be writeable
    assert sizes[0] == 5


@pytest.mark.parametrize("seed", range(3))
def test_layout_block_views_match_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = random_block_sizes(rng, 6, 4)
    p = 3
    lay = dp.DecoderLayout(sizes, p)
    t = rng.standard_normal(lay.n_coef)
    ref = ref_blocks(t, sizes, p)
    for k, B in enumerate(lay.blocks(t)):
        assert B.shape == (sizes[k], p)
        np.testing.assert_array_equal(B, ref[k])
        assert np.shares_memory(B, t)  # a view, not a copy
    blk = lay.block(t, 2)
    blk[0, 0] = 123.0
    assert t[lay.offsets[2]] == 123.0
    np.testing.assert_array_equal(lay.rows(t), np.concatenate(ref_blocks(t, sizes, p)))


def test_layout_padded():
    sizes = [1, 3, 2]
    p = 2
    lay = dp.DecoderLayout(sizes, p)
    t = np.arange(1.0, lay.n_coef + 1)
    P = lay.padded(t)
    assert P.shape == (3, 3, 2)
    ref = ref_blocks(t, sizes, p)
    for k, m in enumerate(sizes):
        np.testing.assert_array_equal(P[k, :m], ref[k])
        np.testing.assert_array_equal(P[k, m:], 0.0)
    P5 = lay.padded(t, 5)
    assert P5.shape == (3, 5, 2)
    np.testing.assert_array_equal(P5[:, :3], P)
    np.testing.assert_array_equal(P5[:, 3:], 0.0)
    with pytest.raises(InvalidArgumentError, match="m_max = 2 is smaller than the largest block 3"):
        lay.padded(t, 2)


@pytest.mark.parametrize("atoms", [[2, 0], [1], [0, 1, 2, 3], [3, 3], []])
def test_layout_gather_scatter_index_subset(atoms):
    sizes = [2, 1, 3, 2]
    p = 3
    lay = dp.DecoderLayout(sizes, p)
    t = np.random.default_rng(1).standard_normal(lay.n_coef)
    ref = ref_blocks(t, sizes, p)
    expected = np.concatenate([ref[a].ravel() for a in atoms]) if atoms else np.zeros(0)
    g = lay.gather(t, atoms)
    np.testing.assert_array_equal(g, expected)
    idx = lay.scatter_index(atoms)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(t[idx], expected)
    # scatter back: adding the gathered vector at idx doubles exactly those blocks
    z = np.zeros_like(t)
    np.add.at(z, idx, g)
    for a in range(len(sizes)):
        blk = lay.block(z, a)
        np.testing.assert_array_equal(blk, atoms.count(a) * ref[a])
    if len(atoms) >= 2:
        sub = lay.subset(atoms)
        assert sub.block_sizes.tolist() == [sizes[a] for a in atoms]
        for i, a in enumerate(atoms):
            np.testing.assert_array_equal(sub.block(g, i), ref[a])


def test_layout_atom_of_coef_and_coef_range():
    sizes = [2, 1, 3]
    p = 2
    lay = dp.DecoderLayout(sizes, p)
    owner = np.repeat(np.arange(3), np.array(sizes) * p)
    np.testing.assert_array_equal(lay.atom_of_coef(np.arange(lay.n_coef)), owner)
    assert lay.coef_range(1, 3) == (4, 12)
    assert lay.coef_range(0, 1) == (0, 4)


def test_layout_check_beta_converts_and_validates():
    lay = dp.DecoderLayout([1, 2], 2)
    out = lay.check_beta(np.arange(6, dtype=np.float32))
    assert out.dtype == np.float64 and out.flags.c_contiguous
    out = lay.check_beta(np.arange(12.0)[::2])  # non-contiguous input
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.arange(0.0, 12.0, 2.0))
    with pytest.raises(ShapeMismatchError, match="= 6 coefficients, but t has 5"):
        lay.check_beta(np.zeros(5))


def test_layout_equality_and_spec():
    a = dp.DecoderLayout([1, 2], 3)
    assert a == dp.DecoderLayout(np.array([1, 2]), 3)
    assert a != dp.DecoderLayout([1, 2], 4)
    assert a != dp.DecoderLayout([2, 1], 3)
    assert dp.DecoderLayout(**a.to_spec()) == a


def test_layout_accepts_whole_floats_refuses_fractions():
    assert dp.DecoderLayout(np.array([1.0, 2.0]), 3).block_sizes.tolist() == [1, 2]
    with pytest.raises(dp.errors.InvalidDtypeError, match="block_sizes must hold integers"):
        dp.DecoderLayout([1.5, 2.0], 3)


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3, 3], [1, 4, 2, 4, 1], [2, 2]])
def test_block_matmul_matches_a_per_atom_loop(sizes):
    """One batched matmul for equal block sizes, grouped ones for mixed sizes: both equal the loop."""
    rng = np.random.default_rng(len(sizes))
    p = 3
    lay = dp.DecoderLayout(np.array(sizes), p)
    for atoms in (None, np.array([a for a in range(len(sizes)) if a % 2 == 0])):
        sel = np.arange(len(sizes)) if atoms is None else atoms
        mats = rng.random((sel.shape[0], p, p))
        t = rng.random(int(np.sum(np.array(sizes)[sel])) * p)
        ref, pos = [], 0
        for i, a in enumerate(sel):
            blk = t[pos:pos + sizes[a] * p].reshape(sizes[a], p)
            ref.append((blk @ mats[i]).ravel())
            pos += sizes[a] * p
        np.testing.assert_allclose(lay.block_matmul(t, mats, atoms), np.concatenate(ref), rtol=1e-14)
    with pytest.raises(ShapeMismatchError, match="mats has shape"):
        lay.block_matmul(np.zeros(lay.n_coef), np.zeros((1, p, p)))
