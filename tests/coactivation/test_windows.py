"""Window co-occurrence (``coactivation_stats(..., window=W)``) against a plain numpy reference,
across every gate form, chunking, thresholds, sequence boundaries, resume and bad input."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import distpen as dp
from distpen.coactivation.windows import WindowedGates, window_count
from distpen.errors import GateDataError, InvalidArgumentError, StoreConflictError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sources"))
from _sae_fixtures import dense_gates, encode_as_workers, random_sae_weights, write_delphi_cache, write_saelens  # noqa: E402
from _sae_fixtures import write_saelens_arrow_cache  # noqa: E402
from test_coactivation_stats import assert_stats, full, reference, to_topk, topk_gates  # noqa: E402


# --------------------------------------------------------------------------- the reference
def window_max(G, seq_len, window, thr=None):
    """Window gates by a loop over sequences and windows (the definition), after a per-token
    threshold ``thr(G) -> mask of gates that fire``."""
    if thr is not None:
        G = np.where(thr(G), G, 0.0).astype(G.dtype)
    rows = []
    for s0 in range(0, G.shape[0], seq_len):
        s1 = min(G.shape[0], s0 + seq_len)
        for a in range(s0, s1, window):
            rows.append(G[a:min(a + window, s1)].max(axis=0))
    return np.array(rows, dtype=G.dtype)


@pytest.mark.parametrize("n, L, W", [(120, 12, 4), (103, 12, 5), (50, 7, 7), (31, 10, 1), (64, 16, 16)])
def test_window_count_and_rows_match_the_definition(n, L, W):
    G = topk_gates(n=n, K=11, k=4, seed=n)
    ref = window_max(G, L, W)
    assert window_count(n, L, W) == ref.shape[0]
    wg = WindowedGates(G, W, seq_len=L)
    assert wg.n_tokens == ref.shape[0] and wg.row_align == -(-L // W)
    assert np.array_equal(np.asarray(wg), ref)
    assert np.array_equal(wg[3:ref.shape[0] - 1, 2:9], ref[3:-1, 2:9])  # any window and atom range


def test_a_window_never_crosses_a_sequence_boundary():
    # seq_len 10, window 4: windows [0,4) [4,8) [8,10) | [10,14) ... ; atom 0 on token 9, atom 1 on
    # token 10: adjacent tokens, different sequences, so they never share a window
    G = np.zeros((20, 3), dtype=np.float32)
    G[9, 0] = 1.0
    G[10, 1] = 2.0
    G[8, 2] = 0.5    # same window as token 9: [8, 10) is the ragged last window of sequence 0
    wg = WindowedGates(G, 4, seq_len=10)
    X = np.asarray(wg)
    assert X.shape == (6, 3)
    assert X[2].tolist() == [1.0, 0.0, 0.5] and X[3].tolist() == [0.0, 2.0, 0.0]


# --------------------------------------------------------------------------- the job
@pytest.mark.parametrize("row_chunk, tile, split_every", [(None, None, None), (6, 5, 2), (3, 4, 3)])
def test_window_stats_match_numpy_on_every_form(client, tmp_path, row_chunk, tile, split_every):
    n, K, L, W = 143, 17, 12, 5          # ragged windows (12 = 5 + 5 + 2) and a short last sequence
    G = topk_gates(n=n, K=K, k=5, seed=4)
    ref = reference(window_max(G, L, W))
    kw = dict(window=W, seq_len=L, row_chunk=row_chunk, tile=tile, split_every=split_every)
    idx, val = to_topk(G, 5)
    m = sp.csr_matrix(G)
    forms = {"dense": G, "topk": dp.TopKGates(idx, val, K), "csr": dp.SparseGates(m)}
    got = {}
    for name, g in forms.items():
        got[name] = dp.coactivation_stats(g, tmp_path / name, **kw)
        assert_stats(got[name], ref)
        assert got[name].window == W and got[name].seq_len == L and got[name].n_source_tokens == n
    for name in ("pair_count",):
        assert np.array_equal(full(got["dense"], name), full(got["topk"], name))


def test_window_of_one_token_is_per_token_statistics(client, tmp_path):
    G = topk_gates(n=90, K=13, k=4, seed=2)
    a = dp.coactivation_stats(G, tmp_path / "w1", window=1, seq_len=9)
    b = dp.coactivation_stats(G, tmp_path / "tok")
    assert a.n_tokens == b.n_tokens == 90
    for name in ("pair_sum", "pair_count"):
        np.testing.assert_allclose(full(a, name), full(b, name), rtol=1e-13)
    np.testing.assert_array_equal(a.fire_count, b.fire_count)


def test_zarr_gates_and_chunking_invariance(client, tmp_path):
    import zarr

    n, K, L, W = 200, 19, 20, 6
    G = topk_gates(n=n, K=K, k=5, seed=7).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "g.zarr"), shape=G.shape, chunks=(40, K), dtype="float32")
    z[:] = G
    ref = reference(window_max(G, L, W))
    a = dp.coactivation_stats(z, tmp_path / "a", window=W, seq_len=L, row_chunk=4, tile=8, split_every=2)
    b = dp.coactivation_stats(z, tmp_path / "b", window=W, seq_len=L, row_chunk=12, tile=8, split_every=4)
    assert_stats(a, ref)
    assert_stats(b, ref)
    np.testing.assert_array_equal(full(a, "pair_count"), full(b, "pair_count"))


@pytest.mark.parametrize("kind", ["scalar", "per_atom", "relative"])
def test_threshold_applies_per_token_before_the_window_maximum(client, tmp_path, kind):
    n, K, L, W = 96, 14, 12, 4
    G = topk_gates(n=n, K=K, k=6, seed=9)
    if kind == "scalar":
        ft, fires = 0.6, (lambda X: X > 0.6)
    elif kind == "per_atom":
        t = np.linspace(0.0, 1.5, K)
        ft, fires = t, (lambda X: X > t)
    else:
        # relative to the token's own largest gate: not the window's (which would differ)
        ft = dp.RelativeThreshold(0.5)
        fires = (lambda X: X > 0.5 * X.max(axis=1, keepdims=True))
    ref = reference(window_max(G, L, W, fires))
    idx, val = to_topk(G, 6)
    for name, g in {"dense": G, "topk": dp.TopKGates(idx, val, K)}.items():
        st = dp.coactivation_stats(g, tmp_path / name, window=W, seq_len=L, fire_threshold=ft)
        assert_stats(st, ref)
    if kind == "relative":  # the test can tell the two readings apart
        Wx = window_max(G, L, W)
        wrong = reference(np.where(Wx > 0.5 * Wx.max(axis=1, keepdims=True), Wx, 0.0))
        assert not np.array_equal(wrong["pair_count"], ref["pair_count"])


def test_delphi_cache_knows_its_sequence_length(client, tmp_path):
    n_seq, ctx, K = 9, 10, 21
    G = dense_gates(n_seq, ctx, K, density=0.12, seed=5, silent_tokens=(0, 13, 14))
    path = write_delphi_cache(str(tmp_path / "latents"), "layers.3", G, n_seq, ctx, n_splits=3, shuffle=True)
    ref = reference(window_max(G, ctx, 4))
    st = dp.coactivation_stats(path, tmp_path / "st", window=4, tile=8)
    assert st.seq_len == ctx
    assert_stats(st, ref)
    with pytest.raises(InvalidArgumentError, match="seq_len = 5 but these gates have sequences of 10"):
        dp.coactivation_stats(path, tmp_path / "bad", window=4, seq_len=5)


def test_encoded_activations_from_a_saelens_arrow_cache(client, tmp_path):
    d_in, d_sae, ctx, n_seq = 8, 24, 6, 10
    W_enc, b_enc, W_dec, b_dec, _ = random_sae_weights(d_in, d_sae, seed=1)
    write_saelens(str(tmp_path / "sae"), W_enc, b_enc, W_dec, b_dec, architecture="topk", k=4)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n_seq, ctx, d_in)).astype(np.float32)
    tok = rng.integers(0, 100, (n_seq, ctx)).astype(np.int32)
    write_saelens_arrow_cache(str(tmp_path / "cache"), "blocks.0.hook_resid_pre", acts, tok)
    sae = dp.load_sae(str(tmp_path / "sae"))
    src = dp.open_activations(str(tmp_path / "cache"))
    assert src.seq_len == ctx
    G = encode_as_workers(sae.encode, acts.reshape(-1, d_in))
    ref = reference(window_max(np.asarray(G, dtype=np.float32), ctx, 4))
    st = dp.coactivation_stats(dp.EncodedGates(src, sae), tmp_path / "st", window=4, tile=8)
    assert st.seq_len == ctx
    assert_stats(st, ref, rtol=1e-6)


def test_resume_and_identity(client, tmp_path):
    G = topk_gates(n=120, K=16, k=4, seed=3)
    out = tmp_path / "st"
    dp.coactivation_stats(G, out, window=4, seq_len=12, tile=4, _units=["0.0", "1.3"])
    st = dp.coactivation_stats(G, out, window=4, seq_len=12, tile=4)    # resumes, then finishes
    assert_stats(st, reference(window_max(G, 12, 4)))
    with pytest.raises(StoreConflictError):
        dp.coactivation_stats(G, out, window=6, seq_len=12, tile=4)     # another window: another job
    with pytest.raises(StoreConflictError):
        dp.coactivation_stats(G, out, tile=4)                            # per token: another job
    tok = dp.coactivation_stats(G, tmp_path / "tok", tile=4)
    with pytest.raises(InvalidArgumentError, match="per token .* per window of 4"):
        dp.merge_stats(tok, st, tmp_path / "m")
    merged = dp.merge_stats(st, st, tmp_path / "m2")
    assert merged.window == 4 and merged.n_tokens == 2 * st.n_tokens


def test_bad_gate_is_named_by_its_token_row(client, tmp_path):
    G = topk_gates(n=60, K=9, k=3, seed=1)
    G[37, 2] = -1.0   # hidden by the window maximum if it were taken first
    G[36, 2] = 3.0
    with pytest.raises(GateDataError, match="row 37, atom 2 is negative"):
        dp.coactivation_stats(G, tmp_path / "st", window=4, seq_len=12)


@pytest.mark.parametrize("kw, msg", [
    (dict(window=4), "needs the sequence length: pass seq_len="),
    (dict(window=0, seq_len=12), "window must be .*got 0"),
    (dict(window=13, seq_len=12), "window = 13 is longer than a sequence"),
    (dict(seq_len=12), "only used with window="),
    (dict(window=4, seq_len=12, row_chunk=4), "multiple of 3"),
])
def test_bad_arguments_before_any_work(client, tmp_path, kw, msg):
    G = topk_gates(n=60, K=9, k=3, seed=1)
    with pytest.raises(InvalidArgumentError, match=msg):
        dp.coactivation_stats(G, tmp_path / "st", **kw)
    assert not os.path.exists(tmp_path / "st")


def test_dask_gates_are_refused(client, tmp_path):
    import dask.array as da

    G = da.from_array(topk_gates(n=60, K=9, k=3, seed=1), chunks=(20, 9))
    with pytest.raises(InvalidArgumentError, match="does not take dask arrays"):
        dp.coactivation_stats(G, tmp_path / "st", window=4, seq_len=12)


def test_out_of_core_within_worker_memory_limit(tmp_path):
    """Workers of 300 MiB each count windows over dense gates larger than their total memory."""
    from distributed import Client, LocalCluster

    from test_coactivation_stats import _rss_peak, _rss_sampler

    limit = 300 * 2**20
    n, k, L, W = 500_000, 512, 1000, 32      # float32: 1.02 GB of dense gates, 2% non-zero
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=":0", host="127.0.0.1") as cluster, \
            Client(cluster, set_as_default=False) as c:
        g = dp.synth_gates(tmp_path / "g", n, k, density=0.02, seed=4, client=c)
        assert g.n_tokens * g.k_atoms * 4 > 3 * limit
        pids = c.run(os.getpid)
        c.run(_rss_sampler)
        st = dp.coactivation_stats(g, tmp_path / "st", window=W, seq_len=L, client=c)
        peaks = c.run(_rss_peak)
        assert c.run(os.getpid) == pids                      # no worker was killed and restarted
    assert max(peaks.values()) < limit, {a: p / 2**20 for a, p in peaks.items()}
    assert st.n_tokens == window_count(n, L, W) == 500 * 32
    # spot check against the definition on the first sequences
    part = np.asarray(g.array[:20 * L])
    ref = window_max(part, L, W)
    got = dp.WindowedGates(g, W, seq_len=L)[0:ref.shape[0]]
    assert np.array_equal(got, ref)
    pc = full(st, "pair_count")
    np.testing.assert_array_equal(np.diag(pc), st.fire_count)
    assert 0.2 * st.n_tokens * k < st.fire_count.sum() < 0.6 * st.n_tokens * k   # 1 − 0.98³² ≈ 48% per window
