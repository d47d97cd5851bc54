"""The benchmark grid behind ``esgd-bench run`` and ``sweep``: plan the cells, run them, keep the folder.

A grid is tasks x optimizers x learning rates x seeds (:func:`plan_cells`).  :func:`run_benchmark` builds
every task once before anything trains (missing data, a bad option, a batch the data cannot fill or a
model that does not fit in memory fail there, with one line), opens the results folder
(:class:`~bench.store.ResultsFolder`: checked, marked, locked), runs the cells that are not finished yet
with an executor (:mod:`bench.executors`) and records each cell as it ends, so a crash loses at most the
cells that were running.  ``--resume`` continues a folder only when the settings that change what a cell
computes are the ones it was made with.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import tasks
from tasks import TaskDataError, TaskOptionError

from .cluster import submit, wait_for
from .config import BenchConfig
from .environment import environment, now
from .errors import BenchError, RunInterrupted
from .executors import Distributed, Executor, Pool, Sequential, StopSignals
from .optimizers import OptimizerChoice, default_lr
from .steps import backend_for, split_batch
from .store import FINISHED, ResultsFolder, cell_key, read_cell_summaries
from .train import Cell, RunResult, out_of_memory

__all__ = ["Reporter", "BenchResult", "plan_cells", "lr_grid", "best_lrs", "selection_rule", "run_benchmark", "RESUME_KEYS"]

# Settings that change what a cell computes: a resumed folder must have been made with the same ones.
RESUME_KEYS = ("steps", "batch_size", "eval_every", "synthetic", "options", "device", "compile",
               "accumulate", "nproc", "data_dir", "download", "precision", "schedule")


class Reporter:
    """What :func:`run_benchmark` tells its caller; the default does nothing (the CLI draws rich bars)."""

    def add(self, cell: Cell, steps: int, done: RunResult | None = None) -> None:
        """A planned cell; ``done`` is set for a cell that ``--resume`` skips."""

    def update(self, cell: Cell, step: int, loss: float) -> None:
        """Progress of a running cell (called at most a few times a second)."""

    def finish(self, cell: Cell, result: RunResult) -> None:
        """A cell ended (with any status)."""


@dataclass
class BenchResult:
    out: Path
    summary: pd.DataFrame
    metrics: pd.DataFrame
    submitted: list[dict[str, Any]] = field(default_factory=list)    # the jobs of a cluster executor
    selection: dict[str, Any] = field(default_factory=dict)          # a sweep's rule and budget, per task
    tasks: dict[str, Any] = field(default_factory=dict)              # meta.json's description of each task


def lr_grid(choice: OptimizerChoice, task: str | None = None, points: int = 7) -> list[float]:
    """The default sweep grid: log-spaced 1e-3..1 for ESGD-M (the range its description recommends),
    otherwise three decades centred on the registry's default for ``task``."""
    if choice.name == "esgd-m":
        lo, hi = -3.0, 0.0
    else:
        centre = math.log10(default_lr(choice.spec, task) or 1e-2)
        lo, hi = centre - 1.5, centre + 1.5
    return [float(f"{10 ** e:.3g}") for e in np.linspace(lo, hi, points)]


def plan_cells(config: BenchConfig) -> list[Cell]:
    """Every (task, optimizer, lr, seed) of the grid, in run order (seed-major within an lr)."""
    cells = []
    for task in config.tasks:
        steps = config.steps or tasks.get_task(task).default_steps
        for choice in config.optimizers:
            if config.sweep:
                lrs = list(config.lrs or lr_grid(choice, task))
            elif choice.lr is not None:
                lrs = [choice.lr]
            else:
                lrs = [config.lr if config.lr is not None else choice.lr_for(task)]
            for lr in lrs:
                for seed in range(config.seeds):
                    cells.append(Cell(task, choice, float(lr), seed, steps, config.eval_every,
                                      config.task_config(task), config.accumulate, config.compile,
                                      config.precision, schedule=config.schedule_for(task)))
    return cells


def _check_tasks(config: BenchConfig) -> dict[str, dict[str, Any]]:
    """Build every task once: what would fail in a cell for every seed fails here, before training."""
    meta = {}
    for t in config.tasks:
        spec = tasks.get_task(t)
        try:
            problem = tasks.build_task(t, config.task_config(t))
            first = next(problem.batches)
            if config.accumulate * config.nproc > 1:
                split_batch(first, config.accumulate * config.nproc)
        except (TaskDataError, TaskOptionError):
            raise
        except (ValueError, TypeError, BenchError) as err:
            raise BenchError(f"{t}: {err}") from None
        except (RuntimeError, MemoryError) as err:
            if not out_of_memory(err):
                raise
            raise BenchError(f"{t}: out of memory while building the task ({' '.join(str(err).split())[:160]});"
                             " choose a smaller model (--option) or --batch-size") from None
        meta[t] = {"description": spec.description, "steps": config.steps or spec.default_steps,
                   "eval_every": config.eval_every or spec.default_eval_every,
                   "batch_size": config.batch_size or spec.default_batch_size,
                   "eval_metric": spec.eval_metric, "higher_is_better": spec.higher_is_better,
                   "target": spec.target, "options": dict(config.options.get(t, {})),
                   "schedule": config.schedule_for(t).label, "info": _recordable(problem.info),
                   "reference": (None if problem.reference is None else
                                 {"what": problem.reference[0], "value": float(problem.reference[1])}),
                   "data_source": problem.data_source, "synthetic": bool(problem.synthetic),
                   "loss_scale": problem.loss_scale, "param_scale": problem.param_scale,
                   "parameters": sum(p.numel() for p in problem.model.parameters())}
        del problem
    return meta


def _recordable(info: dict[str, Any]) -> dict[str, Any]:
    """The task's info without its tensors (a quadratic's Hessian is there for tests, not for meta.json)."""
    return {k: v for k, v in info.items() if not hasattr(v, "shape") or not len(getattr(v, "shape"))}


def _default_out(config: BenchConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = "+".join(config.tasks)[:100] + ("-sweep" if config.sweep else "")
    out, n = Path("results") / f"{stem}-{stamp}", 1
    while out.exists():
        n += 1
        out = Path("results") / f"{stem}-{stamp}-{n}"
    return out


def _check_resume(folder: ResultsFolder, config: BenchConfig, task_meta: dict[str, Any]) -> dict[str, Any]:
    """The stored meta.json, after checking it was made with the settings of ``config``."""
    from .readers import load_meta
    if not (folder.path / "meta.json").is_file():
        return {}
    meta = load_meta(folder.path)
    before, now_ = meta.get("config"), config.to_json()
    if not isinstance(before, dict):
        raise BenchError(f"--resume: {folder.path / 'meta.json'} has no settings to compare with; "
                         "choose another --out")
    for key in RESUME_KEYS:
        if key in before and before[key] != now_[key]:
            raise BenchError(f"--resume: {folder.path} was made with {key}={before[key]!r}, now {now_[key]!r}; "
                             "use the same settings or another --out")
    for t, m in task_meta.items():
        old = (meta.get("tasks") or {}).get(t, {})
        if isinstance(old, dict) and "data_source" in old and old["data_source"] != m["data_source"]:
            raise BenchError(f"--resume: {t} in {folder.path} was trained on {old['data_source']!r}, now on "
                             f"{m['data_source']!r}; use the same data or another --out")
    return meta


def _executor(config: BenchConfig) -> Executor:
    if config.nproc > 1:
        return Distributed(config.nproc, config.device)
    if config.jobs > 1:
        return Pool(config.jobs)
    return Sequential(config.threads)


def _session(folder: ResultsFolder, config: BenchConfig, task_meta: dict[str, Any], cells: list[Cell],
             reporter: Reporter, argv: Sequence[str] | None) -> tuple[dict[str, Any], list[Cell]]:
    """The folder's meta.json for this run of the grid, and the cells still to run (each with its snapshot
    file, so an interrupted cell continues where it stopped)."""
    old = _check_resume(folder, config, task_meta) if config.resume else {}
    done = {cell_key(*(r[k] for k in ("task", "optimizer", "lr", "seed"))): r
            for r in folder.summaries() if r["status"] in FINISHED}
    session = {"argv": list(argv) if argv is not None else None, "started": now(), "finished": None,
               "jobs": config.jobs, "executor": config.executor, "resumed": bool(done)}
    meta = {"command": " ".join(argv) if argv is not None else "run_benchmark()",
            "started": old.get("started", session["started"]), "finished": None,
            "config": config.to_json(), "tasks": {**(old.get("tasks") or {}), **task_meta},
            "environment": environment(config.device), "jobs": config.jobs,
            "world_size": config.nproc, "backend": backend_for(config.device) if config.nproc > 1 else None,
            "sessions": list(old.get("sessions") or []) + [session],
            "cells": [dict(zip(("task", "optimizer", "lr", "seed"), c.key)) for c in cells]}
    meta["data_sources"] = {t: m.get("data_source") for t, m in meta["tasks"].items()}
    if config.sweep:
        meta["selection"] = sweep_budget(config, cells)
    todo = []
    for cell in cells:
        prev = done.get(cell.key)
        reporter.add(cell, cell.steps, RunResult([], prev, prev["status"]) if prev else None)
        if prev is None:
            todo.append(dataclasses.replace(cell, snapshot=str(folder.snapshot_path(cell.key)),
                                            snapshot_every=config.snapshot_every)
                        if config.snapshot_every > 0 else cell)
    return meta, todo


def run_benchmark(config: BenchConfig, *, reporter: Reporter | None = None,
                  argv: Sequence[str] | None = None) -> BenchResult:
    """Run every cell of ``config`` that is not finished in ``config.out`` (default
    ``results/<task>[+<task>...]-<YYYYmmdd-HHMMSS>/``) and return the folder's merged frames.

    With a cluster executor the cells are submitted as one job array and the frames are those of the
    cells finished so far (all of them with ``wait``).  Raises :class:`~bench.errors.RunInterrupted`
    after writing everything when Ctrl-C or SIGTERM stops the run; cells that end with status ``error``
    are recorded and the others go on.
    """
    reporter = reporter or Reporter()
    task_meta = _check_tasks(config)
    cells = plan_cells(config)
    order = [c.key for c in cells]
    out = Path(config.out) if config.out else _default_out(config)
    submitted: list[dict[str, Any]] = []
    jobs: list[Any] = []
    with ResultsFolder.open(out, resume=config.resume, force=config.force) as folder, \
            StopSignals(cooperative=True) as signals:
        meta, todo = _session(folder, config, task_meta, cells, reporter, argv)
        folder.write_meta(meta)
        folder.rebuild(order)
        if config.executor != "local":
            since = time.time()
            if todo:
                submitted, jobs = submit(config.executor, folder, todo, order, config.cluster, config.nproc)
            folder.close()        # the array's tasks take the lock in turn to rebuild the merged files
            stopped = _follow(folder, todo, jobs, since, reporter, signals) if config.wait and todo else False
            with folder.locked():
                summary, metrics = folder.rebuild(order)
                if config.wait or not todo:
                    meta["finished"] = meta["sessions"][-1]["finished"] = now()
                folder.write_meta(meta)
        else:
            def record(cell: Cell, result: RunResult) -> None:
                with signals.deferred():       # a cell's files are written whole, even if a signal comes
                    folder.write_cell(result.summary, result.rows)
                    folder.rebuild(order)
                reporter.finish(cell, result)

            try:
                stopped = _executor(config).run(todo, reporter.update, record, signals.requested) if todo else False
            except KeyboardInterrupt:
                stopped = True
            with signals.deferred():
                meta["finished"] = meta["sessions"][-1]["finished"] = now()
                summary, metrics = folder.rebuild(order)
                meta["status_counts"] = summary["status"].value_counts().to_dict() if len(summary) else {}
                folder.write_meta(meta)
    if stopped or signals.received is not None:
        raise RunInterrupted(out, signals.received or signal.SIGINT)
    return BenchResult(out, summary, metrics, submitted, meta.get("selection", {}), meta.get("tasks", {}))


def _follow(folder: ResultsFolder, todo: list[Cell], jobs: list[Any], since: float, reporter: Reporter,
            signals: StopSignals) -> bool:
    """Wait for the cells submitted at ``since``, telling the reporter as each one ends; True if a
    signal stopped the waiting (the jobs go on)."""
    reported: set = set()
    by_key = {c.key: c for c in todo}

    def done() -> set:
        rows = {cell_key(*(r[k] for k in ("task", "optimizer", "lr", "seed"))): r
                for r in read_cell_summaries(folder.path) if r["_written"] >= since}
        for key in set(rows) & set(by_key) - reported:
            reported.add(key)
            reporter.finish(by_key[key], RunResult([], rows[key], rows[key]["status"]))
        return set(rows)

    wait_for(todo, done, jobs, stop=signals.requested)
    done()
    return signals.requested()


TAIL_FRACTION = 0.1       # tasks without validation data: the mean training loss over this last share


def selection_rule(task: str) -> dict[str, Any]:
    """How ``sweep`` picks a learning rate for ``task``: by the validation metric at the end of training
    where the task has held-out data, else by the mean training loss over the last 10% of steps (never
    by the test split, never by one minibatch's loss)."""
    spec = tasks.get_task(task)
    if spec.test_metric is not None:
        return {"criterion": spec.eval_metric, "column": "eval_value", "higher_is_better": spec.higher_is_better,
                "rule": f"best mean over seeds of {spec.eval_metric} (validation split) at the end of training"}
    return {"criterion": "tail_loss", "column": "tail_loss", "higher_is_better": False,
            "rule": f"lowest mean over seeds of the training loss over the last {TAIL_FRACTION:.0%} of steps "
                    "(the task has no validation data)"}


def sweep_budget(config: BenchConfig, cells: Sequence[Cell]) -> dict[str, Any]:
    """What a sweep spent and how it chooses, per task: the same grid size, seeds and steps for every
    optimizer (meta.json records it and ``sweep`` prints it)."""
    out = {}
    for task in config.tasks:
        mine = [c for c in cells if c.task == task]
        lrs = {opt.label: sorted({c.lr for c in mine if c.optimizer.label == opt.label})
               for opt in config.optimizers}
        rule = selection_rule(task)
        out[task] = {"rule": rule["rule"], "criterion": rule["criterion"], "seeds": config.seeds,
                     "steps": mine[0].steps if mine else None, "grid_points": {k: len(v) for k, v in lrs.items()},
                     "grids": lrs, "runs": len(mine)}
    return out


def best_lrs(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (task, optimizer): the selection criterion's mean over seeds at each lr, and the best lr.

    The criterion is :func:`selection_rule`'s.  An lr where any seed did not finish ``ok`` counts as
    failed: a rate that sometimes diverges is not a rate to recommend.  Returns one row per (task,
    optimizer, lr) with ``criterion``, ``score`` and ``score_std`` (mean and spread over seeds), ``runs``
    and ``best`` (True on the winning lr; none when every lr failed).
    """
    rows = []
    for (task, opt, lr), g in summary.groupby(["task", "optimizer", "lr"], sort=True):
        rule = selection_rule(task)
        ok = bool((g["status"] == "ok").all())
        values = pd.to_numeric(g[rule["column"]], errors="coerce") if rule["column"] in g else pd.Series([math.nan])
        usable = ok and values.notna().all() and np.isfinite(values).all()
        rows.append({"task": task, "optimizer": opt, "lr": lr, "criterion": rule["criterion"],
                     "higher_is_better": rule["higher_is_better"],
                     "score": float(values.mean()) if usable else math.nan,
                     "score_std": float(values.std(ddof=1)) if usable and len(values) > 1 else math.nan,
                     "runs": f"{int((g['status'] == 'ok').sum())}/{len(g)}"})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["best"] = False
    for _, g in table.groupby(["task", "optimizer"]):
        finite = g[g["score"].notna()]
        if len(finite):
            pick = finite["score"].idxmax() if finite["higher_is_better"].iloc[0] else finite["score"].idxmin()
            table.loc[pick, "best"] = True
    return table
