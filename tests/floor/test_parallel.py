"""The chunk-kernel thread runner: every chunk exactly once, any thread count, errors raised."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import distpen as dp
from distpen._parallel import run_chunks, set_threads, threads
from distpen._workers import kernel_threads
from distpen.cli.demo import synthetic_decoder_problem


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n_chunks", [0, 1, 5, 97])
def test_every_chunk_runs_once(n_threads, n_chunks):
    hits = np.zeros(n_chunks, dtype=np.int64)
    seen = set()

    def kernel(c0, c1, out):
        assert 0 <= c0 < c1 <= n_chunks
        seen.add(threading.get_ident())
        out[c0:c1] += 1

    previous = set_threads(n_threads)   # may exceed the cores, unlike kernel_threads
    try:
        run_chunks(kernel, n_chunks, hits)
    finally:
        set_threads(previous)
    np.testing.assert_array_equal(hits, 1)
    assert len(seen) <= n_threads


def test_an_error_in_a_piece_is_raised_after_all_pieces_finish():
    done = []

    def kernel(c0, c1):
        done.append((c0, c1))
        if c0 <= 5 < c1:
            raise ValueError("chunk 5 is bad")

    with kernel_threads(2), pytest.raises(ValueError, match="chunk 5 is bad"):
        run_chunks(kernel, 40)
    covered = sorted(c for c0, c1 in done for c in range(c0, c1))
    assert covered == list(range(40))


def test_thread_limit_is_per_calling_thread_and_restored():
    before = threads()
    with kernel_threads(1):
        assert threads() == 1
        other = []
        t = threading.Thread(target=lambda: other.append(threads()))
        t.start()
        t.join()
        assert other == [before]
    assert threads() == before
    assert set_threads(None) is None


def test_penalty_results_do_not_depend_on_the_thread_count():
    bs, pairs, beta = synthetic_decoder_problem(300, 12, 3000, max_block=4, seed=4)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(beta.shape[0])
    for normalize in (None, "frobenius"):
        pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, bs, 12, 1.3, normalize=normalize)
        got = {}
        for n in (1, 2, 4):
            with kernel_threads(n):
                got[n] = (pen.value(beta), pen.grad_target(beta), pen.hvp(beta, np.zeros(0), v),
                          pen.psd_majorizer_diag(beta, np.zeros(0)))
        for n in (2, 4):
            assert got[n][0] == got[1][0]
            for a, b in zip(got[n][1:], got[1][1:]):
                np.testing.assert_array_equal(a, b)
    nested = dp.NestedPrefixPenalty([8, 32], [1.0, 0.5], eps=1e-2, latent_dim=32)
    t = rng.standard_normal(5000 * 32)
    res = {}
    for n in (1, 3):
        previous = set_threads(n)
        try:
            z = np.zeros(2)
            res[n] = (nested.value(t, z), nested.grad_target(t, z), nested.hessian_diag(t, z))
        finally:
            set_threads(previous)
    assert res[1][0] == res[3][0]
    np.testing.assert_array_equal(res[1][1], res[3][1])
    np.testing.assert_array_equal(res[1][2], res[3][2])
