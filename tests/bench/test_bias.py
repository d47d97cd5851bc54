"""``esgd-bench bias`` (bench/bias.py): the cheap routes' mean estimate of (H z)^2 against the exact one.

Identities first (a route that sees the whole batch measures 1), then the statistics the command exists
to show, on a small MLP with real digits: the paired estimate is centred on the whole batch's squared
product and the sub-batch's is inflated by its sampling noise.  Every registry entry either runs or is
refused in one line.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.bias import BiasConfig, route_rows, run_bias
from bench.errors import BenchError
from bench.optimizers import list_optimizers, parse_optimizer
from cli import app

SMALL = {"width": 32}


def _whole(table: pd.DataFrame, route: str) -> pd.Series:
    return table[(table["route"] == route) & (table["parameter"] == "all")].iloc[0]


def test_a_route_that_sees_the_whole_batch_measures_one(tmp_path):
    exact, covering = "esgd-m", parse_optimizer("esgd-m:hvp_fraction=1.0,hvp_paired=true").label
    _, table = run_bias(BiasConfig(task="mnist", routes=(exact, covering), at_step=3, samples=4,
                                   options=SMALL, out=tmp_path))
    # The same product of the same batch and probe, computed twice.
    assert (table[table["route"] == exact]["ratio"] == 1.0).all()
    # Two halves covering the batch: e = ((a + b) / 2)^2, the batch's own square up to float32 rounding
    # of two half-batch products against one (relative 1e-6 per element; 1e-4 leaves room for sums).
    assert table[table["route"] == covering]["ratio"].sub(1).abs().max() < 1e-4
    assert _whole(table, covering)["rows"] == "2 x 64"


def test_the_paired_estimate_is_centred_and_the_sub_batch_inflated(tmp_path):
    _, table = run_bias(BiasConfig(task="mnist", at_step=20, samples=96, options=SMALL, out=tmp_path))
    pair, sub = _whole(table, "esgd-m-pair"), _whole(table, "esgd-m-sub")
    # Independent rows: E[ab + f((a-b)/2)^2] = E[(H z)^2] of the whole batch (1 inside the interval,
    # measured 0.97-1.28 here); 16 rows square 8 times the batch's noise (measured 3.4-3.7).
    assert pair["low"] <= 1 <= pair["high"]
    assert sub["low"] > 2
    # The model, then each of the depth-2 MLP's three weights and three biases.
    assert (table.groupby("route")["parameter"].nunique() == 1 + 6).all()


@pytest.mark.parametrize("name", sorted(spec.name for spec in list_optimizers()))
def test_every_registry_entry_is_measured_or_refused_in_one_line(name, tmp_path):
    choice = parse_optimizer(name)
    config = BiasConfig(task="mnist", routes=(name,), at_step=0, samples=2, options={"width": 8}, out=tmp_path)
    eligible = (choice.second_order and getattr(choice.spec.factory, "squares_products", False)
                and {**choice.spec.defaults, **choice.given}.get("hvp_method", "autograd") == "autograd"
                and not choice.hvp_compiled)
    if not eligible:
        with pytest.raises(BenchError) as err:
            run_bias(config)
        assert "\n" not in str(err.value) and name in str(err.value)
        assert not (tmp_path / "bias.csv").exists()
        return
    _, table = run_bias(config)
    assert table["ratio"].map(math.isfinite).all()
    assert (tmp_path / "bias.csv").is_file() and (tmp_path / "meta.json").is_file()


def test_route_rows_counts_what_one_product_sees():
    assert route_rows(parse_optimizer("esgd-m-pair"), 128) == "2 x 8"
    assert route_rows(parse_optimizer("esgd-m-sub"), 128) == "16"
    assert route_rows(parse_optimizer("esgd-m"), 128) == "128"


def test_cli_prints_the_table_and_writes_the_files(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["bias", "mnist", "--opt", "esgd-m-pair", "--samples", "3", "--at-step",
                                      "2", "--option", "width=8", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "esgd-m-pair" in result.output and "2 x 8" in result.output
    frame = pd.read_csv(out / "bias.csv")
    assert {"route", "parameter", "ratio", "low", "high", "rows", "samples"} <= set(frame.columns)


@pytest.mark.parametrize("args, says", [
    (["nosuchtask"], "nosuchtask"),
    (["mnist", "--opt", "adam"], "adam"),
    (["mnist", "--opt", "esgd-m:hvp_method=finite-difference"], "hvp_method"),
    (["mnist", "--opt", "nosuchopt"], "nosuchopt"),
    (["mnist", "--samples", "1"], "samples"),
    (["mnist", "--at-step", "-1"], "at_step"),
])
def test_cli_bad_input_is_one_line(args, says, tmp_path):
    result = CliRunner().invoke(app, ["bias", *args, "--option", "width=8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.output
    assert not (tmp_path / "o" / "bias.csv").exists()


def test_cli_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    result = CliRunner().invoke(app, ["bias", "mnist", "--samples", "2", "--at-step", "0", "--option", "width=8",
                                      "--out", str(blocker / "sub")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert blocker.read_text() == "kept"
