"""The Markdown report holds the tables, links images that exist, and shows the environment; the CLI
commands plot/table/report work on result folders and fail with one line and exit 2 on bad input."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from bench.report import build_report
from bench.tables import ReportError, markdown_table, wall_clock_table
from cli import app
from tests.bench.fake_results import frames, write_results

runner = CliRunner()


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
    assert "| command | esgd-bench run rosenbrock (hand-built test data) |" in text   # meta.json
    assert "| sgd | 2 | diverged |" in text                                          # the failed run
    assert "<summary>full resolved config</summary>" in text


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "rep")
    d = write_results(tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="cannot create report folder"):
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
    assert res.exit_code == 0 and "| esgd-m | 2/2 |" in res.output and (tmp_path / "t.csv").is_file()
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
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    args = [a.format(d=d, missing=tmp_path / "missing") for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1 and "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before   # nothing lost
