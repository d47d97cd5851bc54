"""The scale-invariance study (issue 5; ESGD-M seed; Dauphin et al. 2015, section 3).

Each optimizer trains, at ONE fixed learning rate (its registry default for the base task, or a given
one), on ``<task>-loss-x<f>`` or ``<task>-params-x<f>`` for every factor ``f``; the final *unscaled* loss
(the mean training loss over the last 10% of steps) is then plotted against ``f``.  A method that is
invariant to the scale gives a flat line.  The seed's claim: ESGD-M is flat for both kinds, Adam for loss
scaling only, SGD for neither (SGD's step would need lr / n for the loss and lr * n^2 for the parameters).

Flatness is judged by the relative spread of the mean final loss over the factors,
``spread = (max - min) / min(|max|, |min|)`` (that is max/min - 1 for positive losses; it still means
something for a loss whose optimum is negative, such as the quadratic task's).  An optimizer is called flat
when every run finished and ``spread <= flat_spread`` (0.5 by default, a factor of 1.5 for positive
losses: the spread of a few seeds at one scale is well inside that, a scale-dependent method is off by
orders of magnitude or diverges).  ESGD-M is invariant only up to ``eps`` (1e-4 is added to sqrt(d)), so
at extreme factors, where the Hessian is scaled by 1e-6, it may bend; the verdict reports what happens.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.table import Table

__all__ = ["DEFAULT_FACTORS", "DEFAULT_OPTIMIZERS", "FLAT_SPREAD", "TAIL", "tail_loss", "spread", "check_study",
           "parse_factors", "scaled_name", "resolve_lrs", "run_scale_study", "summarise_scale", "verdicts",
           "plot_scale", "scale_rich_table", "write_scale_outputs"]

DEFAULT_FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
DEFAULT_OPTIMIZERS = ("esgd-m", "esgd", "sgd", "adam")
FLAT_SPREAD = 0.5
TAIL = 0.1         # the final loss is the mean over this fraction of the last steps
_TINY = 1e-30  # keeps the spread finite when a loss is exactly zero


def parse_factors(text: str) -> list[float]:
    """``"1e-3,1,1e3"`` -> ``[0.001, 1.0, 1000.0]``; every factor must be a positive finite number."""
    factors = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"bad scale factor {part!r}: give positive numbers separated by commas, "
                             "e.g. 1e-3,1,1e3") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"bad scale factor {part!r}: it must be a positive finite number")
        factors.append(value)
    if not factors:
        raise ValueError("no scale factors given")
    return sorted(set(factors))


def scaled_name(task: str, kind: str, factor: float) -> str:
    from tasks.scaled import format_factor
    return f"{task}-{kind}-x{format_factor(factor)}"


def resolve_lrs(task: str, optimizers: Iterable[str], lr: float | None = None) -> dict[str, float]:
    """The one learning rate per optimizer spec: ``lr``, else ``name:lr=X``, else the registry's default
    for the base task.  Unknown names and malformed specs raise the registry's errors."""
    from .optimizers import default_lr, get_optimizer, parse_opt_spec
    out = {}
    for spec in optimizers:
        name, overrides = parse_opt_spec(spec)
        value = lr if lr is not None else overrides.get("lr", default_lr(get_optimizer(name), task))
        if value is None:
            raise ValueError(f"optimizer {name!r} has no default learning rate for {task!r}; pass --lr")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"learning rate of {spec!r} must be a positive finite number, got {value!r}")
        out[spec] = float(value)
    return out


def check_study(task: str, kind: str, optimizers: Sequence[str], *, steps: int | None = None, seeds: int = 1,
                lr: float | None = None) -> dict[str, float]:
    """Validate a study before any training; returns the one lr per optimizer spec."""
    from tasks import get_task
    from tasks.scaled import KINDS
    if kind not in KINDS:
        raise ValueError(f"scale kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = get_task(task)
    if spec.base is not None:
        raise ValueError(f"task {task!r} is already a scaled variant; give its base task {spec.base!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return resolve_lrs(task, optimizers, lr)


def run_scale_study(task: str, kind: str, *, factors: Sequence[float] = DEFAULT_FACTORS,
                    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, steps: int | None = None, seeds: int = 1,
                    lr: float | None = None, task_config=None,
                    on_run: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Train every (optimizer, factor, seed); one row per run with the final unscaled loss (mean of the
    last 10% of steps; ``last_loss`` is the last minibatch's).

    A run interrupted by Ctrl-C ends the study early: the rows so far are returned, the last one with
    status ``interrupted``."""
    from .runner import train
    lrs = check_study(task, kind, optimizers, steps=steps, seeds=seeds, lr=lr)
    rows = []
    for opt in optimizers:
        for factor in factors:
            name = scaled_name(task, kind, factor)
            for seed in range(seeds):
                result = train(name, opt, seed=seed, steps=steps, overrides={"lr": lrs[opt]},
                               task_config=task_config)
                s = result.summary
                row = {"task": task, "kind": kind, "factor": float(factor), "scaled_task": name,
                       "optimizer": opt, "lr": lrs[opt], "seed": seed, "steps": s.get("steps"),
                       "final_loss": tail_loss(result.rows), "last_loss": s.get("final_loss", math.nan),
                       "eval_metric": s.get("eval_metric"),
                       "eval_value": s.get("eval_value", math.nan), "status": result.status,
                       "wall_time_s": s.get("wall_time_s", math.nan),
                       "synthetic": bool(s.get("synthetic", False))}
                rows.append(row)
                if on_run is not None:
                    on_run(row)
                if result.status == "interrupted":     # Ctrl-C: keep what is done, run nothing more
                    return pd.DataFrame(rows)
    return pd.DataFrame(rows)


def tail_loss(rows: Sequence[dict], fraction: float = TAIL) -> float:
    """Mean unscaled training loss over the last ``fraction`` of a run's steps (at least one step):
    one minibatch's loss alone varies by tens of percent from step to step."""
    losses = [r["loss"] for r in rows]
    if not losses:
        return math.nan
    tail = losses[-max(1, math.ceil(fraction * len(losses))):]
    return float(np.mean(tail))


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
    from tasks.scaled import format_factor
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


def plot_scale(runs: pd.DataFrame, flat_spread: float = FLAT_SPREAD, *, synthetic: bool = False) -> Figure:
    """Final unscaled loss against the factor (log-log), one line per optimizer, min-max over seeds."""
    import matplotlib.pyplot as plt
    from .plots import _colour
    summary = summarise_scale(runs)
    verdict = verdicts(summary, flat_spread).set_index("optimizer")
    task, kind = runs["task"].iloc[0], runs["kind"].iloc[0]
    if "synthetic" in runs:
        synthetic = synthetic or bool(runs["synthetic"].astype(str).str.lower().isin({"true", "1"}).any())
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    any_failed = False
    for i, (opt, part) in enumerate(summary.groupby("optimizer", sort=False)):
        colour = _colour(opt, i)
        v = verdict.loc[opt]
        label = f"{opt} (lr {v['lr']:g}): {v['verdict']}, spread {v['spread']:.3g}"
        ax.plot(part["factor"], part["mean"], marker="o", color=colour, lw=1.6, label=label)
        if (part["runs"] > 1).any():
            ax.fill_between(part["factor"], part["min"], part["max"], color=colour, alpha=0.18, lw=0)
        failed = part[part["ok"] < part["runs"]]
        if len(failed):     # a crossed marker on the top edge: a run at this factor diverged or failed
            ax.plot(failed["factor"], [0.97] * len(failed), ls="none", marker="x", ms=9, mew=2, color=colour,
                    transform=ax.get_xaxis_transform(), clip_on=False)
            any_failed = True
    ax.set_xscale("log")
    finite = summary["mean"][np.isfinite(summary["mean"])]
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
        labels.append("x on the top edge: a run diverged or failed at that factor")
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    return fig


def scale_rich_table(runs: pd.DataFrame, flat_spread: float = FLAT_SPREAD):
    """Two narrow tables: final loss per factor (rows) and optimizer (columns), then the verdicts."""
    from rich import box
    from rich.console import Group
    from tasks.scaled import format_factor
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
                        meta: dict | None = None, image: str = "scale.png") -> dict[str, Path]:
    """``scale.csv`` (one row per run), ``scale_summary.csv``, ``scale_verdict.csv``, the plot and
    ``meta.json``, each written atomically."""
    from .plots import save_figure
    from .results import write_csv_atomic, write_json_atomic
    out = Path(out)
    summary = summarise_scale(runs)
    paths = {"runs": out / "scale.csv", "summary": out / "scale_summary.csv",
             "verdict": out / "scale_verdict.csv", "plot": out / image, "meta": out / "meta.json"}
    write_csv_atomic(runs, paths["runs"])
    write_csv_atomic(summary, paths["summary"])
    write_csv_atomic(verdicts(summary, flat_spread), paths["verdict"])
    synthetic = bool(meta and meta.get("synthetic"))
    save_figure(plot_scale(runs, flat_spread, synthetic=synthetic), paths["plot"])
    write_json_atomic({**(meta or {}), "flat_spread": flat_spread,
                       "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}, paths["meta"])
    return paths
