"""The results store of ``esgd-bench run`` (issue 4): one folder with ``metrics.csv``, ``summary.csv``
and ``meta.json``, written atomically, and loaders that return pandas DataFrames from one or many folders.

The layout follows the long ("tidy") format that pandas and seaborn expect: one metrics row per training
step, one summary row per (task, optimizer, lr, seed) cell.  Every write goes to a temporary file in the
destination folder and is moved into place with ``os.replace``, which is atomic on POSIX and Windows, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

__all__ = ["METRICS_COLUMNS", "SUMMARY_COLUMNS", "CELL_KEY", "ResultsError", "write_csv_atomic",
           "write_json_atomic", "load_metrics", "load_summary", "load_meta", "aggregate_summary",
           "metrics_frame", "summary_frame"]

# The column contract (eval_<key> columns follow METRICS_COLUMNS, one per key of the task's evaluate()).
METRICS_COLUMNS = ["task", "optimizer", "lr", "seed", "step", "wall_time_s", "loss", "is_hvp_step",
                   "step_ms", "data_ms", "fwd_bwd_ms", "hvp_ms", "update_ms"]
SUMMARY_COLUMNS = ["task", "optimizer", "opt_name", "lr", "seed", "steps", "final_loss", "eval_metric",
                   "eval_value", "wall_time_s", "step_time_ms", "fwd_bwd_time_ms", "update_time_ms",
                   "hvp_time_ms", "mean_step_ms", "hvp_steps", "peak_mem_mb", "status", "data_source",
                   "synthetic", "device", "error"]
# What identifies one cell of a benchmark (resume, merging a re-run into an existing store).
CELL_KEY = ["task", "optimizer", "lr", "seed"]


_UMASK = os.umask(0)
os.umask(_UMASK)


class ResultsError(ValueError):
    """A folder that is not an esgd-bench results folder, or a file in it that cannot be read."""


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)     # mkstemp's 0600 would make results private to the writer
        with os.fdopen(fd, mode, newline="" if "b" not in mode else None) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` (without its index) to ``path`` via a temporary file and ``os.replace``."""
    return _atomic_write(path, lambda fh: df.to_csv(fh, index=False))


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON; non-finite floats become null so the file stays valid JSON."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, default=str) + "\n"
    return _atomic_write(path, lambda fh: fh.write(text))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def metrics_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Metrics rows as a frame with the contract's columns first and eval columns sorted after."""
    df = pd.DataFrame(list(rows))
    evals = sorted(c for c in df.columns if c.startswith("eval_"))
    extra = [c for c in df.columns if c not in METRICS_COLUMNS and c not in evals]
    return df.reindex(columns=METRICS_COLUMNS + evals + extra)


def summary_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    extra = [c for c in df.columns if c not in SUMMARY_COLUMNS]
    return df.reindex(columns=SUMMARY_COLUMNS + extra)


def _dirs(dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(dirs, (str, os.PathLike)):
        return [Path(dirs)]
    return [Path(d) for d in dirs]


def _load(dirs, name: str) -> pd.DataFrame:
    frames = []
    for d in _dirs(dirs):
        path = d / name
        if not path.is_file():
            raise ResultsError(f"no {name} in {d} (not an esgd-bench results folder?)")
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ResultsError(f"cannot read {path}: {err}") from None
        df["result_dir"] = str(d)
        frames.append(df)
    if not frames:
        raise ResultsError("no result folders given")
    return pd.concat(frames, ignore_index=True)


def load_metrics(dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """``metrics.csv`` of one or many result folders, concatenated, with a ``result_dir`` column."""
    return _load(dirs, "metrics.csv")


def load_summary(dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """``summary.csv`` of one or many result folders, concatenated, with a ``result_dir`` column."""
    return _load(dirs, "summary.csv")


def load_meta(dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of one result folder."""
    path = Path(dir) / "meta.json"
    if not path.is_file():
        raise ResultsError(f"no meta.json in {dir} (not an esgd-bench results folder?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: {err}") from None


def aggregate_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (task, optimizer, lr), over runs that finished ok.

    Columns: task, optimizer, lr, runs (ok/total), and ``<col>_mean`` / ``<col>_std`` for final_loss,
    eval_value, step_time_ms, hvp_time_ms, mean_step_ms, wall_time_s and peak_mem_mb.  The std is the
    sample standard deviation (ddof=1), NaN for a single seed.
    """
    cols = ["final_loss", "eval_value", "step_time_ms", "hvp_time_ms", "mean_step_ms", "wall_time_s",
            "peak_mem_mb"]
    keys = ["task", "optimizer", "lr"]
    out = []
    for key, group in summary.groupby(keys, sort=False, dropna=False):
        ok = group[group["status"] == "ok"]
        row: dict[str, Any] = dict(zip(keys, key))
        row["eval_metric"] = group["eval_metric"].iloc[0]
        row["runs"] = f"{len(ok)}/{len(group)}"
        row["statuses"] = ",".join(sorted(set(group["status"]) - {"ok"}))
        for c in cols:
            values = pd.to_numeric(ok[c], errors="coerce")
            row[f"{c}_mean"] = values.mean()
            row[f"{c}_std"] = values.std(ddof=1)
        out.append(row)
    return pd.DataFrame(out)
