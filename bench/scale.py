"""The scale-invariance study: one learning rate per optimizer, the task scaled by many factors.

Each optimizer trains, at ONE fixed learning rate (its registry default for the base task, or a given
one), on ``<task>-loss-x<f>`` or ``<task>-params-x<f>`` for every factor ``f`` (Dauphin et al. 2015,
section 3).  The study is an ordinary grid of those tasks (:func:`scale_config`), run into an ordinary
results folder, plus post-processing of that folder (:func:`scale_runs`): each run's final *unscaled*
loss is the mean training loss over its last 10% of steps, plotted against ``f``.  A method that is
invariant to the scale gives a flat line.  The claim under test: ESGD-M is flat for both kinds, Adam for
loss scaling only, SGD for neither (SGD's step would need lr / n for the loss and lr * n^2 for the
parameters).

Flatness is judged by the relative spread of the mean final loss over the factors,
``spread = (max - min) / min(|max|, |min|)`` (max/min - 1 for positive losses; it still means something
for a loss whose optimum is negative, such as the quadratic task's).  An optimizer is called flat when
every run finished and ``spread <= flat_spread`` (0.5 by default, a factor of 1.5 for positive losses:
the spread of a few seeds at one scale is well inside that, a scale-dependent method is off by orders of
magnitude or diverges).  ESGD-M is invariant only up to ``eps`` (1e-4 is added to sqrt(d)), so at extreme
factors, where the Hessian is scaled by 1e-6, it may bend; the verdict reports what happens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.table import Table

from tasks import get_task
from tasks.scaled import KINDS, format_factor, parse_name

from .config import BenchConfig, make_config
from .errors import BenchError
from .readers import Results
from .store import as_bool, write_csv, write_json
from .timing import TAIL, tail_mean

__all__ = ["DEFAULT_FACTORS", "FLAT_SPREAD", "TAIL", "parse_factors", "scaled_name", "scale_config",
           "scale_runs", "spread", "summarise_scale", "verdicts", "plot_scale",
           "scale_rich_table", "write_scale_outputs"]

DEFAULT_FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
FLAT_SPREAD = 0.5
_TINY = 1e-30      # keeps the spread finite when a loss is exactly zero


def parse_factors(text: str) -> list[float]:
    """``"1e-3,1,1e3"`` -> ``[0.001, 1.0, 1000.0]``; every factor must be a positive finite number."""
    factors = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise BenchError(f"bad scale factor {part!r}: give positive numbers separated by commas, "
                             "e.g. 1e-3,1,1e3") from None
        if not (math.isfinite(value) and value > 0):
            raise BenchError(f"bad scale factor {part!r}: it must be a positive finite number")
        factors.append(value)
    return sorted(set(factors))


def scaled_name(task: str, kind: str, factor: float) -> str:
    return f"{task}-{kind}-x{format_factor(factor)}"


def scale_config(task: str, kind: str, factors: Sequence[float], settings: Mapping[str, Any],
                 file: Mapping[str, Any] | None = None, file_name: str | None = None) -> BenchConfig:
    """The study's grid: ``settings`` (the ``run`` settings: optimizers, seeds, steps, lr, options,
    out, ...) over the scaled variants of ``task``; every optimizer keeps one lr over the factors."""
    if kind not in KINDS:
        raise BenchError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if get_task(task).base is not None:
        raise BenchError(f"task {task!r} is already a scaled variant; give its base task {get_task(task).base!r}")
    if not factors:
        raise BenchError("no scale factors given")
    given = {k: v for k, v in settings.items() if v is not None}
    given.setdefault("seeds", 1)
    return make_config({**given, "tasks": [scaled_name(task, kind, f) for f in factors]}, file, file_name)


def scale_runs(results: Results) -> pd.DataFrame:
    """One row per run of a study's results folder, with its factor and its tail loss."""
    rows = []
    metrics = results.metrics.sort_values("step")
    grouped = {key: part["loss"].tolist() for key, part in
               metrics.groupby(["task", "optimizer", "lr", "seed"], sort=False)}
    for r in results.summary.to_dict("records"):
        parsed = parse_name(str(r["task"]))
        if parsed is None:
            raise BenchError(f"{r['task']!r} is not a scaled task: {r.get('result_dir')} is not a scale study")
        base, kind, factor = parsed
        losses = grouped.get((r["task"], r["optimizer"], r["lr"], r["seed"]), [])
        rows.append({"task": base, "kind": kind, "factor": float(factor), "scaled_task": r["task"],
                     "optimizer": r["optimizer"], "lr": float(r["lr"]), "seed": int(r["seed"]),
                     "steps": r.get("steps"), "final_loss": tail_mean(losses),
                     "last_loss": r.get("final_loss", math.nan), "eval_metric": r.get("eval_metric"),
                     "eval_value": r.get("eval_value", math.nan), "status": r["status"],
                     "wall_time_s": r.get("wall_time_s", math.nan),
                     "synthetic": bool(as_bool(pd.Series([r.get("synthetic", False)])).iloc[0])})
    return pd.DataFrame(rows)


def _finite_positive(x: pd.Series) -> pd.Series:
    x = pd.to_numeric(x, errors="coerce")
    return x.where(np.isfinite(x))


def summarise_scale(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (optimizer, factor): mean / min / max final loss over seeds and how many runs were ok."""
    df = runs.assign(final_loss=_finite_positive(runs["final_loss"]), ok=runs["status"].astype(str) == "ok")
    out = df.groupby(["optimizer", "factor"], sort=False).agg(
        lr=("lr", "first"), mean=("final_loss", "mean"), min=("final_loss", "min"), max=("final_loss", "max"),
        runs=("seed", "count"), ok=("ok", "sum")).reset_index()
    return out.sort_values(["optimizer", "factor"], key=lambda c: c.map(_order(runs)) if c.name == "optimizer"
                           else c).reset_index(drop=True)


def _order(runs: pd.DataFrame) -> dict[str, int]:
    return {name: i for i, name in enumerate(dict.fromkeys(runs["optimizer"]))}


def spread(values: Sequence[float]) -> float:
    """``(max - min) / min(|max|, |min|)``: 0 for a flat line, inf when a value is not finite."""
    v = np.asarray(values, dtype=float)
    if not len(v) or not np.isfinite(v).all():
        return math.inf
    hi, lo = v.max(), v.min()
    return float((hi - lo) / (min(abs(hi), abs(lo)) + _TINY)) if hi > lo else 0.0


def verdicts(summary: pd.DataFrame, flat_spread: float = FLAT_SPREAD) -> pd.DataFrame:
    """Per optimizer: the relative spread of mean final loss over factors and a flat / NOT flat verdict."""
    rows = []
    for opt, part in summary.groupby("optimizer", sort=False):
        means = part["mean"]
        failed = part.loc[(part["ok"] < part["runs"]) | ~np.isfinite(means), "factor"].tolist()
        value = spread(means)
        if failed:
            verdict = "NOT flat (failed at x" + ", x".join(format_factor(f) for f in failed) + ")"
        else:
            verdict = "flat" if value <= flat_spread else "NOT flat"
        rows.append({"optimizer": opt, "lr": part["lr"].iloc[0], "spread": value, "verdict": verdict})
    return pd.DataFrame(rows)


def plot_scale(runs: pd.DataFrame, flat_spread: float = FLAT_SPREAD) -> Figure:
    """Final unscaled loss against the factor (log-log), one line per optimizer, min-max over seeds."""
    import matplotlib.pyplot as plt
    from .plots import line_colour
    summary = summarise_scale(runs)
    verdict = verdicts(summary, flat_spread).set_index("optimizer")
    task, kind = runs["task"].iloc[0], runs["kind"].iloc[0]
    synthetic = "synthetic" in runs and bool(as_bool(runs["synthetic"]).any())
    # Lines and bands are drawn from the runs that finished ok: one diverged run's loss of 1e18 would
    # otherwise set the y-axis and press the flat lines, the point of the figure, into one at the bottom.
    ok_runs = runs[runs["status"].astype(str) == "ok"]
    drawn = summarise_scale(ok_runs) if len(ok_runs) else summary.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    any_failed = False
    for i, (opt, part) in enumerate(summary.groupby("optimizer", sort=False)):
        colour = line_colour(opt, i)
        v = verdict.loc[opt]
        label = f"{opt} (lr {v['lr']:g}): {v['verdict']}, spread {v['spread']:.3g}"
        line = drawn[drawn["optimizer"] == opt]
        ax.plot(line["factor"], line["mean"], marker="o", color=colour, lw=1.6, label=label)
        if (line["runs"] > 1).any():
            ax.fill_between(line["factor"], line["min"], line["max"], color=colour, alpha=0.18, lw=0)
        failed = part[part["ok"] < part["runs"]]
        if len(failed):     # a crossed marker on the top edge: a run at this factor diverged or failed
            ax.plot(failed["factor"], [0.97] * len(failed), ls="none", marker="x", ms=9, mew=2, color=colour,
                    transform=ax.get_xaxis_transform(), clip_on=False)
            any_failed = True
    ax.set_xscale("log")
    finite = drawn["mean"][np.isfinite(drawn["mean"])]
    if len(finite) and finite.min() > 0:
        ax.set_yscale("log")
    what = "loss multiplied by" if kind == "loss" else "parameters rescaled by"
    ax.set_xlabel(f"scale factor ({what} the factor)")
    ax.set_ylabel(f"training loss (unscaled), mean of the last {TAIL:.0%} of steps")
    steps = pd.to_numeric(runs["steps"], errors="coerce").max()
    seeds = runs["seed"].nunique()
    title = f"Scale invariance: {task}, {kind} scaling, {steps:g} steps, one lr per optimizer"
    if seeds > 1:
        title += f"\nmean of {seeds} seeds, band: min-max over seeds"
    if synthetic:
        title += "\nSYNTHETIC DATA"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_failed:
        handles.append(plt.Line2D([], [], ls="none", marker="x", mew=2, color="grey"))
        labels.append("x on the top edge: a run diverged or failed at that factor (lines: ok runs only)")
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    return fig


def scale_rich_table(runs: pd.DataFrame, flat_spread: float = FLAT_SPREAD):
    """Two narrow tables: final loss per factor (rows) and optimizer (columns), then the verdicts."""
    from rich import box
    from rich.console import Group
    summary = summarise_scale(runs)
    verdict = verdicts(summary, flat_spread)
    task, kind = runs["task"].iloc[0], runs["kind"].iloc[0]
    opts = list(verdict["optimizer"])
    losses = Table(title=f"Final unscaled loss: {task}, {kind} scaled by the factor", box=box.SIMPLE_HEAD,
                   caption="mean over seeds; * some run of that cell did not finish ok")
    losses.add_column("factor", justify="right", no_wrap=True)
    for opt in opts:
        losses.add_column(opt, justify="right", no_wrap=True)
    cells = summary.set_index(["optimizer", "factor"])
    for f in sorted(summary["factor"].unique()):
        row = []
        for opt in opts:
            r = cells.loc[(opt, f)]
            text = f"{r['mean']:.4g}" if np.isfinite(r["mean"]) else "failed"
            row.append(text + ("*" if r["ok"] < r["runs"] and np.isfinite(r["mean"]) else ""))
        losses.add_row(f"x{format_factor(f)}", *row)
    judged = Table(title="Flat in the scale? (one fixed lr per optimizer)", box=box.SIMPLE_HEAD,
                   caption=f"spread = (max - min) / min(|max|, |min|) over factors; flat: every run ok "
                           f"and spread <= {flat_spread:g}")
    for name in ("optimizer", "lr", "spread", "verdict"):
        judged.add_column(name, justify="right" if name in ("lr", "spread") else "left")
    for v in verdict.itertuples(index=False):
        style = "green" if v.verdict == "flat" else "red"
        judged.add_row(v.optimizer, f"{v.lr:g}", f"{v.spread:.3g}", f"[{style}]{v.verdict}[/]")
    return Group(losses, judged)


def write_scale_outputs(runs: pd.DataFrame, out: str | os.PathLike, *, flat_spread: float = FLAT_SPREAD,
                        study: dict | None = None, image: str = "scale.png") -> dict[str, Path]:
    """``scale.csv`` (one row per run), ``scale_summary.csv``, ``scale_verdict.csv``, the plot and
    ``scale.json`` (the study's settings), each written atomically next to the run's results."""
    from .plots import save_figure
    out = Path(out)
    summary = summarise_scale(runs)
    paths = {"runs": out / "scale.csv", "summary": out / "scale_summary.csv",
             "verdict": out / "scale_verdict.csv", "plot": out / image, "study": out / "scale.json"}
    write_csv(runs, paths["runs"])
    write_csv(summary, paths["summary"])
    write_csv(verdicts(summary, flat_spread), paths["verdict"])
    save_figure(plot_scale(runs, flat_spread), paths["plot"])
    write_json({**(study or {}), "flat_spread": flat_spread}, paths["study"])
    return paths
