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
from bench.optimizers import OptimizerSpecError, list_optimizers, parse_optimizer
from bench.profiling import CATEGORIES, COMPILED_GRAPH
from bench import steps as bench_steps
from bench.steps import StepRoute, check_route, sub_batch
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


def _first_hvp_step(task, options, name):
    """Build the task (8 synthetic rows), take the forward+backward of the first (HVP) step by ``name``'s
    route, and check that the task's buffers (BatchNorm statistics) moved by one forward of the whole
    batch only and that .grad holds the plain gradient of the whole batch, with no graph."""
    config = TaskConfig(seed=0, synthetic=True, batch_size=8, options=options)
    problem = build_task(task, config)
    params = list(problem.model.parameters())
    choice = parse_optimizer(name)
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
    return problem, params, choice, opt, route, batch


def _product_of(problem, params, part, probes):
    g1 = torch.autograd.grad(problem.loss(part), params, create_graph=True)
    return torch.autograd.grad(g1, params, grad_outputs=probes)


@pytest.mark.parametrize("task,options", [("mnist", TINY["mnist"]), ("cifar", {"arch": "resnet20"})])
def test_sub_batch_product_is_the_exact_product_of_the_sub_batch(task, options):
    """The product is that of the first rows' loss, with the same probe."""
    problem, params, choice, opt, route, batch = _first_hvp_step(task, options, "esgd-m-sub")
    probes = [opt._probes[p] for p in params]
    got = [opt._hvp_sums[p].clone() for p in params]
    part = sub_batch(batch, choice.hvp_fraction)
    assert len(part[0]) == 1
    for a, b in zip(got, _product_of(problem, params, part, probes)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    route.step()                                    # consumes the product, leaves no graph
    assert not opt._hvp_sums and all(not p.grad.requires_grad for p in params)
    route.close()


# The compiled route on the MLP only: compiling a ResNet's product takes minutes on a CPU.
@pytest.mark.parametrize("task,options,spec", [("mnist", TINY["mnist"], "esgd-m-pair"),
                                               ("cifar", {"arch": "resnet20"}, "esgd-m-pair"),
                                               ("mnist", TINY["mnist"], "esgd-m-pair:hvp_compiled=true")])
def test_paired_products_are_those_of_two_disjoint_halves(task, options, spec):
    """hvp_paired: the step's estimate comes from the products of rows 0 and 1 (1/8 of 8 rows, rounded
    up to two rows), with the same probe, covering 2/8 of the batch; by the double backward or by
    compiled forward-over-reverse."""
    problem, params, _, opt, route, batch = _first_hvp_step(task, options, spec)
    assert (route.forward_over_reverse is not None) == spec.endswith("hvp_compiled=true")
    a_got, b_got, covers = opt._hvp_pair
    assert covers == 0.25 and not opt._hvp_sums
    probes = [opt._probes[p] for p in params]
    for rows, got in ((slice(0, 1), a_got), (slice(1, 2), b_got)):
        for p, w in zip(params, _product_of(problem, params, tuple(t[rows] for t in batch), probes)):
            torch.testing.assert_close(got[p], w, rtol=1e-4, atol=1e-6)
    route.step()
    assert opt._hvp_pair is None and all(not p.grad.requires_grad for p in params)
    route.close()


def test_compiled_product_is_the_exact_product_of_the_whole_batch():
    """hvp_compiled: gradient, buffers and product of the step are those of the double backward, to the
    float32 rounding of a reordered computation."""
    problem, params, _, opt, route, batch = _first_hvp_step("mnist", TINY["mnist"], "esgd-m:hvp_compiled=true")
    assert route.forward_over_reverse is not None
    probes = [opt._probes[p] for p in params]
    for p, w in zip(params, _product_of(problem, params, batch, probes)):
        torch.testing.assert_close(opt._hvp_sums[p], w, rtol=1e-4, atol=1e-6)
    route.step()
    assert not opt._hvp_sums and all(not p.grad.requires_grad for p in params)
    route.close()


@pytest.mark.parametrize("extra,options", [({"accumulate": 2}, ""), ({"nproc": 2}, ""), ({"compile": True}, ""),
                                           ({"precision": "fp16"}, ""), ({"precision": "bf16"}, ""),
                                           ({}, ",hvp_fraction=0.5"),
                                           ({}, ",hvp_method='finite-difference'")])
def test_compiled_product_is_refused_where_it_does_not_apply(extra, options):
    with pytest.raises(BenchError, match="hvp_compiled"):
        make_config({"tasks": ["mnist"], "optimizers": [f"esgd-m:hvp_compiled=true{options}"], "device": "cpu",
                     **extra})


@pytest.mark.parametrize("name,kernels", [("esgd-m-sub", [False, True]),
                                          ("esgd-m-pair", [False, True, True])])
def test_only_the_forwards_whose_graph_is_built_take_the_math_attention_kernel(name, kernels, monkeypatch):
    """On a product step of a cheap route the whole batch's forward has a plain backward, so it keeps
    the fused attention kernel; the sub-batch's and the halves' forwards are differentiated twice."""
    seen = []
    real = bench_steps.hvp_attention
    monkeypatch.setattr(bench_steps, "hvp_attention", lambda graph: seen.append(bool(graph)) or real(graph))
    _first_hvp_step("mnist", TINY["mnist"], name)[4].close()
    assert seen == kernels


BAD_FRACTION = "esgd-m:hvp_fraction=0.5,hvp_method='finite-difference'"


def test_paired_estimate_is_refused_where_it_does_not_apply():
    with pytest.raises(BenchError, match="hvp_paired"):
        make_config({"tasks": ["mnist"], "optimizers": ["esgd-m-pair:hvp_method='finite-difference'"],
                     "device": "cpu"})
    with pytest.raises(OptimizerSpecError, match="squared product"):
        parse_optimizer("adahessian:hvp_paired=true")
    with pytest.raises(OptimizerSpecError, match="true or false"):
        parse_optimizer("esgd-m:hvp_paired=0.5")


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
    tasks = saved[saved["section"] == "task"].set_index("optimizer")
    flops, own = tasks["hvp_flop_evals"], tasks["route_flop_evals"]
    assert flops["esgd-m-fd"] == pytest.approx(1.0)
    assert 1.0 < flops["esgd-m"] <= 3.0 and 1.0 < flops["esgd"] <= 3.0
    assert 0.0 < flops["esgd-m-sub"] < flops["esgd-m"] and 0.0 < flops["esgd-m-pair"] < flops["esgd-m"]
    # every exact route is held to the fewest FLOPs any of them counts for the same product
    exact = tasks[tasks["hvp_route"] == "exact"]
    assert (exact["hvp_flop_evals"] == own[exact.index].min()).all() and (own[exact.index] >= 1.0).all()
    assert meta["target_checks"] and meta["threads"] == 1 and meta["device"] == "cpu"
    # the exact product every 40 steps is amortised over 40 steps, as its registry entry takes it
    lazy = tasks.loc["esgd-m-lazy"]
    assert lazy["hvp_every"] == 40 and tasks.loc["esgd-m", "hvp_every"] == pf.HVP_EVERY
    assert lazy["amortised_ms"] == pytest.approx((39 * lazy["plain_ms"] + lazy["hvp_step_ms"]) / 40, rel=1e-6)
    assert "lazy, 1 in 40" in "\n".join(_render(t) for t in perf_table(saved))    # as read back from perf.csv
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


def test_perf_peak_memory_in_spawned_processes(tmp_path, monkeypatch):
    """On CUDA the probes are spawned (a fork server may have initialised CUDA); the same probe there."""
    from bench import executors
    assert executors.process_context([], cuda=True).get_start_method() == "spawn"
    spawned = []

    def context(preload, *, cuda=False):
        spawned.append(cuda)
        return executors.mp.get_context("spawn")
    monkeypatch.setattr(executors, "process_context", context)
    from bench.memory import peak_memory
    config = TaskConfig(synthetic=True, batch_size=8, options=TINY["mnist"])
    result = peak_memory([("mnist", "mnist", "esgd-m", config, SCHEDULE)], steps=4, threads=1)
    assert spawned == [False]          # a CPU job asks for the fork server; spawned here all the same
    got = result[("mnist", "esgd-m")]
    assert got["hvp_steps"] == 2 and got["graph_left_on_grad"] == 0 and got["peak_mb"] > 0
    cuda_job = [("mnist", "mnist", "esgd-m", dataclasses.replace(config, device="cuda"), SCHEDULE)]
    if torch.cuda.is_available():
        assert peak_memory(cuda_job, steps=4, threads=1)[("mnist", "esgd-m")]["hvp_steps"] == 2
    else:
        with pytest.raises(BenchError, match="peak-memory probe of esgd-m on mnist failed"):
            peak_memory(cuda_job, steps=4, threads=1)
    assert spawned == [False, True]      # a CUDA job asks for spawn


def _fail_compiled(monkeypatch, labels=None):
    """Make the variants with a compiled product (or those in ``labels``) fail in their first cycle,
    as a product that the installed torch cannot compile does."""
    cycle = pf._Trainer.cycle

    def failing(self):
        if (self.variant.label in labels) if labels else self.variant.choice.hvp_compiled:
            raise RuntimeError("the compiler failed here\nand a long second line that is not shown")
        return cycle(self)
    monkeypatch.setattr(pf._Trainer, "cycle", failing)


def test_perf_names_a_variant_that_fails_and_measures_the_others(tmp_path, monkeypatch):
    _fail_compiled(monkeypatch)
    res = CliRunner().invoke(app, ["perf", "--task", "mnist", "--rounds", "1", "--widths", "none", "--no-memory",
                                   "--batch-size", "8", "--threads", "1", "--option", "width=16",
                                   "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    compiled = sorted(v.label for v in pf.VARIANTS if v.choice.hvp_compiled)
    lines = [line for line in res.stderr.splitlines() if "was not measured" in line]
    assert sorted(line.split()[1] for line in lines) == compiled
    assert all(line.endswith("(RuntimeError: the compiler failed here)") for line in lines)
    saved = pd.read_csv(tmp_path / "p" / "perf.csv")
    assert set(saved["optimizer"]) == {v.label for v in pf.VARIANTS} - set(compiled)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert sorted(r["optimizer"] for r in meta["not_measured"]) == compiled
    assert {r["task"] for r in meta["not_measured"]} == {"mnist"}


def test_perf_ends_in_one_line_when_a_variant_fails_after_its_warm_up(tmp_path, monkeypatch):
    _fail_compiled(monkeypatch, labels={"esgd-m"})
    variants = [v for v in pf.VARIANTS if v.label in ("esgd-m", "adam")]
    with pytest.raises(BenchError, match=r"^perf: esgd-m failed in a timed round \(RuntimeError: "
                                         r"the compiler failed here\)$"):
        pf.run_perf(pf.PerfConfig(tasks=["mnist"], out=tmp_path, rounds=1, warmup_cycles=0, batch_size=8,
                                  widths=(), options=TINY, threads=1, memory=False, variants=variants))


def test_perf_stops_in_one_line_when_adam_fails(tmp_path, monkeypatch):
    _fail_compiled(monkeypatch, labels={"adam"})
    variants = [v for v in pf.VARIANTS if v.label in ("esgd-m", "adam")]
    with pytest.raises(BenchError, match=r"^perf: adam failed, and every ratio is to it \(RuntimeError: "
                                         r"the compiler failed here\)$"):
        pf.run_perf(pf.PerfConfig(tasks=["mnist"], out=tmp_path, rounds=1, batch_size=8, widths=(),
                                  options=TINY, threads=1, memory=False, variants=variants))


def test_perf_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    for args, text in ((["--task", "imagenet"], "--task"), (["--widths", "a,b"], "--widths"),
                       (["--rounds", "0"], "rounds"), (["--option", "cifar.width=3", "--task", "mnist"], "cifar")):
        res = runner.invoke(app, ["perf", "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and text in res.output and "Traceback" not in res.output, (args, res.output)
    assert not (tmp_path / "x" / "perf.csv").exists()


def _round(fb, update, hvp=math.nan):
    return {"fb_ms": fb, "update_ms": update, "plain_ms": fb + update, "hvp_step_ms": hvp}


def test_floor_is_the_step_with_the_product_at_forward_backward_speed():
    """Hand-worked: ESGD-M's plain step 10 + 2 ms, its HVP step 60 ms, Adam's step 10 + 4 ms; a product
    of 2 gradient evaluations of FLOPs at 10 ms each would add 20 ms every ten steps."""
    samples = {"esgd-m": [_round(10, 2, 60)] * 3, "adam": [_round(10, 4)] * 3}
    s = pf.summarise(samples, flop_evals={"esgd-m": 2.0})
    assert s["esgd-m"]["amortised_vs_adam"] == pytest.approx((9 * 12 + 60) / 10 / 14)
    assert s["esgd-m"]["floor_vs_adam"] == pytest.approx((12 + 2.0 * 10 / 10) / 14)
    assert s["esgd-m"]["amortised_vs_floor"] == pytest.approx(16.8 / 14.0)
    assert "floor_vs_adam" not in s["adam"]


def test_a_variant_is_amortised_over_its_own_interval():
    """Hand-worked: the same steps as above with one product in 40 steps (esgd-m-lazy's entry) instead of
    10; the interval comes from the registry entry, not from a second copy of it in the benchmark."""
    samples = {"esgd-m-lazy": [_round(10, 2, 60)] * 3, "adam": [_round(10, 4)] * 3}
    s = pf.summarise(samples, flop_evals={"esgd-m-lazy": 2.0}, every={"esgd-m-lazy": 40})
    assert s["esgd-m-lazy"]["amortised_vs_adam"] == pytest.approx((39 * 12 + 60) / 40 / 14)
    assert s["esgd-m-lazy"]["floor_vs_adam"] == pytest.approx((12 + 2.0 * 10 / 40) / 14)
    assert s["esgd-m-lazy"]["hvp_every"] == 40 and math.isnan(s["adam"]["hvp_every"])
    every = {v.label: v.every for v in pf.VARIANTS}
    assert every["esgd-m-lazy"] == parse_optimizer("esgd-m-lazy").spec.defaults["update_d_every"] == 40
    assert every["esgd-m-lazy-compiled"] == 40
    assert every["esgd-m"] == every["esgd"] == every["esgd-m-pair"] == pf.HVP_EVERY
    assert pf.Variant("x", "esgd-m:update_d_every=25", "lazy").every == 25


def test_exact_routes_are_held_to_their_floor_and_cheap_ones_to_a_fixed_bound():
    rows = [{"section": "task", "task": "t", "mode": "eager", "optimizer": o, "hvp_route": r,
             "amortised_vs_adam": a, "floor_vs_adam": f, "update_vs_adam": 0.5}
            for o, r, a, f in (("esgd-m", "exact", 1.26, 1.20), ("esgd", "exact", 1.27, 1.20),
                               ("esgd-m-pair", "paired", 1.06, math.nan), ("esgd-m-sub", "sub-batch", 1.08, math.nan),
                               ("esgd-m-lazy", "lazy", 1.05, 1.02),
                               ("adam", "", 1.0, math.nan))]
    checks = {c["optimizer"]: c for c in pf.target_checks(pd.DataFrame(rows)) if "amortised" in c["target"]}
    assert checks["esgd-m"]["bound"] == pytest.approx(1.26) and checks["esgd-m"]["met"]
    assert checks["esgd-m"]["floor"] == 1.20 and not checks["esgd"]["met"]
    assert checks["esgd-m-pair"]["bound"] == 1.07 and checks["esgd-m-pair"]["met"]
    assert not checks["esgd-m-sub"]["met"] and "adam" not in checks
    # the exact product taken less often is a cheap route: held to the fixed bound, not to its own floor
    assert checks["esgd-m-lazy"]["bound"] == 1.07 and checks["esgd-m-lazy"]["floor"] is None


def test_profile_splits_the_product_into_categories(tmp_path):
    """perf --profile: per exact route, category rows summing to the total and the top operators, and an
    HVP step that takes longer than a plain one."""
    out, _ = pf.run_perf(pf.PerfConfig(tasks=["mnist"], out=tmp_path / "p", rounds=1, warmup_cycles=0,
                                       batch_size=8, widths=(), options=TINY, threads=1, memory=False,
                                       profile=True))
    prof = pd.read_csv(out / "profile.csv")
    assert set(prof["optimizer"]) == {v.label for v in pf.VARIANTS if v.route == "exact"}
    for label, g in prof.groupby("optimizer"):
        cats = g[g["kind"] == "category"].set_index("name")
        assert list(cats.index) == list(CATEGORIES) + ["total"]
        # the compiled product runs in generated kernels, and only it does
        assert (cats.loc["compiled", "hvp_ms"] > 0) == parse_optimizer(
            next(v.spec for v in pf.VARIANTS if v.label == label)).hvp_compiled
        assert cats.loc["total", "extra_ms"] == pytest.approx(cats.drop("total")["extra_ms"].sum())
        # (times, so only the step's total: a tiny model's matmul share is within a loaded machine's noise)
        assert cats.loc["total", "hvp_ms"] > cats.loc["total", "plain_ms"]
        assert 1 <= (g["kind"] == "op").sum() <= 8


def test_profile_categories():
    from bench.profiling import category
    assert category("aten::addmm") == category("aten::convolution_backward") == "matmul/conv"
    assert category("aten::native_batch_norm_backward") == "normalisation"
    assert category("aten::mul") == "elementwise" and category("MulBackward0") == "autograd"
    assert category(COMPILED_GRAPH) == "compiled"


def test_perf_cli_prints_the_profile(tmp_path):
    res = CliRunner().invoke(app, ["perf", "--task", "mnist", "--rounds", "1", "--widths", "none", "--no-memory",
                                   "--batch-size", "8", "--threads", "1", "--option", "width=16", "--profile",
                                   "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "mnist, esgd-m: self time of one HVP step" in res.stdout and "profile.csv" in res.stdout


@pytest.mark.parametrize("compiled,precision", [(False, "fp32"), (True, "fp32"), (False, "fp16"), (False, "bf16")])
def test_every_variant_perf_times_is_a_route_the_config_accepts(compiled, precision):
    """perf --compile and --precision skip the variants whose route does not apply, and time the rest."""
    timed = [v for v in pf.VARIANTS if pf._applies(v, compiled, precision)]
    for v in pf.VARIANTS:
        extra = pf.compiled_extras(v.choice) if compiled else {}
        method = extra.get("hvp_method") or v.choice.given.get("hvp_method")
        try:
            check_route(v.choice, compile=compiled, hvp_method=method, precision=precision)
            ok = True
        except BenchError:
            ok = False
        if v in timed:
            assert ok, v.label
    assert {v.label for v in timed} >= {"esgd-m", "adam"}
    assert any(v.choice.hvp_compiled for v in timed) == (not compiled and precision == "fp32")
