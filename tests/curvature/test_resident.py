"""Worker-resident PCG (``newton_step(vectors="workers")``): the same solves as the client path,
state that never outlives a solve, and a named error when a worker holding part of it dies."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import distpen as dp
from distpen.cli.demo import synthetic_decoder_problem
from distpen.curvature import resident
from distpen.curvature.newton import newton_step
from distpen.errors import WorkerLostError

from test_newton import _dense_solve, _problem


def _held(client) -> int:
    return sum(client.run(resident.held_parts).values())


@pytest.mark.parametrize("precond", ["none", "jacobi", "block"])
def test_resident_equals_client_path_and_dense_solve(client, precond):
    pen, beta, rho, rhs = _problem(seed=3, spread=0.0 if precond == "none" else 1.0)
    a = newton_step(pen, beta, rho, rhs, damping=0.3, tol=1e-12, maxiter=400, precond=precond)
    b = newton_step(pen, beta, rho, rhs, damping=0.3, tol=1e-12, maxiter=400, precond=precond, vectors="client")
    assert a.converged and b.converged
    assert a.iterations == b.iterations
    np.testing.assert_allclose(a.residuals, b.residuals, rtol=1e-6, atol=1e-13)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-10, atol=1e-12 * np.abs(b.x).max())
    np.testing.assert_allclose(a.x, _dense_solve(pen, beta, rho, rhs, 0.3), rtol=1e-8, atol=1e-10)
    assert _held(client) == 0          # every part's vectors dropped when the solve ended


@pytest.mark.parametrize("n_tasks", [1, 3, 7])
def test_any_number_of_parts(client, n_tasks):
    pen, beta, rho, rhs = _problem(seed=1)
    a = newton_step(pen, beta, rho, rhs, damping=0.5, tol=1e-11, maxiter=300, n_tasks=n_tasks)
    np.testing.assert_allclose(a.x, _dense_solve(pen, beta, rho, rhs, 0.5), rtol=1e-8, atol=1e-10)


def test_rhs_sent_in_pieces_gives_the_same_solve(client, monkeypatch):
    # b reaches the workers in pieces of RHS_PIECE coefficients (the client's memory stays flat in
    # n); pieces that do not divide the parts evenly, or one piece per part, change no bit of x
    pen, beta, rho, rhs = _problem(seed=4)
    whole = newton_step(pen, beta, rho, rhs, damping=0.4, tol=1e-11, maxiter=300, n_tasks=3)
    sent = []
    real_scatter = type(client).scatter

    def counting_scatter(self, data, *args, **kwargs):
        if isinstance(data, np.ndarray) and data.ndim == 1:
            sent.append(data.size)
        return real_scatter(self, data, *args, **kwargs)

    monkeypatch.setattr(resident, "RHS_PIECE", 7)
    monkeypatch.setattr(type(client), "scatter", counting_scatter)
    pieces = newton_step(pen, beta, rho, rhs, damping=0.4, tol=1e-11, maxiter=300, n_tasks=3)
    b_sizes = [n for n in sent if n <= 7]
    assert sum(b_sizes) == rhs.size and len(b_sizes) >= rhs.size // 7
    assert np.array_equal(whole.x, pieces.x) and whole.residuals == pieces.residuals
    assert _held(client) == 0


def _extra_rows_fn(x, c0, c1):  # E = 0.7·I on every row, as a callable
    return 0.7 * x[c0:c1]


def test_extras_on_the_workers_match_the_client_path(client):
    pen, beta, rho, rhs = _problem(seed=2)
    _, pairs2, _ = synthetic_decoder_problem(30, 5, 40, max_block=3, seed=5)
    other = dp.DecoderIncoherencePenalty.from_pairs(pairs2, pen.layout.block_sizes, 5, 0.7, normalize="frobenius")
    rng = np.random.default_rng(0)
    diag = rng.uniform(0.0, 2.0, beta.shape[0])
    # every extra kind once, the diagonal with both preconditioners that add its diagonal
    for extra, precond in ((diag, "jacobi"), (diag, "block"), (_extra_rows_fn, "block"),
                           ((other, np.zeros(other.rho_count)), "jacobi")):
        a = newton_step(pen, beta, rho, rhs, damping=0.2, tol=1e-12, maxiter=400, precond=precond, extra=extra)
        b = newton_step(pen, beta, rho, rhs, damping=0.2, tol=1e-12, maxiter=400, precond=precond, extra=extra,
                        vectors="client")
        assert a.converged and b.converged and a.iterations == b.iterations
        np.testing.assert_allclose(a.x, b.x, rtol=1e-9, atol=1e-12 * np.abs(b.x).max())
    assert _held(client) == 0


def test_an_error_in_a_part_drops_every_part(client):
    pen, beta, rho, rhs = _problem(seed=2)

    def bad(x, c0, c1):
        return np.zeros(c1 - c0 + 1)

    with pytest.raises(dp.errors.InvalidArgumentError, match=r"returned shape"):
        newton_step(pen, beta, rho, rhs, damping=0.2, extra=bad)
    assert _held(client) == 0
    with pytest.raises(dp.errors.InvalidArgumentError, match="vectors must be 'workers' or 'client'"):
        newton_step(pen, beta, rho, rhs, damping=0.2, vectors="gpu")


def test_a_task_that_finds_no_state_names_the_part():
    with pytest.raises(WorkerLostError, match="part 3 of resident solve .* re-run newton_step"):
        resident._update("0123456789abcdef", 3, 1.0)


def test_killed_worker_mid_solve_is_a_named_error_and_the_solve_can_be_rerun(tmp_path):
    from distributed import Client, LocalCluster

    pen, beta, rho, rhs = _problem(seed=4, K=60, p=6, n_pairs=300, spread=1.5)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as c:
        from distributed.client import _set_global_client

        _set_global_client(c)
        try:
            pids = c.run(os.getpid)
            victim = sorted(pids)[1]

            def kill_at_3(it, rel):
                if it == 3:
                    os.kill(pids[victim], signal.SIGKILL)

            with pytest.raises(WorkerLostError, match=r"part 1 of the resident Newton solve .* re-run newton_step"):
                newton_step(pen, beta, rho, rhs, damping=0.1, tol=1e-14, maxiter=10_000, precond="none",
                            callback=kill_at_3)
            c.wait_for_workers(2, timeout=60)            # the nanny restarts it
            ok = newton_step(pen, beta, rho, rhs, damping=0.1, tol=1e-10, maxiter=2000)
            assert ok.converged
            np.testing.assert_allclose(ok.x, _dense_solve(pen, beta, rho, rhs, 0.1), rtol=1e-7, atol=1e-9)
        finally:
            _set_global_client(None)


def test_resident_handle_sends_t_once_and_releases_it(client, monkeypatch):
    from distributed import Client

    from distpen._broadcast import BROADCASTS

    pen, beta, rho, rhs = _problem(seed=7)
    other_pen, other_beta, other_rho, _ = _problem(seed=8)
    sent = []
    real = Client.scatter

    def counting(self, data, *a, **kw):
        sent.append(getattr(data, "nbytes", 0))
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Client, "scatter", counting)
    want = dp.evaluate(pen, beta, rho, ops=("value", "grad"))
    with dp.Resident(pen, beta, rho) as r:
        first = r.evaluate(ops=("value", "grad"))
        n_first = len(sent)
        dp.evaluate(other_pen, other_beta, other_rho, ops=("value",))   # another penalty meanwhile
        n_other = len(sent)
        again = r.evaluate(ops=("value", "grad"))
        step = r.newton_step(rhs, damping=0.3, tol=1e-10, maxiter=300)
        assert beta.nbytes not in sent[n_other:]                       # t was not sent again
        assert sum(sent[n_other:]) == rhs.nbytes                       # only the rhs, one slice per part
        assert sent[:n_first].count(beta.nbytes) >= 1                  # the first call sent it
        beta[0] += 1.0                                                 # changed in place: seen, sent again
        moved = r.evaluate(ops=("value",))
        assert sent[n_other:].count(beta.nbytes) == 1
        assert moved["value"] == dp.evaluate(pen, beta, rho, ops=("value",))["value"]
        beta[0] -= 1.0
    assert first["value"] == want["value"] and again["value"] == want["value"]
    np.testing.assert_array_equal(again["grad"], want["grad"])
    np.testing.assert_allclose(step.x, _dense_solve(pen, beta, rho, rhs, 0.3), rtol=1e-7, atol=1e-9)
    assert BROADCASTS.release(r._scope) == 0                            # closing released its entries
    with pytest.raises(dp.errors.InvalidArgumentError, match="closed"):
        r.evaluate()


@pytest.mark.parametrize("vectors, n_tasks, chunk", [("workers", 3, 7), ("workers", 7, 1000), ("workers", 2, 1),
                                                     ("client", None, 11)])
def test_newton_result_in_a_store_equals_the_numpy_result(client, tmp_path, vectors, n_tasks, chunk):
    """With out= the workers write x (chunks inside a part) and the client the chunks two parts
    share — or, for 1000 > n, the one chunk every part shares: the same bits as x in memory."""
    import zarr

    pen, beta, rho, rhs = _problem(seed=4)
    kw = dict(damping=0.3, tol=1e-12, maxiter=300, precond="block", vectors=vectors, n_tasks=n_tasks)
    a = newton_step(pen, beta, rho, rhs, **kw)
    seen = []
    b = newton_step(pen, beta, rho, rhs, out=str(tmp_path / "run"), chunk=chunk,
                    callback=lambda it, r: seen.append(it), **kw)
    assert isinstance(b.x, zarr.Array) and b.x.chunks == (min(chunk, beta.shape[0]),)
    np.testing.assert_array_equal(b.x[:], a.x)
    assert b.iterations == a.iterations and b.residuals == a.residuals and seen == list(range(1, a.iterations + 1))
    job = dp.RunStore(str(tmp_path / "run")).job("newton")
    assert job.status == "done" and job.done() == {"x"}
    prog = job.progress()
    assert prog["iterations"] == a.iterations and prog["converged"] and prog["residuals"] == a.residuals
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "run"), mode="r")["newton_x"][:], a.x)
    assert _held(client) == 0


def test_newton_result_store_on_failure_and_bad_chunk(client, tmp_path):
    pen, beta, rho, rhs = _problem(seed=2)
    run = str(tmp_path / "run")

    def bad(x, c0, c1):
        return np.zeros(c1 - c0 + 1)

    with pytest.raises(dp.errors.InvalidArgumentError, match=r"returned shape"):
        newton_step(pen, beta, rho, rhs, damping=0.2, extra=bad, out=run)
    job = dp.RunStore(run).job("newton")
    assert job.status == "failed" and job.done() == set()  # no x to trust
    assert "returned shape" in job.progress()["failures"][-1]["error"]
    res = newton_step(pen, beta, rho, rhs, damping=0.2, out=run)  # the same call again, fixed: replaces it
    assert dp.RunStore(run).job("newton").status == "done"
    np.testing.assert_array_equal(res.x[:], newton_step(pen, beta, rho, rhs, damping=0.2).x)
    with pytest.raises(dp.errors.InvalidArgumentError, match="chunk must be"):
        newton_step(pen, beta, rho, rhs, damping=0.2, out=run, chunk=0)
    with pytest.raises(dp.errors.InvalidArgumentError, match="pass out= too"):
        newton_step(pen, beta, rho, rhs, damping=0.2, chunk=5)
    with pytest.raises(dp.errors.InvalidArgumentError, match="rhs"):  # bad input: the store is not touched
        newton_step(pen, beta, rho, rhs[:-1], damping=0.2, out=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")


def test_the_client_writes_only_the_chunks_two_parts_share(client, tmp_path, monkeypatch):
    pen, beta, rho, rhs = _problem(seed=4)
    got = []
    real = resident.write_pieces
    monkeypatch.setattr(resident, "write_pieces", lambda z, pieces: (got.extend(pieces), real(z, pieces)))
    # parts end on atom bounds, multiples of p_out = 5 here: chunks of 7 straddle them
    res = newton_step(pen, beta, rho, rhs, damping=0.3, n_tasks=3, out=str(tmp_path / "run"), chunk=7)
    rows = sum(v.shape[0] for _, v in got)
    assert 0 < rows <= 2 * 2 * 7  # at most one chunk's worth on each side of the 2 inner part bounds
    assert rows < beta.shape[0] // 4
    np.testing.assert_array_equal(res.x[:], newton_step(pen, beta, rho, rhs, damping=0.3, n_tasks=3).x)


def test_write_pieces_refuses_a_chunk_left_short(tmp_path):
    import zarr

    z = zarr.create_array(str(tmp_path / "z"), shape=(10,), chunks=(4,), dtype="f8")
    resident.write_pieces(z, [(0, np.arange(3.0)), (3, np.arange(3.0, 8.0))])
    np.testing.assert_array_equal(z[:8], np.arange(8.0))
    with pytest.raises(RuntimeError, match="chunk 2 of the Newton result got 1 of its 2 rows"):
        resident.write_pieces(z, [(8, np.zeros(1))])


def test_newton_recorder_writes_the_residual_history(tmp_path):
    run = str(tmp_path / "run")
    record = dp.newton_recorder(run, 10, every=0.0)
    for it, rel in ((1, 0.5), (2, 0.25)):
        record(it, rel)
    prog = dp.RunStore(run).job("newton").progress()
    assert prog["iterations"] == 2 and prog["residuals"] == [1.0, 0.5, 0.25] and prog["phase"] == "pcg"
