"""Gate inputs: validation before any work, open_gates, synth_gates (deterministic, heavy-tailed, planted groups)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import distpen as dp
from distpen.errors import (InvalidArgumentError, InvalidDtypeError, ShapeMismatchError,
                            StoreConflictError, StoreCorruptError)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("array, exc, match", [
    (np.ones(5), ShapeMismatchError, r"dense gates must be 2-D \(n_tokens, k_atoms\), got 1-D of shape \(5,\)"),
    (np.ones((2, 3, 4)), ShapeMismatchError, "got 3-D"),
    (np.ones((3, 4), dtype=np.int32), InvalidDtypeError, r"dense gates have dtype int32; expected float32 or float64"),
    (np.ones((3, 4), dtype=np.complex64), InvalidDtypeError, "complex64"),
    (np.ones((3, 4), dtype=np.float16), InvalidDtypeError, "float16"),
    (np.ones((0, 4)), ShapeMismatchError, r"at least one token and one atom, got shape \(0, 4\)"),
    ("not an array", InvalidArgumentError, "must be a numpy, dask or zarr array, got str"),
    (object(), InvalidArgumentError, "must be a numpy, dask or zarr array, got object"),
])
def test_dense_gates_validation(array, exc, match):
    with pytest.raises(exc, match=match):
        dp.DenseGates(array)


def test_coactivation_of_a_missing_path(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"no gates at .* \(path does not exist\)"):
        dp.coactivation_stats(str(tmp_path / "missing"), tmp_path / "st")


def _ok_topk():
    return np.array([[0, 2], [1, -1]]), np.array([[1.0, 0.5], [2.0, 0.0]])


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda i, v, K: (i[0], v, K), ShapeMismatchError, r"top-k indices must be 2-D \(n_tokens, k\), got 1-D"),
    (lambda i, v, K: (i, v[:1], K), ShapeMismatchError, r"indices have 2 tokens but values have 1; both must have the same N"),
    (lambda i, v, K: (i, v[:, :1], K), ShapeMismatchError, r"indices have k = 2 slots per token but values have 1"),
    (lambda i, v, K: (i.astype(float), v, K), InvalidDtypeError, r"indices have dtype float64; expected an integer dtype"),
    (lambda i, v, K: (i, v.astype(np.int64), K), InvalidDtypeError, r"values have dtype int64; expected float32 or float64"),
    (lambda i, v, K: (i, v, 0), InvalidArgumentError, "k_atoms must be > 0, got 0"),
    (lambda i, v, K: (i, v, 1), ShapeMismatchError, r"k = 2 slots per token but only k_atoms = 1 atoms"),
    (lambda i, v, K: (i + 5, v, K), InvalidArgumentError, r"top-k indices hold 7, outside \[-1, 3\)"),
    (lambda i, v, K: (i - 2, v, K), InvalidArgumentError, r"top-k indices hold -3, outside \[-1, 3\)"),
])
def test_topk_gates_validation(mutate, exc, match):
    i, v = _ok_topk()
    with pytest.raises(exc, match=match):
        dp.TopKGates(*mutate(i, v, 3))


def test_gate_objects_describe_themselves():
    i, v = _ok_topk()
    g = dp.TopKGates(i, v.astype(np.float32), 3)
    assert (g.n_tokens, g.k, g.k_atoms, g.dtype, g.form) == (2, 2, 3, np.float32, "topk")
    spec = g.input_spec()
    assert spec["form"] == "topk" and spec["indices"]["shape"] == [2, 2]
    d = dp.DenseGates(np.zeros((4, 3), dtype=np.float32))
    assert d.input_spec()["gates"]["dtype"] == "float32"
    assert d.input_spec() != dp.DenseGates(np.ones((4, 3), dtype=np.float32)).input_spec()  # content token


# --------------------------------------------------------------------------- open_gates
def test_open_gates_bare_array_and_errors(tmp_path):
    import zarr

    z = zarr.create_array(str(tmp_path / "bare"), shape=(10, 4), chunks=(5, 4), dtype="float64")
    g = dp.open_gates(tmp_path / "bare")
    assert isinstance(g, dp.DenseGates) and g.kind == "zarr" and g.row_chunk_hint() == 5
    zarr.open_group(str(tmp_path / "grp"), mode="w").create_array("x", shape=(2,), dtype="f8")
    with pytest.raises(StoreCorruptError, match=r"is not a gates store: attributes format=None, form=None \(arrays \['x'\]\)"):
        dp.open_gates(tmp_path / "grp")
    with pytest.raises(InvalidArgumentError, match=r"no gates at .* \(path does not exist\)"):
        dp.open_gates(tmp_path / "missing")
    grp = zarr.open_group(str(tmp_path / "lying"), mode="w")
    grp.create_array("gates", shape=(3, 5), dtype="f4")
    grp.attrs.update({"format": "distpen.gates", "form": "dense", "k_atoms": 4})
    with pytest.raises(ShapeMismatchError, match="says k_atoms = 4 but its arrays hold 5 atoms"):
        dp.open_gates(tmp_path / "lying")
    grp = zarr.open_group(str(tmp_path / "badidx"), mode="w")
    grp.create_array("indices", shape=(3, 2), dtype="i4")
    grp.create_array("values", shape=(3, 2), dtype="f4")
    grp.attrs.update({"format": "distpen.gates", "form": "topk", "k_atoms": 4, "index_range": [-1, 9]})
    with pytest.raises(InvalidArgumentError, match=r"top-k indices hold 9, outside \[-1, 4\)"):
        dp.open_gates(tmp_path / "badidx")
    del z


# --------------------------------------------------------------------------- synth_gates
def test_synth_topk_is_deterministic_and_valid(client, tmp_path):
    a = dp.synth_gates(tmp_path / "a", 3000, 200, topk=12, seed=7, row_chunk=700)
    b = dp.synth_gates(tmp_path / "b", 3000, 200, topk=12, seed=7, row_chunk=700)
    c = dp.synth_gates(tmp_path / "c", 3000, 200, topk=12, seed=8, row_chunk=700)
    assert isinstance(a, dp.TopKGates) and a.kind == "zarr" and a.indices.chunks == (700, 12)
    ia, va = a.indices[:], a.values[:]
    assert np.array_equal(ia, b.indices[:]) and np.array_equal(va, b.values[:])
    assert not np.array_equal(ia, c.indices[:])
    assert ia.dtype == np.int32 and va.dtype == np.float32
    assert ia.min() >= -1 and ia.max() < 200
    assert ((ia == -1) == (va == 0)).all() and (va >= 0).all()
    srt = np.sort(np.where(ia < 0, -np.arange(12)[None, :] - 2, ia), axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()                   # no index repeated within a row
    attrs = dict(__import__("zarr").open_group(str(tmp_path / "a")).attrs)
    assert attrs["format"] == "distpen.gates" and attrs["form"] == "topk" and attrs["k_atoms"] == 200
    assert attrs["complete"] is True and attrs["seed"] == 7


def test_synth_dense_density_heavy_tail_and_planted_groups(client, tmp_path):
    g = dp.synth_gates(tmp_path / "d", 6000, 256, density=0.05, seed=3, row_chunk=1000)
    assert isinstance(g, dp.DenseGates) and g.array.chunks == (1000, 256)
    G = g.array[:]
    assert G.dtype == np.float32 and (G >= 0).all()
    dens = (G > 0).mean()
    assert 0.04 < dens < 0.075                                      # planted groups add a little
    rates = np.sort((G > 0).mean(0))[::-1]
    assert rates[0] > 20 * np.median(rates)                        # heavy-tailed firing rates
    st = dp.coactivation_stats(g, tmp_path / "st")
    groups = __import__("zarr").open_group(str(tmp_path / "d")).attrs["planted_groups"]
    assert len(groups) == 4 and all(2 <= len(x) <= 8 for x in groups)
    lift = st.pairs(measure="lift", min_count=5)
    planted = {(min(a, b), max(a, b)) for grp in groups for a in grp for b in grp if a != b}
    w = dict(zip(zip(lift.j.tolist(), lift.k.tolist()), lift.w.tolist()))
    # planted pairs co-fire far above chance; typical pairs do not
    assert np.median([w[p] for p in planted]) > 5.0
    assert np.median(lift.w) < 2.0


def test_synth_chunk_depends_only_on_seed_and_chunk_index(client, tmp_path):
    """Each stored chunk is the pure function of (seed, chunk index) that a worker computed."""
    from distpen.sources.synth import _synth_chunk

    a = dp.synth_gates(tmp_path / "a", 2000, 64, density=0.1, seed=1, row_chunk=300)
    G = a.array[:]
    for c in (0, 3, 6):  # the last chunk is ragged
        r0, r1 = 300 * c, min(2000, 300 * (c + 1))
        np.testing.assert_array_equal(_synth_chunk(c, r0, r1, 64, 1, None, 0.1, "float32", "k"), G[r0:r1])
    t = dp.synth_gates(tmp_path / "t", 900, 64, topk=5, seed=2, row_chunk=400)
    idx, val = _synth_chunk(1, 400, 800, 64, 2, 5, None, "float32", "k2")
    np.testing.assert_array_equal(idx, t.indices[400:800])
    np.testing.assert_array_equal(val, t.values[400:800])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(topk=4, density=0.1), InvalidArgumentError, "pass topk .* or density .*, not both"),
    (dict(topk=11), InvalidArgumentError, r"topk = 11 exceeds k_atoms = 10"),
    (dict(density=0.0), InvalidArgumentError, r"density must be in \(0, 1\], got 0.0"),
    (dict(density=1.5), InvalidArgumentError, r"density must be in \(0, 1\], got 1.5"),
    (dict(density=0.1, dtype="int8"), InvalidDtypeError, "dtype must be float32 or float64"),
    (dict(density=0.1, row_chunk=0), InvalidArgumentError, "row_chunk must be > 0"),
])
def test_synth_bad_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dp.synth_gates(tmp_path / "x", 100, 10, **kwargs)
    assert not os.path.exists(tmp_path / "x")


def test_synth_refuses_existing_path(client, tmp_path):
    dp.synth_gates(tmp_path / "x", 50, 8, density=0.2)
    with pytest.raises(StoreConflictError, match="already exists; pass overwrite=True"):
        dp.synth_gates(tmp_path / "x", 50, 8, density=0.2)
    g = dp.synth_gates(tmp_path / "x", 60, 8, topk=2, overwrite=True)
    assert g.n_tokens == 60 and g.form == "topk"
