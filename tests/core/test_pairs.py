"""distpen.pairs.PairTable: validation, sorting, from_dense, chunking, Zarr I/O, directed, restrict."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from _reference import random_block_sizes, random_coactivation, random_pairs

import distpen as dp
from distpen.errors import InvalidArgumentError, PairTableError, StoreCorruptError


def _as_set(pt):
    return {(int(j), int(k)): float(w) for j, k, w in zip(pt.j, pt.k, pt.w)}


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("seed", range(4))
def test_pairs_sorted_and_columnar(seed):
    rng = np.random.default_rng(seed)
    j, k, w = random_pairs(rng, 12, 0.4)
    pt = dp.PairTable(j, k, w, 12)
    assert pt.j.dtype == np.int64 and pt.k.dtype == np.int64 and pt.w.dtype == np.float64
    assert len(pt) == pt.n_pairs == len(j)
    keys = list(zip(pt.j.tolist(), pt.k.tolist()))
    assert keys == sorted(keys)
    assert (pt.j < pt.k).all()
    assert _as_set(pt) == {(a, b): c for a, b, c in zip(j.tolist(), k.tolist(), w.tolist())}
    assert pt.k_atoms == 12


def test_pairs_drop_zero_weights_and_accept_any_order():
    pt = dp.PairTable([2, 0, 1, 0], [3, 1, 3, 2], [1.0, 0.0, 2.5, 0.5], 4)
    assert pt.j.tolist() == [0, 1, 2]
    assert pt.k.tolist() == [2, 3, 3]
    assert pt.w.tolist() == [0.5, 2.5, 1.0]


def test_pairs_columns_are_read_only_and_do_not_alias_input():
    j = np.array([0, 1], dtype=np.int64)
    k = np.array([1, 2], dtype=np.int64)
    w = np.array([1.0, 2.0])
    pt = dp.PairTable(j, k, w, 3)
    j[0], w[0] = 1, 9.0
    assert pt.j.tolist() == [0, 1] and pt.w.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        pt.w[0] = 3.0


def test_pairs_converts_input_dtypes():
    pt = dp.PairTable(np.array([0, 1], dtype=np.int32), np.array([1.0, 2.0]),
                      np.array([1, 2], dtype=np.int16), 3)
    assert pt.j.dtype == np.int64 and pt.k.dtype == np.int64 and pt.w.dtype == np.float64
    assert pt.w.tolist() == [1.0, 2.0]


def test_pairs_empty_table():
    pt = dp.PairTable([], [], [], 5)
    assert len(pt) == 0
    assert pt.chunk_bounds(10.0) == []
    assert pt.chunks(n_chunks=3) == []
    indptr, nbr, wts = pt.directed()
    assert indptr.tolist() == [0] * 6 and nbr.size == 0 and wts.size == 0


# --------------------------------------------------------------------------- from_dense


@pytest.mark.parametrize("seed", range(4))
def test_from_dense_symmetrises_upper_triangle(seed):
    rng = np.random.default_rng(seed)
    K = 9
    C = random_coactivation(rng, K, 0.5)
    pt = dp.PairTable.from_dense(C)
    expected = {}
    for a in range(K):
        for b in range(a + 1, K):
            w = 0.5 * (C[a, b] + C[b, a])
            if w > 0:
                expected[(a, b)] = w
    got = _as_set(pt)
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, rel=1e-15)
    assert pt.k_atoms == K
    # only the diagonal was non-zero on the diagonal: no self pairs
    assert (pt.j != pt.k).all()
    # round trip through to_dense: the symmetrised off-diagonal part
    D = pt.to_dense()
    S = 0.5 * (C + C.T)
    np.fill_diagonal(S, 0.0)
    np.testing.assert_allclose(D, S, rtol=1e-15)


def test_from_dense_one_sided_entries_kept():
    C = np.zeros((3, 3))
    C[2, 0] = 4.0  # only the lower triangle
    pt = dp.PairTable.from_dense(C)
    assert (pt.j.tolist(), pt.k.tolist(), pt.w.tolist()) == ([0], [2], [2.0])


def test_from_dense_all_zero_is_empty():
    pt = dp.PairTable.from_dense(np.eye(4))
    assert len(pt) == 0 and pt.k_atoms == 4


# --------------------------------------------------------------------------- directed / adjacency / degree


@pytest.mark.parametrize("seed", range(3))
def test_directed_csr_lists_both_directions(seed):
    rng = np.random.default_rng(seed)
    K = 10
    pt = dp.PairTable(*random_pairs(rng, K, 0.35), K)
    indptr, nbr, wts = pt.directed()
    assert indptr.shape == (K + 1,) and indptr[0] == 0 and indptr[-1] == 2 * len(pt)
    assert (np.diff(indptr) >= 0).all()
    edges = {}
    for a in range(K):
        for e in range(indptr[a], indptr[a + 1]):
            assert (a, int(nbr[e])) not in edges
            edges[(a, int(nbr[e]))] = float(wts[e])
    expected = {}
    for j, k, w in zip(pt.j.tolist(), pt.k.tolist(), pt.w.tolist()):
        expected[(j, k)] = w
        expected[(k, j)] = w
    assert edges == expected
    np.testing.assert_array_equal(np.diff(indptr), pt.degree())
    np.testing.assert_array_equal(pt.adjacency().toarray(), pt.to_dense())
    assert pt.directed() is pt.directed() or all(
        np.array_equal(a, b) for a, b in zip(pt.directed(), pt.directed()))


def test_atoms_lists_touched_atoms():
    pt = dp.PairTable([1, 4], [4, 6], [1.0, 1.0], 8)
    assert pt.atoms().tolist() == [1, 4, 6]
    assert pt.degree().tolist() == [0, 1, 0, 0, 2, 0, 1, 0]


# --------------------------------------------------------------------------- restrict


@pytest.mark.parametrize("seed", range(3))
def test_restrict_renumbers_onto_local_atoms(seed):
    rng = np.random.default_rng(seed)
    K = 12
    pt = dp.PairTable(*random_pairs(rng, K, 0.3), K)
    sub = pt[: max(2, len(pt) // 2)]
    atoms = sub.atoms()
    local, got_atoms = sub.restrict(atoms)
    np.testing.assert_array_equal(got_atoms, atoms)
    assert local.k_atoms == len(atoms)
    np.testing.assert_array_equal(atoms[local.j], sub.j)
    np.testing.assert_array_equal(atoms[local.k], sub.k)
    np.testing.assert_array_equal(local.w, sub.w)
    assert (local.j < local.k).all()
    # a superset of the touched atoms works too
    local2, _ = sub.restrict(np.arange(K))
    assert local2 == sub


def test_restrict_rejects_missing_atoms():
    pt = dp.PairTable([0, 2], [1, 3], [1.0, 1.0], 4)
    with pytest.raises(InvalidArgumentError, match="restrict: atoms must be sorted and contain every atom"):
        pt.restrict([0, 1, 2])


# --------------------------------------------------------------------------- chunks


def _chunk_problem(seed, K=30, density=0.3, max_block=4, p_out=3):
    rng = np.random.default_rng(seed)
    sizes = random_block_sizes(rng, K, max_block)
    pt = dp.PairTable(*random_pairs(rng, K, density), K)
    cost = sizes[pt.j] * sizes[pt.k] * p_out
    return pt, sizes, p_out, cost.astype(np.float64)


def _check_cover(pt, bounds, chunks):
    assert bounds[0][0] == 0 and bounds[-1][1] == len(pt)
    for (a, b), (c, d) in zip(bounds[:-1], bounds[1:]):
        assert b == c  # contiguous, in order, no overlap
    assert all(b > a for a, b in bounds)  # no empty chunk
    assert [len(c) for c in chunks] == [b - a for a, b in bounds]
    joined = dp.PairTable.concat(chunks)
    assert joined == pt  # every pair exactly once, same order


def test_pair_costs():
    pt, sizes, p, cost = _chunk_problem(0)
    np.testing.assert_array_equal(pt.pair_costs(sizes, p), cost)
    np.testing.assert_array_equal(pt.pair_costs(), np.ones(len(pt)))
    np.testing.assert_array_equal(pt.pair_costs(p_out=5), np.full(len(pt), 5.0))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_cost", [1.0, 20.0, 48.0, 100.0, 333.0, 1e9])
def test_chunks_max_cost(seed, max_cost):
    pt, sizes, p, cost = _chunk_problem(seed)
    bounds = pt.chunk_bounds(max_cost, block_sizes=sizes, p_out=p)
    chunks = pt.chunks(max_cost, block_sizes=sizes, p_out=p)
    _check_cover(pt, bounds, chunks)
    ccost = [cost[a:b].sum() for a, b in bounds]
    for (a, b), c in zip(bounds, ccost):
        assert c <= max_cost or b - a == 1, f"chunk [{a},{b}) costs {c} > {max_cost}"
    # greedy, not wasteful: two neighbouring chunks together exceed max_cost
    for c1, c2 in zip(ccost[:-1], ccost[1:]):
        assert c1 + c2 > max_cost
    if max_cost >= cost.sum():
        assert bounds == [(0, len(pt))]


def test_chunks_oversized_single_pairs_get_their_own_chunk():
    sizes = np.array([8, 8, 1, 1, 1])
    pt = dp.PairTable([0, 0, 2, 2, 3], [1, 2, 3, 4, 4], [1.0] * 5, 5)
    # costs: (0,1)=64, (0,2)=8, (2,3)=1, (2,4)=1, (3,4)=1
    bounds = pt.chunk_bounds(10.0, block_sizes=sizes)
    assert bounds == [(0, 1), (1, 3), (3, 5)] or bounds == [(0, 1), (1, 4), (4, 5)]
    assert bounds[0] == (0, 1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7, 50])
def test_chunks_n_chunks_balanced(seed, n_chunks):
    pt, sizes, p, cost = _chunk_problem(seed)
    bounds = pt.chunk_bounds(n_chunks=n_chunks, block_sizes=sizes, p_out=p)
    chunks = pt.chunks(n_chunks=n_chunks, block_sizes=sizes, p_out=p)
    _check_cover(pt, bounds, chunks)
    assert len(bounds) <= min(n_chunks, len(pt))
    total = cost.sum()
    for a, b in bounds:
        assert cost[a:b].sum() <= total / n_chunks + cost.max() + 1e-9


@pytest.mark.parametrize("n_chunks", [1, 2, 5, 13])
def test_chunks_n_chunks_exact_for_uniform_cost(n_chunks):
    K = 20
    pt = dp.PairTable(*random_pairs(np.random.default_rng(3), K, 0.3), K)
    bounds = pt.chunk_bounds(n_chunks=n_chunks)
    assert len(bounds) == n_chunks
    lengths = [b - a for a, b in bounds]
    assert max(lengths) - min(lengths) <= 1


def test_chunks_more_than_pairs():
    pt = dp.PairTable([0, 1], [1, 2], [1.0, 1.0], 3)
    assert pt.chunk_bounds(n_chunks=10) == [(0, 1), (1, 2)]


def test_chunk_bounds_needs_exactly_one_mode():
    pt = dp.PairTable([0], [1], [1.0], 2)
    with pytest.raises(InvalidArgumentError, match="exactly one of max_cost or n_chunks"):
        pt.chunk_bounds()
    with pytest.raises(InvalidArgumentError, match="exactly one of max_cost or n_chunks"):
        pt.chunk_bounds(1.0, n_chunks=2)
    with pytest.raises(InvalidArgumentError, match="max_cost must be > 0, got 0"):
        pt.chunk_bounds(0.0)
    with pytest.raises(InvalidArgumentError, match="n_chunks must be > 0, got 0"):
        pt.chunk_bounds(n_chunks=0)


# --------------------------------------------------------------------------- slicing, concat, pickle


def test_getitem_slice_and_refuses_others():
    pt = dp.PairTable([0, 0, 1], [1, 2, 2], [1.0, 2.0, 3.0], 3)
    s = pt[1:]
    assert s.j.tolist() == [0, 1] and s.w.tolist() == [2.0, 3.0] and s.k_atoms == 3
    with pytest.raises(InvalidArgumentError, match="contiguous slices only"):
        pt[0]
    with pytest.raises(InvalidArgumentError, match="contiguous slices only"):
        pt[::2]


def test_concat_rejects_overlap_and_mismatch():
    a = dp.PairTable([0], [1], [1.0], 3)
    with pytest.raises(PairTableError, match=r"pair \(0, 1\) appears more than once"):
        dp.PairTable.concat([a, a])
    with pytest.raises(dp.errors.ShapeMismatchError, match="different k_atoms"):
        dp.PairTable.concat([a, dp.PairTable([0], [1], [1.0], 4)])


def test_pickle_round_trip():
    pt = dp.PairTable([0, 1], [2, 2], [0.5, 1.5], 3)
    pt.directed()
    back = pickle.loads(pickle.dumps(pt))
    assert back == pt
    assert [a.tolist() for a in back.directed()] == [a.tolist() for a in pt.directed()]


def test_scaled():
    pt = dp.PairTable([0, 1], [2, 2], [0.5, 1.5], 3)
    assert pt.scaled(2.0).w.tolist() == [1.0, 3.0]
    assert pt.w.tolist() == [0.5, 1.5]


# --------------------------------------------------------------------------- Zarr I/O


@pytest.mark.parametrize("seed, chunk", [(0, 1 << 20), (1, 3), (2, 1)])
def test_save_open_round_trip(tmp_path, seed, chunk):
    rng = np.random.default_rng(seed)
    pt = dp.PairTable(*random_pairs(rng, 15, 0.3), 15)
    path = tmp_path / "pairs.zarr"
    pt.save(path, chunk=chunk)
    back = dp.PairTable.open(path)
    assert back == pt
    assert back.j.dtype == np.int64 and back.w.dtype == np.float64
    back2 = dp.PairTable.open(str(path), validate=False)
    assert back2 == pt


def test_save_open_empty(tmp_path):
    pt = dp.PairTable.empty(7)
    pt.save(tmp_path / "e.zarr")
    back = dp.PairTable.open(tmp_path / "e.zarr")
    assert len(back) == 0 and back.k_atoms == 7


def test_save_overwrite_semantics(tmp_path):
    a = dp.PairTable([0], [1], [1.0], 3)
    b = dp.PairTable([1], [2], [2.0], 3)
    a.save(tmp_path / "p.zarr")
    b.save(tmp_path / "p.zarr")  # overwrite=True by default
    assert dp.PairTable.open(tmp_path / "p.zarr") == b
    with pytest.raises(Exception):
        a.save(tmp_path / "p.zarr", overwrite=False)
    assert dp.PairTable.open(tmp_path / "p.zarr") == b


def test_open_missing_or_foreign_store(tmp_path):
    import zarr

    with pytest.raises(InvalidArgumentError, match="no PairTable store"):
        dp.PairTable.open(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(StoreCorruptError, match="is not a PairTable store"):
        dp.PairTable.open(tmp_path / "other.zarr")


def test_open_validates_contents(tmp_path):
    import zarr

    pt = dp.PairTable([0, 1], [1, 2], [1.0, 2.0], 3)
    pt.save(tmp_path / "p.zarr")
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r+")
    g["w"][1] = -1.0
    with pytest.raises(PairTableError, match=r"pair 1 = \(1, 2\) has weight .*-1\.0"):
        dp.PairTable.open(tmp_path / "p.zarr")


# --------------------------------------------------------------------------- Parquet and networkx
def test_parquet_round_trip_is_exact_and_readable_by_pyarrow(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(4)
    pt = dp.PairTable.from_dense(random_coactivation(rng, 30, 0.3))
    path = tmp_path / "pairs.parquet"
    pt.to_parquet(path, measure="jaccard")
    assert dp.PairTable.from_parquet(path) == pt
    table = pq.read_table(path)
    assert table.column_names == ["j", "k", "w", "jaccard"]
    assert str(table.schema.field("j").type) == "int64" and str(table.schema.field("w").type) == "double"
    np.testing.assert_array_equal(table.column("jaccard").to_numpy(), pt.w)
    # another tool's file: rows in any order, the weight under another name, k_atoms passed
    import pyarrow as pa

    perm = rng.permutation(len(pt))
    pq.write_table(pa.table({"j": pt.j[perm], "k": pt.k[perm], "score": pt.w[perm]}), tmp_path / "other.parquet")
    assert dp.PairTable.from_parquet(tmp_path / "other.parquet", k_atoms=30, weight="score") == pt


def test_parquet_errors_name_the_file_and_what_is_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"j": [0], "k": [1]}), tmp_path / "nok.parquet")
    with pytest.raises(InvalidArgumentError, match=r"nok.parquet.* missing \['w'\]"):
        dp.PairTable.from_parquet(tmp_path / "nok.parquet", k_atoms=2)
    pq.write_table(pa.table({"j": [0], "k": [1], "w": [1.0]}), tmp_path / "noatoms.parquet")
    with pytest.raises(InvalidArgumentError, match="does not record k_atoms.*pass k_atoms="):
        dp.PairTable.from_parquet(tmp_path / "noatoms.parquet")
    with pytest.raises(InvalidArgumentError, match="cannot read pairs from Parquet file"):
        dp.PairTable.from_parquet(tmp_path / "absent.parquet", k_atoms=2)
    with pytest.raises(InvalidArgumentError, match="measure must be a column name other than j, k and w"):
        dp.PairTable([0], [1], [1.0], 2).to_parquet(tmp_path / "x.parquet", measure="w")


def test_to_networkx_has_every_atom_and_weighted_edges():
    pt = dp.PairTable([0, 1], [2, 2], [0.5, 2.0], 4)
    g = pt.to_networkx()
    assert sorted(g.nodes) == [0, 1, 2, 3]
    assert g[0][2]["weight"] == 0.5 and g[2][1]["weight"] == 2.0 and g.number_of_edges() == 2
