"""The Markdown report holds the tables, links images that exist, and shows the environment; the
``plot``, ``table`` and ``report`` commands work on results folders, and a bad input (a bad option, a
missing, torn or foreign file) ends them with one ``error:`` line and exit code 2, touching nothing."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.errors import BenchError, ResultsError
from bench.report import build_report
from bench.tables import markdown_table, wall_clock_table
from cli import app
from tests.bench.fake_results import (frames, markdown_tables, one_error, run_copy, run_folder,  # noqa: F401
                                      snapshot, tear_summary, warning_lines, write_results)

runner = CliRunner()


def _rows(text: str) -> list[list[str]]:
    return [row for table in markdown_tables(text) for row in table]


def test_report_page(tmp_path):
    d = write_results(tmp_path / "r", synthetic=True)
    page = build_report([d], tmp_path / "rep")
    text = page.read_text()
    assert markdown_table(wall_clock_table(*frames())) in text        # the full table, verbatim
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"loss_vs_step.png", "loss_vs_time.png", "eval_vs_step.png"} <= set(links)
    for link in links:
        assert (page.parent / link).stat().st_size > 5000
    assert "SYNTHETIC DATA" in text
    rows = _rows(text)
    assert ["command", "esgd-bench run rosenbrock (hand-built test data)"] in rows      # meta.json
    assert ["rosenbrock", "sgd", "2", "diverged", "1"] in rows                          # the failed run
    assert "<summary>full resolved config</summary>" in text


def test_report_escapes_a_pipe_in_the_environment(tmp_path):
    d = write_results(tmp_path / "r")
    meta = (d / "meta.json").read_text().replace("hand-built test data", "a|b")
    (d / "meta.json").write_text(meta)
    rows = _rows(build_report([d], tmp_path / "rep").read_text())
    assert ["command", "esgd-bench run rosenbrock (a\\|b)"] in rows


def test_report_errors(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "rep")
    d = write_results(tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BenchError, match=re.escape(f"cannot write to report folder {tmp_path / 'file' / 'rep'}")):
        build_report([d], tmp_path / "file" / "rep")


def test_cli_report_plot_table(tmp_path):
    d = write_results(tmp_path / "r")
    res = runner.invoke(app, ["report", str(d), "--out", str(tmp_path / "rep"), "--title", "PR 12"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# PR 12")
    res = runner.invoke(app, ["plot", str(d), "--x", "time", "--metric", "eval", "--out", str(tmp_path / "p.svg")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.svg").stat().st_size > 5000
    res = runner.invoke(app, ["plot", str(d), "--log-y"])
    assert res.exit_code == 0 and (d / "loss_vs_step.png").is_file()
    res = runner.invoke(app, ["table", str(d), "--format", "markdown", "--out", str(tmp_path / "t.csv")])
    assert res.exit_code == 0 and (tmp_path / "t.csv").is_file()
    assert ["rosenbrock", "esgd-m", "2/2"] == _rows(res.stdout)[4][:3]
    res = runner.invoke(app, ["table", str(d), "--format", "csv", "--target-loss", "1"])
    assert res.exit_code == 0 and "loss <= 1" in res.output
    res = runner.invoke(app, ["table", str(d)], terminal_width=100)
    assert res.exit_code == 0 and "Cost per step: rosenbrock" in res.output and "1.56x" in res.output


@pytest.mark.parametrize("args", [
    ["plot", "{missing}"], ["plot", "{d}", "--x", "epoch"], ["plot", "{d}", "--metric", "acc"],
    ["plot", "{d}", "--out", "{d}/p.jpg"], ["plot", "{d}", "--out", "{missing}/p.png"],
    ["table", "{missing}"], ["table", "{d}", "--format", "html"], ["table", "{d}", "--out", "{d}/t.txt"],
    ["table", "{d}", "--target", "abc"], ["report", "{missing}"], ["report", "{d}", "--out", "{d}/metrics.csv"],
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args):
    d = write_results(tmp_path / "r")
    before = snapshot(d)
    args = [a.format(d=d, missing=tmp_path / "missing") for a in args]
    one_error(runner.invoke(app, args))
    assert snapshot(d) == before   # nothing lost, nothing added


def _command(name: str, d: Path, tmp_path: Path) -> list[str]:
    """``name`` on folder ``d``, writing its output outside ``d``."""
    return {"table": ["table", str(d)], "plot": ["plot", str(d), "--out", str(tmp_path / "p.png")],
            "report": ["report", str(d), "--out", str(tmp_path / "rep")]}[name]


@pytest.mark.parametrize("command", ["table", "plot", "report"])
def test_torn_summary_without_cells_is_one_error_naming_it(tmp_path, command):
    """A hand-built folder whose summary.csv lost the end of its last row: refused, naming the file."""
    d = write_results(tmp_path / "r")
    path = tear_summary(d)
    before = snapshot(d)
    message = one_error(runner.invoke(app, _command(command, d, tmp_path)))
    assert message.startswith(f"{path} is damaged: line 8")
    assert snapshot(d) == before
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("command", ["table", "plot", "report"])
@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_damaged_summary_with_cells_warns_and_counts_every_run(run_copy, tmp_path, command, damage):
    """A run folder's cell files are the truth: a torn or missing summary.csv is one warning line, and
    both runs still count as ok."""
    path = run_copy / "summary.csv"
    if damage == "torn":
        text = path.read_text().rstrip("\n")
        path.write_text(text[:len(text) - len(text.rsplit("\n", 1)[1]) // 2])
    else:
        path.unlink()
    res = runner.invoke(app, _command(command, run_copy, tmp_path)
                        + (["--format", "csv"] if command == "table" else []))
    assert res.exit_code == 0, res.output
    warnings = warning_lines(res)
    assert len(warnings) == 1 and str(path) in warnings[0] and res.stderr == warnings[0] + "\n"
    if command == "table":
        t = pd.read_csv(io.StringIO(res.stdout))
        assert (t["runs"].tolist(), t["runs_ok"].tolist()) == ([2], [2])
    elif command == "plot":
        assert (tmp_path / "p.png").stat().st_size > 5000
    else:
        text = (tmp_path / "rep" / "report.md").read_text()
        assert ["rosenbrock", "adam", "2/2"] == [r for r in _rows(text) if r[:2] == ["rosenbrock", "adam"]][0][:3]
        assert "did not finish cleanly" not in text


@pytest.mark.parametrize("command", ["table", "plot", "report"])
@pytest.mark.parametrize("name, text", [
    ("meta.json", "[1, 2]"), ("meta.json", '"a string"'), ("summary.csv", "a,b\n1,2\n"),
    ("metrics.csv", "a,b\n1,2\n"),
])
def test_foreign_file_is_one_error_naming_it(tmp_path, command, name, text):
    """Valid JSON that is not an object, a CSV with someone else's columns: one line naming the file."""
    d = write_results(tmp_path / "r")
    (d / name).write_text(text)
    before = snapshot(d)
    message = one_error(runner.invoke(app, _command(command, d, tmp_path)))
    assert str(d / name) in message
    assert snapshot(d) == before


@pytest.mark.parametrize("command", ["table", "plot", "report"])
def test_non_object_meta_of_run_folder_is_one_error_naming_it(run_copy, tmp_path, command):
    (run_copy / "meta.json").write_text("[1, 2]")
    before = snapshot(run_copy)
    message = one_error(runner.invoke(app, _command(command, run_copy, tmp_path)))
    assert str(run_copy / "meta.json") in message
    assert snapshot(run_copy) == before


def test_environment_table_leads_with_what_identifies_the_machine(run_copy):
    """The keys the page puts first are keys a run's meta.json really has, in that order."""
    from bench.readers import load_meta
    from bench.report import _FIRST, _flatten, environment_markdown
    meta = load_meta(run_copy)
    flat = _flatten(meta)
    present = [k for k in _FIRST if k in flat]
    assert present[:4] == ["command", "started", "finished", "environment.torch"]
    assert {"environment.cpu", "environment.git_commit", "jobs"} <= set(present)
    rows = [line.split("|")[1].strip() for line in environment_markdown(meta).splitlines()[2:]
            if line.startswith("|")]
    assert rows[:len(present)] == present
