"""Learning-rate schedules: parsing, their shape, how they compose with ESGD-M's own warmup, and how a
run records them."""

from __future__ import annotations

import math

import pytest
import torch

import esgd
from bench.config import make_config
from bench.errors import BenchError
from bench.optimizers import list_optimizers
from bench.schedules import SCHEDULES, Schedule, build_scheduler, parse_schedule
from bench.train import train
from tasks import TaskConfig


def test_parse_gives_canonical_labels():
    assert parse_schedule("constant") == Schedule("constant")
    assert parse_schedule(" cosine ").label == "cosine"
    assert parse_schedule("warmup-cosine:warmup=100,final=0.1").label == "warmup-cosine:final=0.1,warmup=100"


@pytest.mark.parametrize("text, words", [
    ("linear", "unknown schedule 'linear'"), ("cosine:warmup=3", "no parameter 'warmup=3'"),
    ("warmup-cosine:warmup=ten", "is not a number"), ("warmup-cosine:warmup=0", "warmup=0"),
    ("warmup-cosine:warmup=2.5", "whole number"), ("cosine:final=2", "in [0, 1]"), ("", "must be one of"),
])
def test_bad_schedules_are_one_line_errors(text, words):
    with pytest.raises(BenchError) as info:
        parse_schedule(text)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_command_line_checks_the_schedule_where_it_was_given():
    with pytest.raises(BenchError, match="--schedule: unknown schedule 'step'"):
        make_config({"tasks": ["rosenbrock"], "schedule": "step"})
    config = make_config({"tasks": ["rosenbrock"], "schedule": "cosine"})
    assert config.schedule == Schedule("cosine") and config.to_json()["schedule"] == "cosine"
    assert make_config({"tasks": ["rosenbrock"]}).schedule_for("rosenbrock").name == "constant"


def test_shapes():
    cos = parse_schedule("cosine:final=0.1").factor(100)
    assert cos(0) == 1.0 and math.isclose(cos(50), 0.55) and math.isclose(cos(100), 0.1)
    assert all(cos(t) >= cos(t + 1) for t in range(100))
    warm = parse_schedule("warmup-cosine:warmup=10").factor(110)
    assert [warm(t) for t in range(3)] == [0.1, 0.2, 0.3] and warm(9) == 1.0 and warm(10) == 1.0
    assert math.isclose(warm(60), 0.5) and warm(110) == 0.0
    assert parse_schedule("warmup-cosine").factor(200)(0) == 0.1      # default warmup: 5% of the run
    assert build_scheduler(Schedule(), torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 10) is None


def test_the_schedule_multiplies_esgd_m_s_own_warmup():
    # f(x) = c x^2 / 2 with beta1 = 0 and eps = 0: m = g, the curvature estimate is exactly c, so each
    # step multiplies x by 1 - lr * schedule(t - 1) * (1 - lr_warmup^t), the documented composition.
    c, lr, warmup, steps = 3.0, 0.5, 0.9, 12
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = esgd.ESGD([x], lr=lr, betas=(0.0, 0.999), lr_warmup=warmup, eps=0.0, d_warmup=1, update_d_every=1)
    schedule = parse_schedule("warmup-cosine:warmup=4")
    scheduler, f = build_scheduler(schedule, opt, steps), schedule.factor(steps)
    for t in range(1, steps + 1):
        before = x.item()
        opt.zero_grad(set_to_none=True)
        (0.5 * c * x * x).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
        scheduler.step()
        expected = 1 - lr * f(t - 1) * (1 - warmup ** t)
        assert x.item() / before == pytest.approx(expected, rel=1e-12), t


@pytest.mark.parametrize("opt", [s.name for s in list_optimizers()])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_optimizer_runs_every_schedule_and_the_run_records_it(opt, name):
    result = train("rosenbrock", opt, seed=0, steps=12, schedule=name, task_config=TaskConfig())
    assert result.status in ("ok", "diverged") and result.summary["schedule"] == name
    lrs = [r["step_lr"] for r in result.rows]
    f, lr = parse_schedule(name).factor(12), result.summary["lr"]
    assert lrs == pytest.approx([lr * f(t) for t in range(len(lrs))], rel=1e-12)
