"""Loss and evaluation curves from results folders, drawn with matplotlib's Agg backend.

Each optimizer is one line: the mean over seeds, with a shaded min-max band over the same seeds (the
legend says so, a band is not a confidence interval).  The x-axis is the optimizer step or the training
wall-clock time (mean over seeds at each step, evaluation excluded as the runner logs it).  HVP steps of
second-order optimizers are marked on the loss curves, so the cost of the Hessian information is visible
where it is paid.  Runs on synthetic data say so in the title: their curves say nothing about real data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # headless everywhere: CI, servers, the CLI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .errors import BenchError  # noqa: E402
from .readers import load_results  # noqa: E402
from .store import as_bool, check_output_file, write_figure  # noqa: E402

__all__ = ["FORMATS", "SMOOTH", "eval_column", "curve_frame", "smoothed", "plot_curves", "save_figure", "check_image_path",
           "plot_results"]

FORMATS = (".png", ".svg", ".pdf")
XAxis = Literal["step", "time"]
SMOOTH = 0.9    # EMA weight of the loss curves: about the last ten steps
Metric = Literal["loss", "eval"]

# Fixed colours per optimizer so that every figure of a report reads the same way.
_COLOURS = {"esgd-m": "tab:red", "esgd": "tab:orange", "sgd": "tab:blue", "adam": "tab:green"}


def line_colour(name: str, index: int) -> str:
    # Only the plain registry name gets the fixed colour: "esgd-m:eps=1e-8" beside "esgd-m" must differ.
    if name in _COLOURS:
        return _COLOURS[name]
    from matplotlib.colors import to_hex
    fixed = {to_hex(c) for c in _COLOURS.values()}
    others = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if to_hex(c) not in fixed]
    return others[index % len(others)] if others else f"C{index % 10}"


def eval_column(metrics: pd.DataFrame, summary: pd.DataFrame | None, task: str) -> str | None:
    """The ``eval_<key>`` column holding ``task``'s eval metric (the summary names it), else the first one."""
    if summary is not None and "eval_metric" in summary and len(summary):
        names = summary.loc[summary["task"] == task, "eval_metric"].dropna().unique()
        for name in names:
            if f"eval_{name}" in metrics:
                return f"eval_{name}"
    cols = [c for c in metrics.columns if c.startswith("eval_")]
    return cols[0] if cols else None


def curve_frame(metrics: pd.DataFrame, *, value: str, x: XAxis = "step") -> pd.DataFrame:
    """Per (task, label, step): x position, mean/min/max of ``value`` over seeds, seed count, HVP flag
    (``label`` is the optimizer, with its lr when a sweep ran several: :func:`bench.tables.add_labels`).

    Steps where ``value`` was not logged (evaluation every N steps) are dropped first, so the mean is
    always over the seeds that have the value at that step.
    """
    need = {"task", "label", "seed", "step", value}
    missing = need - set(metrics.columns)
    if missing:
        raise BenchError(f"metrics have no column(s) {', '.join(sorted(missing))}")
    df = metrics[np.isfinite(pd.to_numeric(metrics[value], errors="coerce"))].copy()
    df[value] = df[value].astype(float)
    if "is_hvp_step" not in df:
        df["is_hvp_step"] = False
    df["is_hvp_step"] = as_bool(df["is_hvp_step"])
    agg = {"mean": (value, "mean"), "min": (value, "min"), "max": (value, "max"),
           "seeds": ("seed", "nunique"), "hvp": ("is_hvp_step", "any")}
    if x == "time":
        if "wall_time_s" not in df:
            raise BenchError("metrics have no wall_time_s column, cannot plot against time")
        agg["x"] = ("wall_time_s", "mean")
    out = df.groupby(["task", "label", "step"], sort=False).agg(**agg).reset_index()
    if x == "step":
        out["x"] = out["step"].astype(float)
    return out


def smoothed(values: pd.Series, weight: float) -> pd.Series:
    """The exponential moving average with ``weight`` on the past, bias-corrected so that its first
    values are not pulled towards zero (pandas' ``ewm(adjust=True)``: a normalised weighted mean)."""
    if not weight:
        return values
    return values.ewm(alpha=1.0 - weight, adjust=True).mean()


def plot_curves(metrics: pd.DataFrame, summary: pd.DataFrame | None = None, *, x: XAxis | str = "step",
                metric: Metric = "loss", log_y: bool = False, synthetic: bool | None = None,
                title: str | None = None, smooth: float = SMOOTH) -> Figure:
    """One panel per task (a row per x-axis with ``x="both"``), one line per optimizer (mean over seeds)
    with its min-max band.  Loss curves are smoothed by an EMA of weight ``smooth`` (0 turns it off),
    with the raw mean drawn faintly behind: one minibatch's loss varies by tens of percent."""
    if x not in ("step", "time", "both"):
        raise BenchError(f"x must be 'step', 'time' or 'both', got {x!r}")
    if metric not in ("loss", "eval"):
        raise BenchError(f"metric must be 'loss' or 'eval', got {metric!r}")
    if not 0.0 <= smooth < 1.0:
        raise BenchError(f"smooth must be in [0, 1), got {smooth!r}")
    if metrics.empty:
        raise BenchError("no metrics to plot")
    from .tables import add_labels
    metrics, labelled = add_labels(metrics, summary if summary is not None else metrics)
    summary = labelled if summary is not None else None
    tasks = list(dict.fromkeys(metrics["task"]))
    if synthetic is None:
        synthetic = _any_synthetic(summary)
    rows = ["step", "time"] if x == "both" else [x]
    smooth = smooth if metric == "loss" else 0.0     # evaluations are few and already averaged
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(6.4 * len(tasks), 4.4 * len(rows)), squeeze=False)
    for row, axis in zip(axes, rows):
        for ax, task in zip(row, tasks):
            _panel(ax, metrics[metrics["task"] == task], summary, task, axis, metric, log_y, smooth)
    heading = title or ("Training loss" if metric == "loss" else "Evaluation metric")
    if synthetic:
        heading += " — SYNTHETIC DATA (says nothing about real data)"
    fig.suptitle(heading, color="darkred" if synthetic else "black")
    fig.tight_layout()
    return fig


def _panel(ax: Any, part: pd.DataFrame, summary: pd.DataFrame | None, task: str, x: XAxis, metric: Metric,
           log_y: bool, smooth: float) -> None:
    value = "loss" if metric == "loss" else eval_column(part, summary, task)
    if value is None:
        raise BenchError(f"task {task!r} has no evaluation columns (eval_*) to plot")
    curves = curve_frame(part, value=value, x=x)
    if curves.empty:
        raise BenchError(f"task {task!r} has no finite {value} values to plot")
    for i, (opt, c) in enumerate(curves.groupby("label", sort=False)):
        c = c.sort_values("step")
        colour = line_colour(opt, i)
        seeds = int(c["seeds"].max())
        if smooth:
            ax.plot(c["x"], c["mean"], color=colour, lw=0.7, alpha=0.25)
            c = c.assign(**{k: smoothed(c[k], smooth) for k in ("mean", "min", "max")})
        ax.plot(c["x"], c["mean"], color=colour, lw=1.6, label=f"{opt} (mean of {seeds} seed"
                f"{'s' if seeds != 1 else ''}{_failures(summary, task, opt)})")
        if seeds > 1:
            ax.fill_between(c["x"], c["min"], c["max"], color=colour, alpha=0.18, lw=0)
        hvp = c[c["hvp"]]
        if metric == "loss" and len(hvp):
            ax.plot(hvp["x"], hvp["mean"], ls="none", marker="|", ms=7, mew=0.9, color=colour, alpha=0.8)
    ax.set_xlabel("optimizer step" if x == "step" else "training wall-clock time (s)")
    ax.set_ylabel("training loss (unscaled)" if metric == "loss" else value.removeprefix("eval_"))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(task)
    ax.grid(True, alpha=0.3, which="both" if log_y else "major")
    # Proxy artists for what the band, the smoothing and the ticks mean: a reader should not have to guess.
    handles, labels = ax.get_legend_handles_labels()
    handles.append(plt.Rectangle((0, 0), 1, 1, color="grey", alpha=0.25))
    labels.append("band: min-max over seeds")
    if smooth:
        handles.append(plt.Line2D([], [], color="grey", lw=0.7, alpha=0.4))
        labels.append(f"faint: per-step mean; lines: its EMA ({smooth:g})")
    if metric == "loss" and curves["hvp"].any():
        handles.append(plt.Line2D([], [], ls="none", marker="|", ms=7, color="grey"))
        labels.append("HVP step (Hessian-vector product)")
    ax.legend(handles, labels, fontsize=8, loc="best")


def _failures(summary: pd.DataFrame | None, task: str, label: str) -> str:
    """``", 1 diverged"``: the mean is over fewer seeds after a run stopped, the legend must say so."""
    if summary is None or "status" not in summary:
        return ""
    runs = summary[(summary["task"] == task) & (summary["label"] == label)]
    bad = runs["status"].astype(str)[runs["status"].astype(str) != "ok"].value_counts()
    return "".join(f", {n} {status}" for status, n in bad.items())


def _any_synthetic(summary: pd.DataFrame | None) -> bool:
    if summary is None or "synthetic" not in summary:
        return False
    return bool(as_bool(summary["synthetic"]).any())


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save atomically (the format comes from the suffix) and close the figure."""
    try:
        path = check_image_path(path)
        return write_figure(fig, path, dpi=130)
    finally:
        plt.close(fig)


def check_image_path(path: str | os.PathLike) -> Path:
    """``path`` if it names an image that can be written (known suffix, writable folder, not a file of a
    results folder), else a one-line :class:`~bench.errors.BenchError`."""
    return check_output_file(path, FORMATS)


def plot_results(dirs: list[str | os.PathLike], out: str | os.PathLike, *, x: XAxis | str = "step",
                 metric: Metric = "loss", log_y: bool = False, smooth: float = SMOOTH,
                 only: list[str] | None = None) -> Path:
    """Load results folders and save their curves to ``out`` (``only`` those optimizers, if given)."""
    check_image_path(out)
    results = load_results(dirs, only)
    return save_figure(plot_curves(results.metrics, results.summary, x=x, metric=metric, log_y=log_y,
                                   smooth=smooth), out)
