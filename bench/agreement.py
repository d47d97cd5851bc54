"""Does a cheaper route converge like the reference one?  (``esgd-bench table DIRS --against NAME``)

A cheap estimate of the curvature (a product of part of the batch, finite differences) is worth having
only if training with it ends where training with the exact product ends.  For every (task, optimizer)
of a results folder this puts two end-of-run measures next to the reference optimizer's seeds: the
training loss over the last 10% of the steps (the summary's ``tail_loss``) and the test metric (or,
without a test split, the validation metric).  A measure is *inside* when the mean over the
optimizer's ok seeds falls within the reference's min-max over its own ok seeds; only then can the two
not be told apart with this many seeds.  Seeds that diverged are counted, not averaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich import box
from rich.table import Table

from .errors import BenchError
from .store import check_output_file, write_csv, write_text
from .tables import TABLE_SUFFIXES, _ok

__all__ = ["agreement_table", "render_agreement", "write_agreement", "AGREEMENT_HEADERS"]

AGREEMENT_HEADERS = ["task", "optimizer", "ok", "tail loss", "ref. min – max", "inside", "metric", "mean",
                     "ref. min – max", "inside"]


def _measure(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    """The end-of-run metric columns: the test split's where there is one, else the validation's."""
    for name, value in (("test_metric", "test_value"), ("eval_metric", "eval_value")):
        if name in runs and value in runs:
            names = [m for m in runs[name].dropna().astype(str) if m]
            if names and pd.to_numeric(runs[value], errors="coerce").notna().any():
                return names[0], value
    return None, None


def agreement_table(summary: pd.DataFrame, reference: str) -> pd.DataFrame:
    """One row per (task, optimizer) other than ``reference``, in the order they first appear."""
    if summary.empty:
        raise BenchError("no runs in these results folders")
    tasks_with = set(summary.loc[summary["optimizer"] == reference, "task"])
    if not tasks_with:
        names = ", ".join(dict.fromkeys(summary["optimizer"].astype(str)))
        raise BenchError(f"--against {reference}: no runs of it in these results (optimizers: {names})")
    rows = []
    for (task, opt), runs in summary.groupby(["task", "optimizer"], sort=False):
        if opt == reference or task not in tasks_with:
            continue
        ref = _ok(summary[(summary["task"] == task) & (summary["optimizer"] == reference)])
        ok = _ok(runs)
        loss = pd.to_numeric(ok["tail_loss"], errors="coerce").dropna()
        ref_loss = pd.to_numeric(ref["tail_loss"], errors="coerce").dropna()
        metric, column = _measure(summary[summary["task"] == task])
        values = pd.to_numeric(ok[column], errors="coerce").dropna() if column else pd.Series(dtype=float)
        ref_values = pd.to_numeric(ref[column], errors="coerce").dropna() if column else pd.Series(dtype=float)
        rows.append({
            "task": task, "optimizer": opt, "reference": reference, "runs": len(runs), "runs_ok": len(ok),
            "reference_runs_ok": len(ref),
            "tail_loss_mean": _mean(loss), "reference_tail_loss_min": _min(ref_loss),
            "reference_tail_loss_max": _max(ref_loss), "loss_inside": _inside(loss, ref_loss),
            "loss_side": _side(loss, ref_loss),
            "metric": metric, "metric_mean": _mean(values), "reference_metric_min": _min(ref_values),
            "reference_metric_max": _max(ref_values),
            "metric_inside": _inside(values, ref_values) if column else None,
            "metric_side": _side(values, ref_values) if column else "",
        })
    if not rows:
        raise BenchError(f"--against {reference}: no other optimizer on the same task to compare with it")
    return pd.DataFrame(rows)


def _mean(s: pd.Series) -> float:
    return float(s.mean()) if len(s) else math.nan


def _min(s: pd.Series) -> float:
    return float(s.min()) if len(s) else math.nan


def _max(s: pd.Series) -> float:
    return float(s.max()) if len(s) else math.nan


def _inside(values: pd.Series, reference: pd.Series) -> bool | None:
    if not len(values) or not len(reference):
        return None
    return bool(reference.min() <= values.mean() <= reference.max())


def _side(values: pd.Series, reference: pd.Series) -> str:
    """Where the mean lies against the reference's range: "", "below" or "above"."""
    if not len(values) or not len(reference):
        return ""
    m = values.mean()
    return "below" if m < reference.min() else "above" if m > reference.max() else ""


def _fmt(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _yes(flag: bool | None, side: str) -> str:
    return "—" if flag is None else "yes" if flag else f"no ({side})"


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    out = [[r.task, r.optimizer, f"{r.runs_ok}/{r.runs}", _fmt(r.tail_loss_mean),
            f"{_fmt(r.reference_tail_loss_min)} – {_fmt(r.reference_tail_loss_max)}", _yes(r.loss_inside, r.loss_side),
            r.metric or "—", _fmt(r.metric_mean),
            f"{_fmt(r.reference_metric_min)} – {_fmt(r.reference_metric_max)}", _yes(r.metric_inside, r.metric_side)]
           for r in table.itertuples(index=False)]
    return pd.DataFrame(out, columns=AGREEMENT_HEADERS)


def render_agreement(table: pd.DataFrame, fmt: str):
    """A rich Table, or the Markdown / CSV text."""
    if fmt == "csv":
        return table.to_csv(index=False)
    shown = _shown(table)
    if fmt == "markdown":
        return shown.to_markdown(index=False) + "\n"
    if fmt != "rich":
        raise BenchError(f"unknown format {fmt!r}; use rich, markdown or csv")
    ref = str(table["reference"].iloc[0])
    t = Table(title=f"Against {ref}: the mean over ok seeds inside {ref}'s min – max over its seeds?",
              box=box.SIMPLE_HEAD, caption="tail loss: training loss over the last 10% of the steps; metric: "
                                           "test split (validation where there is none)")
    for i, name in enumerate(AGREEMENT_HEADERS):
        t.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
    for row in shown.itertuples(index=False):
        t.add_row(*row)
    return t


def write_agreement(table: pd.DataFrame, path) -> Path:
    """Write the table atomically: ``.csv`` numeric, ``.md`` Markdown (as :func:`bench.tables.write_table`)."""
    path = check_output_file(path, TABLE_SUFFIXES)
    if path.suffix.lower() == ".csv":
        return write_csv(table, path)
    return write_text(path, render_agreement(table, "markdown"))
