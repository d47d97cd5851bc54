"""A small hand-built results folder whose table numbers can be worked out by hand.

The folder holds ``summary.csv``, ``metrics.csv`` and ``meta.json`` only (no ``manifest.json``, no
``cells/``): the layout of a folder written by hand or by an older esgd-bench, which readers accept.

Task rosenbrock (eval metric dist, lower is better, default target 1e-2), 4 steps per run, eval at steps 2
and 4; wall time grows linearly, so step k of a run of total wall time W is logged at W * k / 4.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.store import write_csv, write_json

NAN = math.nan
STEPS = 4

# opt, seed, wall_time_s, step_time_ms, hvp_time_ms, final_loss, eval_value, fwd_bwd_ms per step,
# is_hvp per step, eval_dist at steps 2 and 4, status, losses per step
RUNS = [
    ("sgd", 0, 0.4, 90.0, NAN, 1.0, 0.5, [10, 10, 10, 10], [0, 0, 0, 0], (0.9, 0.5), "ok", [4, 3, 2, 1.0]),
    ("sgd", 1, 0.6, 110.0, NAN, 3.0, 0.7, [20, 20, 20, 20], [0, 0, 0, 0], (0.9, 0.7), "ok", [4, 3.5, 3.2, 3.0]),
    ("sgd", 2, 0.1, 50.0, NAN, NAN, NAN, [20, NAN, NAN, NAN], [0, 0, 0, 0], (NAN, NAN), "diverged",
     [4, NAN, NAN, NAN]),
    ("adam", 0, 0.5, 120.0, NAN, 2.0, 0.2, [15, 15, 15, 15], [0, 0, 0, 0], (0.3, 0.2), "ok", [4, 3, 2.5, 2.0]),
    ("adam", 1, 0.7, 130.0, NAN, 2.0, 0.4, [15, 15, 15, 15], [0, 0, 0, 0], (0.009, 0.4), "ok", [4, 3, 2.5, 2.0]),
    ("esgd-m", 0, 0.8, 150.0, 60.0, 0.5, 0.001, [1000, 1000, 30, 40], [1, 1, 0, 0], (0.05, 0.001), "ok",
     [4, 2, 1, 0.5]),
    ("esgd-m", 1, 1.0, 170.0, 80.0, 0.7, 0.003, [1000, 1000, 50, 60], [1, 1, 0, 0], (0.008, 0.003), "ok",
     [4, 1.4, 1, 0.7]),
]

# The table's numbers, worked out by hand from RUNS (see the module docstring).
EXPECTED = {
    "sgd": dict(runs=3, runs_ok=2, step_ms=100.0, hvp_ms=NAN, amortised_ms=125.0, vs_sgd=1.0, vs_adam=125 / 150,
                ttt_reached=0, ttt_s=NAN, final_loss_mean=2.0, final_loss_std=math.sqrt(2.0),
                eval_mean=0.6, eval_std=math.sqrt(0.02), hvp_x_grad=NAN),
    "adam": dict(runs=2, runs_ok=2, step_ms=125.0, hvp_ms=NAN, amortised_ms=150.0, vs_sgd=150 / 125, vs_adam=1.0,
                 ttt_reached=1, ttt_s=0.35, final_loss_mean=2.0, final_loss_std=0.0, eval_mean=0.3,
                 eval_std=math.sqrt(0.02), hvp_x_grad=NAN),
    # amortised: 800/4 = 200 and 1000/4 = 250 ms; non-HVP fwd_bwd: 30, 40, 50, 60 -> median 45
    "esgd-m": dict(runs=2, runs_ok=2, step_ms=160.0, hvp_ms=70.0, amortised_ms=225.0, vs_sgd=225 / 125,
                   vs_adam=225 / 150, ttt_reached=2, ttt_s=(0.8 + 0.5) / 2, final_loss_mean=0.6,
                   final_loss_std=math.sqrt(0.02), eval_mean=0.002, eval_std=math.sqrt(2e-6),
                   hvp_x_grad=70 / 45),
}


def frames(task: str = "rosenbrock", synthetic: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics, summary = [], []
    for opt, seed, wall, step_ms, hvp_ms, final, ev, fb, hvp, dist, status, losses in RUNS:
        for k in range(1, STEPS + 1):
            if math.isnan(losses[k - 1]):
                break
            metrics.append({"task": task, "optimizer": opt, "lr": 0.1, "seed": seed, "step": k,
                            "wall_time_s": wall * k / STEPS, "loss": losses[k - 1],
                            "is_hvp_step": bool(hvp[k - 1]), "step_ms": step_ms, "data_ms": 0.0,
                            "fwd_bwd_ms": fb[k - 1], "hvp_ms": hvp_ms if hvp[k - 1] else NAN, "update_ms": 1.0,
                            "eval_dist": dist[k // 2 - 1] if k % 2 == 0 else NAN,
                            "eval_f": losses[k - 1] if k % 2 == 0 else NAN})
        summary.append({"task": task, "optimizer": opt, "opt_name": opt, "lr": 0.1, "seed": seed,
                        "steps": STEPS if status == "ok" else 1, "final_loss": final, "eval_metric": "dist",
                        "eval_value": ev, "wall_time_s": wall, "step_time_ms": step_ms,
                        "hvp_time_ms": hvp_ms, "hvp_steps": sum(hvp), "peak_mem_mb": 100.0,
                        "status": status, "data_source": "none (analytic)", "synthetic": synthetic,
                        "device": "cpu"})
    return pd.DataFrame(metrics), pd.DataFrame(summary)


def write_results(folder: Path, task: str = "rosenbrock", synthetic: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    metrics, summary = frames(task, synthetic)
    write_csv(metrics, folder / "metrics.csv")
    write_csv(summary, folder / "summary.csv")
    write_json({"command": "esgd-bench run rosenbrock (hand-built test data)", "torch": "2.x",
                "python": "3.x", "device": "cpu", "threads": 2,
                "config": {"task": task, "steps": STEPS}}, folder / "meta.json")
    return folder


# -- helpers for tests that go through the command line ------------------------------------------------
TINY_RUN = ["run", "rosenbrock", "--opt", "adam", "--seeds", "2", "--steps", "5"]


def tiny_run(folder: Path) -> Path:
    """A real results folder written by ``esgd-bench run`` (manifest.json, meta.json, summary.csv,
    metrics.csv and cells/): two adam runs of five steps on rosenbrock, both ok."""
    from typer.testing import CliRunner

    from cli import app
    res = CliRunner().invoke(app, TINY_RUN + ["--out", str(folder)])
    assert res.exit_code == 0, res.output
    assert (folder / "manifest.json").is_file() and len(list((folder / "cells").glob("*.json"))) == 2
    return folder


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """One real results folder per test module (see :func:`tiny_run`); tests must not change it."""
    return tiny_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture
def run_copy(run_folder, tmp_path) -> Path:
    """A fresh copy of :func:`run_folder`, for a test that damages it."""
    return Path(shutil.copytree(run_folder, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) with its bytes, to prove that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def warning_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("warning: ")]


def one_error(res, code: int = 2) -> str:
    """The message of a command that failed the way the CLI promises: exit ``code``, no traceback, and
    its whole output one ``error: ...`` line on stderr."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)     # not an uncaught exception
    assert "Traceback" not in res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0].removeprefix("error: ")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text`` as rows of cell strings (header, alignment row, body), split on the
    pipes that are not escaped; an escaped ``\\|`` stays in its cell as written."""
    import re
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = re.split(r"(?<!\\)\|", line.rstrip()[1:-1])
            current.append([c.strip() for c in cells])
        elif current:
            tables.append(current)
            current = []
    return tables


# Where the last row of summary.csv is cut: every cut that loses part of the cell key or the status.
CUTS = {"one character": lambda row: 1, "in the key": lambda row: row.index(",esgd-m,") + 4,
        "middle": lambda row: len(row) // 2, "in the status": lambda row: row.index(",ok,") + 2}


def tear_summary(folder, where="middle"):
    """Cut the last row of ``folder/summary.csv`` as a crash or a full disk of another tool would."""
    path = folder / "summary.csv"
    text = path.read_text()
    head, last = text.rstrip("\n").rsplit("\n", 1)
    path.write_text(head + "\n" + last[:CUTS[where](last)])
    return path
