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


# ---------------------------------------------------------------- the per-worker span cache
def _cache_states(client):
    from distpen.curvature._span import cache_state

    return client.run(cache_state)


def _reset(client):
    from distpen.curvature._span import reset_cache_stats

    client.run(reset_cache_stats)


def _shm_left():
    import os

    from distpen.curvature import _span

    return [n for n in os.listdir(_span.SHM_DIR) if n.startswith(_span.SHARED_PREFIX)] \
        if os.path.isdir(_span.SHM_DIR) else []


def _zarr_problem(tmp_path, seed=3):
    sizes, p, beta, pairs = problem(seed=seed)
    z = zarr.create_array(str(tmp_path / "beta.zarr"), shape=beta.shape, chunks=(97,), dtype="f8")
    z[:] = beta
    return sizes, p, beta, pairs, z


def test_the_workers_of_a_host_decode_the_zarr_decoder_once_between_them(client, tmp_path):
    """Two worker processes on one host: each decodes half of the chunks into one shared segment,
    every task of the call uses it, and nothing is left in /dev/shm or the caches afterwards."""
    sizes, p, beta, pairs, z = _zarr_problem(tmp_path)
    _reset(client)
    kept, o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, return_overlap=True)
    n_tasks = -(-len(pairs) // 16)
    states = _cache_states(client)
    assert sum(s["hits"] for s in states.values()) == n_tasks
    for s in states.values():
        assert s["filled"] == 1 and s["reads"] == s["refused"] == s["rejected"] == 0
        assert s["shared"] == (1 if s["hits"] else 0)
        assert s["entries"] == 0 and s["bytes"] == 0  # released when the call ended
    assert _shm_left() == []
    ref_kept, ref_o = collinearity_gate_local(pairs, beta, sizes, p)
    np.testing.assert_array_equal(o, ref_o)
    np.testing.assert_array_equal(kept.w, ref_kept.w)


def _set_shm_dir(path):
    from distpen.curvature import _span

    previous, _span.SHM_DIR = _span.SHM_DIR, path
    return previous


def test_workers_that_do_not_share_a_segment_each_read_the_whole_decoder(client, tmp_path):
    """One worker's /dev/shm is another directory (as in another container): its segment and the
    other's each hold one part, neither verifies, and both workers read the span themselves."""
    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=8)
    other = tmp_path / "other-shm"
    other.mkdir()
    first = sorted(client.scheduler_info()["workers"])[0]
    previous = client.run(_set_shm_dir, str(other), workers=[first])[first]
    try:
        _reset(client)
        o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, return_overlap=True)[1]
        states = _cache_states(client)
    finally:
        client.run(_set_shm_dir, previous, workers=[first])
    for s in states.values():
        if s["hits"] + s["reads"]:
            assert s["rejected"] == 1 and s["reads"] == 1 and s["shared"] == 0
    assert list(other.iterdir()) == [] and _shm_left() == []
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])


def test_without_shared_memory_each_worker_decodes_its_own_copy(client, tmp_path, monkeypatch):
    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=9)
    monkeypatch.setenv("DISTPEN_SHARED_SPANS", "0")  # read on the client, which plans the fills
    _reset(client)
    o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, return_overlap=True)[1]
    states = _cache_states(client)
    assert sum(s["hits"] for s in states.values()) == -(-len(pairs) // 16)
    for s in states.values():  # each worker's fill task decoded the whole span into private memory
        assert s["shared"] == s["reads"] == s["rejected"] == 0 and s["filled"] == 1
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])


def test_a_numpy_decoder_is_used_in_place_with_norms_computed_once_per_worker(client):
    sizes, p, beta, pairs = problem(seed=4)
    _reset(client)
    o = dp.collinearity_gate(pairs, beta, sizes, p, chunk_pairs=32, return_overlap=True)[1]
    states = _cache_states(client)
    assert all(s["reads"] <= 1 and s["filled"] == 0 and s["entries"] == 0 for s in states.values())
    assert sum(s["reads"] + s["hits"] for s in states.values()) == -(-len(pairs) // 32)
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])


def test_a_decoder_over_the_cache_budget_is_read_task_by_task(client, tmp_path, monkeypatch):
    from distpen.curvature import collinearity as mod

    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=5)
    monkeypatch.setattr(mod, "CACHE_FRACTION", 1e-12)  # the budget (client side) is below one span
    _reset(client)
    o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, return_overlap=True)[1]
    states = _cache_states(client)
    assert sum(s["refused"] for s in states.values()) == -(-len(pairs) // 16)
    assert all(s["reads"] == s["hits"] == s["filled"] == s["entries"] == s["bytes"] == 0 for s in states.values())
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])


def test_pairs_in_shuffled_order_give_the_in_process_overlaps_in_that_order(client, tmp_path):
    from distpen.penalties.collinearity import overlap_of

    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=6)
    perm = np.random.default_rng(0).permutation(len(pairs))
    shuffled = dp.PairTable(pairs.j[perm], pairs.k[perm], pairs.w[perm], pairs.k_atoms, _trusted=True)
    o = dp.collinearity_gate(shuffled, z, sizes, p, chunk_pairs=40, return_overlap=True)[1]
    ref = overlap_of(pairs.j[perm], pairs.k[perm], beta, dp.DecoderLayout(sizes, p))
    np.testing.assert_array_equal(o, ref)
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1][perm])


def test_sparse_candidates_read_only_their_blocks(client, tmp_path):
    """Candidates touching few of the atoms skip the cache: each task reads its own blocks."""
    sizes, p, beta, _, z = _zarr_problem(tmp_path, seed=7)
    pairs = dp.PairTable([0, 0, 38], [1, 39, 39], [1.0, 1.0, 1.0], 40)
    _reset(client)
    o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=1, return_overlap=True)[1]
    assert all(s["reads"] == s["hits"] == s["refused"] == s["filled"] == 0 for s in _cache_states(client).values())
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])


def test_span_cache_builds_once_for_concurrent_tasks_and_respects_its_budget():
    import threading
    import time

    from distpen.curvature import _span

    _span.reset_cache_stats()
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.05)
        return "span"

    got = []
    threads = [threading.Thread(target=lambda: got.append(_span.cached(("c1", "x"), 100, 1000, build)))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == ["span"] * 4 and len(calls) == 1
    assert _span.cache_state()["bytes"] == 100
    assert _span.cached(("c1", "y"), 950, 1000, build) is None  # 100 + 950 > 1000: refused, not built
    assert len(calls) == 1 and _span.cache_state()["refused"] == 1

    def fail():
        raise OSError("disk")

    with pytest.raises(OSError):
        _span.cached(("c1", "z"), 500, 1000, fail)
    assert _span.cache_state()["bytes"] == 100  # the failed build gave its reservation back
    assert _span.release_call("c1") == 100 and _span.cache_state()["bytes"] == 0
    # a task that finishes after its call was released serves its value but keeps nothing
    assert _span.cached(("c1", "x"), 100, 1000, build) == "span"
    assert _span.cache_state()["entries"] == 0 and _span.cache_state()["bytes"] == 0


def test_fill_parts_in_one_process_and_the_shared_header(tmp_path, monkeypatch):
    """Parts cut at chunk boundaries; a private span is complete once every part is in; a shared
    segment is verified by its header tokens and loses its name then."""
    from distpen.curvature import _span
    from distpen.curvature._vectors import VectorSource

    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=10)
    lay = dp.DecoderLayout(sizes, p)
    src = VectorSource("zarr", z, lay.n_coef)
    lo, hi = int(lay.offsets[3]), int(lay.offsets[40])
    bounds = _span.part_bounds(lo, hi, 97, 3)
    assert bounds[0] == lo and bounds[-1] == hi and all(b % 97 == 0 for b in bounds[1:-1])
    assert _span.part_bounds(5, 50, 97, 3) == [5, 5, 5, 50]  # one chunk: the other parts are empty
    monkeypatch.setattr(_span, "SHM_DIR", str(tmp_path))
    for shared in (None, {"name": _span.SHARED_PREFIX + "test", "token": 12345}):
        key = ("call-" + str(bool(shared)), "x")
        for part in (0, 2):
            assert _span.fill_part(key, 8 * (hi - lo), 1 << 30, src, (3, 40), part, bounds, sizes, p, shared)
        entry = _span.cached(key, 0, 0, None)
        assert entry.parts == {0, 2}  # part 1 is missing
        if shared is not None:
            assert np.frombuffer(entry.mm, dtype=np.int64, count=3).tolist() == [12345, 0, 12345]
        else:
            assert not entry.verified()
            entry.checked = None
        assert _span.fill_part(key, 8 * (hi - lo), 1 << 30, src, (3, 40), 1, bounds, sizes, p, shared)
        assert entry.verified()
        np.testing.assert_array_equal(entry.t, beta[lo:hi])
        assert (entry.mm is not None) == (shared is not None)
        assert not (tmp_path / (_span.SHARED_PREFIX + "test")).exists()  # verified: the name is gone
        _span.release_call(key[0])
    assert _span.cache_state()["bytes"] == 0


def test_a_worker_with_two_threads_fills_its_span_with_both(tmp_path):
    """One worker, two threads: two fill tasks decode one half each into the worker's private copy."""
    from distributed import Client, LocalCluster

    from distpen.curvature import _span

    sizes, p, beta, pairs, z = _zarr_problem(tmp_path, seed=11)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as own:
        _span.reset_cache_stats()  # the worker runs in this process
        o = dp.collinearity_gate(pairs, z, sizes, p, chunk_pairs=16, return_overlap=True, client=own)[1]
        s = _span.cache_state()
    assert s["filled"] == 2 and s["reads"] == s["rejected"] == s["shared"] == 0
    assert s["hits"] == -(-len(pairs) // 16) and s["entries"] == 0
    np.testing.assert_array_equal(o, collinearity_gate_local(pairs, beta, sizes, p)[1])
