"""The scale-invariance study on a tiny setting: an ordinary grid of scaled tasks, one lr per optimizer,
the post-processing of its results folder (tail losses, spreads, verdicts), the files it writes, and
the command line."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench import scale as study
from bench.errors import BenchError
from bench.grid import plan_cells, run_benchmark
from bench.optimizers import default_lr, get_optimizer, list_optimizers
from bench.readers import load_results
from cli import app

runner = CliRunner()
FACTORS = [0.1, 1.0, 10.0]


def _study(task: str, kind: str, out, **settings) -> pd.DataFrame:
    config = study.scale_config(task, kind, FACTORS, {**settings, "out": out, "device": "cpu"})
    result = run_benchmark(config)
    return study.scale_runs(load_results([result.out]))


@pytest.fixture(scope="module")
def quadratic_runs(tmp_path_factory) -> dict[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("scale")
    return {kind: _study("quadratic", kind, root / kind, optimizers=["esgd-m", "sgd"], steps=25, seeds=1)
            for kind in ("loss", "params")}


@pytest.mark.parametrize("kind", ["loss", "params"])
def test_esgd_m_flat_and_sgd_not(quadratic_runs, kind):
    """The claim of ESGD-M's description on the quadratic: ESGD-M follows the same trajectory at every scale, SGD does not."""
    runs = quadratic_runs[kind]
    assert len(runs) == 2 * len(FACTORS) and set(runs["factor"]) == set(FACTORS)
    assert set(runs["scaled_task"]) == {f"quadratic-{kind}-x{f}" for f in ("0.1", "1", "10")}
    assert set(runs["task"]) == {"quadratic"} and set(runs["kind"]) == {kind}
    assert (runs.loc[runs["optimizer"] == "esgd-m", "steps"] == 25).all()
    for opt in ("esgd-m", "sgd"):   # one fixed lr per optimizer, the registry's for the task
        assert set(runs.loc[runs["optimizer"] == opt, "lr"]) == {default_lr(get_optimizer(opt), "quadratic")}
    v = study.verdicts(study.summarise_scale(runs)).set_index("optimizer")
    assert v.loc["esgd-m", "verdict"] == "flat" and v.loc["esgd-m", "spread"] < 1e-3
    assert v.loc["sgd", "verdict"].startswith("NOT flat")


def test_spread_definition():
    assert study.spread([2.0, 2.0]) == 0.0
    assert study.spread([1.0, 3.0]) == pytest.approx(2.0)            # max/min - 1 for positive losses
    assert study.spread([-1.0, -0.5]) == pytest.approx(1.0)          # still meaningful below zero
    assert study.spread([1.0, math.nan]) == math.inf


def test_outputs_written(tmp_path, quadratic_runs):
    paths = study.write_scale_outputs(quadratic_runs["loss"], tmp_path, study={"task": "quadratic"})
    runs = pd.read_csv(paths["runs"])
    assert {"factor", "optimizer", "lr", "seed", "final_loss", "status"} <= set(runs.columns)
    assert len(pd.read_csv(paths["summary"])) == 6 and len(pd.read_csv(paths["verdict"])) == 2
    assert paths["plot"].read_bytes().startswith(b"\x89PNG") and paths["plot"].stat().st_size > 5000
    assert '"flat_spread": 0.5' in paths["study"].read_text()
    assert json.loads(paths["study"].read_text()) == {"task": "quadratic", "flat_spread": 0.5}


def test_the_plot_is_framed_on_the_runs_that_finished(quadratic_runs):
    """A diverged run's enormous loss marks its factor on the top edge and does not set the y-axis."""
    import matplotlib.pyplot as plt
    runs = quadratic_runs["params"].copy()
    bad = (runs["optimizer"] == "sgd") & (runs["factor"] == 10.0)
    runs.loc[bad, ["final_loss", "status"]] = [1e18, "diverged"]
    fig = study.plot_scale(runs)
    try:
        ax = fig.axes[0]
        finite = runs.loc[~bad, "final_loss"]
        assert ax.get_ylim()[1] < 10 * finite.max()
        assert any(line.get_marker() == "x" for line in ax.get_lines())
    finally:
        plt.close(fig)


@pytest.mark.parametrize("spec", [s.name for s in list_optimizers()])
def test_one_lr_per_optimizer_over_the_factors(spec):
    """Each optimizer keeps one lr at every factor: its registry lr for the base task, the one its
    choice fixes, or the one ``--lr`` gives."""
    config = study.scale_config("rosenbrock", "loss", FACTORS, {"optimizers": [spec, f"{spec}:lr=0.5"]})
    assert config.tasks == tuple(f"rosenbrock-loss-x{f}" for f in ("0.1", "1", "10"))
    lrs: dict[str, set] = {}
    for cell in plan_cells(config):
        lrs.setdefault(cell.optimizer.label, set()).add(cell.lr)
    assert lrs == {spec: {default_lr(get_optimizer(spec), "rosenbrock")}, f"{spec}:lr=0.5": {0.5}}
    config = study.scale_config("rosenbrock", "loss", FACTORS, {"optimizers": [spec], "lr": 0.25})
    assert {cell.lr for cell in plan_cells(config)} == {0.25} and config.seeds == 1


def test_parse_factors():
    assert study.parse_factors("1e3, 1e-3,1,1") == [1e-3, 1.0, 1e3]
    for bad in ("1,x", "0", "-1", "inf", ""):
        with pytest.raises(BenchError):
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
    # the study is an ordinary results folder, with the study's files next to the runs'
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["task"]) == {"rosenbrock-params-x1", "rosenbrock-params-x1000"} and len(summary) == 4
    for name in ("metrics.csv", "meta.json", "scale_summary.csv", "scale_verdict.csv", "scale.json"):
        assert (out / name).is_file(), name


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
