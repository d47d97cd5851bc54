"""Data-parallel runs: 2 gloo processes on CPU with global batch B equal one process with batch B.

One ``run_benchmark(..., nproc=2)`` trains every registered optimizer (the HVP schedule and eps of
test_accumulate, so HVP and plain steps are both compared) in two spawned ranks; the same cells are then
trained in this process with ``train()``.  The per-step losses and the final test accuracy must agree.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import esgd
from esgd import distributed as esgd_dist
from bench.config import make_config
from bench.errors import BenchError
from bench.grid import run_benchmark
from bench.optimizers import parse_optimizer
from bench.readers import load_meta, load_results
from bench.train import train

from .test_accumulate import CFG, RTOL, SCALABLE, STEPS, equivalence_spec

SPECS = [equivalence_spec(n) for n in SCALABLE]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    config = make_config(dict(tasks=["mnist"], optimizers=SPECS, seeds=1, steps=STEPS, batch_size=CFG.batch_size,
                              eval_every=STEPS, device="cpu", out=out, options=dict(CFG.options), nproc=2))
    run_benchmark(config)
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_two_processes_equal_one(ddp_run, spec):
    results = load_results([ddp_run])
    summary, metrics = results.summary, results.metrics
    choice = parse_optimizer(spec)
    label = choice.label
    row = summary[summary["optimizer"] == label].iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["world_size"] == 2
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train("mnist", spec, seed=0, steps=STEPS, task_config=CFG, eval_every=STEPS)
    finally:
        torch.set_num_threads(before)
    got = torch.tensor(metrics[metrics["optimizer"] == label]["loss"].to_numpy(), dtype=torch.float64)
    want = torch.tensor([r["loss"] for r in single.rows], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    assert abs(row["eval_value"] - single.summary["eval_value"]) <= 0.01
    if choice.second_order:
        assert row["hvp_method"] == "autograd" and 0 < row["hvp_steps"] < STEPS


def test_meta_records_world_size_and_backend(ddp_run):
    meta = load_meta(ddp_run)
    assert meta["world_size"] == 2 and meta["backend"] == "gloo" and meta["config"]["nproc"] == 2


def test_bad_combinations_fail_before_training(tmp_path):
    base = dict(tasks=["mnist"], optimizers=["sgd"], seeds=1, steps=1, device="cpu", options={"width": 8})
    with pytest.raises(BenchError, match="--nproc and --jobs"):
        make_config(dict(base, out=tmp_path / "a", nproc=2, jobs=2))
    with pytest.raises(BenchError, match="does not split into 2"):
        run_benchmark(make_config(dict(base, out=tmp_path / "b", nproc=2, batch_size=63)))
    with pytest.raises(BenchError, match="no data batch"):
        run_benchmark(make_config(dict(base, tasks=["rosenbrock"], options={}, out=tmp_path / "c", nproc=2)))
    with pytest.raises(BenchError, match="CPUs"):
        make_config(dict(base, out=tmp_path / "e", nproc=64))
    for name in "abce":
        assert not (tmp_path / name).exists()
    from cli import app
    result = CliRunner().invoke(app, ["run", "mnist", "--nproc", "0", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--nproc must be an integer >= 1" in result.stderr


def test_setup_is_a_no_op_on_one_process():
    p = torch.nn.Parameter(torch.ones(2))
    opt = esgd.ESGD([p])
    assert esgd_dist.setup(opt) is opt and opt.hvp_reduce is None
    t = [torch.ones(3)]
    esgd_dist.all_reduce_mean_(t)
    assert torch.equal(t[0], torch.ones(3))
