"""The wall-clock table's numbers against values worked out by hand (tests/bench/fake_results.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench.tables import (HEADERS, ReportError, format_table, load_results, markdown_table, render_table,
                          wall_clock_table, write_table)
from tests.bench.fake_results import EXPECTED, frames, write_results


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.fixture
def table() -> pd.DataFrame:
    return wall_clock_table(*frames()).set_index("optimizer")


@pytest.mark.parametrize("opt", list(EXPECTED))
def test_numbers_match_hand_computed(table, opt):
    row = table.loc[opt]
    for key, want in EXPECTED[opt].items():
        assert _close(float(row[key]), want), (opt, key, row[key], want)
    assert row["target"] == "dist <= 0.01"   # rosenbrock's default target, lower is better
    assert row["eval_metric"] == "dist"


def test_one_row_per_task_and_optimizer_in_first_seen_order(table):
    assert list(table.index) == ["sgd", "adam", "esgd-m"]


def test_target_override_and_target_on_loss():
    metrics, summary = frames()
    t = wall_clock_table(metrics, summary, target=0.3).set_index("optimizer")
    # adam: dist 0.3 at step 2 of seed 0 (0.5 * 2/4 s) and 0.009 at step 2 of seed 1 (0.7 * 2/4 s)
    assert t.loc["adam", "ttt_reached"] == 2 and t.loc["adam", "ttt_s"] == pytest.approx(0.3)
    t = wall_clock_table(metrics, summary, target_loss=1.0).set_index("optimizer")
    assert t.loc["sgd", "target"] == "loss <= 1"
    assert (t.loc["sgd", "ttt_reached"], t.loc["sgd", "ttt_s"]) == (1, pytest.approx(0.4))
    # esgd-m reaches loss 1 at step 3 in both seeds: 0.8 * 3/4 and 1.0 * 3/4
    assert t.loc["esgd-m", "ttt_s"] == pytest.approx((0.6 + 0.75) / 2)
    assert t.loc["adam", "ttt_reached"] == 0 and math.isnan(t.loc["adam", "ttt_s"])


def test_references_missing_give_empty_ratios():
    metrics, summary = frames()
    keep = summary["optimizer"] == "esgd-m"
    t = wall_clock_table(metrics[metrics["optimizer"] == "esgd-m"], summary[keep])
    assert math.isnan(t["vs_sgd"].iloc[0]) and math.isnan(t["vs_adam"].iloc[0])


def test_several_lrs_of_one_optimizer_are_separate_rows():
    metrics, summary = frames()
    other_m, other_s = metrics.copy(), summary.copy()
    other_m["lr"], other_s["lr"] = 0.5, 0.5
    t = wall_clock_table(pd.concat([metrics, other_m]), pd.concat([summary, other_s]))
    assert "sgd (lr 0.1)" in set(t["optimizer"]) and "sgd (lr 0.5)" in set(t["optimizer"])
    assert len(t) == 6


def test_formats(tmp_path):
    t = wall_clock_table(*frames())
    shown = format_table(t)
    assert list(shown.columns) == HEADERS
    esgd = shown[shown["optimizer"] == "esgd-m"].iloc[0]
    assert esgd["HVP / grad"] == "1.56x" and esgd["vs SGD"] == "1.80x" and esgd["vs Adam"] == "1.50x"
    assert esgd["final loss"] == "0.6 ± 0.14" and esgd["runs ok"] == "2/2"
    assert shown[shown["optimizer"] == "sgd"].iloc[0]["time to target"].startswith("not reached (0/3")
    md = render_table(t, "markdown")
    assert md.count("\n") == 2 + len(t) and "| esgd-m |" in md and "| 1.56x |" in md
    csv_text = render_table(t, "csv")
    assert pd.read_csv(__import__("io").StringIO(csv_text))["amortised_ms"].tolist() == [125.0, 150.0, 225.0]
    assert write_table(t, tmp_path / "t.md").read_text() == markdown_table(t)
    assert pd.read_csv(write_table(t, tmp_path / "t.csv"))["optimizer"].tolist() == ["sgd", "adam", "esgd-m"]
    with pytest.raises(ReportError):
        render_table(t, "html")
    with pytest.raises(ReportError):
        write_table(t, tmp_path / "t.txt")


def test_load_results_round_trip_and_errors(tmp_path):
    d = write_results(tmp_path / "r")
    metrics, summary, metas = load_results([d])
    assert len(summary) == 7 and metas[0]["threads"] == 2
    t = wall_clock_table(metrics, summary).set_index("optimizer")
    assert t.loc["esgd-m", "hvp_x_grad"] == pytest.approx(70 / 45)
    with pytest.raises(ReportError, match="does not exist"):
        load_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no summary.csv"):
        load_results([tmp_path / "empty"])
    with pytest.raises(ReportError, match="no result directory"):
        load_results([])


@pytest.mark.parametrize("spec", __import__("tasks").list_tasks(), ids=lambda s: s.name)
def test_every_task_has_its_target_and_direction(spec):
    """Time to target reads the task's own target and direction (scaled variants included)."""
    from bench.tables import _task_goal
    assert _task_goal(spec.name, spec.eval_metric) == (spec.target, spec.higher_is_better)
    metrics, summary = frames(task=spec.name)
    summary["eval_metric"] = spec.eval_metric
    metrics = metrics.drop(columns=["eval_f"]).rename(columns={"eval_dist": f"eval_{spec.eval_metric}"})
    row = wall_clock_table(metrics, summary).iloc[0]
    assert row["target"] == ("" if spec.target is None else
                             f"{spec.eval_metric} {'>=' if spec.higher_is_better else '<='} {spec.target:g}")
