"""Dask clusters for lungmets on a SLURM batch system (through dask-jobqueue).

The analysis itself does not change: ``lungmets run --scheduler ADDRESS`` sends its chunks to
any Dask scheduler. This module starts one whose workers are SLURM jobs, with settings that
suit lungmets: one thread per worker process (the detector holds the GIL in places and each
process opens the slide itself) and a few GB of memory per worker.
"""

from __future__ import annotations

import sys


def slurm_cluster(
    *,
    cores: int = 8,
    memory: str = "32GB",
    walltime: str = "02:00:00",
    queue: str | None = None,
    account: str | None = None,
    local_directory: str | None = None,
    job_extra_directives: list[str] | None = None,
):
    """A `dask_jobqueue.SLURMCluster` whose jobs each run `cores` single-threaded workers.

    Parameters
    ----------
    cores : int
        CPU cores per SLURM job; the job runs as many worker processes.
    memory : str
        Memory per job (e.g. ``"32GB"``), shared by its workers. lungmets needs about 1.5 GB
        per worker with the default 2048-px chunks.
    walltime : str
        Job time limit, ``HH:MM:SS``.
    queue, account : str, optional
        SLURM partition (``-p``) and account (``-A``).
    local_directory : str, optional
        Node-local scratch for spilling (e.g. ``"$TMPDIR"``).
    job_extra_directives : list of str, optional
        More ``#SBATCH`` lines, e.g. ``["--gres=gpu:1"]``.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        Not yet scaled: call ``cluster.scale(jobs=N)``.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        from .errors import InputError

        raise InputError(
            "running on SLURM needs dask-jobqueue; install it with "
            "`pip install 'lungmets[cluster]'`"
        ) from exc
    return SLURMCluster(
        cores=cores,
        processes=cores,
        memory=memory,
        walltime=walltime,
        queue=queue,
        account=account,
        local_directory=local_directory,
        job_extra_directives=job_extra_directives or [],
        python=sys.executable,
    )
