"""The wall-clock table: is ESGD-M worth its Hessian-vector products on this task?

One row per task x optimizer, from a results folder's summary and metrics:

- ``step_ms``: median over seeds of the summary's ``step_time_ms`` (itself the median non-HVP step);
- ``hvp_ms``: median over seeds of ``hvp_time_ms``, the extra cost of an HVP step (empty for first order);
- ``hvp_x_grad``: ``hvp_ms`` over the median ``fwd_bwd_ms`` of the non-HVP steps, i.e. how many gradient
  evaluations one HVP costs (ESGD's authors put it at about one);
- ``amortised_ms``: median over seeds of training wall time / steps, everything included, and its ratio
  to SGD's and Adam's on the same task when those are in the results;
- time to target: per seed, the training wall time of the first logged step whose eval metric reaches the
  task's default target (``TaskSpec.target``) or ``target``; on the training loss with ``target_loss``;
  median over the seeds that reached it, and how many did;
- final loss, eval metric (validation) and test metric (scored once at the end of a run): mean and
  sample standard deviation over the seeds whose status is ok.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from rich import box
from rich.console import Group
from rich.table import Table

from .errors import BenchError
from .store import as_bool, check_output_file, write_csv, write_text
from .timing import median

__all__ = ["add_labels", "wall_clock_table", "format_table", "rich_table", "markdown_table", "render_table",
           "write_table", "TABLE_SUFFIXES"]

Format = Literal["rich", "markdown", "csv"]
TABLE_SUFFIXES = (".csv", ".md")


def add_labels(metrics: pd.DataFrame, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give both frames a ``label`` column: the optimizer, plus its lr where one (task, optimizer) was
    run at several learning rates (a sweep), so that different lrs are never averaged together, and its
    precision when it is not fp32 (``esgd-m [bf16]``)."""
    multi: set[tuple[str, str]] = set()
    if "lr" in summary:
        counts = summary.groupby(["task", "optimizer"])["lr"].nunique()
        multi = set(counts[counts > 1].index)

    def label(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        lrs = df["lr"] if "lr" in df else [None] * len(df)
        precisions = df["precision"].fillna("fp32").astype(str) if "precision" in df else ["fp32"] * len(df)
        df["label"] = [str(o) + (f" (lr {float(lr):g})" if (t, o) in multi else "")
                       + (f" [{p}]" if p != "fp32" else "")
                       for t, o, lr, p in zip(df["task"], df["optimizer"], lrs, precisions)]
        return df
    return label(metrics), label(summary)


def _task_goal(task: str, eval_metric: str | None) -> tuple[float | None, bool]:
    """(default target, higher_is_better) of a task from the registry; a guess for unknown tasks."""
    from tasks import UnknownTaskError, get_task
    try:
        spec = get_task(task)
        if eval_metric in (None, spec.eval_metric):
            return spec.target, spec.higher_is_better
    except UnknownTaskError:
        pass
    return None, bool(eval_metric) and any(k in eval_metric.lower() for k in ("acc", "top1", "top5"))


def _time_to_target(runs: pd.DataFrame, column: str, target: float, higher: bool) -> tuple[float, int]:
    """Median (over seeds that got there) training time to the first step reaching ``target``."""
    times = []
    for _, run in runs.groupby("seed"):
        run = run.sort_values("step")
        values = pd.to_numeric(run[column], errors="coerce")
        hit = run[(values >= target) if higher else (values <= target)]
        if len(hit):
            times.append(float(hit["wall_time_s"].iloc[0]))
    return (float(np.median(times)) if times else math.nan), len(times)


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"].astype(str) == "ok"] if "status" in frame else frame


def _median(series: pd.Series) -> float:
    return median(pd.to_numeric(series, errors="coerce").tolist())


def _hvp_flags(frame: pd.DataFrame) -> pd.Series:
    return as_bool(frame["is_hvp_step"]) if "is_hvp_step" in frame else pd.Series(False, index=frame.index)


def wall_clock_table(metrics: pd.DataFrame, summary: pd.DataFrame, *, target: float | None = None,
                     target_loss: float | None = None) -> pd.DataFrame:
    """The numeric table, one row per (task, optimizer), in the order they first appear."""
    metrics, summary = add_labels(metrics, summary)
    rows = []
    for (task, opt), runs in summary.groupby(["task", "label"], sort=False):
        ok = _ok(runs)
        m = metrics[(metrics["task"] == task) & (metrics["label"] == opt)]
        eval_metric = next(iter(runs["eval_metric"].dropna().astype(str)), None) \
            if "eval_metric" in runs else None
        default_target, higher = _task_goal(task, eval_metric)
        row = {"task": task, "optimizer": opt, "runs": len(runs), "runs_ok": len(ok),
               "step_ms": _median(ok["step_time_ms"]) if "step_time_ms" in ok else math.nan,
               "hvp_ms": _median(ok["hvp_time_ms"]) if "hvp_time_ms" in ok else math.nan}
        plain = m[~_hvp_flags(m) & (pd.to_numeric(m["step"], errors="coerce") > 1)] if len(m) else m
        grad_ms = _median(plain["fwd_bwd_ms"]) if "fwd_bwd_ms" in m else math.nan
        if not grad_ms > 0 and "fwd_bwd_time_ms" in ok:
            grad_ms = _median(ok["fwd_bwd_time_ms"])
        row["hvp_x_grad"] = row["hvp_ms"] / grad_ms if grad_ms > 0 else math.nan
        steps = pd.to_numeric(ok["steps"], errors="coerce")
        row["amortised_ms"] = _median(1000 * pd.to_numeric(ok["wall_time_s"], errors="coerce") / steps)
        # Time to target, on the training loss when asked, else on the task's eval metric.
        if target_loss is not None:
            column, goal, higher_goal, label = "loss", target_loss, False, "loss"
        else:
            column = f"eval_{eval_metric}" if eval_metric else None
            goal, higher_goal, label = (target if target is not None else default_target), higher, eval_metric
        if column in m and goal is not None and len(m):
            row["ttt_s"], row["ttt_reached"] = _time_to_target(m, column, goal, higher_goal)
            row["target"] = f"{label} {'>=' if higher_goal else '<='} {goal:g}"
        else:
            row["ttt_s"], row["ttt_reached"], row["target"] = math.nan, 0, ""
        losses = pd.to_numeric(ok["final_loss"], errors="coerce")
        row["final_loss_mean"], row["final_loss_std"] = losses.mean(), losses.std(ddof=1)
        values = pd.to_numeric(ok["eval_value"], errors="coerce") if "eval_value" in ok else pd.Series([], dtype=float)
        row["eval_metric"] = eval_metric or ""
        row["eval_mean"], row["eval_std"] = values.mean(), values.std(ddof=1)
        tests = pd.to_numeric(ok["test_value"], errors="coerce") if "test_value" in ok else pd.Series([], dtype=float)
        row["test_metric"] = next(iter(ok["test_metric"].dropna().astype(str)), "") if "test_metric" in ok else ""
        row["test_mean"], row["test_std"] = tests.mean(), tests.std(ddof=1)
        rows.append(row)
    table = pd.DataFrame(rows)
    for ref in ("sgd", "adam"):
        table[f"vs_{ref}"] = [_relative(table, task, value, ref)
                              for task, value in zip(table["task"], table["amortised_ms"])]
    order = ["task", "optimizer", "runs", "runs_ok", "step_ms", "hvp_ms", "hvp_x_grad", "amortised_ms",
             "vs_sgd", "vs_adam", "target", "ttt_s", "ttt_reached", "final_loss_mean", "final_loss_std",
             "eval_metric", "eval_mean", "eval_std", "test_metric", "test_mean", "test_std"]
    return table[order]


def _relative(table: pd.DataFrame, task: str, value: float, ref: str) -> float:
    """``value`` over the reference optimizer's amortised cost on ``task`` (``ref`` or one ``ref:...``)."""
    same = table[table["task"] == task]
    exact = same[same["optimizer"] == ref]
    if exact.empty:
        exact = same[same["optimizer"].astype(str).str.split(":").str[0] == ref]
    if len(exact) != 1 or not exact["amortised_ms"].iloc[0] > 0:
        return math.nan
    return value / float(exact["amortised_ms"].iloc[0])


def _num(value: float, fmt: str = "{:.4g}", unit: str = "") -> str:
    return "—" if value is None or not np.isfinite(value) else fmt.format(value) + unit


def _spread(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.4g}" if not np.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


HEADERS = ["task", "optimizer", "runs ok", "step (ms)", "HVP extra (ms)", "HVP / grad",
           "amortised (ms/step)", "vs SGD", "vs Adam", "time to target", "final loss", "eval", "test"]


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-readable strings of :func:`wall_clock_table` (used by rich and Markdown)."""
    out = []
    for r in table.itertuples(index=False):
        if r.target:
            ttt = (f"{_num(r.ttt_s, '{:.3g}', ' s')} ({r.ttt_reached}/{r.runs}, {r.target})"
                   if r.ttt_reached else f"not reached (0/{r.runs}, {r.target})")
        else:
            ttt = "—"
        evals = f"{r.eval_metric} {_spread(r.eval_mean, r.eval_std)}" if r.eval_metric else "—"
        tests = f"{r.test_metric} {_spread(r.test_mean, r.test_std)}" if r.test_metric else "—"
        out.append([str(r.task), str(r.optimizer), f"{r.runs_ok}/{r.runs}", _num(r.step_ms, "{:.3g}"),
                    _num(r.hvp_ms, "{:.3g}"), _num(r.hvp_x_grad, "{:.2f}", "x"), _num(r.amortised_ms, "{:.3g}"),
                    _num(r.vs_sgd, "{:.2f}", "x"), _num(r.vs_adam, "{:.2f}", "x"), ttt,
                    _spread(r.final_loss_mean, r.final_loss_std), evals, tests])
    return pd.DataFrame(out, columns=HEADERS)


def rich_table(table: pd.DataFrame, title: str = "Wall-clock and convergence") -> Group:
    """Per task, a cost table and a convergence table (split so each fits an 80-column terminal)."""
    shown = format_table(table)
    parts = []
    for task, part in shown.groupby("task", sort=False):
        raw = table[table["task"] == task]
        targets = ", ".join(t for t in dict.fromkeys(raw["target"]) if t)
        metric = next((m for m in raw["eval_metric"] if m), "eval")
        test = next((m for m in raw["test_metric"] if m), None)
        cost = Table(title=f"Cost per step: {task}", box=box.SIMPLE_HEAD,
                     caption="medians over seeds; HVP/grad: HVP extra cost in gradient evaluations; "
                             "amort.: training time / steps")
        conv = Table(title=f"Convergence: {task}" + (f" (target {targets})" if targets else ""),
                     box=box.SIMPLE_HEAD, caption="mean ± sample std over the seeds that finished ok")
        for t, heads in ((cost, ["optimizer", "step ms", "HVP ms", "HVP/grad", "amort. ms", "vs SGD",
                                 "vs Adam"]),
                         (conv, ["optimizer", "ok", "time to target", "final loss", metric]
                          + ([test] if test else []))):
            for i, name in enumerate(heads):
                t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for r, ttt in zip(part.itertuples(index=False), _short_ttt(raw)):
            cost.add_row(r[1], *r[3:9])
            conv.add_row(r[1], r[2], ttt, r[10], *[v.split(" ", 1)[1] if v != "—" else v
                                                   for v in (r[11], r[12])[:2 if test else 1]])
        parts += [cost, conv]
    return Group(*parts)


def _short_ttt(table: pd.DataFrame) -> list[str]:
    return [("—" if not r.target else f"{_num(r.ttt_s, '{:.3g}', ' s')} ({r.ttt_reached}/{r.runs})"
             if r.ttt_reached else f"no (0/{r.runs})") for r in table.itertuples(index=False)]


def markdown_table(table: pd.DataFrame) -> str:
    shown = format_table(table).astype(str).apply(lambda col: col.str.replace("|", "\\|", regex=False))
    return shown.to_markdown(index=False, colalign=["left"] * 2 + ["right"] * (len(HEADERS) - 2)) + "\n"


def render_table(table: pd.DataFrame, fmt: Format):
    """A rich Table, or the Markdown / CSV text."""
    if fmt == "rich":
        return rich_table(table)
    if fmt == "markdown":
        return markdown_table(table)
    if fmt == "csv":
        return table.to_csv(index=False)
    raise BenchError(f"unknown format {fmt!r}; use rich, markdown or csv")


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table atomically: ``.csv`` numeric, ``.md`` Markdown."""
    path = check_output_file(path, TABLE_SUFFIXES)
    if path.suffix.lower() == ".csv":
        return write_csv(table, path)
    return write_text(path, markdown_table(table))
