"""Grids on a cluster through submitit: the local stand-in gives the local executor's results, a
preempted cell is requeued and continues from its snapshot, and the sbatch script carries the options.

``--executor submitit-local`` runs the very code path of ``--executor slurm`` with submitit's local
executor (a process per job on this machine), so these tests need no Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.train import train
from cli import app

submitit = pytest.importorskip("submitit")
runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _wait(condition, timeout: float = 180.0, what: str = "the jobs") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} did not finish in time"
        time.sleep(0.2)


def test_submitit_local_gives_the_local_executor_s_summary(tmp_path):
    grid = ["run", "rosenbrock", "--opt", "esgd-m", "--opt", "adam", "--seeds", 2, "--steps", 150]
    local = invoke(*grid, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.output
    res = invoke(*grid, "--executor", "submitit-local", "--wait", "--out", tmp_path / "cluster")
    assert res.exit_code == 0, res.output
    assert "submitted 4 cell(s) to submitit-local" in res.stdout and "mean ± std" in res.stdout
    a, b = (pd.read_csv(tmp_path / d / "summary.csv") for d in ("local", "cluster"))
    assert a[["task", "optimizer", "lr", "seed"]].equals(b[["task", "optimizer", "lr", "seed"]])
    assert a["final_loss"].tolist() == b["final_loss"].tolist() and (b["status"] == "ok").all()
    status = invoke("status", tmp_path / "cluster")
    assert status.exit_code == 0 and "4 cell(s): 4 done" in status.stdout
    jobs = json.loads((tmp_path / "cluster" / "jobs.json").read_text())["jobs"]
    assert len(jobs) == 4 and all(Path(j["stderr"]).parent.exists() for j in jobs)   # per-cell logs


def test_a_preempted_cell_is_requeued_and_continues_from_its_snapshot(tmp_path):
    steps = 6000
    out = tmp_path / "r"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"snapshot_every": 0.5}))
    res = invoke("run", "rosenbrock", "--opt", "adam", "--seeds", 1, "--steps", steps, "--eval-every", steps,
                 "--executor", "submitit-local", "--config", config, "--out", out)
    assert res.exit_code == 0, res.output
    assert "submitted 1 cell(s)" in res.stdout and "status" in res.stdout     # returned at once
    cells = out / "cells"
    _wait(lambda: list(cells.glob("*.snapshot")) and list(cells.glob("*.running")), 120, "the first snapshot")
    marker = next(cells.glob("*.running"))
    first_pid = json.loads(marker.read_text())["pid"]
    mid = invoke("status", out)
    assert "1 running" in mid.stdout
    os.kill(first_pid, signal.SIGUSR2)         # what Slurm sends before preempting or timing out a job
    _wait(lambda: list(cells.glob("*.json")) and not list(cells.glob("*.running")))   # written and merged
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["ok"] and 0 < summary["continued_at_step"].iloc[0] < steps
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, steps + 1))           # no step missing or repeated
    whole = train("rosenbrock", "adam", seed=0, steps=steps, eval_every=steps)
    assert metrics["loss"].tolist() == [r["loss"] for r in whole.rows]      # the uninterrupted curve
    job = json.loads((out / "jobs.json").read_text())["jobs"][0]
    assert "preempted" in Path(job["stderr"]).read_text()                   # submitit caught the signal...
    assert "continues from its snapshot" in Path(job["stdout"]).read_text()  # ...requeued it, and it went on
    assert invoke("status", out).stdout.count("1 done") == 1


def test_the_sbatch_script_carries_the_options(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    submitted = []

    class Sbatch:             # submitit runs sbatch through this; answer as sbatch would
        def __init__(self, command, verbose=True, **kw):
            self.command = command

        def __call__(self, *args, **kwargs):
            submitted.append(self.command)
            return "Submitted batch job 4242"

    import submitit.core.utils
    monkeypatch.setattr(submitit.core.utils, "CommandFunction", Sbatch)
    out = tmp_path / "r"
    res = invoke("run", "rosenbrock", "--opt", "esgd-m", "--opt", "adam", "--seeds", 2, "--steps", 10,
                 "--executor", "slurm", "--partition", "gpu", "--time-min", 30, "--gpus-per-task", 1,
                 "--cpus-per-task", 4, "--mem-gb", 16, "--account", "proj", "--qos", "high",
                 "--sbatch", "constraint=a100", "--array-parallelism", 2, "--out", out)
    assert res.exit_code == 0, res.output
    assert "submitted 4 cell(s) to slurm as job 4242" in res.stdout
    assert len(submitted) == 1 and submitted[0][0] == "sbatch"               # one job array
    script = Path(submitted[0][1]).read_text() if Path(submitted[0][1]).exists() else \
        next((out / "jobs").rglob("*_submission.sh")).read_text()
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=16GB",
                 "--account=proj", "--qos=high", "--constraint=a100", "--array=0-3%2", "--signal=USR2"):
        assert f"#SBATCH {line}" in script, line
    status = invoke("status", out)
    assert "4 queued" in status.stdout


@pytest.mark.parametrize("args, needle", [
    (["--partition", "gpu"], "scheduler options need --executor slurm or submitit-local"),
    (["--wait"], "--wait needs --executor"),
    (["--executor", "pbs"], "--executor must be one of local, slurm, submitit-local"),
    (["--executor", "submitit-local", "--jobs", "2"], "cannot be combined"),
    (["--executor", "slurm", "--sbatch", "novalue"], "--sbatch expects KEY=VALUE"),
])
def test_bad_cluster_settings_are_one_line(tmp_path, args, needle):
    res = invoke("run", "rosenbrock", "--steps", 2, "--out", tmp_path / "o", *args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_without_submitit_one_line_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    res = invoke("run", "rosenbrock", "--steps", 2, "--executor", "slurm", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "pip install 'esgd-bench[cluster]'" in res.stderr


def test_status_names_a_failed_cell_and_a_dead_task(tmp_path):
    out = tmp_path / "r"
    assert invoke("run", "rosenbrock", "--opt", "adam", "--opt", "sgd", "--seeds", 1, "--steps", 5,
                  "--out", out).exit_code == 0
    cells = out / "cells"
    adam = next(p for p in cells.glob("*.json") if "adam" in p.name)
    data = json.loads(adam.read_text())
    data["summary"].update(status="error", error="RuntimeError: the node ran out of memory")
    adam.write_text(json.dumps(data))
    sgd = next(p for p in cells.glob("*.json") if "sgd" in p.name)
    sgd.with_suffix(".running").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename,
                                                       "started": time.time() + 10}))
    res = invoke("status", out)
    assert res.exit_code == 0 and "2 failed" in res.stdout
    assert "the node ran out of memory" in res.stdout and "ended without a result" in res.stdout
