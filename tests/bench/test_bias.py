"""``esgd-bench bias`` (bench/bias.py): the cheap routes' mean estimate of (H z)^2 against the exact one.

Identities first (two halves covering a batch give its own square; the resampled interval keeps each
sample's estimate with its exact square), then the statistics the command exists to show, on a small
MLP with real digits: the paired estimate is centred on the whole batch's squared product and the
sub-batch's is inflated by its sampling noise.  Every registry entry either runs or is refused in one
line, and so is every bad input, with nothing written.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.bias import BiasConfig, _ratio, estimate, product_fn, run_bias
from bench.errors import BenchError
from bench.optimizers import list_optimizers, parse_optimizer
from cli import app
from esgd._base import rademacher
from tasks import TaskConfig, build_task

SMALL = {"width": 32}


def _whole(table: pd.DataFrame, route: str) -> pd.Series:
    return table[(table["route"] == route) & (table["parameter"] == "all")].iloc[0]


@pytest.mark.parametrize("task,options", [("mnist", SMALL), ("mnist-cnn", {})])
def test_two_halves_covering_the_batch_give_its_own_square_and_buffers_stay(task, options):
    """e = ab + ((a - b)/2)^2 = ((a + b)/2)^2 at covers = 1, and (a + b)/2 is the batch's product where
    the loss is a mean over rows (the MLP); float32 products of 8 and 16 rows agree to about 1e-6 of
    the largest element.  The products leave BatchNorm's running statistics as they were."""
    torch.manual_seed(0)
    problem = build_task(task, TaskConfig(seed=0, synthetic=True, batch_size=16, options=options))
    params = list(problem.model.parameters())
    hvp = product_fn(problem, params)
    batch = next(problem.batches)
    probe = [rademacher(p.shape, torch.Generator().manual_seed(1), p.device, p.dtype) for p in params]
    before = [b.clone() for b in problem.model.buffers()]
    e, floors = estimate(parse_optimizer("esgd-m:hvp_fraction=1.0,hvp_paired=true"), hvp, batch, probe)
    assert all(torch.equal(b, a) for b, a in zip(problem.model.buffers(), before))
    assert floors is not None
    if task == "mnist":
        for x, h in zip(e, hvp(batch, probe)):
            torch.testing.assert_close(x, h * h, rtol=0, atol=1e-5 * float((h * h).max()))


def test_the_interval_resamples_each_sample_with_its_own_exact_square():
    exact = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    ratio, low, high = _ratio(2 * exact, exact, torch.Generator().manual_seed(0))
    assert ratio == pytest.approx(2) and low == pytest.approx(2) and high == pytest.approx(2)
    noisy = exact * (1 + 0.5 * torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    ratio, low, high = _ratio(noisy, exact, torch.Generator().manual_seed(0))
    assert low < ratio < high and float(noisy.sum() / exact.sum()) == pytest.approx(ratio)


def test_the_paired_estimate_is_centred_and_the_sub_batch_inflated(tmp_path):
    _, table = run_bias(BiasConfig(task="mnist", at_step=20, samples=96, options=SMALL, out=tmp_path))
    pair, sub = _whole(table, "esgd-m-pair"), _whole(table, "esgd-m-sub")
    assert (pair["rows"], sub["rows"], pair["batch_rows"]) == ("2 x 8", "16", 128)
    # Independent rows: E[ab + f((a-b)/2)^2] = E[(H z)^2] of the whole batch (0.99-1.12 over seeds 0-2,
    # standard error about 0.08); 16 rows square 8 times the batch's noise (3.3-3.5 measured; 8 or 32
    # rows would give about 7 or 2).
    assert 0.75 < pair["ratio"] < 1.3
    assert 2.5 < sub["low"] and sub["high"] < 5 and sub["low"] > pair["high"]
    # The floor can only raise the denominators; a sub-batch has none.
    assert pair["floored"] >= pair["ratio"] and sub["floored"] == pytest.approx(sub["ratio"])
    assert 1 / 96 <= pair["top_share"] < 0.5 and 1 / 96 <= sub["top_share"] < 0.5
    # The model, then each of the depth-2 MLP's three weights and three biases.
    assert (table.groupby("route")["parameter"].nunique() == 1 + 6).all()


@pytest.mark.parametrize("name", sorted(spec.name for spec in list_optimizers()))
def test_every_registry_entry_is_measured_or_refused_in_one_line(name, tmp_path):
    out = tmp_path / "o"
    config = BiasConfig(task="mnist", routes=(name,), at_step=0, samples=10, options={"width": 8}, out=out)
    try:
        _, table = run_bias(config)
    except BenchError as err:
        assert "\n" not in str(err) and name in str(err)
        assert not out.exists()
        return
    assert table["ratio"].map(math.isfinite).all() and table["floored"].map(math.isfinite).all()
    assert (out / "bias.csv").is_file() and (out / "meta.json").is_file()


@pytest.mark.parametrize("name,says", [("adam", "squared product"), ("esgd-m", "whole batch"),
                                       ("esgd-m:hvp_paired=true", "whole batch"),
                                       ("esgd-m-pair:hvp_compiled=true", "hvp_compiled")])
def test_routes_with_nothing_to_compare_are_refused(name, says, tmp_path):
    with pytest.raises(BenchError, match=says):
        run_bias(BiasConfig(task="mnist", routes=(name,), at_step=0, samples=10, options={"width": 8},
                            out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_running_maximum_is_floored_each_step(tmp_path):
    _, table = run_bias(BiasConfig(task="mnist", routes=("esgd-m-pair", "esgd-m-max:hvp_fraction=0.125,hvp_paired=true"),
                                   at_step=5, samples=10, options={"width": 8}, out=tmp_path))
    averaged, each_step = (_whole(table, r) for r in table["route"].unique())
    assert averaged["ratio"] == pytest.approx(each_step["ratio"])        # the same estimates
    assert each_step["floored"] >= averaged["floored"]                  # mean of maxima >= max of means


def test_cli_prints_the_table_and_writes_the_files(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["bias", "mnist", "--opt", "esgd-m-pair", "--samples", "10", "--at-step",
                                      "2", "--option", "width=8", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "esgd-m-pair" in result.output and "2 x 8" in result.output
    frame = pd.read_csv(out / "bias.csv")
    assert {"route", "parameter", "ratio", "low", "high", "floored", "top_share", "rows", "samples"} \
        <= set(frame.columns)


@pytest.mark.parametrize("args, says", [
    (["nosuchtask"], "nosuchtask"),
    (["rosenbrock"], "no rows"),
    (["mnist", "--batch-size", "1"], "batch_size"),
    (["mnist", "--opt", "adam"], "adam"),
    (["mnist", "--opt", "esgd-m:hvp_method=finite-difference"], "hvp_method"),
    (["mnist", "--opt", "nosuchopt"], "nosuchopt"),
    (["mnist", "--opt", "esgd-m-pair", "--opt", "esgd-m-pair"], "more than once"),
    (["mnist", "--option", "nosuch=1"], "nosuch"),
    (["mnist", "--samples", "2"], "samples"),
    (["mnist", "--at-step", "-1"], "at_step"),
])
def test_cli_bad_input_is_one_line_and_leaves_nothing(args, says, tmp_path):
    small = ["--option", "width=8"] if args[0] == "mnist" else []
    result = CliRunner().invoke(app, ["bias", *args, *small, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    result = CliRunner().invoke(app, ["bias", "mnist", "--samples", "10", "--at-step", "0", "--option", "width=8",
                                      "--out", str(blocker / "sub")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert blocker.read_text() == "kept"
