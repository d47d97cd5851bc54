"""``esgd-bench status DIR``: a grid at a glance, whether it runs here or on a cluster.

Every planned cell (``meta.json`` lists the plan) is in one of these states: ``done`` (finished ok),
``diverged``, ``failed`` (with its one-line error and, for a cluster job, the log to read), ``interrupted``
(stopped; ``--resume`` continues it from its snapshot), ``running`` (a task holds its marker) or
``queued`` (submitted, not started).  The states come from the folder itself: the cells' own files,
the markers running tasks keep, and for a job that ended without a result, what submitit recorded.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pandas as pd

from .cluster import job_outcome, read_jobs
from .errors import ResultsError
from .readers import load_meta
from .store import cell_key, is_results_folder, read_cell_summaries, read_json_object

__all__ = ["STATES", "grid_status", "status_counts"]

STATES = ("done", "diverged", "failed", "interrupted", "running", "queued")
_BY_STATUS = {"ok": "done", "diverged": "diverged", "error": "failed", "interrupted": "interrupted"}


def _alive(marker: dict[str, Any]) -> bool:
    """A task on this host is alive while its process is; elsewhere the marker is taken at its word."""
    if marker.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(marker.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def grid_status(out: str | os.PathLike) -> pd.DataFrame:
    """One row per planned cell: task, optimizer, lr, seed, state, steps, error, log, job_id."""
    out = Path(out)
    if not out.is_dir() or not is_results_folder(out):
        raise ResultsError(f"{out} is not an esgd-bench results folder")
    meta = load_meta(out) if (out / "meta.json").is_file() else {}
    plan = [cell_key(c["task"], c["optimizer"], c["lr"], c["seed"]) for c in meta.get("cells") or []
            if isinstance(c, dict) and {"task", "optimizer", "lr", "seed"} <= set(c)]
    results = {cell_key(*(r[k] for k in ("task", "optimizer", "lr", "seed"))): r for r in read_cell_summaries(out)}
    jobs = {cell_key(e["task"], e["optimizer"], e["lr"], e["seed"]): e for e in read_jobs(out)
            if {"task", "optimizer", "lr", "seed", "job_id"} <= set(e)}
    markers = {}
    for path in (out / "cells").glob("*.running") if (out / "cells").is_dir() else []:
        try:
            markers[path.stem] = read_json_object(path)
        except ResultsError:
            continue
    rows = []
    for key in plan + [k for k in results if k not in set(plan)]:
        result, job = results.get(key), jobs.get(key, {})
        marker = markers.get(result["_stem"] if result else _stem_of(out, key))
        row = {"task": key[0], "optimizer": key[1], "lr": key[2], "seed": key[3], "state": "queued",
               "steps": result.get("steps") if result else None, "error": "", "log": job.get("stderr", ""),
               "job_id": job.get("job_id", "")}
        if marker is not None and (result is None or result.get("_written", 0) < marker.get("started", 0)):
            row["state"] = "running" if _alive(marker) else "failed"
            row["error"] = "" if row["state"] == "running" else "the task's process ended without a result"
        elif result is not None:
            row["state"] = _BY_STATUS.get(result["status"], "failed")
            row["error"] = result.get("error") or ""
        elif job:
            failure = job_outcome(job, out)
            if failure is not None:
                row["state"], row["error"] = "failed", failure
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "optimizer", "lr", "seed", "state", "steps", "error", "log",
                                       "job_id"])


def _stem_of(out: Path, key: tuple) -> str:
    from .store import ResultsFolder
    return ResultsFolder(out).snapshot_path(key).stem


def status_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    return {s: int(counts.get(s, 0)) for s in STATES}
