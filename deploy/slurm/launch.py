#!/usr/bin/env python
"""Run distpen co-activation statistics on a SLURM cluster through dask-jobqueue.

The Dask scheduler runs inside this process (run it on a login node if your site allows
long-running processes there, or submit it with ``sbatch deploy/slurm/distpen-coactivation.sbatch``);
the workers are SLURM jobs described by ``jobqueue.yaml`` (copy it to ``~/.config/dask/`` or
pass ``--config``). Stores must be on a filesystem every node sees (Lustre, GPFS, NFS), or an
fsspec URL staged through such a filesystem (``DISTPEN_STAGING_DIR``).

    python deploy/slurm/launch.py /scratch/$USER/gates.zarr --out /scratch/$USER/stats.zarr --jobs 4

Re-running the same command after a failure (or after SLURM killed the launcher's own job)
resumes: only the tiles without a completion marker are computed.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("gates", help="gates Zarr group (path or fsspec URL)")
    p.add_argument("--out", required=True, help="statistics run store (path on a shared filesystem, or URL)")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs of workers to request")
    p.add_argument("--config", default=None,
                   help="a jobqueue.yaml to load (default: the Dask configuration, e.g. ~/.config/dask/)")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--row-chunk", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tls", action="store_true",
                   help="TLS between scheduler, workers and this client with temporary self-signed certificates "
                        "(needs shared-temp-directory in jobqueue.yaml)")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for the first worker")
    return p


def load_config(path) -> None:
    import dask.config
    import yaml

    with open(path) as f:
        dask.config.update(dask.config.config, yaml.safe_load(f), priority="new")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        load_config(args.config)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("launch.py: dask-jobqueue is not installed (pip install 'distpen[slurm]')", file=sys.stderr)
        return 2
    from distributed import Client

    import distpen as dp
    from distpen.store import check_workers_see, is_url, staged_store

    kwargs = {}
    if args.tls:
        from distpen.security import temporary_security

        kwargs["security"] = temporary_security()
    with SLURMCluster(**kwargs) as cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; dashboard {cluster.dashboard_link}", flush=True)
        print(cluster.job_script(), flush=True)
        client.wait_for_workers(1, timeout=args.wait)
        with staged_store(args.out) as out:
            if is_url(args.out):
                check_workers_see(client, out)
            st = dp.coactivation_stats(args.gates, out, tile=args.tile, row_chunk=args.row_chunk,
                                       overwrite=args.overwrite, client=client)
            p = st._job.progress()
        print(f"{args.out}: {st.n_tokens} tokens × {st.k_atoms} atoms, tiles {p.get('units_done')}/"
              f"{p.get('units_total')} ({p.get('units_computed')} computed now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
