"""Running a grid's cells as a Slurm job array through submitit, or through submitit on this machine.

``--executor slurm`` submits one job array for the cells still to run (submitit's ``map_array``), one
cell per array task; ``--executor submitit-local`` runs the very same path with submitit's local
executor (a process per job on this machine), for tests and for trying a configuration before a
cluster sees it.  A cell with ``--nproc N`` becomes one N-task job whose tasks join a
``torch.distributed`` group through submitit's environment (``--nodes M`` spreads them over M nodes).

Each array task (:class:`ClusterCell`) writes its cell's own files into the results folder
(:class:`~bench.store.ResultsFolder`, which takes its lock only to rebuild the merged files), keeps a
marker while it runs and a snapshot every ``snapshot_every`` seconds.  A preempted or timed-out job is
requeued through submitit's checkpoint hook and continues from its last snapshot, not from step 0.
The job logs and submitit's files live in ``<results>/jobs/``; ``jobs.json`` maps each cell to its job.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import BenchError
from .store import ResultsFolder, write_json
from .train import Cell

__all__ = ["EXECUTORS", "ClusterOptions", "ClusterCell", "require_submitit", "submit", "read_jobs",
           "job_outcome", "wait_for", "running_marker"]

EXECUTORS = ("local", "slurm", "submitit-local")
JOBS_FILE = "jobs.json"


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise BenchError("--executor slurm and submitit-local need submitit: pip install 'esgd-bench[cluster]'") \
            from None
    return submitit


@dataclass(frozen=True)
class ClusterOptions:
    """What the scheduler is asked for, per array task (one cell)."""

    partition: str | None = None
    time_min: int = 60                       # the time limit of one task, in minutes
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)   # any other #SBATCH --key=value
    array_parallelism: int | None = None     # the most array tasks running at once
    nodes: int = 1

    def parameters(self, nproc: int) -> dict[str, Any]:
        """submitit's parameters (generic names, and slurm_* where only Slurm has the knob)."""
        tasks_per_node = max(1, nproc // self.nodes)
        params: dict[str, Any] = {"timeout_min": self.time_min, "nodes": self.nodes,
                                  "tasks_per_node": tasks_per_node, "name": "esgd-bench"}
        if self.gpus_per_task:
            params["gpus_per_node"] = self.gpus_per_task * tasks_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        slurm = {"slurm_partition": self.partition, "slurm_account": self.account, "slurm_qos": self.qos,
                 "slurm_array_parallelism": self.array_parallelism,
                 "slurm_additional_parameters": dict(self.sbatch) or None}
        params.update({k: v for k, v in slurm.items() if v is not None})
        return params


def running_marker(folder: ResultsFolder, cell: Cell) -> Path:
    return folder.snapshot_path(cell.key).with_suffix(".running")


@dataclass
class ClusterCell:
    """One array task: train one cell and write its files (rank 0 under ``torch.distributed``).

    submitit calls :meth:`checkpoint` when the job is preempted or about to time out; returning the
    same call requeues it, and the cell then continues from its snapshot.
    """

    out: str
    cell: Cell
    order: list[tuple]
    threads: int | None = None

    def __call__(self) -> str:
        import submitit
        import torch
        env = submitit.JobEnvironment()
        if self.threads:
            torch.set_num_threads(self.threads)
        folder = ResultsFolder(Path(self.out))
        rank = 0
        if env.num_tasks > 1:
            import torch.distributed as dist
            from .steps import backend_for
            dist_env = submitit.helpers.TorchDistributedEnvironment().export()
            dist.init_process_group(backend_for(self.cell.task_config.device))
            rank = dist_env.rank
            if self.cell.task_config.device == "cuda":
                torch.cuda.set_device(dist_env.local_rank)
        marker = running_marker(folder, self.cell)
        if rank == 0:
            write_json({"job_id": env.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.time()}, marker)
        if rank == 0 and self.cell.snapshot and Path(self.cell.snapshot).exists():
            print(f"esgd-bench: {self.cell.task} {self.cell.optimizer.label} lr {self.cell.lr:g} seed "
                  f"{self.cell.seed} continues from its snapshot", flush=True)
        try:
            result = self.cell.run()
            if rank == 0:
                with folder.locked():
                    folder.write_cell(result.summary, result.rows)
                    folder.rebuild(self.order)
        finally:
            if rank == 0:
                marker.unlink(missing_ok=True)
        return result.status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit(kind: str, folder: ResultsFolder, cells: Sequence[Cell], order: list[tuple],
           options: ClusterOptions, nproc: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Submit ``cells`` as one job array; returns one entry per cell (also recorded in ``jobs.json``)
    and submitit's job objects."""
    submitit = require_submitit()
    params = options.parameters(nproc)
    if kind != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    try:
        executor = submitit.AutoExecutor(folder=folder.path / "jobs" / "%j",
                                         cluster="slurm" if kind == "slurm" else "local")
        executor.update_parameters(**params)
        # Submitted in a batch, the cells are one job array; each callable is checkpointable itself, so
        # a preempted task is requeued with it.
        # Local jobs all run at once on this machine's cores: one thread each unless told otherwise.
        threads = options.cpus_per_task or (None if kind == "slurm" else 1)
        with executor.batch():
            jobs = [executor.submit(ClusterCell(str(folder.path), c, order, threads)) for c in cells]
    except Exception as err:     # noqa: BLE001 - sbatch refused, no scheduler: one line
        raise BenchError(f"--executor {kind}: submitting failed: {' '.join(str(err).split())[:300]}") from None
    entries = [{"task": c.task, "optimizer": c.optimizer.label, "lr": c.lr, "seed": c.seed, "job_id": j.job_id,
                "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr), "executor": kind}
               for c, j in zip(cells, jobs)]
    write_json({"executor": kind, "options": asdict(options), "jobs": read_jobs(folder.path) + entries},
               folder.path / JOBS_FILE)
    return entries, jobs


def read_jobs(out: Path) -> list[dict[str, Any]]:
    path = out / JOBS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [e for e in data.get("jobs", []) if isinstance(e, dict)] if isinstance(data, dict) else []


def job_outcome(entry: dict[str, Any], out: Path) -> str | None:
    """What became of a job that left no cell result: its error's last line, or ``None`` while it may
    still be running or its state cannot be known (no accounting on this machine)."""
    try:
        submitit = require_submitit()
        job_cls = submitit.SlurmJob if entry.get("executor") == "slurm" else submitit.LocalJob
        job = job_cls(folder=out / "jobs" / "%j", job_id=entry["job_id"])
        if not job.paths.result_pickle.exists():
            return None
        err = job.exception()
    except Exception:    # noqa: BLE001 - no sacct, a job folder moved: the cell files still tell
        return None
    if err is None:
        return None
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def wait_for(cells: Sequence[Cell], done: Callable[[], set], jobs: Sequence[Any], poll: float = 0.5,
             stop: Callable[[], bool] = lambda: False) -> None:
    """Wait until every cell's key is in ``done()``, every job has ended, or ``stop()``."""
    keys = {c.key for c in cells}
    while not stop():
        if keys <= done() or all(j.done() for j in jobs):
            return
        time.sleep(poll)
