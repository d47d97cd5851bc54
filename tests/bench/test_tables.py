"""The wall-clock table: its numbers against values worked out by hand (tests/bench/fake_results.py),
its rich, Markdown and CSV forms, and the ``table`` command: which files it may write, how it counts a
folder given twice, and output to a stream that cannot spell every character."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.errors import BenchError
from bench.readers import load_results
from bench.tables import HEADERS, format_table, markdown_table, render_table, wall_clock_table, write_table
from cli import app
from tests.bench.fake_results import (EXPECTED, frames, markdown_tables, one_error, run_copy,  # noqa: F401
                                      run_folder, snapshot, warning_lines, write_results)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


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


def test_test_metric_is_its_own_column_over_the_ok_seeds():
    metrics, summary = frames()
    assert (format_table(wall_clock_table(metrics, summary))["test"] == "—").all()    # no test split
    summary = summary.assign(test_metric="test_acc", test_value=[0.5 + i / 10 for i in range(len(summary))])
    t = wall_clock_table(metrics, summary).set_index("optimizer")
    for opt, runs in summary.groupby("optimizer"):
        ok = runs[runs["status"] == "ok"]["test_value"]
        assert _close(t.loc[opt, "test_mean"], ok.mean()) and _close(t.loc[opt, "test_std"], ok.std(ddof=1))
        assert t.loc[opt, "test_metric"] == "test_acc"
    assert format_table(t.reset_index())["test"].str.startswith("test_acc ").all()


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
    csv_text = render_table(t, "csv")
    assert pd.read_csv(io.StringIO(csv_text))["amortised_ms"].tolist() == [125.0, 150.0, 225.0]
    assert write_table(t, tmp_path / "t.md").read_text() == markdown_table(t)
    assert pd.read_csv(write_table(t, tmp_path / "t.csv"))["optimizer"].tolist() == ["sgd", "adam", "esgd-m"]
    with pytest.raises(BenchError, match="unknown format 'html'"):
        render_table(t, "html")
    with pytest.raises(BenchError, match="unsupported file type '.txt'"):
        write_table(t, tmp_path / "t.txt")
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.md"]


def test_markdown_holds_every_cell_and_aligns_numbers():
    t = wall_clock_table(*frames())
    md = render_table(t, "markdown")
    assert md.endswith("\n") and md.count("\n") == 2 + len(t)     # header, alignment row, one line a row
    [rows] = markdown_tables(md)
    assert rows[0] == HEADERS
    assert rows[2:] == format_table(t).values.tolist()
    align = rows[1]
    assert all(a.startswith(":") and not a.endswith(":") for a in align[:2])   # task, optimizer: left
    assert all(a.endswith(":") and not a.startswith(":") for a in align[2:])   # numbers: right
    esgd = dict(zip(HEADERS, rows[2 + 2]))
    assert esgd["optimizer"] == "esgd-m" and esgd["HVP / grad"] == "1.56x" and esgd["runs ok"] == "2/2"


def test_markdown_escapes_a_pipe_in_a_cell():
    metrics, summary = frames()
    metrics["optimizer"] = metrics["optimizer"].replace("esgd-m", "my|opt")
    summary["optimizer"] = summary["optimizer"].replace("esgd-m", "my|opt")
    md = markdown_table(wall_clock_table(metrics, summary))
    [rows] = markdown_tables(md)
    assert all(len(r) == len(HEADERS) for r in rows)             # the pipe did not open a new column
    assert [r[1] for r in rows[2:]] == ["sgd", "adam", "my\\|opt"]


def test_load_results_round_trip(tmp_path):
    d = write_results(tmp_path / "r")
    results = load_results([d])
    assert len(results.summary) == 7 and results.metas[0]["threads"] == 2
    t = wall_clock_table(results.metrics, results.summary).set_index("optimizer")
    assert t.loc["esgd-m", "hvp_x_grad"] == pytest.approx(70 / 45)
    for opt, want in EXPECTED.items():
        assert (t.loc[opt, "runs"], t.loc[opt, "runs_ok"]) == (want["runs"], want["runs_ok"])


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


# -- the table command ----------------------------------------------------------------------------------
def _csv_table(res) -> pd.DataFrame:
    assert res.exit_code == 0, res.output
    return pd.read_csv(io.StringIO(res.stdout))


@pytest.mark.parametrize("kind", ["hand-built", "run"])
@pytest.mark.parametrize("name", ["summary.csv", "metrics.csv", "meta.json", "manifest.json"])
def test_table_out_refuses_a_file_of_the_results_folder(tmp_path, run_copy, kind, name):
    """``--out`` naming one of the folder's own files is refused; every file stays byte-identical and
    the folder still reads as before."""
    d = write_results(tmp_path / "r") if kind == "hand-built" else run_copy
    shown = _csv_table(runner.invoke(app, ["table", str(d), "--format", "csv"]))
    before = snapshot(d)
    message = one_error(runner.invoke(app, ["table", str(d), "--out", str(d / name)]))
    assert str(d / name) in message
    assert snapshot(d) == before
    res = runner.invoke(app, ["table", str(d), "--format", "csv"])
    assert warning_lines(res) == [] and _csv_table(res).equals(shown)


def test_write_table_refuses_a_file_of_the_results_folder(tmp_path):
    d = write_results(tmp_path / "r")
    before = snapshot(d)
    for name in ("summary.csv", "metrics.csv"):
        with pytest.raises(BenchError, match="that is a file of the results folder"):
            write_table(wall_clock_table(*frames()), d / name)
    assert snapshot(d) == before


def test_table_out_refuses_a_cell_file_of_a_run_folder(run_copy):
    """A cell's metrics file (cells/<cell>.csv) is as much the folder's as summary.csv is."""
    cell = sorted((run_copy / "cells").glob("*.csv"))[0]
    before = snapshot(run_copy)
    message = one_error(runner.invoke(app, ["table", str(run_copy), "--out", str(cell)]))
    assert str(cell) in message
    assert snapshot(run_copy) == before
    assert _csv_table(runner.invoke(app, ["table", str(run_copy), "--format", "csv"]))["runs_ok"].tolist() == [2]


@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink", "copy"])
def test_folder_given_twice_is_counted_once(run_folder, tmp_path, spelling):
    if spelling == "copy":      # two different folders holding the same cells
        other = str(shutil.copytree(run_folder, tmp_path / "copy"))
    elif spelling == "symlink":
        other = str(tmp_path / "link")
        os.symlink(run_folder, other)
    else:
        other = {"same": str(run_folder), "dot": f"{run_folder}/.",
                 "dotdot": f"{run_folder}/../{run_folder.name}"}[spelling]
    before = snapshot(run_folder)
    res = runner.invoke(app, ["table", str(run_folder), other, "--format", "csv"])
    t = _csv_table(res)
    assert (t["runs"].tolist(), t["runs_ok"].tolist()) == ([2], [2])        # not 4/4
    assert len(warning_lines(res)) == 1 and res.stderr == warning_lines(res)[0] + "\n"
    assert snapshot(run_folder) == before


@pytest.mark.parametrize("fmt", ["rich", "markdown"])
def test_table_to_an_ascii_stream(tmp_path, fmt):
    """``±`` and ``—`` on a pipe or terminal whose encoding is ASCII: replaced, not a crash."""
    d = write_results(tmp_path / "r")
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "from cli import app; app()", "table", str(d), "--format", fmt],
                          cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"UnicodeEncodeError" not in proc.stderr and proc.stderr == b""
    out = proc.stdout.decode(errors="replace")
    assert "esgd-m" in out and "1.56x" in out
