"""The runner: the training loop's rows and statuses, the timing maths, the store, resume, jobs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bench import optimizers as reg
from bench.optimizers import list_optimizers
from bench.results import METRICS_COLUMNS, SUMMARY_COLUMNS, load_meta, load_metrics, load_summary
from bench.runner import (BenchConfig, BenchError, Reporter, RunInterrupted, best_lrs, lr_grid, plan_cells,
                          run_benchmark, train)
from bench.timing import attribute_hvp_cost, summarise_timings

STEPS = 30     # > ESGD-M's 20 warm-up HVP steps, so plain steps exist to time against


def _row(step, hvp, fb, up, data=0.0):
    return {"step": step, "is_hvp_step": hvp, "fwd_bwd_ms": fb, "update_ms": up, "data_ms": data,
            "step_ms": data + fb + up}


def test_timing_maths_by_hand():
    rows = [_row(1, True, 100.0, 100.0),                      # warm-up step: in no median
            _row(2, True, 7.0, 9.0, data=1.0), _row(3, False, 2.0, 1.0), _row(4, False, 4.0, 3.0),
            _row(5, False, 3.0, 2.0), _row(6, True, 5.0, 6.0)]
    attribute_hvp_cost(rows)
    # plain medians: fwd_bwd 3, update 2; HVP extras: (7-3)+(9-2)=11 and (5-3)+(6-2)=6
    assert [r["hvp_ms"] for r in rows[1:]] == [11.0, 0.0, 0.0, 0.0, 6.0]
    for r in rows:
        assert r["data_ms"] + r["fwd_bwd_ms"] + r["hvp_ms"] + r["update_ms"] == pytest.approx(r["step_ms"])
    s = summarise_timings(rows)
    assert s["step_time_ms"] == 5.0                           # median of 3, 7, 5
    assert s["fwd_bwd_time_ms"] == 3.0 and s["update_time_ms"] == 2.0
    assert s["hvp_time_ms"] == 8.5                            # median of 11 and 6; step 1 left out
    assert s["mean_step_ms"] == pytest.approx((17 + 3 + 7 + 5 + 11) / 5)
    assert s["hvp_steps"] == 3


def test_timing_without_plain_steps_is_nan():
    rows = [_row(1, True, 1.0, 1.0), _row(2, True, 2.0, 2.0)]
    attribute_hvp_cost(rows)
    s = summarise_timings(rows)
    assert math.isnan(s["step_time_ms"]) and math.isnan(s["hvp_time_ms"]) and s["hvp_steps"] == 2


@pytest.mark.parametrize("name", [s.name for s in list_optimizers()])
def test_train_each_optimizer(name):
    second = reg.get_optimizer(name).second_order
    res = train("rosenbrock", name, seed=1, steps=STEPS, eval_every=10)
    assert res.status == "ok" and res.summary["status"] == "ok" and len(res.rows) == STEPS
    assert set(SUMMARY_COLUMNS) <= set(res.summary)
    assert set(METRICS_COLUMNS) <= set(res.rows[0])
    assert [r["step"] for r in res.rows] == list(range(1, STEPS + 1))
    walls = [r["wall_time_s"] for r in res.rows]
    assert all(b > a for a, b in zip(walls, walls[1:])) and res.summary["wall_time_s"] == walls[-1]
    assert all(math.isfinite(r["loss"]) for r in res.rows) and res.rows[-1]["loss"] < res.rows[0]["loss"]
    assert [r["step"] for r in res.rows if "eval_dist" in r] == [10, 20, 30]
    assert res.summary["eval_value"] == res.rows[-1]["eval_dist"] and res.summary["eval_metric"] == "dist"
    assert res.summary["lr"] == reg.default_lr(reg.get_optimizer(name), "rosenbrock")
    assert (res.summary["hvp_steps"] > 0) == second
    if not second:
        assert math.isnan(res.summary["hvp_time_ms"])
    elif math.isfinite(res.summary["step_time_ms"]):      # plain steps exist to time the HVP against
        assert res.summary["hvp_time_ms"] > 0
    assert res.summary["mean_step_ms"] > 0 and res.summary["peak_mem_mb"] > 0


def test_train_deterministic_and_lr_override():
    a = train("rosenbrock", "esgd", seed=3, steps=25)
    b = train("rosenbrock", "esgd", seed=3, steps=25, overrides={"lr": 0.5})
    c = train("rosenbrock", "esgd:lr=0.5", seed=3, steps=25)
    assert [r["loss"] for r in b.rows] == [r["loss"] for r in c.rows]
    assert [r["loss"] for r in a.rows] != [r["loss"] for r in b.rows]
    assert b.summary["lr"] == 0.5 and b.summary["optimizer"] == "esgd" and c.summary["optimizer"] == "esgd:lr=0.5"


def test_divergence_stops_the_run():
    res = train("rosenbrock", "sgd:lr=1", steps=STEPS)
    assert res.status == "diverged" and len(res.rows) < STEPS
    last = res.rows[-1]["loss"]
    assert not math.isfinite(last) or last > 1e5 * res.rows[0]["loss"]
    assert math.isnan(res.rows[-1]["update_ms"])             # the step that diverged took no update


def test_keyboard_interrupt_keeps_rows():
    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    res = train("rosenbrock", "adam", steps=STEPS, progress_callback=stop_at_5)
    assert res.status == "interrupted" and len(res.rows) == 5 and res.summary["steps"] == 5


def test_error_in_loop_is_recorded(monkeypatch):
    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("broken update")

    reg.register_optimizer(reg.OptimizerSpec("broken-test", Broken, "test only", False, {}, {"*": 0.1}))
    try:
        res = train("rosenbrock", "broken-test", steps=5)
    finally:
        del reg._REGISTRY["broken-test"]
    assert res.status == "error" and "broken update" in res.summary["error"] and len(res.rows) == 0


class _Stopper(Reporter):
    """Ctrl-C while cell number ``at`` (0-based) runs; counts the cells that started."""

    def __init__(self, at=None):
        self.at, self.started, self.seen = at, [], set()

    def update(self, cell, step, loss):
        if cell.key not in self.seen:
            self.seen.add(cell.key)
            self.started.append(cell)
        if self.at is not None and len(self.started) - 1 == self.at:
            raise KeyboardInterrupt


def test_benchmark_store_interrupt_and_resume(tmp_path):
    out = tmp_path / "r"
    cfg = BenchConfig(tasks=["rosenbrock"], optimizers=["esgd-m", "sgd:lr=1", "adam"], seeds=2, steps=STEPS,
                      out=out, eval_every=10)
    stopper = _Stopper(at=4)
    with pytest.raises(RunInterrupted):
        run_benchmark(cfg, reporter=stopper, argv=["esgd-bench", "test"])
    s = load_summary(out)
    assert s["status"].tolist() == ["ok", "ok", "diverged", "diverged", "interrupted"]
    m = load_metrics(out)
    assert set(METRICS_COLUMNS) <= set(m.columns) and "eval_dist" in m.columns
    assert len(m[(m.optimizer == "adam")]) > 0                 # the interrupted cell's steps are kept
    meta = load_meta(out)
    assert meta["command"] == "esgd-bench test" and meta["jobs"] == 1 and meta["finished"]

    with pytest.raises(BenchError, match="--resume"):
        run_benchmark(cfg)                                     # never clobbers a store silently
    with pytest.raises(BenchError, match="steps"):
        run_benchmark(BenchConfig(**{**cfg.__dict__, "steps": STEPS + 1, "resume": True}))

    again = _Stopper()
    run_benchmark(BenchConfig(**{**cfg.__dict__, "resume": True}), reporter=again)
    assert [(c.optimizer, c.seed) for c in again.started] == [("adam", 0), ("adam", 1)]
    s = load_summary(out)
    assert len(s) == 6 and s["status"].tolist() == ["ok", "ok", "diverged", "diverged", "ok", "ok"]
    m = load_metrics(out)
    assert len(m[(m.optimizer == "adam") & (m.seed == 0)]) == STEPS    # the partial rows were replaced
    assert len(load_meta(out)["sessions"]) == 2


def test_parallel_jobs(tmp_path):
    out = run_benchmark(BenchConfig(tasks=["rosenbrock"], optimizers=["esgd-m", "adam"], seeds=1, steps=STEPS,
                                    out=tmp_path / "j", jobs=2))
    s = load_summary(out)
    assert s["optimizer"].tolist() == ["esgd-m", "adam"] and (s["status"] == "ok").all()
    assert len(load_metrics(out)) == 2 * STEPS and load_meta(out)["jobs"] == 2
    serial = train("rosenbrock", "esgd-m", seed=0, steps=STEPS)
    assert load_metrics(out).query("optimizer == 'esgd-m'")["loss"].tolist() == \
        pytest.approx([r["loss"] for r in serial.rows])


@pytest.mark.parametrize("kw, fragment", [
    (dict(seeds=0), "--seeds"), (dict(steps=-1), "--steps"), (dict(lr=float("nan")), "--lr"),
    (dict(jobs=0), "--jobs"), (dict(device="tpu"), "--device"), (dict(options={"width": "3"}), "rosenbrock"),
    (dict(options={"mnist.dim": "3"}), "scoped"),
])
def test_bad_config(tmp_path, kw, fragment):
    with pytest.raises(BenchError, match=fragment):
        run_benchmark(BenchConfig(tasks=["rosenbrock"], out=tmp_path / "x", **kw))
    assert not (tmp_path / "x" / "summary.csv").exists()


def test_sweep_grid_and_best():
    assert lr_grid("esgd-m") == [0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0]
    grid = lr_grid("adam", "mnist")
    assert len(grid) == 7 and grid[3] == pytest.approx(reg.default_lr(reg.get_optimizer("adam"), "mnist"))
    cells = plan_cells(BenchConfig(tasks=["rosenbrock"], optimizers=["sgd"], seeds=2, sweep=True, lrs=[0.1, 1.0]))
    assert [(c.lr, c.seed) for c in cells] == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    summary = pd.DataFrame({"task": "t", "optimizer": "sgd", "lr": [0.1, 0.1, 1.0, 1.0, 3.0, 3.0],
                            "seed": [0, 1] * 3, "final_loss": [2.0, 4.0, 1.0, 2.0, 0.1, math.nan],
                            "status": ["ok", "ok", "ok", "ok", "ok", "diverged"]})
    best = best_lrs(summary).set_index("lr")
    assert best.loc[0.1, "mean_final_loss"] == 3.0 and math.isinf(best.loc[3.0, "mean_final_loss"])
    assert best["best"].tolist() == [False, True, False]
