"""Rich output: the live progress bars of ``run`` and ``sweep``, their end-of-run tables, and ``perf``'s.

One bar per (task, optimizer, lr, seed) cell with steps/s, the current loss and the ETA, as rich's
``Progress`` documents; the summary table gives mean ± sample std over seeds per optimizer
(:func:`bench.readers.aggregate_summary`).  Kept apart from ``cli.py`` so the command functions stay thin.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeRemainingColumn)
from rich import box
from rich.table import Table
from rich.text import Text

from .grid import Reporter
from .readers import aggregate_summary
from .train import Cell, RunResult

__all__ = ["RichReporter", "summary_table", "sweep_table", "fmt", "perf_table", "targets_table"]


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "--/s", style="cyan")


def _label(cell: Cell, show_lr: bool) -> str:
    lr = f" lr={cell.lr:g}" if show_lr else ""
    return f"{cell.task} {cell.optimizer.label}{lr} seed {cell.seed}"


class RichReporter(Reporter):
    """A :class:`~bench.grid.Reporter` that draws one rich progress bar per cell."""

    def __init__(self, console: Console, show_lr: bool = False) -> None:
        self.console, self.show_lr = console, show_lr
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 _Rate(), TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.ids: dict[tuple, Any] = {}
        self.totals: dict[tuple, int] = {}

    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ids:
            self.progress.stop()

    def add(self, cell: Cell, steps: int, done: RunResult | None = None) -> None:
        if not self.ids:    # start drawing only once the inputs have been checked and cells planned
            self.progress.start()
        status = f"{done.status} (resumed)" if done else ""
        loss = fmt(done.summary.get("final_loss")) if done else "--"
        self.totals[cell.key] = steps
        self.ids[cell.key] = self.progress.add_task(_label(cell, self.show_lr), total=steps,
                                                    completed=steps if done else 0, loss=loss, status=status)

    def update(self, cell: Cell, step: int, loss: float) -> None:
        self.progress.update(self.ids[cell.key], completed=step, loss=fmt(loss))

    def finish(self, cell: Cell, result: RunResult) -> None:
        style = {"ok": "green", "diverged": "yellow"}.get(result.status, "red")
        loss = result.summary.get("final_loss")
        self.progress.update(self.ids[cell.key], loss=fmt(loss), status=f"[{style}]{result.status}[/]")
        if result.status == "ok":
            self.progress.update(self.ids[cell.key], completed=self.totals[cell.key])


def fmt(value: Any, digits: int = 4) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "--"
    if math.isnan(value):
        return "--"
    return f"{value:.{digits}g}"


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "--"
    return fmt(mean, digits) + ("" if math.isnan(std) else f"±{fmt(std, 1)}")


def summary_table(summary: pd.DataFrame) -> list[Table]:
    """One table per task: mean ± std over the seeds that finished ok, per optimizer and lr."""
    agg = aggregate_summary(summary)
    tables = []
    for task, rows in agg.groupby("task", sort=False):
        metric = rows["eval_metric"].iloc[0]
        precisions = set(summary.loc[summary["task"] == task, "precision"].dropna()) \
            if "precision" in summary else set()
        shown = f" ({', '.join(sorted(precisions))})" if precisions - {"fp32"} else ""
        table = Table(title=f"{task}{shown}: mean ± std over seeds (ok runs)", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for col in ("optimizer", "lr", "ok", "final loss", metric, "step ms", "HVP ms", "wall s", "peak MB"):
            table.add_column(col, justify="left" if col == "optimizer" else "right")
        for r in rows.to_dict("records"):
            runs = r["runs"] + (f" {r['statuses']}" if r["statuses"] else "")
            table.add_row(r["optimizer"], fmt(r["lr"], 3), runs,
                          _pm(r["final_loss_mean"], r["final_loss_std"], 3),
                          _pm(r["eval_value_mean"], r["eval_value_std"], 3),
                          _pm(r["step_time_ms_mean"], r["step_time_ms_std"], 3),
                          _pm(r["hvp_time_ms_mean"], r["hvp_time_ms_std"], 3),
                          fmt(r["wall_time_s_mean"], 3), fmt(r["peak_mem_mb_mean"], 4))
        tables.append(table)
    return tables


def sweep_table(best: pd.DataFrame) -> Table:
    criteria = ", ".join(dict.fromkeys(best["criterion"])) if len(best) else "score"
    table = Table(title=f"Learning-rate sweep: mean over seeds of {criteria} (* = best)")
    for col in ("task", "optimizer", "lr", "runs ok", "picked by", "score"):
        table.add_column(col, justify="left" if col in ("task", "optimizer", "picked by") else "right")
    for r in best.to_dict("records"):
        score = "failed" if not math.isfinite(r["score"]) else _pm(r["score"], r["score_std"])
        mark = "[bold green]*[/]" if r["best"] else ""
        arrow = "↑" if r["higher_is_better"] else "↓"
        table.add_row(r["task"], r["optimizer"], f"{r['lr']:g}{mark}", r["runs"], f"{r['criterion']} {arrow}", score)
    return table
# -- rich output -------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def perf_table(table: pd.DataFrame) -> list[Table]:
    """``esgd-bench perf``'s tables: one per task/mode section, and the parameter sweep."""
    tables = []
    tasks_part = table[table["section"] == "task"]
    for (task, mode), g in tasks_part.groupby(["task", "mode"], sort=False):
        precision = g["precision"].iloc[0] if "precision" in g else "fp32"
        t = Table(title=f"{task} ({mode}, {precision}, {int(g['params'].iloc[0]):,} params, "
                        f"batch {int(g['batch_size'].iloc[0])}, "
                        f"{int(g['threads'].iloc[0])} threads; medians of {int(g['rounds'].iloc[0])} rounds)")
        for col in ("optimizer", "HVP route", "fwd+bwd ms", "update ms", "update / Adam", "HVP step ms",
                    "HVP = grad evals", "HVP FLOPs = grad evals", "amortised ms", "amortised / Adam",
                    "floor / Adam", "peak mem / Adam", "mem above start / Adam"):
            t.add_column(col, justify="left" if col in ("optimizer", "HVP route") else "right")
        for r in g.to_dict("records"):
            route = r["hvp_route"] if isinstance(r["hvp_route"], str) else ""
            every = r.get("hvp_every")
            if route and isinstance(every, (int, float)) and math.isfinite(every):
                route += f", 1 in {int(every)}"
            t.add_row(r["optimizer"], route or "-", _f(r["fb_ms"], "{:.1f}"),
                      _f(r["update_ms"], "{:.2f}"), _f(r.get("update_vs_adam")), _f(r["hvp_step_ms"], "{:.1f}"),
                      _f(r["hvp_grad_evals"]), _f(r.get("hvp_flop_evals")), _f(r["amortised_ms"], "{:.1f}"),
                      _f(r.get("amortised_vs_adam")), _f(r.get("floor_vs_adam")),
                      _f(r.get("peak_mem_vs_adam")), _f(r.get("peak_extra_vs_adam")))
        tables.append(t)
    sweep = table[table["section"] == "sweep"]
    if len(sweep):
        t = Table(title="parameter sweep: MLP 784-w-w-10 (amortised step; linear growth shows as a flat us/kparam)")
        for col in ("width", "params", "optimizer", "amortised ms", "amortised / Adam", "us / kparam",
                    "HVP = grad evals", "peak mem / Adam", "mem above start / Adam"):
            t.add_column(col, justify="right")
        for r in sweep.to_dict("records"):
            t.add_row(r["task"].split("-")[1], f"{int(r['params']):,}", r["optimizer"],
                      _f(r["amortised_ms"], "{:.1f}"), _f(r.get("amortised_vs_adam")),
                      _f(r.get("us_per_kparam"), "{:.3f}"), _f(r["hvp_grad_evals"]),
                      _f(r.get("peak_mem_vs_adam")), _f(r.get("peak_extra_vs_adam")))
        tables.append(t)
    return tables


def targets_table(checks: list[dict[str, Any]]) -> Table:
    """Each performance target of ``esgd-bench perf``: the measured ratio, its bound, met or not."""
    t = Table(title="Performance targets (ratios to Adam)",
              caption="floor: the amortised step if the product ran at the speed of a forward+backward, "
                      "by its counted FLOPs; an exact product is held to 1.05x its floor")
    for col in ("task", "target", "floor", "measured", "bound", "met"):
        t.add_column(col, justify="left" if col in ("task", "target") else "right")
    for c in checks:
        t.add_row(c["task"], c["target"], _f(c.get("floor")), _f(c["value"]), f"<= {c['bound']:.2f}",
                  "[green]met[/green]" if c["met"] else "[red]not met[/red]")
    return t


def profile_tables(profile: pd.DataFrame) -> list[Table]:
    """``perf --profile``: per task and exact route, where the HVP step's extra time goes."""
    tables = []
    for (task, opt), g in profile.groupby(["task", "optimizer"], sort=False):
        t = Table(title=f"{task}, {opt}: self time of one HVP step against one plain step (ms)",
                  caption="x plain step: the extra time in units of the whole plain step")
        for col in ("", "category", "plain step", "HVP step", "extra", "x plain step"):
            t.add_column(col, justify="left" if col in ("", "category") else "right")
        for r in g.to_dict("records"):
            is_op = r["kind"] == "op"
            t.add_row(r["name"] if is_op else f"[bold]{r['name']}[/bold]", r.get("category") if is_op else "",
                      _f(r["plain_ms"], "{:.1f}"), _f(r["hvp_ms"], "{:.1f}"), _f(r["extra_ms"], "{:.1f}"),
                      _f(r["extra_vs_plain_step"]))
        tables.append(t)
    return tables


def bias_table(table: pd.DataFrame) -> Table:
    """``esgd-bench bias``: each cheap route's mean estimate against the whole batch's exact (H z)^2."""
    first = table.iloc[0]
    t = Table(title=f"{first['task']}: mean estimate / mean exact (H z)^2 after {int(first['at_step'])} steps of "
                    f"{first['reference']}, {int(first['samples'])} batches of {int(first['batch_rows'])} rows",
              caption="1 = centred on the whole batch's squared product; above 1, larger denominators and smaller "
                      "steps. Sums over elements (weighted by curvature); interval: 95%, resampling the batches; "
                      "floored: with the paired estimate's noise floor, as the optimizer applies it; top: the "
                      "largest batch's share of the estimates' sum (large: heavy tails, the interval too narrow)")
    for col in ("route", "rows per product", "ratio", "95% interval", "floored", "top", "per tensor: min - max"):
        t.add_column(col, justify="left" if col == "route" else "right")
    for route, g in table.groupby("route", sort=False):
        whole = g[g["parameter"] == "all"].iloc[0]
        each = g[g["parameter"] != "all"]["ratio"]
        t.add_row(route, str(whole["rows"]), _f(whole["ratio"]), f"{_f(whole['low'])} - {_f(whole['high'])}",
                  _f(whole["floored"]), _f(whole.get("top_share")),
                  f"{_f(each.min())} - {_f(each.max())}" if len(each) else "-")
    return t
