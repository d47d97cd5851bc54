"""``esgd-bench perf`` (bench/perf.py, bench/memory.py, bench/display.py) and the sub-batch product route
of bench/steps.py: runs, files, sane numbers, and the same step code as training.

Not a timed test: the ratios depend on the machine, so only their being finite and positive is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from bench import perf as pf
from bench.config import make_config
from bench.display import perf_table, targets_table
from bench.errors import BenchError
from bench.memory import probe
from bench.optimizers import list_optimizers, parse_optimizer
from bench.steps import StepRoute, sub_batch
from bench.train import train
from cli import app
from tasks import TaskConfig, build_task

TINY = {"mnist": {"width": 16}}
SCHEDULE = {"update_d_every": 3, "d_warmup": 1}     # what perf gives second-order variants


def test_sub_batch_takes_the_first_rows_of_every_tensor():
    x, y = torch.arange(20.).reshape(10, 2), torch.arange(10)
    sx, sy = sub_batch((x, y), 0.25)
    assert torch.equal(sx, x[:3]) and torch.equal(sy, y[:3])
    assert torch.equal(sub_batch(x, 0.01), x[:1])
    assert sub_batch((x, y), 1.0) is None and sub_batch(None, 0.5) is None
    assert sub_batch((x, y[:4]), 0.5) is None          # rows disagree: no safe slice


@pytest.mark.parametrize("task,options", [("mnist", TINY["mnist"]), ("cifar", {"arch": "resnet20"})])
def test_sub_batch_product_is_the_exact_product_of_the_sub_batch(task, options):
    """Plain gradient of the whole batch in .grad (no graph left), the product that of the first rows'
    loss with the same probe, and the task's buffers (BatchNorm statistics) moved by the step's one
    forward of the whole batch only."""
    config = TaskConfig(seed=0, synthetic=True, batch_size=8, options=options)
    problem = build_task(task, config)
    params = list(problem.model.parameters())
    choice = parse_optimizer("esgd-m-sub")
    opt = choice.create(params, seed=0)
    route = StepRoute(problem, opt, choice)
    assert route.is_hvp_step()
    batch = next(problem.batches)
    opt.zero_grad(set_to_none=True)
    before = [b.clone() for b in problem.model.buffers()]
    route.forward_backward(batch)
    after = [b.clone() for b in problem.model.buffers()]
    with torch.no_grad():
        for b, saved in zip(problem.model.buffers(), before):
            b.copy_(saved)
        problem.loss(batch)                             # the one forward the step may move them by
    assert all(torch.equal(a, b) for a, b in zip(after, problem.model.buffers()))
    grads = torch.autograd.grad(problem.loss(batch), params)
    assert all(torch.allclose(p.grad, g, atol=1e-6) and not p.grad.requires_grad for p, g in zip(params, grads))
    probes = [opt._probes[p] for p in params]
    got = [opt._hvp_sums[p].clone() for p in params]
    part = sub_batch(batch, choice.hvp_fraction)
    assert len(part[0]) == 1
    g1 = torch.autograd.grad(problem.loss(part), params, create_graph=True)
    want = torch.autograd.grad(g1, params, grad_outputs=probes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    route.step()                                    # consumes the product, leaves no graph
    assert not opt._hvp_sums and all(not p.grad.requires_grad for p in params)
    route.close()


BAD_FRACTION = "esgd-m:hvp_fraction=0.5,hvp_method='finite-difference'"


def test_hvp_fraction_with_finite_differences_is_refused_by_the_config():
    with pytest.raises(BenchError, match="hvp_fraction"):
        make_config({"tasks": ["mnist"], "optimizers": [BAD_FRACTION], "device": "cpu"})


def test_hvp_fraction_with_finite_differences_is_refused_by_train():
    with pytest.raises(BenchError, match="hvp_fraction"):
        train("mnist", BAD_FRACTION, steps=1, task_config=TaskConfig(synthetic=True, options=TINY["mnist"]))


def test_sub_batch_on_a_task_without_rows_uses_the_whole_loss():
    full = train("rosenbrock", "esgd-m", seed=0, steps=30)   # no batch rows: the whole loss is used
    sub = train("rosenbrock", "esgd-m-sub", seed=0, steps=30)
    assert sub.status == "ok" and [r["loss"] for r in sub.rows] == [r["loss"] for r in full.rows]


@pytest.mark.parametrize("label", [v.label for v in pf.VARIANTS])
def test_perf_steps_as_training_does(label):
    """perf times exactly the step code of bench.train.train (StepRoute): the same losses and the same
    product steps, step by step, for every variant and route."""
    variant = next(v for v in pf.VARIANTS if v.label == label)
    config = TaskConfig(seed=0, synthetic=True, batch_size=8, options=TINY["mnist"])
    trainer = pf._Trainer("mnist", variant, config, False)
    assert type(trainer.route) is StepRoute
    losses: list[float] = []
    own = trainer.route.forward_backward

    def recorded(batch):
        loss = own(batch)
        losses.append(loss.item())
        return loss

    trainer.route.forward_backward = recorded
    steps = 7
    hvps = [trainer.step() for _ in range(steps)]
    trainer.close()
    choice = variant.choice
    if choice.second_order:
        choice = dataclasses.replace(choice, given={**choice.given, **SCHEDULE})
        assert hvps == [True, False, False, True, False, False, True]
    else:
        assert not any(hvps)
    result = train("mnist", choice, seed=0, steps=steps, lr=choice.lr or pf.TIMING_LR, task_config=config)
    assert result.status == "ok"
    assert [r["loss"] for r in result.rows] == losses and len(set(losses)) > 1
    assert [r["is_hvp_step"] for r in result.rows] == hvps


def _render(renderable) -> str:
    console = Console(record=True, width=250)
    console.print(renderable)
    return console.export_text()


def test_perf_tiny_run_writes_finite_ratios(tmp_path):
    second = [s.name for s in list_optimizers() if s.second_order]
    assert {"esgd-m", "esgd-m-sub"} <= set(second)
    out, table = pf.run_perf(pf.PerfConfig(tasks=["mnist"], out=tmp_path / "p", rounds=1, warmup_cycles=0,
                                           batch_size=8, widths=(8,), options=TINY, threads=1, memory=False))
    saved = pd.read_csv(out / "perf.csv")
    meta = json.loads((out / "meta.json").read_text())
    assert len(saved) == len(table) == len(pf.VARIANTS) + len(pf.SWEEP_VARIANTS)
    assert set(saved["optimizer"]) == {v.label for v in pf.VARIANTS}
    for col in ("fb_ms", "update_ms", "amortised_ms", "amortised_vs_adam", "update_vs_adam"):
        assert (saved[col] > 0).all() and saved[col].map(math.isfinite).all(), col
    second_order = saved[saved["hvp_route"].notna()]
    assert len(second_order) and (second_order["hvp_step_ms"] > 0).all()
    assert second_order["hvp_grad_evals"].map(math.isfinite).all()
    # FLOP counts are exact: a finite-difference product is one more forward+backward of the same
    # batch; an exact product adds more than one and, by the R-operator count, about two (at most three).
    flops = saved[saved["section"] == "task"].set_index("optimizer")["hvp_flop_evals"]
    assert flops["esgd-m-fd"] == pytest.approx(1.0)
    assert 1.0 < flops["esgd-m"] <= 3.0 and 1.0 < flops["esgd"] <= 3.0
    assert 0.0 < flops["esgd-m-sub"] < flops["esgd-m"]
    assert meta["target_checks"] and meta["threads"] == 1 and meta["device"] == "cpu"
    # the rich tables
    shown = "\n".join(_render(t) for t in perf_table(table))
    assert "mnist (eager" in shown and "parameter sweep" in shown and "esgd-m-fd" in shown
    checks = pf.target_checks(table)
    assert checks == meta["target_checks"]
    targets = _render(targets_table(checks))
    assert "Performance targets (ratios to Adam)" in targets and "issue" not in targets.lower()
    assert "plain update vs Adam" in targets


def test_perf_peak_memory_in_fresh_processes(tmp_path):
    variants = [v for v in pf.VARIANTS if v.label in ("esgd-m", "adam")]
    _, table = pf.run_perf(pf.PerfConfig(tasks=["mnist"], out=tmp_path, rounds=1, warmup_cycles=0, batch_size=8,
                                         widths=(), options=TINY, threads=1, variants=variants))
    assert (table["peak_mem_mb"] > 0).all() and (table["peak_mem_vs_adam"] > 0).all()
    assert (table["graph_left_on_grad"] == 0).all()    # no double-backward graph outlives its step
    result = probe("mnist", "esgd-m", TaskConfig(synthetic=True, batch_size=8, options=TINY["mnist"]),
                   steps=4, threads=torch.get_num_threads(), **SCHEDULE)
    assert result["hvp_steps"] == 2 and result["graph_left_on_grad"] == 0 and result["extra_mb"] >= 0


def test_perf_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    for args, text in ((["--task", "imagenet"], "--task"), (["--widths", "a,b"], "--widths"),
                       (["--rounds", "0"], "rounds"), (["--option", "cifar.width=3", "--task", "mnist"], "cifar")):
        res = runner.invoke(app, ["perf", "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and text in res.output and "Traceback" not in res.output, (args, res.output)
    assert not (tmp_path / "x" / "perf.csv").exists()
