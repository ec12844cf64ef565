"""deploy/: the recipes parse and name commands that exist; the compose topology runs for real on
loopback; stores addressed by fsspec URL.

There is no Docker engine, Kubernetes or SLURM here: the recipes are checked by parsing them
(YAML, the ``dask``/``distpen`` command lines against the real click/argparse parsers, shell
syntax), and the compose topology is reproduced with the same commands as local processes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

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

yaml = pytest.importorskip("yaml")

DEPLOY = pathlib.Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"
K8S = DEPLOY / "kubernetes"
SLURM = DEPLOY / "slurm"


# ============================================================================ command checks
def _dask_command(name):
    from importlib.metadata import entry_points

    eps = {e.name: e for e in entry_points(group="dask_cli")}
    assert name in eps, f"`dask {name}` is not a dask CLI command (have {sorted(eps)})"
    return eps[name].load()


def check_command(argv):
    """Assert that ``argv`` (a container command) is a valid `dask` / `distpen` / `jupyter lab` /
    `sh -c` command line: the program exists and every option is one its parser declares."""
    argv = [str(a) for a in argv]
    prog = argv[0]
    if prog == "dask":
        cmd = _dask_command(argv[1])
        declared = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for tok in argv[2:]:
            if tok.startswith("--"):
                assert tok.split("=")[0] in declared, f"`dask {argv[1]}` has no option {tok}"
        import click

        try:
            cmd.make_context(argv[1], argv[2:], resilient_parsing=False)   # values type-check
        except click.BadParameter as exc:      # container paths (/certs/...) need not exist here
            if not (isinstance(exc.param.type, click.Path) and "does not exist" in exc.message):
                raise
    elif prog == "distpen":
        from distpen.cli import build_parser

        parser = build_parser()
        parser.exit = _raise_exit
        parser.parse_args(argv[1:])
    elif prog == "jupyter":
        assert argv[1] == "lab", argv
        assert "jupyterlab" in (DEPLOY / "docker" / "Dockerfile").read_text()
    elif prog == "sh" and argv[1] == "-c":
        for part in argv[2].split("&&"):
            check_command(shlex.split(part))
    elif prog == "python":
        assert argv[1] in ("-c", "-m"), argv
    else:
        raise AssertionError(f"unexpected program {prog!r} in {argv}")


def _raise_exit(status=0, message=None):
    raise AssertionError(f"argparse rejected the command: {message}")


def _parser_rejects(argv):
    try:
        check_command(argv)
    except (AssertionError, SystemExit, Exception):
        return True
    return False


def test_command_checker_rejects_wrong_commands():
    assert _parser_rejects(["dask", "worker", "tcp://s:8786", "--no-such-option"])
    assert _parser_rejects(["dask", "schedule"])
    assert _parser_rejects(["distpen", "coactivation", "g", "--no-such-option"])
    assert _parser_rejects(["distpen", "coactivate", "g"])
    check_command(["distpen", "coactivation", "g", "--out", "s", "--scheduler", "tcp://x:1", "--tls"])


# ============================================================================ recipes
def _load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = _load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def _compose(*files):
    merged = {}
    for f in files:
        doc = _load_all(f)[0]
        for name, svc in doc.get("services", {}).items():
            merged.setdefault(name, {}).update(svc)
    return merged


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_TLS)], ids=["plain", "tls"])
def test_compose_services_run_commands_that_exist(files):
    services = _compose(*files)
    assert {"scheduler", "worker", "jupyter", "job"} <= set(services)
    for name, svc in services.items():
        check_command(svc["command"])
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"
    top = _load_all(COMPOSE)[0]
    assert "stores" in top["volumes"]
    for name in ("worker", "jupyter", "job"):
        assert "stores:/data" in services[name]["volumes"] or any(
            v == "stores:/data" for v in _load_all(COMPOSE)[0]["services"][name]["volumes"])
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["scheduler"]["image"] == services["worker"]["image"] == "distpen:latest"
    if COMPOSE_TLS in files:
        assert "--protocol" in services["scheduler"]["command"]
        assert services["worker"]["command"][2].startswith("tls://")
        env = services["jupyter"]["environment"]
        assert env["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
        assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == "/certs/ca.pem"


def test_dockerfile_installs_distpen_jupyterlab_and_labextension():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    install = [line for line in text.splitlines() if "pip install" in line][0]
    assert '"/src[deploy]"' in install and "jupyterlab" in install and "dask-labextension" in install
    assert "\nUSER distpen" in text and 'VOLUME ["/data"]' in text


def _containers(pod_spec):
    return pod_spec["containers"]


def test_kubernetes_daskcluster_and_daskjob():
    (cluster,) = _load_all(K8S / "daskcluster.yaml")
    (job,) = _load_all(K8S / "daskjob.yaml")
    (pvc,) = _load_all(K8S / "pvc.yaml")
    (secret,) = _load_all(K8S / "object-store-secret.example.yaml")
    assert cluster["apiVersion"] == job["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["kind"] == "DaskCluster" and job["kind"] == "DaskJob"
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (cluster["spec"], job["spec"]["cluster"]["spec"]):
        assert spec["scheduler"]["service"]["type"] == "ClusterIP"
        for c in _containers(spec["scheduler"]["spec"]) + _containers(spec["worker"]["spec"]):
            check_command(c["args"])
        worker = _containers(spec["worker"]["spec"])[0]
        assert worker["args"][:2] == ["dask", "worker"] and "$(DASK_WORKER_NAME)" in worker["args"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["worker"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]]
        assert worker["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    (runner,) = _containers(job["spec"]["job"]["spec"])
    check_command(runner["args"])
    assert runner["args"][:2] == ["distpen", "coactivation"]
    out = runner["args"][runner["args"].index("--out") + 1]
    assert out.startswith("s3://")
    staging = {e["name"]: e["value"] for e in runner["env"]}["DISTPEN_STAGING_DIR"]
    mounts = {m["mountPath"] for m in runner["volumeMounts"]}
    assert staging.startswith("/data/") and "/data" in mounts       # staging on the shared claim


SLURM_KEYS = {  # dask-jobqueue's jobqueue.slurm configuration keys (dask_jobqueue/jobqueue.yaml)
    "name", "cores", "memory", "processes", "interface", "death-timeout", "local-directory",
    "shared-temp-directory", "extra", "worker-extra-args", "shebang", "queue", "account", "walltime",
    "env-extra", "job-script-prologue", "job-cpu", "job-mem", "job-extra", "job-extra-directives",
    "job-directives-skip", "log-directory", "scheduler-options", "worker-command", "python",
}


def _load_launcher():
    spec = importlib.util.spec_from_file_location("distpen_slurm_launch", SLURM / "launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_config_and_launcher(monkeypatch, capsys):
    import dask.config

    (conf,) = _load_all(SLURM / "jobqueue.yaml")
    slurm = conf["jobqueue"]["slurm"]
    assert set(slurm) <= SLURM_KEYS, set(slurm) - SLURM_KEYS
    assert slurm["cores"] == slurm["processes"]            # one single-threaded worker per core
    assert slurm["scheduler-options"]["dashboard_address"].startswith("127.0.0.1:")
    launch = _load_launcher()
    args = launch.build_parser().parse_args(["g.zarr", "--out", "s3://b/st.zarr", "--jobs", "3", "--tls"])
    assert args.jobs == 3 and args.tls and args.out == "s3://b/st.zarr"
    saved = copy.deepcopy(dask.config.config)
    try:
        launch.load_config(SLURM / "jobqueue.yaml")
        assert dask.config.get("jobqueue.slurm.cores") == 8
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)   # not installed here: a clear message
    assert launch.main(["g.zarr", "--out", "st.zarr"]) == 2
    assert "dask-jobqueue is not installed" in capsys.readouterr().err
    sbatch = (SLURM / "distpen-coactivation.sbatch").read_text()
    subprocess.run(["bash", "-n", str(SLURM / "distpen-coactivation.sbatch")], check=True)
    line = [x for x in sbatch.splitlines() if x.startswith("python ")][0]
    assert '"$here/launch.py"' in line and "--config" in line
    launch.build_parser().parse_args(["G", "--out", "S", "--jobs", "4", "--config", "c.yaml"])


def test_deploy_readme_covers_every_recipe():
    text = (DEPLOY / "README.md").read_text()
    for name in ("docker-compose.yml", "docker-compose.tls.yml", "Dockerfile", "daskcluster.yaml",
                 "daskjob.yaml", "pvc.yaml", "jobqueue.yaml", "launch.py", "tests/test_deploy.py",
                 "tests/test_faults.py", "tests/floor/test_security.py", "tests/test_soak.py", "DISTPEN_STAGING_DIR"):
        assert name in text, name
        if name.startswith("tests/"):
            assert (DEPLOY.parent / name).is_file(), f"deploy/README.md names {name}, which does not exist"


# ============================================================================ the compose topology, for real
def test_compose_topology_on_loopback(tmp_path):
    """`dask scheduler` + two `dask worker` processes (the compose services' commands), then
    `distpen synth` and `distpen coactivation --scheduler tcp://127.0.0.1:PORT` as separate processes."""
    with ProcCluster(tmp_path) as pc:
        pc.start(2)
        assert pc.address.startswith("tcp://127.0.0.1:")
        g, st = tmp_path / "gates.zarr", tmp_path / "stats.zarr"
        run_distpen("synth", g, "--tokens", 6000, "--atoms", 300, "--topk", 8, "--seed", 5,
                    "--row-chunk", 1000, "--scheduler", pc.address, "--quiet")
        res = run_distpen("coactivation", g, "--out", st, "--tile", 128, "--row-chunk", 1000,
                          "--scheduler", pc.address)
        assert "6000 tokens × 300 atoms, tiles 6/6 (6 computed now)" in res.stdout
        with pc.client() as c:                       # both workers took part
            assert len(c.scheduler_info()["workers"]) == 2
        gates = dp.open_gates(g)
        ref = reference_stats(topk_to_sparse(np.asarray(gates.indices[:]), np.asarray(gates.values[:]), 300))
        assert_matches(st, ref)
        assert run_distpen("status", st, "--verify").returncode == 0


# ============================================================================ fsspec URLs
@pytest.fixture
def inproc_client():
    """An in-process cluster (threads): a memory:// filesystem is per process, so the workers must
    share the test's process to see it."""
    from distributed import Client, LocalCluster
    from distributed.client import _get_global_client, _set_global_client

    previous = _get_global_client()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        with Client(cluster, set_as_default=False) as c:
            try:
                yield c
            finally:
                from distpen import cluster as dp_cluster

                dp_cluster.close()         # the client `distpen ... --scheduler` connected
    _set_global_client(previous)


@pytest.fixture
def memfs():
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    for root in ("/distpen-test",):
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_memory_url_gates_and_store_resume_through_staging(inproc_client, memfs):
    from distpen.store import staged_store

    gurl, surl = "memory://distpen-test/gates.zarr", "memory://distpen-test/stats.zarr"
    idx, val = write_topk_gates(gurl, 3000, 200, 6, seed=3, row_chunk=500)
    ref = reference_stats(topk_to_sparse(idx, val, 200))
    gates = dp.open_gates(gurl)
    assert type(gates.indices.store).__name__ == "FsspecStore"
    assert gates.input_spec()["indices"]["path"] == "memory:///distpen-test/gates.zarr/indices"
    with staged_store(surl) as local:                           # a first run computes one tile only
        dp.coactivation_stats(gates, local, tile=64, row_chunk=500, client=inproc_client, _units=["0.0"])
    assert memfs.exists("/distpen-test/stats.zarr/_distpen/coactivation/units/0.0.json")
    assert not memfs.exists("/distpen-test/stats.zarr/_distpen/coactivation/units/0.1.json")
    with staged_store(surl) as local:                           # a re-run resumes from the URL
        st = dp.coactivation_stats(gates, local, tile=64, row_chunk=500, client=inproc_client)
        p = st._job.progress()
    assert p["units_skipped"] == 1 and p["units_computed"] == 9 and p["status"] == "done"
    manifest = json.loads(memfs.cat("/distpen-test/stats.zarr/_distpen/coactivation/manifest.json"))
    assert manifest["status"] == "done"
    with staged_store(surl, push=False) as local:               # read back from the URL
        assert_matches(local, ref)
    # the command line stages URL stores itself; `status` reads them
    from distpen.cli import main

    addr = inproc_client.scheduler.address
    assert main(["coactivation", gurl, "--out", "memory://distpen-test/cli.zarr", "--tile", "64",
                 "--row-chunk", "500", "--scheduler", addr, "--quiet"]) == 0
    assert main(["status", "memory://distpen-test/cli.zarr", "--verify"]) == 0
    memfs.rm("/distpen-test/cli.zarr/pair_sum/c/0/1")
    assert main(["status", "memory://distpen-test/cli.zarr", "--verify"]) == 1
    assert main(["coactivation", gurl, "--out", "memory://distpen-test/cli.zarr", "--scheduler", addr,
                 "--quiet"]) == 0                                # the re-run repairs the remote store
    with staged_store("memory://distpen-test/cli.zarr", push=False) as local:
        assert_matches(local, ref)


def test_penalty_commands_write_into_url_stores(inproc_client, memfs, tmp_path):
    """`distpen evaluate | assemble | newton --out memory://...` stage the run store locally and
    mirror it back; a re-run resumes from the URL."""
    import zarr

    from distpen.cli import main
    from distpen.cli.demo import synthetic_decoder_problem
    from distpen.store import staged_store

    bs, pairs, beta = synthetic_decoder_problem(24, 4, 60, max_block=2, seed=5)
    pen = dp.DecoderIncoherencePenalty.from_pairs(pairs, bs, 4, 1.5)
    spec = tmp_path / "penalty.json"
    spec.write_text(json.dumps(pen.to_spec()))
    pairs.save(str(tmp_path / "pairs"))
    np.save(tmp_path / "beta.npy", beta)
    url = "memory://distpen-test/penalty-run.zarr"
    common = ["--penalty", str(spec), "--pairs", str(tmp_path / "pairs"), "--t", str(tmp_path / "beta.npy"),
              "--out", url, "--scheduler", inproc_client.scheduler.address, "--quiet"]
    assert main(["evaluate", *common, "--ops", "value,grad"]) == 0
    assert main(["assemble", *common, "--tile", "32"]) == 0
    assert main(["newton", *common, "--damping", "0.1", "--tol", "1e-10", "--maxiter", "400"]) == 0
    for stage in ("evaluate", "assembly", "newton"):
        assert memfs.exists(f"/distpen-test/penalty-run.zarr/_distpen/{stage}/manifest.json")
    n = beta.shape[0]
    H = np.zeros((n, n))
    pen.accumulate_psd_majorizer_dense(beta, np.zeros(0), 1.0, H)
    with staged_store(url, push=False) as local:                  # read back from the URL
        np.testing.assert_allclose(zarr.open_array(local + "/grad")[...], pen.grad_target(beta, np.zeros(0)),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(zarr.open_array(local + "/H")[...], H, rtol=0, atol=1e-12)
        x = zarr.open_array(local + "/newton_x")[...]
    want = np.linalg.solve(H + 0.1 * np.eye(n), -pen.grad_target(beta, np.zeros(0)))
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-7 * np.abs(want).max())
    # the same assembly again resumes from the mirrored markers: nothing is recomputed
    assert main(["assemble", *common, "--tile", "32"]) == 0
    with staged_store(url, push=False) as local:
        H2 = zarr.open_array(local + "/H")
        assert H2.attrs["tiles_computed_this_run"] == 0
        np.testing.assert_allclose(H2[...], H, rtol=0, atol=1e-12)


def test_file_url_gates_are_read_by_worker_processes(client, tmp_path):
    """An fsspec URL opened through zarr's FsspecStore and read inside separate worker processes."""
    idx, val = write_topk_gates(tmp_path / "g", 2000, 130, 5, seed=4, row_chunk=400)
    url = "file://" + str(tmp_path / "g")
    gates = dp.open_gates(url)
    assert type(gates.values.store).__name__ == "FsspecStore"
    st = dp.coactivation_stats(gates, tmp_path / "st", tile=64, row_chunk=400)
    assert st._job.progress()["units_computed"] == 6
    assert dp.RunStore(tmp_path / "st").manifest("coactivation")["spec"]["inputs"]["values"]["path"] == url + "/values"
    assert_matches(tmp_path / "st", reference_stats(topk_to_sparse(idx, val, 130)))


def test_url_store_needs_workers_that_see_the_staging_directory(client):
    from distpen.errors import InvalidArgumentError
    from distpen.store import check_workers_see

    with pytest.raises(InvalidArgumentError, match="cannot see the staging directory.*DISTPEN_STAGING_DIR"):
        check_workers_see(client, "/nonexistent/distpen-staging")


def test_unknown_url_scheme_is_a_clear_error(tmp_path):
    from distpen.errors import InvalidArgumentError
    from distpen.store import staged_store

    with pytest.raises(InvalidArgumentError, match="cannot open 'nosuchfs://b/x' with fsspec"):
        with staged_store("nosuchfs://b/x"):
            pass


def test_python_api_refuses_a_url_store_instead_of_writing_a_local_directory(client, tmp_path, monkeypatch):
    """`coactivation_stats(g, "s3://b/x")` must not create ./s3:/b/x; `file://` means the local path."""
    from distpen.errors import InvalidArgumentError

    monkeypatch.chdir(tmp_path)
    G = np.eye(4)
    with pytest.raises(InvalidArgumentError, match="staged_store"):
        dp.coactivation_stats(G, "s3://bucket/stats.zarr", tile=2)
    assert not (tmp_path / "s3:").exists()
    st = dp.coactivation_stats(G, "file://" + str(tmp_path / "st"), tile=2)
    assert st.path == str(tmp_path / "st") and (tmp_path / "st" / "zarr.json").exists()
    assert not (tmp_path / "file:").exists()
