"""Reading results folders back: validated frames for ``table``, ``plot``, ``report`` and the studies.

Readers validate what they read and name the file that is bad, in one line: a ``meta.json`` that is not
a JSON object, a ``summary.csv`` with foreign columns or a row cut short.  In a folder with cell files
(:mod:`bench.store`), the merged ``summary.csv`` and ``metrics.csv`` are read when they agree with the
cells, and the cells themselves, the source of truth, with a warning when they do not.  A folder given
twice, and a cell found in several folders, are each counted once, with a warning: otherwise they would
pass for extra seeds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .errors import ResultsError
from .store import (CELL_KEY, MANIFEST, cell_key, frames_from_cells, is_results_folder, read_cell_summaries,
                    read_csv, read_json_object)

__all__ = ["ResultsWarning", "Results", "load_results", "load_meta", "aggregate_summary"]

_CELLS = "cells"


class ResultsWarning(UserWarning):
    """Something in the results read that the user should know of (a duplicate, a damaged file)."""


def load_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of one results folder (a JSON object)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise ResultsError(f"no meta.json in {folder} (not an esgd-bench results folder?)")
    return read_json_object(path)


@dataclass
class Results:
    """What ``table``, ``plot`` and ``report`` read: frames over one or more folders (with a
    ``result_dir`` column) and each folder's ``meta.json``."""

    metrics: pd.DataFrame
    summary: pd.DataFrame
    metas: list[dict[str, Any]]


_SUMMARY_REQUIRED = ("task", "optimizer", "lr", "seed", "status")
_METRICS_REQUIRED = ("task", "optimizer", "lr", "seed", "step")


def _load_folder(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The merged files when they agree with the cell files (the same cells, every step), else the
    cells themselves with a warning; folders without cell files are read from the merged files."""
    if not folder.is_dir():
        raise ResultsError(f"results folder {folder} does not exist")
    cells = read_cell_summaries(folder) if (folder / _CELLS).is_dir() else []
    if not cells:
        if not is_results_folder(folder):
            raise ResultsError(f"{folder} is not an esgd-bench results folder (no {MANIFEST}, no summary.csv)")
        return (read_csv(folder / "summary.csv", _SUMMARY_REQUIRED, "summary"),
                read_csv(folder / "metrics.csv", _METRICS_REQUIRED, "metrics"))
    try:
        summary = read_csv(folder / "summary.csv", _SUMMARY_REQUIRED, "summary")
        metrics = read_csv(folder / "metrics.csv", _METRICS_REQUIRED, "metrics")
        keys = {cell_key(*k) for k in summary[CELL_KEY].itertuples(index=False)}
        steps = sum(int(r.get("steps") or 0) for r in cells)
        if keys == {cell_key(*(r[k] for k in CELL_KEY)) for r in cells} and len(summary) == len(cells) \
                and len(metrics) == steps:
            return summary, metrics
    except ResultsError:
        pass
    summary, metrics = frames_from_cells(folder)
    warnings.warn(f"{folder / 'summary.csv'} or metrics.csv is missing, damaged or out of date; read the "
                  f"{len(summary)} cell files in {folder / _CELLS} instead", ResultsWarning, stacklevel=3)
    return summary, metrics


def _keys(frame: pd.DataFrame) -> list[tuple]:
    """Each row's cell, with its precision: the same cell in fp32 and bf16 is two results."""
    precision = frame["precision"].fillna("fp32").astype(str) if "precision" in frame else ["fp32"] * len(frame)
    return [cell_key(*k) + (p,) for k, p in zip(frame[CELL_KEY].itertuples(index=False), precision)]


def load_results(folders: Sequence[str | os.PathLike], only: Sequence[str] | None = None) -> Results:
    """Read one or more results folders; a folder given twice and a cell found in several folders are
    each counted once (with a warning), since they would otherwise pass for extra seeds.  ``only``
    keeps the runs of those optimizers (as the results name them), each of which must be there."""
    if not folders:
        raise ResultsError("no results folder given")
    unique: dict[Path, Path] = {}
    for f in map(Path, folders):
        real = f.resolve()
        if real in unique:
            warnings.warn(f"{f} is given more than once; it is read once", ResultsWarning, stacklevel=2)
            continue
        unique[real] = f
    summaries, metrics, metas, seen = [], [], [], set()
    for folder in unique.values():
        summary, metric = _load_folder(folder)
        meta = load_meta(folder) if (folder / "meta.json").is_file() else {}
        keys = _keys(summary)
        dup = [k in seen for k in keys]
        if any(dup):
            warnings.warn(f"{sum(dup)} cell(s) of {folder} (same task, optimizer, lr and seed) are also in "
                          "a folder given before it; each cell is counted once, from the first folder",
                          ResultsWarning, stacklevel=2)
            drop = {k for k, d in zip(keys, dup) if d}
            summary = summary[[not d for d in dup]]
            metric = metric[[k not in drop for k in _keys(metric)]]
        seen.update(keys)
        summaries.append(summary.assign(result_dir=str(folder)))
        metrics.append(metric.assign(result_dir=str(folder)))
        metas.append({**meta, "result_dir": str(folder)})
    summary = pd.concat(summaries, ignore_index=True)
    if summary.empty:
        raise ResultsError(f"no runs in {', '.join(map(str, unique.values()))}")
    metric = pd.concat(metrics, ignore_index=True)
    if only:
        present = list(dict.fromkeys(summary["optimizer"].astype(str)))
        missing = [o for o in only if o not in present]
        if missing:
            raise ResultsError(f"--only {', '.join(missing)}: not in these results (optimizers: {', '.join(present)})")
        summary = summary[summary["optimizer"].astype(str).isin(only)].reset_index(drop=True)
        metric = metric[metric["optimizer"].astype(str).isin(only)].reset_index(drop=True)
    return Results(metric, summary, metas)


def aggregate_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) over seeds per (task, optimizer, lr), over the runs
    that finished ok; ``runs`` is ``ok/total`` and ``statuses`` lists the other statuses seen."""
    cols = ["final_loss", "eval_value", "step_time_ms", "hvp_time_ms", "mean_step_ms", "wall_time_s",
            "peak_mem_mb"]
    keys = ["task", "optimizer", "lr"]
    out = []
    for key, group in summary.groupby(keys, sort=False, dropna=False):
        ok = group[group["status"] == "ok"]
        row: dict[str, Any] = dict(zip(keys, key))
        row["eval_metric"] = group["eval_metric"].iloc[0] if "eval_metric" in group else ""
        row["runs"] = f"{len(ok)}/{len(group)}"
        row["statuses"] = ",".join(sorted(set(group["status"]) - {"ok"}))
        for c in cols:
            values = pd.to_numeric(ok[c], errors="coerce") if c in ok else pd.Series(dtype=float)
            row[f"{c}_mean"] = values.mean()
            row[f"{c}_std"] = values.std(ddof=1)
        out.append(row)
    return pd.DataFrame(out)
