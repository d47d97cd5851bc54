"""Stopping a run from outside: Ctrl-C (SIGINT) and SIGTERM, sequential and with worker processes.

The promise: the running cells end as ``interrupted`` with everything they logged, everything finished
stays, and the command exits 130 for SIGINT and 143 for SIGTERM (what ``timeout``, ``kill`` and job
schedulers send), without a traceback.  Each test runs the real command in a subprocess and signals it
once its cells are training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _wait_until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the run did not start in time"
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code, jobs", [(signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 1),
                                            (signal.SIGTERM, 143, 2)])
def test_a_signal_marks_running_cells_interrupted_and_keeps_everything(tmp_path, sig, code, jobs):
    out = tmp_path / "r"
    # the first cell finishes at once, the second trains for minutes unless stopped
    cmd = [sys.executable, "-c", "import cli; cli.app()", "run", "rosenbrock", "--opt", "adam:lr=0.1",
           "--opt", "sgd:lr=0.0001", "--seeds", "1", "--steps", "1000000", "--eval-every", "1000000",
           "--jobs", str(jobs), "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_until(lambda: (out / "meta.json").exists() or proc.poll() is not None)
        if jobs > 1:         # the resource tracker, a fork server and its two workers
            _wait_until(lambda: len(_descendants(proc.pid)) >= 4 or proc.poll() is not None)
        time.sleep(3.0 if jobs == 1 else 8.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "interrupted: everything logged so far is in" in stderr
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["status"]) <= {"interrupted"} and len(summary) == jobs
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == summary["steps"].sum() > 0          # every logged step is kept
    assert (out / "meta.json").read_text().count('"finished"') >= 1
