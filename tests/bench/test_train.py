"""One training run: its rows and statuses, divergence, interruption, errors and out-of-memory."""

from __future__ import annotations

import math

import pytest
import torch

from bench.optimizers import default_lr, get_optimizer, list_optimizers
from bench.registry import OptimizerSpec, register_optimizer, unregister_optimizer
from bench.store import METRICS_COLUMNS, SUMMARY_COLUMNS
from bench.train import DIVERGENCE_FACTOR, is_diverged, train

STEPS = 30     # > ESGD-M's 20 warm-up HVP steps, so plain steps exist to time against

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.mark.parametrize("name", [s.name for s in list_optimizers()])
def test_train_each_optimizer(name):
    second = get_optimizer(name).second_order
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
    assert res.summary["lr"] == default_lr(get_optimizer(name), "rosenbrock")
    assert (res.summary["hvp_steps"] > 0) == second
    if not second:
        assert math.isnan(res.summary["hvp_time_ms"])
    elif math.isfinite(res.summary["step_time_ms"]):      # plain steps exist to time the HVP against
        assert res.summary["hvp_time_ms"] > 0
    assert res.summary["mean_step_ms"] > 0 and res.summary["peak_mem_mb"] > 0


def test_train_deterministic_and_lr_override():
    a = train("rosenbrock", "esgd", seed=3, steps=25)
    b = train("rosenbrock", "esgd", seed=3, steps=25, lr=0.5)
    c = train("rosenbrock", "esgd:lr=0.5", seed=3, steps=25)
    assert [r["loss"] for r in b.rows] == [r["loss"] for r in c.rows]
    assert [r["loss"] for r in a.rows] != [r["loss"] for r in b.rows]
    assert b.summary["lr"] == 0.5 and b.summary["optimizer"] == "esgd" and c.summary["optimizer"] == "esgd:lr=0.5"


def test_divergence_stops_the_run():
    res = train("rosenbrock", "sgd:lr=1", steps=STEPS)
    assert res.status == "diverged" and len(res.rows) < STEPS
    last = res.rows[-1]["loss"]
    assert not math.isfinite(last) or last > DIVERGENCE_FACTOR * res.rows[0]["loss"]
    assert math.isnan(res.rows[-1]["update_ms"])             # the step that diverged took no update


@pytest.mark.parametrize("first, loss, diverged", [
    (2.0, 2.0 + 2e5 + 1, True), (2.0, 2.0 + 2e5 - 1, False),          # 1e5 times the first loss
    (0.0, 1e5 + 1, True), (0.0, 1e5 - 1, False), (0.0, -50.0, False),  # a first loss of 0: 1e5 itself
    (-4.0, -4.0 + 4e5 + 1, True), (-4.0, -3.0, False),                 # a negative first loss
    (1.0, math.inf, True), (1.0, math.nan, True), (0.0, -math.inf, True),
])
def test_divergence_rule(first, loss, diverged):
    assert is_diverged(loss, first) is diverged


def test_a_run_from_a_zero_loss_that_explodes_is_diverged():
    # The quadratic starts at x = 0, loss 0; SGD far above 2 / lambda_max climbs by orders of magnitude per
    # step and would reach 1e38 (finite in float32) long before inf.
    res = train("quadratic", "sgd:lr=1,momentum=0.0,nesterov=false", steps=200)
    assert res.rows[0]["loss"] == 0.0
    assert res.status == "diverged" and len(res.rows) < 200
    assert res.rows[-1]["loss"] > DIVERGENCE_FACTOR and all(r["loss"] < 1e30 for r in res.rows)


def test_keyboard_interrupt_keeps_rows():
    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    res = train("rosenbrock", "adam", steps=STEPS, progress=stop_at_5)
    assert res.status == "interrupted" and len(res.rows) == 5 and res.summary["steps"] == 5


def test_stop_callback_interrupts_before_the_next_step():
    calls = []
    res = train("rosenbrock", "adam", steps=STEPS, stop=lambda: len(calls) >= 7, progress=lambda s, l: calls.append(s))
    assert res.status == "interrupted" and len(res.rows) == 7


class _Broken(torch.optim.SGD):
    message = "broken update"

    def step(self, closure=None):
        raise RuntimeError(self.message)


class _OutOfMemory(_Broken):
    message = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes."


@pytest.mark.parametrize("cls, needle", [(_Broken, "RuntimeError: broken update"), (_OutOfMemory, "out of memory")])
def test_an_error_in_the_loop_is_the_cell_s_one_line_error(cls, needle):
    register_optimizer(OptimizerSpec("broken-test", cls, "test only", False, {}, {"*": 0.1}))
    try:
        res = train("rosenbrock", "broken-test", steps=5)
    finally:
        unregister_optimizer("broken-test")
    assert res.status == "error" and needle in res.summary["error"] and len(res.rows) == 0
    assert "\n" not in res.summary["error"]
