"""Security: TLS between client, scheduler and workers; dashboards on loopback; stores that hold
JSON only and whose recorded paths cannot leave the store."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from _procs import (
    ProcCluster,
    assert_matches,
    reference_stats,
    run_distpen,
    time_limit,  # noqa: F401  (autouse: a hung test fails instead of stalling)
    topk_to_sparse,
    write_topk_gates,
)

import distpen as dp
from distpen.errors import InvalidArgumentError, StoreCorruptError
from distpen.security import resolve_security, write_temporary_certificates
from distpen.store import RunStore

pytest.importorskip("cryptography")

CONNECT_TIMEOUT = 5


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return write_temporary_certificates(d / "cluster"), write_temporary_certificates(d / "other")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    pc = ProcCluster(tmp_path_factory.mktemp("tls-cluster"), tls=certs[0])
    try:
        pc.start(1)
        yield pc
    finally:
        pc.close()


_CLIENT = """
import sys
from distributed import Client
from distributed.security import Security
addr, mode, ca, cert, key = sys.argv[1:]
if mode == "none":
    sec = None
elif mode == "ca-only":
    sec = Security(require_encryption=True, tls_ca_file=ca)
else:
    sec = Security(require_encryption=True, tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key)
with Client(addr, security=sec, timeout=%d) as c:
    print(c.submit(lambda x: x + 1, 1).result(timeout=60))
""" % CONNECT_TIMEOUT


def _try_connect(address, mode="none", paths=None):
    """Connect a client in a fresh process (a refused TLS handshake leaves nothing behind in the
    test process); True if it ran a task, False if it was refused or timed out."""
    import subprocess
    import sys

    p = paths or {"ca_file": "-", "cert": "-", "key": "-"}
    try:
        res = subprocess.run([sys.executable, "-c", _CLIENT, address, mode, p["ca_file"], p["cert"], p["key"]],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and res.stdout.strip() == "2"


def test_certificate_files_are_pem_and_the_key_is_private(certs):
    paths = certs[0]
    for name in ("ca_file", "cert", "key"):
        assert open(paths[name]).read().startswith("-----BEGIN")
    assert os.stat(paths["key"]).st_mode & 0o077 == 0


def test_client_without_certificates_cannot_connect(tls_cluster, certs):
    address = tls_cluster.address
    assert address.startswith("tls://127.0.0.1:")
    assert not _try_connect(address.replace("tls://", "tcp://"))          # no TLS at all: plain TCP
    assert not _try_connect(address, "ca-only", certs[0])                  # TLS, but no client certificate
    assert not _try_connect(address, "full", certs[1])                     # a certificate of another CA
    with pytest.raises(InvalidArgumentError, match="uses TLS but no certificates were given"):
        dp.connect(address)


def test_client_with_certificates_connects(tls_cluster, certs):
    assert _try_connect(tls_cluster.address, "full", certs[0])


def test_cli_over_tls(tls_cluster, certs, tmp_path):
    c = certs[0]
    idx, val = write_topk_gates(tmp_path / "g", 2000, 100, 5, seed=2, row_chunk=500)
    args = ("coactivation", tmp_path / "g", "--out", tmp_path / "st", "--tile", 64, "--scheduler",
            tls_cluster.address, "--quiet")
    res = run_distpen(*args, check=False)                      # no certificates: a one-line error
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("distpen: error: scheduler 'tls://")
    run_distpen(*args, "--tls-ca-file", c["ca_file"], "--tls-cert", c["cert"], "--tls-key", c["key"])
    assert_matches(tmp_path / "st", reference_stats(topk_to_sparse(idx, val, 100)))
    # --tls alone takes the certificates from the Dask configuration
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": c["ca_file"],
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": c["cert"],
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": c["key"]}
    res = run_distpen("coactivation", tmp_path / "g", "--out", tmp_path / "st2", "--tile", 64,
                      "--scheduler", tls_cluster.address, "--tls", env=env)
    assert "tiles 3/3" in res.stdout


def test_demo_over_tls(tls_cluster, certs, tmp_path):
    """`distpen demo --scheduler tls://…` takes the same TLS options as the other commands."""
    c = certs[0]
    args = ("demo", "--out", tmp_path / "run", "--tokens", 20_000, "--atoms", 256, "--p-out", 16,
            "--scheduler", tls_cluster.address, "--quiet")
    res = run_distpen(*args, check=False)                      # no certificates: a one-line error
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("distpen: error: scheduler 'tls://")
    assert not (tmp_path / "run").exists()
    run_distpen(*args, "--tls-ca-file", c["ca_file"], "--tls-cert", c["cert"], "--tls-key", c["key"])
    st = dp.open_stats(tmp_path / "run")
    assert st.n_tokens == 20_000 and st.k_atoms == 256


def test_resolve_security_options(certs, monkeypatch):
    c = certs[0]
    assert resolve_security() is None
    assert resolve_security(tls=True) is True                               # embedded: temporary
    sec = resolve_security(ca_file=c["ca_file"], cert=c["cert"], key=c["key"])
    assert sec.require_encryption and sec.tls_client_cert == c["cert"]
    with pytest.raises(InvalidArgumentError, match="TLS needs a key; pass all three"):
        resolve_security(ca_file=c["ca_file"], cert=c["cert"])
    with pytest.raises(InvalidArgumentError, match="is not a file"):
        resolve_security(ca_file="/nonexistent.pem", cert=c["cert"], key=c["key"])
    with pytest.raises(InvalidArgumentError, match="--tls with scheduler 'tls://h:1' needs the cluster's"):
        resolve_security(tls=True, address="tls://h:1")
    with pytest.raises(InvalidArgumentError, match="temporary certificates only secure an embedded cluster"):
        dp.connect("tls://127.0.0.1:1", security=True)


def _listening(pids, port=None):
    import psutil

    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids and (port is None or conn.laddr.port == port):
            out.append(conn.laddr.ip)
    return out


def test_embedded_cluster_with_temporary_certificates_and_loopback_dashboard(dask_client):
    from urllib.parse import urlparse

    from distributed.client import _set_global_client

    from distpen import cluster

    try:
        client = dp.connect(security=True, n_workers=1, memory_limit="1GiB")
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(lambda: 41 + 1).result(timeout=60) == 42
        assert not _try_connect(client.scheduler.address)                # no certificates: refused
        link = urlparse(client.dashboard_link)
        assert link.hostname == "127.0.0.1"
        dash = _listening({os.getpid()}, port=link.port)
        assert dash and set(dash) <= {"127.0.0.1"}, dash
        ips = _listening(set(client.run(os.getpid).values()))          # in the worker processes
        assert len(ips) >= 2 and set(ips) <= {"127.0.0.1"}, ips          # worker + its HTTP server
        ports = [urlparse(a).port for a in [client.scheduler.address]
                 + [n.address for n in cluster._cache["cluster"].workers.values()]]   # scheduler, nannies
        for port in ports:                                                 # (in this process)
            assert _listening({os.getpid()}, port=port) == ["127.0.0.1"], port
    finally:
        cluster.close()
        _set_global_client(dask_client)


# ============================================================================ stores: JSON only, no escape
def _small_store(tmp_path, client):
    rng = np.random.default_rng(0)
    G = rng.random((300, 10)) * (rng.random((300, 10)) < 0.3)
    dp.coactivation_stats(G, tmp_path / "st", tile=4)
    return tmp_path / "st", G


def test_store_holds_json_metadata_and_numeric_chunks_only(client, tmp_path):
    import zarr

    store, _ = _small_store(tmp_path, client)
    for d, _, files in os.walk(store):
        rel = os.path.relpath(d, store)
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".json"):
                with open(path) as fh:
                    json.load(fh)
            else:   # otherwise a Zarr chunk: <array>/c/<i>[/<j>]
                parts = os.path.relpath(path, store).split(os.sep)
                assert parts[1] == "c" and all(p.isdigit() for p in parts[2:]), path
                assert not rel.startswith("_distpen")
    g = zarr.open_group(str(store), mode="r")
    for name, arr in g.arrays():
        assert arr.dtype.kind in "fiu", (name, arr.dtype)


def test_reading_a_store_never_unpickles(client, tmp_path, monkeypatch, capsys):
    from distpen.cli.stats import main_for_tests

    store, G = _small_store(tmp_path, client)

    def refuse(*a, **k):
        raise AssertionError("something read from the store was unpickled")

    class NoUnpickler:
        def __init__(self, *a, **k):
            refuse()

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    st = dp.open_stats(store)
    C = st.coactivation_dense()
    np.testing.assert_allclose(C, G.T @ G / 300, rtol=1e-12)
    assert RunStore(store).verify()["ok"]
    assert main_for_tests(["status", str(store), "--verify", "--json"]) == 0
    json.loads(capsys.readouterr().out)


def test_a_planted_pickle_is_refused_not_loaded(client, tmp_path):
    store, _ = _small_store(tmp_path, client)
    canary = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    manifest = store / "_distpen" / "coactivation" / "manifest.json"
    manifest.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(StoreCorruptError, match="manifest.json is not valid JSON"):
        RunStore(store).status()
    with pytest.raises(StoreCorruptError):
        dp.open_stats(store)
    assert not canary.exists()


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "pair_sum/../../x", "a//b", "./x", "C:/x"])
def test_recorded_output_paths_cannot_escape_the_store(tmp_path, bad):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", {"x": 1}, ["0.0", "0.1"])
    with pytest.raises(StoreCorruptError, match="escapes the store|not a relative path"):
        job.mark_done("0.0", outputs=[bad])
    # a marker forged on disk: verify reports it and never reads the outside file
    marker = tmp_path / "run" / "_distpen" / "s" / "units" / "0.1.json"
    marker.write_text(json.dumps({"unit": "0.1", "fingerprint": job.fingerprint, "outputs": {bad: 3},
                                  "info": {}, "time": "t"}))
    rep = store.verify()
    assert not rep["ok"] and "escapes the store" in rep["stages"]["s"]["mismatched"][0]
    # resuming the job forgets the forged unit: it is recomputed, its outputs written inside
    job = store.begin_job("s", {"x": 1}, ["0.0", "0.1"])
    assert job.pending() == ["0.0", "0.1"] and job.progress()["units_repaired"] == ["0.1"]


def test_symlinked_output_leading_outside_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    job = store.begin_job("s", {"x": 1}, ["0.0"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"12345")
    os.symlink(outside, tmp_path / "run" / "link")
    with pytest.raises(StoreCorruptError, match="through a symlink"):
        job.mark_done("0.0", outputs=["link/f"])


@pytest.mark.parametrize("call", [
    lambda s: s.begin_job("../up", {"x": 1}, ["0"]),
    lambda s: s.begin_job("s", {"x": 1}, ["../0"]),
    lambda s: s.begin_job("s", {"x": 1}, ["a/b"]),
])
def test_stage_and_unit_names_cannot_be_paths(tmp_path, call):
    with pytest.raises(InvalidArgumentError):
        call(RunStore(tmp_path / "run"))
    assert not (tmp_path / "up").exists()
