"""``esgd-bench table --against``: a cheaper route's end of training against the reference's seeds."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.agreement import agreement_table, render_agreement
from bench.errors import BenchError
from bench.store import write_csv, write_json
from cli import app

from .fake_results import one_error, snapshot, write_results

# optimizer, seed, tail loss, test accuracy, status
RUNS = [("exact", 0, 0.10, 0.90, "ok"), ("exact", 1, 0.20, 0.94, "ok"), ("exact", 2, 0.15, 0.92, "ok"),
        ("cheap", 0, 0.12, 0.91, "ok"), ("cheap", 1, 0.16, 0.93, "ok"), ("cheap", 2, math.nan, math.nan, "diverged"),
        ("noisy", 0, 0.30, 0.95, "ok"), ("noisy", 1, 0.40, 0.97, "ok")]


def summary(runs=RUNS) -> pd.DataFrame:
    return pd.DataFrame([{"task": "mnist", "optimizer": o, "lr": 0.1, "seed": s, "tail_loss": loss,
                          "eval_metric": "val_acc", "eval_value": acc - 0.01, "test_metric": "test_acc",
                          "test_value": acc, "status": status} for o, s, loss, acc, status in runs])


def test_inside_when_the_mean_of_ok_seeds_is_within_the_reference_range():
    t = agreement_table(summary(), "exact").set_index("optimizer")
    cheap, noisy = t.loc["cheap"], t.loc["noisy"]
    assert (cheap.runs, cheap.runs_ok) == (3, 2)                    # the diverged seed is counted, not averaged
    assert cheap.tail_loss_mean == pytest.approx(0.14) and cheap.loss_inside
    assert cheap.metric == "test_acc" and cheap.metric_mean == pytest.approx(0.92) and cheap.metric_inside
    assert (cheap.reference_tail_loss_min, cheap.reference_tail_loss_max) == (0.10, 0.20)
    assert (cheap.reference_metric_min, cheap.reference_metric_max) == (0.90, 0.94)
    assert not noisy.loss_inside and noisy.loss_side == "above"
    assert not noisy.metric_inside and noisy.metric_side == "above"
    assert "exact" not in t.index


def test_without_a_test_split_the_validation_metric_is_used():
    s = summary().drop(columns=["test_metric", "test_value"])
    row = agreement_table(s, "exact").set_index("optimizer").loc["cheap"]
    assert row.metric == "val_acc" and row.metric_mean == pytest.approx(0.91)


def test_an_absent_reference_names_the_optimizers_there():
    with pytest.raises(BenchError, match="no runs of it.*exact, cheap, noisy"):
        agreement_table(summary(), "adam")


def test_rendered_table_says_which_side_a_miss_is_on():
    text = render_agreement(agreement_table(summary(), "exact"), "markdown")
    noisy = next(line for line in text.splitlines() if "| noisy" in line)
    assert noisy.count("no (above)") == 2
    cheap = next(line for line in text.splitlines() if "| cheap" in line)
    assert cheap.count("yes") == 2 and "2/3" in cheap


def _folder(path):
    path.mkdir()
    write_csv(summary(), path / "summary.csv")
    write_csv(pd.DataFrame([{"task": "mnist", "optimizer": "exact", "lr": 0.1, "seed": 0, "step": 1,
                             "wall_time_s": 0.1, "loss": 1.0}]), path / "metrics.csv")
    write_json({"command": "hand-built", "config": {}}, path / "meta.json")
    return path


def test_cli_against(tmp_path):
    folder = _folder(tmp_path / "res")
    before = snapshot(folder)
    res = CliRunner().invoke(app, ["table", str(folder), "--against", "exact", "--format", "csv",
                                   "--out", str(tmp_path / "agree.csv")])
    assert res.exit_code == 0, res.output
    written = pd.read_csv(tmp_path / "agree.csv")
    assert list(written["optimizer"]) == ["cheap", "noisy"] and list(written["loss_inside"]) == [True, False]
    assert snapshot(folder) == before
    err = one_error(CliRunner().invoke(app, ["table", str(folder), "--against", "adam"]))
    assert "--against adam" in err


def test_only_keeps_the_named_optimizers(tmp_path):
    """--only on table and plot: the other optimizers' runs are left out; an absent name is one line."""
    folder = write_results(tmp_path / "res")
    res = CliRunner().invoke(app, ["table", str(folder), "--only", "adam", "--only", "esgd-m", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(io.StringIO(res.stdout))["optimizer"]) == ["adam", "esgd-m"]
    res = CliRunner().invoke(app, ["plot", str(folder), "--only", "sgd", "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").is_file()
    err = one_error(CliRunner().invoke(app, ["plot", str(folder), "--only", "lion", "--out", str(tmp_path / "q.png")]))
    assert "--only lion" in err and "sgd, adam, esgd-m" in err and not (tmp_path / "q.png").exists()
