"""The scale-invariance study on a tiny setting: CSVs and plot written, one lr per optimizer, verdicts."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench import scale as study
from bench.optimizers import default_lr, get_optimizer, list_optimizers
from cli import app

runner = CliRunner()
FACTORS = [0.1, 1.0, 10.0]


@pytest.fixture(scope="module")
def quadratic_runs() -> dict[str, pd.DataFrame]:
    return {kind: study.run_scale_study("quadratic", kind, factors=FACTORS, optimizers=["esgd-m", "sgd"],
                                        steps=25, seeds=1) for kind in ("loss", "params")}


@pytest.mark.parametrize("kind", ["loss", "params"])
def test_esgd_m_flat_and_sgd_not(quadratic_runs, kind):
    """The seed's claim on the quadratic: ESGD-M follows the same trajectory at every scale, SGD does not."""
    runs = quadratic_runs[kind]
    assert len(runs) == 2 * len(FACTORS) and set(runs["factor"]) == set(FACTORS)
    assert set(runs["scaled_task"]) == {f"quadratic-{kind}-x{f}" for f in ("0.1", "1", "10")}
    for opt in ("esgd-m", "sgd"):   # one fixed lr per optimizer, the registry's for the task
        assert set(runs.loc[runs["optimizer"] == opt, "lr"]) == {default_lr(get_optimizer(opt), "quadratic")}
    v = study.verdicts(study.summarise_scale(runs)).set_index("optimizer")
    assert v.loc["esgd-m", "verdict"] == "flat" and v.loc["esgd-m", "spread"] < 1e-3
    assert v.loc["sgd", "verdict"].startswith("NOT flat")


def test_final_loss_is_the_mean_of_the_last_tenth_of_steps():
    rows = [{"loss": float(i)} for i in range(1, 21)]          # 20 steps: the last 2 count
    assert study.tail_loss(rows) == pytest.approx(19.5)
    assert study.tail_loss(rows[:3]) == 3.0                    # at least the last step
    assert math.isnan(study.tail_loss([]))
    assert math.isnan(study.tail_loss([{"loss": 1.0}, {"loss": math.nan}]))   # ended in NaN: no final loss


def test_spread_definition():
    assert study.spread([2.0, 2.0]) == 0.0
    assert study.spread([1.0, 3.0]) == pytest.approx(2.0)            # max/min - 1 for positive losses
    assert study.spread([-1.0, -0.5]) == pytest.approx(1.0)          # still meaningful below zero
    assert study.spread([1.0, math.nan]) == math.inf


def test_outputs_written(tmp_path, quadratic_runs):
    paths = study.write_scale_outputs(quadratic_runs["loss"], tmp_path, meta={"task": "quadratic"})
    runs = pd.read_csv(paths["runs"])
    assert {"factor", "optimizer", "lr", "seed", "final_loss", "status"} <= set(runs.columns)
    assert len(pd.read_csv(paths["summary"])) == 6 and len(pd.read_csv(paths["verdict"])) == 2
    assert paths["plot"].read_bytes().startswith(b"\x89PNG") and paths["plot"].stat().st_size > 5000
    assert '"flat_spread": 0.5' in paths["meta"].read_text()


@pytest.mark.parametrize("spec", [s.name for s in list_optimizers()])
def test_resolve_lrs_every_optimizer(spec):
    lrs = study.resolve_lrs("rosenbrock", [spec, f"{spec}:lr=0.5"])
    assert lrs[spec] == default_lr(get_optimizer(spec), "rosenbrock") and lrs[f"{spec}:lr=0.5"] == 0.5
    assert study.resolve_lrs("rosenbrock", [spec], lr=0.25) == {spec: 0.25}


def test_parse_factors():
    assert study.parse_factors("1e3, 1e-3,1,1") == [1e-3, 1.0, 1e3]
    for bad in ("1,x", "0", "-1", "inf", ""):
        with pytest.raises(ValueError):
            study.parse_factors(bad)


def test_cli_scale(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["scale", "rosenbrock", "--kind", "params", "--factors", "1,1000", "--opt", "esgd-m",
                              "--opt", "adam:lr=0.01", "--steps", "5", "--out", str(out)], terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "x1000" in res.output and "spread" in res.output
    runs = pd.read_csv(out / "scale.csv")
    assert set(runs["optimizer"]) == {"esgd-m", "adam:lr=0.01"} and (runs["steps"] == 5).all()
    assert set(runs.loc[runs["optimizer"] == "adam:lr=0.01", "lr"]) == {0.01}
    assert (out / "scale.png").stat().st_size > 5000


@pytest.mark.parametrize("args", [
    ["scale", "nosuchtask", "--kind", "loss"], ["scale", "rosenbrock", "--kind", "weights"],
    ["scale", "rosenbrock", "--kind", "loss", "--factors", "1,zero"],
    ["scale", "rosenbrock", "--kind", "loss", "--opt", "nosuchopt"],
    ["scale", "rosenbrock", "--kind", "loss", "--lr", "-1"],
    ["scale", "rosenbrock-loss-x10", "--kind", "loss"],
    ["scale", "rosenbrock", "--kind", "loss", "--steps", "0"],
    ["scale", "rosenbrock", "--kind", "loss", "--out", "/proc/nope"],
])
def test_cli_scale_bad_input(args):
    res = runner.invoke(app, args + ["--steps", "2"] if "--steps" not in args else args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
