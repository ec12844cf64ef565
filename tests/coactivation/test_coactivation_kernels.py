"""Per-chunk co-activation kernels against numpy, without Dask."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from distpen.coactivation import _kernels as ker
from distpen.errors import GateDataError


def _dense(n, k, density, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return ((rng.random((n, k)) < density) * rng.exponential(1.0, (n, k))).astype(dtype)


def _tile_ref(G, i0, i1, j0, j1, diag):
    G = G.astype(np.float64)
    s = G[:, i0:i1].T @ G[:, j0:j1]
    F = (G > 0).astype(np.int64)
    c = F[:, i0:i1].T @ F[:, j0:j1]
    if diag:
        s, c = np.triu(s), np.triu(c)
    return s, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("density", [0.03, 0.6])
@pytest.mark.parametrize("tile", [(0, 7, 0, 7), (0, 7, 7, 19), (3, 4, 10, 19)])
def test_scatter_and_blas_routes_match_numpy(dtype, density, tile):
    G = _dense(300, 19, density, 1, dtype)
    i0, i1, j0, j1 = tile
    diag = (i0, i1) == (j0, j1)
    ref_s, ref_c = _tile_ref(G, i0, i1, j0, j1, diag)
    # scatter route on the CSR of the column blocks
    xi = np.ascontiguousarray(G[:, i0:i1])
    xj = np.ascontiguousarray(G[:, j0:j1])
    ci = ker.dense_to_csr(xi, i0, ker.dense_scan(xi))
    cj = ker.dense_to_csr(xj, j0, ker.dense_scan(xj))
    s = np.zeros((8, 12))
    c = np.zeros((8, 12), dtype=np.int64)
    ker.scatter_pairs(ci, cj, i0, i1, j0, j1, diag, s, c)
    np.testing.assert_allclose(s[:i1 - i0, :j1 - j0], ref_s, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(c[:i1 - i0, :j1 - j0], ref_c)
    assert not s[i1 - i0:].any() and not c[:, j1 - j0:].any()  # padding untouched
    # BLAS route
    s2 = np.zeros((8, 12))
    c2 = np.zeros((8, 12), dtype=np.int64)
    with threadpool_limits(1):
        if diag:
            ker.blas_tile(xi.astype(np.float64), ker.fire_bits(xi), None, None, s2, c2)
        else:
            ker.blas_tile(xi.astype(np.float64), ker.fire_bits(xi), xj.astype(np.float64), ker.fire_bits(xj), s2, c2)
    np.testing.assert_allclose(s2[:i1 - i0, :j1 - j0], ref_s, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(c2[:i1 - i0, :j1 - j0], ref_c)
    assert c2.dtype == np.int64 and s2.dtype == np.float64
    # accumulators of exactly the tile's shape: BLAS adds into them in place, on top of what they hold
    s3 = np.full((i1 - i0, j1 - j0), 0.5)
    c3 = np.full((i1 - i0, j1 - j0), 3, dtype=np.int32)
    with threadpool_limits(1):
        args = (None, None) if diag else (xj.astype(np.float64), ker.fire_bits(xj))
        ker.blas_tile(xi.astype(np.float64), ker.fire_bits(xi), *args, s3, c3)
    mask = np.triu(np.ones_like(ref_c, dtype=bool)) if diag else np.ones_like(ref_c, dtype=bool)
    np.testing.assert_allclose(s3[mask], ref_s[mask] + 0.5, rtol=1e-12)
    np.testing.assert_array_equal(c3[mask], ref_c[mask] + 3)
    assert (s3[~mask] == 0.5).all() and (c3[~mask] == 3).all()  # a diagonal tile's lower triangle: untouched


@pytest.mark.parametrize("n_rows", [1, 63, 64, 65, 130, 20_000])
def test_fire_bits_match_numpy_packbits(n_rows):
    G = _dense(n_rows, 13, 0.4, n_rows, np.float32)
    bits = ker.fire_bits(G)
    assert bits.dtype == np.uint64 and bits.shape == (13, (n_rows + 63) // 64)
    ref = np.packbits(G > 0, axis=0, bitorder="little")  # (ceil(n/8), 13), zero-padded
    ref = np.concatenate([ref, np.zeros((-ref.shape[0] % 8, 13), np.uint8)])
    np.testing.assert_array_equal(bits, np.ascontiguousarray(ref.T).view("<u8"))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (8, 8, 64), (13, 10, 300), (37, 41, 600)])
@pytest.mark.parametrize("cnt_dtype", [np.int32, np.int64])
def test_popcount_gram_counts_pairs_exactly(shape, cnt_dtype):
    n_i, n_j, n_words = shape  # past _GRAM_WORDS words, more than one pass over the words
    G = _dense(64 * n_words - 5, n_i + n_j, 0.5, n_i, np.float32)
    F = (G > 0).astype(np.int64)
    a, b = ker.fire_bits(G[:, :n_i].copy()), ker.fire_bits(G[:, n_i:].copy())
    base = np.arange((n_i + 2) * (n_j + 3), dtype=cnt_dtype).reshape(n_i + 2, n_j + 3)  # counts are added
    cnt = base.copy()
    ker.popcount_gram(a, b, cnt)
    want = base.copy()
    want[:n_i, :n_j] += F[:, :n_i].T @ F[:, n_i:]
    np.testing.assert_array_equal(cnt, want)
    cnt = base[:, :n_i + 2].copy()  # square, upper triangle only: the rest untouched
    ker.popcount_gram(a, None, cnt)
    want = base[:, :n_i + 2].copy()
    want[:n_i, :n_i] += np.triu(F[:, :n_i].T @ F[:, :n_i])
    np.testing.assert_array_equal(cnt, want)
    with pytest.raises(ValueError, match="different rows"):
        ker.popcount_gram(a, ker.fire_bits(np.zeros((64 * n_words + 1, n_j), np.float32)), cnt)


def test_route_follows_measured_density():
    sparse = _dense(2000, 512, 0.01, 2)
    dense = _dense(2000, 512, 0.5, 2)
    for G, want in ((sparse, "scatter"), (dense, "blas")):
        nnz = ker.dense_scan(G)
        assert ker.choose_route(nnz, None, 512, 512) == want
        assert ker.choose_route(nnz, nnz, 512, 512) == want


def test_topk_csr_sorts_skips_empty_slots_and_matches_dense():
    idx = np.array([[4, 1, -1, 2], [0, 3, 2, 5], [5, -1, -1, -1]], dtype=np.int32)
    val = np.array([[1.0, 2.0, 9.0, 0.0], [0.5, 1.5, 2.5, 3.0], [7.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ip, cols, vals = ker.topk_block_csr(idx, val, 0, 6, 6)
    assert ip.tolist() == [0, 2, 6, 7]
    assert cols.tolist() == [1, 4, 0, 2, 3, 5, 5]  # sorted per row; (-1, 9.0) and (2, 0.0) skipped
    assert vals.tolist() == [2.0, 1.0, 0.5, 2.5, 1.5, 3.0, 7.0]
    ip, cols, _ = ker.topk_block_csr(idx, val, 2, 5, 6)
    assert cols.tolist() == [4, 2, 3]


@pytest.mark.parametrize("bad, match", [
    (("val", 1, 2, np.nan), r"row 11, atom 2 is NaN"),
    (("val", 0, 1, -1.0), r"row 10, atom 1 is negative"),
    (("val", 2, 0, np.inf), r"row 12, atom 5 is infinite"),
    (("idx", 1, 3, 3), r"row 11, atom 3 is repeated"),
    (("idx", 0, 0, 6), r"row 10, atom 6 is an atom index outside \[-1, k_atoms\)"),
    (("idx", 0, 0, -2), r"row 10, atom -2 is an atom index outside"),
])
def test_topk_data_errors_name_row_and_atom(bad, match):
    idx = np.array([[4, 1, -1, 2], [0, 3, 2, 5], [5, -1, -1, -1]], dtype=np.int64)
    val = np.array([[1.0, 2.0, 9.0, 0.0], [0.5, 1.5, 2.5, 3.0], [7.0, 0.0, 0.0, 0.0]])
    which, r, s, v = bad
    (idx if which == "idx" else val)[r, s] = v
    with pytest.raises(GateDataError, match=match) as info:
        ker.topk_block_csr(idx, val, 0, 6, 6, row0=10, rows=(10, 13))
    assert "row chunk [10, 13)" in str(info.value)


@pytest.mark.parametrize("value, what", [(np.nan, "is NaN"), (-0.5, "is negative"), (np.inf, "is infinite"),
                                         (-np.inf, "is negative")])
def test_dense_scan_errors(value, what):
    G = _dense(50, 9, 0.3, 3)
    G[17, 4] = value
    with pytest.raises(GateDataError, match=rf"row 117, atom 24 {what}"):
        ker.dense_scan(G, row0=100, col0=20)


def test_vector_stats_dense_and_csr_agree():
    G = _dense(200, 13, 0.2, 4, np.float32)
    f = np.zeros(13, dtype=np.int64)
    s = np.zeros(13)
    q = np.zeros(13)
    ker.dense_vector_stats(G, f, s, q)
    G64 = G.astype(np.float64)
    np.testing.assert_array_equal(f, (G > 0).sum(0))
    np.testing.assert_allclose(s, G64.sum(0), rtol=1e-13)
    np.testing.assert_allclose(q, (G64 ** 2).sum(0), rtol=1e-13)
    csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
    f2, s2, q2 = np.zeros(5, dtype=np.int64), np.zeros(5), np.zeros(5)
    ker.csr_vector_stats(csr, 4, 9, f2, s2, q2)
    np.testing.assert_array_equal(f2, f[4:9])
    np.testing.assert_allclose(s2, s[4:9], rtol=1e-13)
    np.testing.assert_allclose(q2, q[4:9], rtol=1e-13)


def test_combine_is_fixed_shape_and_does_not_mutate_inputs():
    a, b = ker.new_partial(2, 4, 1), ker.new_partial(2, 4, 1)
    a["sum"][:] = 1.0
    b["sum"][:] = 2.0
    a["rows"], b["rows"] = 3, 5
    c = ker.combine_partials([a, b])
    assert c["sum"].shape == (2, 4, 4) and (c["sum"] == 3.0).all() and c["rows"] == 8
    assert (a["sum"] == 1.0).all()


@pytest.mark.parametrize("n", [1, 4, 63, 64, 65, 150])
def test_symmetrise_diag(n):
    rng = np.random.default_rng(n)
    A = rng.random((n, n))
    U = np.triu(A)
    S = ker.symmetrise_diag(A)  # entries below the diagonal are ignored
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_array_equal(np.triu(S), U)
    np.testing.assert_array_equal(S, U + np.triu(U, 1).T)
    C = rng.integers(0, 9, (n, n))
    ref = np.triu(C) + np.triu(C, 1).T
    assert ker.symmetrise_diag(C, out=C) is C  # in place
    np.testing.assert_array_equal(C, ref)
    with pytest.raises(ValueError, match="square"):
        ker.symmetrise_diag(np.zeros((3, 4)))
    C32 = np.triu(rng.integers(0, 9, (n, n))).astype(np.int32)
    wide = ker.symmetrise_diag(C32, out=np.empty((n, n), dtype=np.int64))  # converted on the way
    assert wide.dtype == np.int64 and np.array_equal(wide, C32 + np.triu(C32, 1).T)
    with pytest.raises(ValueError, match="out must have"):
        ker.symmetrise_diag(A, out=np.zeros((n, n), dtype=np.float32))


@pytest.mark.parametrize("tile", [1, 3, 5, 19])
def test_scatter_group_matches_numpy_and_the_per_tile_kernel(tile):
    """Several tiles at once (atom-major order) equal numpy and the one-tile kernel bit for bit."""
    G = _dense(250, 19, 0.25, 6)
    nb = -(-19 // tile)
    tiles = [(i, j) for i in range(nb) for j in range(i, nb)][1::2]  # every other tile
    csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
    s = np.zeros((len(tiles), tile, tile))
    c = np.zeros((len(tiles), tile, tile), dtype=np.int64)
    ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c)
    for q, (i, j) in enumerate(tiles):
        i0, i1, j0, j1 = i * tile, min(19, (i + 1) * tile), j * tile, min(19, (j + 1) * tile)
        ref_s, ref_c = _tile_ref(G, i0, i1, j0, j1, i == j)
        np.testing.assert_allclose(s[q, :i1 - i0, :j1 - j0], ref_s, rtol=1e-12)
        np.testing.assert_array_equal(c[q, :i1 - i0, :j1 - j0], ref_c)
        s1 = np.zeros((tile, tile))
        c1 = np.zeros((tile, tile), dtype=np.int64)
        ker.scatter_pairs(csr, csr, i0, i1, j0, j1, i == j, s1, c1)
        assert np.array_equal(s1, s[q]) and np.array_equal(c1, c[q])  # same summation order


@pytest.mark.parametrize("run", [(0, 3), (2, 9), (4, 5), (6, 15), (9, 21)])
@pytest.mark.parametrize("method", ["bucket", "tile"])
def test_scatter_group_over_a_run_that_starts_and_ends_inside_block_rows(run, method):
    """A group is a consecutive run of tiles in row-major order, which may begin and end in the
    middle of a block row: its row atoms walk only their own tiles' partners, and every tile still
    equals the per-tile kernel bit for bit (tiles outside the run stay zero)."""
    G = _dense(300, 23, 0.3, 11)
    tile, nb = 4, 6
    every = [(i, j) for i in range(nb) for j in range(i, nb)]
    tiles = every[run[0]:run[1]]
    csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
    s = np.zeros((len(tiles), tile, tile))
    c = np.zeros((len(tiles), tile, tile), dtype=np.int64)
    ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c, ker.ScatterWorkspace(50), method=method)
    for q, (i, j) in enumerate(tiles):
        s1, c1 = np.zeros((tile, tile)), np.zeros((tile, tile), dtype=np.int64)
        ker.scatter_pairs(csr, csr, i * tile, min(23, (i + 1) * tile), j * tile, min(23, (j + 1) * tile),
                          i == j, s1, c1)
        assert np.array_equal(s1, s[q]) and np.array_equal(c1, c[q]), (i, j)


def test_dense_scan_stats_is_one_pass_of_scan_and_vector_stats():
    """The fused scan counts like dense_scan_blocks and sums like the CSR kernel (row order, bit for bit)."""
    G = _dense(300, 21, 0.2, 7, np.float32)
    fire, gsum, gsq = np.zeros(21, dtype=np.int64), np.zeros(21), np.zeros(21)
    nnz, none = ker.dense_scan_stats(G, 5, fire, gsum, gsq)
    np.testing.assert_array_equal(nnz, ker.dense_scan_blocks(G, 5))
    assert none is None
    # with a workspace the scan also gives the sparse rows, as dense_to_csr does, while they fit
    ws = ker.ScatterWorkspace()
    f3, s3, q3 = np.zeros(21, dtype=np.int64), np.zeros(21), np.zeros(21)
    _, csr = ker.dense_scan_stats(G, 5, f3, s3, q3, col0=40, workspace=ws, max_density=0.5)
    for a, b in zip(csr, ker.dense_to_csr(G, 40, ker.dense_scan(G))):
        assert np.array_equal(a, b)
    assert np.array_equal(f3, fire) and np.array_equal(s3, gsum)
    # past the workspace's room (20% > 10%) the rows take the branch-free loops: the same bits
    f4, s4, q4 = np.zeros(21, dtype=np.int64), np.zeros(21), np.zeros(21)
    nnz4, over = ker.dense_scan_stats(G, 5, f4, s4, q4, workspace=ws, max_density=0.1)
    assert over is None
    assert np.array_equal(nnz4, nnz) and np.array_equal(f4, fire) and np.array_equal(s4, gsum)
    assert np.array_equal(q4, gsq)
    f2, s2, q2 = np.zeros(21, dtype=np.int64), np.zeros(21), np.zeros(21)
    ker.csr_vector_stats(ker.dense_to_csr(G, 0, ker.dense_scan(G)), 0, 21, f2, s2, q2)
    assert np.array_equal(fire, f2) and np.array_equal(gsum, s2) and np.array_equal(gsq, q2)
    G64 = G.astype(np.float64)
    np.testing.assert_allclose(gsq, (G64 ** 2).sum(0), rtol=1e-13)
    for value, what in ((np.nan, "is NaN"), (-0.5, "is negative"), (np.inf, "is infinite"), (-np.inf, "is negative")):
        bad = G.copy()
        bad[150, 3] = value  # a row the branch-free loops read (no room for sparse rows)
        with pytest.raises(GateDataError, match=rf"row 1150, atom 13 {what}"):
            ker.dense_scan_stats(bad, 5, fire, gsum, gsq, row0=1000, col0=10)
        bad[0, 3] = value  # and the first row, read by the branching loop
        with pytest.raises(GateDataError, match=rf"row 1000, atom 13 {what}"):
            ker.dense_scan_stats(bad, 5, fire, gsum, gsq, row0=1000, col0=10, workspace=ws)


@pytest.mark.parametrize("max_density", [0.1, 0.2])
def test_dense_scan_probe_keeps_the_exact_room_rule(max_density):
    """Dense first rows trigger the probe; the sparse rows are still built exactly when the whole
    block fits the room (18% of 20%), and the vectors are the same bits either way."""
    rng = np.random.default_rng(9)
    G = np.zeros((500, 40), dtype=np.float32)
    G[:100] = (rng.random((100, 40)) < 0.9) * rng.exponential(1.0, (100, 40))
    nnz_all = np.count_nonzero(G)
    assert 0.17 < nnz_all / G.size < 0.19
    ws = ker.ScatterWorkspace()
    vec = [np.zeros(40, dtype=np.int64), np.zeros(40), np.zeros(40)]
    nnz, csr = ker.dense_scan_stats(G, 16, *vec, workspace=ws, max_density=max_density)
    ref = [np.zeros(40, dtype=np.int64), np.zeros(40), np.zeros(40)]
    np.testing.assert_array_equal(nnz, ker.dense_scan_stats(G, 16, *ref)[0])
    for a, b in zip(vec, ref):
        assert np.array_equal(a, b)
    if max_density == 0.1:
        assert csr is None
    else:
        for a, b in zip(csr, ker.dense_to_csr(G, 0, ker.dense_scan(G))):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("cap", [1, 7, 300, 1 << 20])
def test_scatter_group_passes_do_not_change_a_bit(cap):
    """However few pair products the workspace holds (several passes, rows too long for one pass
    added directly), the accumulators equal the per-tile kernel bit for bit, and one workspace
    serves several chunks."""
    G = _dense(400, 23, 0.3, 8)
    tile, nb = 5, 5
    tiles = [(i, j) for i in range(nb) for j in range(i, nb)]
    s = np.zeros((len(tiles), tile, tile))
    c = np.zeros((len(tiles), tile, tile), dtype=np.int64)
    ws = ker.ScatterWorkspace(cap)
    ref_s, ref_c = np.zeros_like(s), np.zeros_like(c)
    for lo, hi in ((0, 170), (170, 400)):  # two row chunks into the same accumulators
        part = G[lo:hi]
        csr = ker.dense_to_csr(part, 0, ker.dense_scan(part))
        ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c, ws)
        for q, (i, j) in enumerate(tiles):
            ker.scatter_pairs(csr, csr, i * tile, min(23, (i + 1) * tile), j * tile, min(23, (j + 1) * tile),
                              i == j, ref_s[q], ref_c[q])
    assert np.array_equal(s, ref_s) and np.array_equal(c, ref_c)
    F = (G > 0).astype(np.int64)
    np.testing.assert_array_equal(c[tiles.index((1, 3))], F[:, 5:10].T @ F[:, 15:20])


def test_scatter_group_picks_its_method_from_the_rows_and_both_agree_bit_for_bit():
    """Dense rows (many pairs per row and tile) go tile by tile, sparse rows over many tiles are
    bucketed; forcing either method gives the same bits, so the choice never shows in results."""
    for density, tile, expect in ((0.9, 40, "tile"), (0.02, 5, "bucket")):
        G = _dense(300, 80, density, 11)
        nb = -(-80 // tile)
        tiles = [(i, j) for i in range(nb) for j in range(i, nb)]
        csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
        out = {}
        for method in (None, "tile", "bucket"):
            s = np.zeros((len(tiles), tile, tile))
            c = np.zeros((len(tiles), tile, tile), dtype=np.int64)
            used = ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c, ker.ScatterWorkspace(97),
                                     method=method)
            assert used == (method or expect)
            out[method] = (s, c)
        for method in ("tile", "bucket"):
            assert np.array_equal(out[method][0], out[None][0]) and np.array_equal(out[method][1], out[None][1])
        F = (G > 0).astype(np.int64)
        np.testing.assert_array_equal(out[None][1][tiles.index((0, 1))], F[:, :tile].T @ F[:, tile:2 * tile])
    with pytest.raises(ValueError, match="method must be"):
        ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c, method="dense")


def test_bucketed_scatter_with_buckets_longer_than_the_prefetch_distance_agrees_with_the_tile_route():
    """The last pass of the bucketed scatter prefetches targets PF_SCATTER updates ahead: a hint
    that must never change a bit, also with buckets of many times that length and a short tail."""
    G = _dense(3000, 60, 0.2, 13)
    tile = 8
    nb = -(-60 // tile)
    tiles = [(i, j) for i in range(nb) for j in range(i, nb)][3:]  # a group that skips a few tiles
    csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
    row_nnz = np.diff(csr[0])
    assert (row_nnz * (row_nnz + 1) // 2).sum() / 60 > 4 * ker.PF_SCATTER  # buckets far longer
    out = {}
    for method in ("tile", "bucket"):
        s = np.zeros((len(tiles), tile, tile))
        c = np.zeros((len(tiles), tile, tile), dtype=np.int32)
        ker.scatter_group(csr, 0, tile, nb, tiles, range(len(tiles)), s, c, ker.ScatterWorkspace(5000),
                          method=method)
        out[method] = (s, c)
    assert np.array_equal(out["tile"][0], out["bucket"][0]) and np.array_equal(out["tile"][1], out["bucket"][1])
    F = (G > 0).astype(np.int64)
    assert tiles[-1] == (7, 7)  # the ragged diagonal tile: atoms 56..59, upper triangle only
    np.testing.assert_array_equal(out["bucket"][1][-1][:4, :4], np.triu(F[:, 56:].T @ F[:, 56:]))


def test_scatter_group_rejects_bad_accumulators():
    csr = ker.dense_to_csr(np.eye(4), 0, np.ones(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(n_slots, 2, 2\)"):
        ker.scatter_group(csr, 0, 2, 2, [(0, 0)], [0], np.zeros((1, 2, 3)), np.zeros((1, 2, 3), dtype=np.int64))
    s = np.zeros((1, 2, 4))[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        ker.scatter_group(csr, 0, 2, 2, [(0, 0)], [0], s, np.zeros((1, 2, 2), dtype=np.int64))


def test_topk_csr_in_a_workspace_equals_fresh_arrays():
    rng = np.random.default_rng(9)
    idx = np.argsort(rng.random((200, 40)), axis=1)[:, :8].astype(np.int32)
    idx[rng.random((200, 8)) < 0.2] = -1
    val = rng.random((200, 8)).astype(np.float32)
    ws = ker.ScatterWorkspace()
    for lo, hi in ((0, 40), (10, 25)):
        fresh = ker.topk_block_csr(idx, val, lo, hi, 40)
        reused = ker.topk_block_csr(idx, val, lo, hi, 40, workspace=ws)
        for a, b in zip(fresh, reused):
            assert np.array_equal(a, b)
        assert np.all(np.diff(fresh[1][fresh[0][0]:fresh[0][1]]) > 0)  # sorted within a row


def _topk_csr_reference(idx, val, lo, hi, thr):
    """Plain Python: each row's slots with an atom in [lo, hi) and a non-zero gate, sorted by atom,
    kept when the gate exceeds the threshold (scalar, per atom, or relative to the row's largest)."""
    mode, tval, tvec = thr
    ip, cols, vals = [0], [], []
    for r in range(idx.shape[0]):
        row_max = max([float(v) for a, v in zip(idx[r], val[r]) if a >= 0] + [0.0])
        kept = sorted((int(a), float(v)) for a, v in zip(idx[r], val[r]) if lo <= a < hi and v != 0)
        for a, v in kept:
            cut = tvec[a] if mode == ker.THR_PER_ATOM else tval * row_max if mode == ker.THR_RELATIVE else tval
            if v > cut:
                cols.append(a)
                vals.append(v)
        ip.append(len(cols))
    return ip, cols, vals


@pytest.mark.parametrize("k", [1, 3, 32, 130])
def test_topk_csr_rank_sort_matches_a_plain_reference(k):
    rng = np.random.default_rng(k)
    K = 300
    idx = np.argsort(rng.random((120, K)), axis=1)[:, :k].astype(np.int32)
    idx[rng.random(idx.shape) < 0.15] = -1
    val = rng.random(idx.shape).astype(np.float32)
    val[rng.random(idx.shape) < 0.1] = 0.0
    val[idx == -1] = np.where(rng.random(int((idx == -1).sum())) < 0.5, np.nan, -3.0)  # never read
    thresholds = [ker.NO_THRESHOLD, ker.threshold_args(("scalar", 0.4)),
                  ker.threshold_args(("per_atom", rng.random(K) * 0.8)), ker.threshold_args(("relative", 0.5))]
    for thr in thresholds:
        for lo, hi in ((0, K), (40, 170), (299, 300)):
            ip, cols, vals = ker.topk_block_csr(idx, val, lo, hi, K, threshold=thr)
            want = _topk_csr_reference(idx, val, lo, hi, thr)
            assert ip.tolist() == want[0]
            assert cols.tolist() == want[1]
            assert np.array_equal(vals, np.array(want[2], dtype=np.float32))


@pytest.mark.parametrize("row, nan_slot, hi, match", [
    ([3, 3, 5, 1], 2, 8, r"atom 3 is repeated"),       # the repeat comes first in slot order ...
    ([3, 5, 3, 1], 1, 8, r"atom 5 is NaN"),            # ... or the NaN does
    ([9, 2, 2, 1], None, 8, r"atom 9 is an atom index"),
    ([5, 1, 9, 2], 0, 4, r"atom 9 is an atom index"),  # out of range is found outside the span too;
])                                                     # a NaN outside it is not read
def test_topk_csr_names_the_first_problem_of_a_row_in_slot_order(row, nan_slot, hi, match):
    idx = np.array([[0, 1, 2, 4], row], dtype=np.int32)
    val = np.ones((2, 4), dtype=np.float32)
    if nan_slot is not None:
        val[1, nan_slot] = np.nan
    with pytest.raises(GateDataError, match=r"row 1, " + match):
        ker.topk_block_csr(idx, val, 0, hi, 8)


def test_partial_with_int32_counts():
    p = ker.new_partial(2, 4, 1, cnt_dtype=np.int32)
    assert p["cnt"].dtype == np.int32 and p["sum"].dtype == np.float64
    assert ker.partial_nbytes(2, 4, 1, np.int32) < ker.partial_nbytes(2, 4, 1)
    buf = np.full(ker.partial_nbytes(2, 4, 1, np.int32), 7, dtype=np.uint8)
    q = ker.new_partial(2, 4, 1, buf, np.int32)
    assert not q["cnt"].any() and np.shares_memory(q["cnt"], buf)


def test_partial_in_a_reused_buffer_is_zeroed():
    n = ker.partial_nbytes(3, 4, 2)
    buf = np.full(n + 64, 255, dtype=np.uint8)
    p = ker.new_partial(3, 4, 2, buf)
    assert p["sum"].shape == (3, 4, 4) and p["cnt"].dtype == np.int64 and p["gsq"].shape == (2, 4)
    assert all(not p[k].any() for k in ("sum", "cnt", "fire", "gsum", "gsq"))
    assert all(np.shares_memory(p[k], buf) for k in ("sum", "cnt", "fire", "gsum", "gsq"))
    assert p["sum"].flags.c_contiguous and p["sum"].ctypes.data % 64 == 0


def test_scatter_group_ignores_atoms_outside_its_span():
    """A chunk's rows may hold every atom: the group's span picks its own (cached chunks rely on it)."""
    G = _dense(300, 30, 0.3, 10)
    tile, lo, nb = 5, 10, 3                        # span [10, 25)
    tiles = [(0, 0), (0, 2), (1, 2)]
    full_csr = ker.dense_to_csr(G, 0, ker.dense_scan(G))
    part = np.ascontiguousarray(G[:, lo:lo + nb * tile])
    span_csr = ker.dense_to_csr(part, lo, ker.dense_scan(part))
    accs = []
    for csr in (full_csr, span_csr):
        s = np.zeros((3, tile, tile))
        c = np.zeros((3, tile, tile), dtype=np.int64)
        ker.scatter_group(csr, lo, tile, nb, tiles, range(3), s, c, ker.ScatterWorkspace(50))
        accs.append((s, c))
    assert np.array_equal(accs[0][0], accs[1][0]) and np.array_equal(accs[0][1], accs[1][1])
    ref, _ = _tile_ref(G, 10, 15, 20, 25, False)
    np.testing.assert_allclose(accs[0][0][1], ref, rtol=1e-12)
