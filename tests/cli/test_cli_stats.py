"""`distpen synth | coactivation | pairs | status` through the real command entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

import distpen as dp
from distpen.cli import main


@pytest.fixture
def addr(client):
    yield client.scheduler.address
    from distributed.client import _set_global_client

    from distpen import cluster

    cluster.close()
    _set_global_client(client)


def test_pipeline_with_progress_bars(addr, tmp_path, capsys):
    g, st, pt = str(tmp_path / "g"), str(tmp_path / "st"), str(tmp_path / "pairs")
    assert main(["synth", g, "--tokens", "3000", "--atoms", "96", "--topk", "8", "--seed", "3",
                 "--row-chunk", "500", "--scheduler", addr]) == 0
    err = capsys.readouterr().err
    # stderr is not a terminal here: plain progress lines, the last one at 100%
    assert err.strip().splitlines()[-1] == "synth: 3,000/3,000 tok (100%)"
    assert main(["coactivation", g, "--out", st, "--tile", "40", "--row-chunk", "500",
                 "--scheduler", addr]) == 0
    cap = capsys.readouterr()
    assert "coactivation" in cap.err and "tiles 6/6" in cap.err and "\r" not in cap.err
    assert "3000 tokens × 96 atoms, tiles 6/6 (6 computed now)" in cap.out
    assert main(["pairs", st, "--out", pt, "--measure", "lift", "--top-m", "3", "--scheduler", addr]) == 0
    assert "pairs (lift) over 96 atoms" in capsys.readouterr().out
    table = dp.PairTable.open(pt)
    assert table == dp.open_stats(st).pairs(measure="lift", top_m=3)
    nb = str(tmp_path / "layer-co-occurrence.json")
    assert main(["neighbours", st, "--out", nb, "--top-m", "5", "--measure", "npmi", "--scheduler", addr]) == 0
    assert "strongest npmi partners" in capsys.readouterr().out
    doc = json.loads(open(nb).read())
    want = dp.open_stats(st).neighbours(measure="npmi", top_m=5)
    assert doc == {str(a): [[s, p] for s, p in v] for a, v in want.items()}
    cl_path = str(tmp_path / "clusters.json")
    assert main(["clusters", st, "--max-size", "10", "--out", cl_path, "--scheduler", addr]) == 0
    printed = capsys.readouterr().out
    assert "groups of latents (components, jaccard >" in printed and "density" in printed
    got = json.loads(open(cl_path).read())
    want = dp.open_stats(st).clusters("jaccard", max_size=10)
    assert got["threshold"] == want.threshold and [c["members"] for c in got["clusters"]] == \
        [r["members"].tolist() for r in want.rows]
    assert main(["status", st, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "coactivation  done" in out and "6/6" in out and "verify coactivation: ok" in out
    assert main(["status", st, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stages"]["coactivation"]["units_done"] == 6
    # re-running the same job resumes: nothing left to compute
    assert main(["coactivation", g, "--out", st, "--quiet", "--scheduler", addr]) == 0
    assert dp.open_stats(st)._job.progress()["units_computed"] == 0


def test_atom_major_decomposition_from_the_command_line(addr, tmp_path, capsys):
    """`--decomposition atoms`: one progress bar per phase (the copy, then the tiles), each ending
    at every row, and the same bits as the row-major job that streams (split_every ≥ 6 chunks)."""
    g = str(tmp_path / "g")
    assert main(["synth", g, "--tokens", "3000", "--atoms", "96", "--topk", "8", "--seed", "4",
                 "--row-chunk", "500", "--quiet", "--scheduler", addr]) == 0
    for kind in ("rows", "atoms"):
        assert main(["coactivation", g, "--out", str(tmp_path / kind), "--tile", "16", "--row-chunk", "500",
                     "--split-every", "6", "--decomposition", kind, "--scheduler", addr]) == 0
    err = capsys.readouterr().err
    assert "coactivation (atom-major copy): 3,000/3,000 tok (100%)" in err
    assert "coactivation (tiles): 3,000/3,000 tok (100%), tiles 21/21" in err
    rows, atoms = dp.open_stats(str(tmp_path / "rows")), dp.open_stats(str(tmp_path / "atoms"))
    assert atoms._job.progress()["decomposition"] == "atoms" and rows._job.progress()["decomposition"] == "rows"
    for i, j in [(0, 0), (0, 5), (2, 4), (5, 5)]:
        a, b = rows.tile(i, j), atoms.tile(i, j)
        assert np.array_equal(a.pair_sum, b.pair_sum) and np.array_equal(a.pair_count, b.pair_count)
    assert np.array_equal(rows.gate_sum, atoms.gate_sum)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    import io

    from distpen.cli._common import Bar as _Bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = _Bar("work", "tok", quiet=False, stream=tty)
    for done in (10, 50, 100):
        bar.update(done, 100, tiles="3/6")
    bar.close()
    assert "\r" in tty.getvalue() and "100/100" in tty.getvalue()   # a redrawn tqdm bar
    plain = io.StringIO()
    bar = _Bar("work", "tok", quiet=False, stream=plain)
    for done in (10, 50, 100):
        bar.update(done, 100, tiles="3/6")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "work: 10/100 tok (10%), tiles 3/6" and lines[-1].startswith("work: 100/100 tok (100%)")
    assert len(lines) == 2  # throttled: the middle update falls within PLAIN_EVERY seconds
    quiet = io.StringIO()
    _Bar("work", "tok", quiet=True, stream=quiet).update(5, 10)
    assert quiet.getvalue() == ""


def test_status_reports_damage_with_exit_1(addr, tmp_path, capsys):
    st = str(tmp_path / "st")
    dp.coactivation_stats(np.eye(6), st, tile=3)
    import os

    os.unlink(os.path.join(st, "pair_sum", "c", "0", "0"))
    assert main(["status", st, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "verify coactivation: DAMAGED" in out and "0.0: pair_sum/c/0/0" in out


@pytest.mark.parametrize("argv, match", [
    (["coactivation", "{tmp}/missing", "--out", "{tmp}/st"], r"no gates at .*missing' \(path does not exist\)"),
    (["synth", "{tmp}/g", "--tokens", "10", "--atoms", "4", "--topk", "9"], "topk = 9 exceeds k_atoms = 4"),
    (["pairs", "{tmp}/nothing", "--out", "{tmp}/p"], "no statistics store at"),
    (["status", "{tmp}/nothing"], "no run store at"),
])
def test_bad_input_is_one_line_and_exit_2(addr, tmp_path, capsys, argv, match):
    import re

    argv = [a.format(tmp=tmp_path) for a in argv] + (["--scheduler", addr] if argv[0] != "status" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distpen: error: ")
    assert re.search(match, err[0])


def test_conflicting_job_needs_overwrite(addr, tmp_path, capsys):
    g = str(tmp_path / "g")
    dp.synth_gates(g, 200, 10, density=0.3)
    st = str(tmp_path / "st")
    assert main(["coactivation", g, "--out", st, "--tile", "5", "--quiet", "--scheduler", addr]) == 0
    assert main(["coactivation", g, "--out", st, "--tile", "4", "--quiet", "--scheduler", addr]) == 2
    assert "pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    assert main(["coactivation", g, "--out", st, "--tile", "4", "--overwrite", "--quiet", "--scheduler", addr]) == 0
    assert dp.open_stats(st).tile_size == 4


def test_argparse_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["synth", "x", "--tokens", "0", "--atoms", "4"])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_window_co_occurrence_from_the_command_line(addr, tmp_path, capsys):
    g, st = str(tmp_path / "g"), str(tmp_path / "st")
    dp.synth_gates(g, 600, 32, topk=4, seed=1, row_chunk=120)
    assert main(["coactivation", g, "--out", st, "--window", "8", "--seq-len", "60", "--tile", "16",
                 "--scheduler", addr]) == 0
    assert "80 windows of 8 tokens × 32 atoms" in capsys.readouterr().out     # 10 sequences × ⌈60/8⌉ = 8
    s = dp.open_stats(st)
    want = dp.coactivation_stats(g, str(tmp_path / "api"), window=8, seq_len=60, tile=16)
    assert s.window == 8 and np.array_equal(s.block(0, 32, 0, 32, "pair_count"),
                                            want.block(0, 32, 0, 32, "pair_count"))
    assert main(["coactivation", g, "--out", str(tmp_path / "x"), "--window", "8", "--scheduler", addr]) == 2
    assert "needs the sequence length: pass seq_len=" in capsys.readouterr().err
