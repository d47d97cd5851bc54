"""Loss and eval curves are written, non-empty, in every format; bad requests, and output paths the
system cannot take, fail with one clear error that names the path the user gave."""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.errors import BenchError, ResultsError
from bench.plots import FORMATS, curve_frame, plot_curves, plot_results, save_figure, smoothed
from bench.tables import add_labels
from cli import app
from tests.bench.fake_results import frames, one_error, snapshot, write_results

runner = CliRunner()

# What a file of each format starts with (or holds near its start).
MAGIC = {".png": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
         ".svg": lambda data: b"<svg" in data[:2000],
         ".pdf": lambda data: data.startswith(b"%PDF-")}


@pytest.mark.parametrize("x", ["step", "time", "both"])
@pytest.mark.parametrize("metric", ["loss", "eval"])
@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_written_and_non_empty(tmp_path, x, metric, suffix):
    d = write_results(tmp_path / "r")
    out = plot_results([d], tmp_path / f"curves{suffix}", x=x, metric=metric, log_y=metric == "loss")
    data = out.read_bytes()
    assert len(data) > 5000
    assert MAGIC[suffix](data)
    assert sorted(os.listdir(tmp_path)) == [f"curves{suffix}", "r"]     # no temporary file left behind


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_listed_is_written_in_that_format(tmp_path, suffix):
    assert suffix in MAGIC, f"no check for {suffix}"
    upper = tmp_path / f"c{suffix.upper()}"              # the suffix is read case-insensitively
    for path in (tmp_path / f"c{suffix}", upper):
        out = save_figure(plot_curves(*frames()), path)
        assert out == path and MAGIC[suffix](path.read_bytes()) and path.stat().st_size > 5000


def test_pdf_and_legend_and_synthetic_title(tmp_path):
    metrics, summary = frames(synthetic=True)
    fig = plot_curves(metrics, summary)
    ax = fig.axes[0]
    labels = ax.get_legend().get_texts()
    texts = [t.get_text() for t in labels]
    assert "esgd-m (mean of 2 seeds)" in texts and "sgd (mean of 3 seeds, 1 diverged)" in texts
    assert "band: min-max over seeds" in texts and "HVP step (Hessian-vector product)" in texts
    assert "SYNTHETIC DATA" in fig._suptitle.get_text()
    out = save_figure(fig, tmp_path / "c.pdf")
    assert out.read_bytes().startswith(b"%PDF")
    assert not plt.fignum_exists(fig.number)            # save_figure closes the figure
    fig = plot_curves(*frames(synthetic=False))
    assert "SYNTHETIC" not in fig._suptitle.get_text()
    plt.close(fig)


def test_curve_frame_means_over_seeds_and_marks_hvp_steps():
    metrics, summary = add_labels(*frames())
    c = curve_frame(metrics, value="loss", x="time").set_index(["label", "step"])
    # esgd-m step 2: losses 2 and 1.4, logged at 0.8/2 and 1.0/2 s
    assert c.loc[("esgd-m", 2), "mean"] == pytest.approx(1.7)
    assert (c.loc[("esgd-m", 2), "min"], c.loc[("esgd-m", 2), "max"]) == (1.4, 2.0)
    assert c.loc[("esgd-m", 2), "x"] == pytest.approx(0.45)
    assert bool(c.loc[("esgd-m", 2), "hvp"]) and not bool(c.loc[("esgd-m", 3), "hvp"])
    assert c.loc[("sgd", 1), "seeds"] == 3 and c.loc[("sgd", 2), "seeds"] == 2   # diverged seed stops
    ev = curve_frame(metrics, value="eval_dist").set_index(["label", "step"])
    assert sorted(set(ev.index.get_level_values("step"))) == [2, 4]


def test_smoothing_is_the_bias_corrected_ema():
    values = [4.0, 2.0, 3.0, 10.0, 1.0]
    for weight in (0.0, 0.5, 0.9):
        acc, want = 0.0, []
        for t, v in enumerate(values, start=1):           # Adam's correction of a zero-started average
            acc = weight * acc + (1 - weight) * v
            want.append(acc / (1 - weight ** t) if weight else v)
        assert smoothed(pd.Series(values), weight).tolist() == pytest.approx(want)


def test_loss_curves_are_smoothed_over_the_faint_raw_mean_and_both_axes_are_drawn():
    metrics, summary = frames()
    fig = plot_curves(metrics, summary, x="both", smooth=0.5)
    try:
        assert len(fig.axes) == 2 and [ax.get_xlabel() for ax in fig.axes] == [
            "optimizer step", "training wall-clock time (s)"]
        ax = fig.axes[0]
        raw = curve_frame(add_labels(metrics, summary)[0], value="loss").query("label == 'esgd-m'")["mean"]
        lines = [line for line in ax.get_lines() if line.get_color() == "tab:red" and line.get_linestyle() == "-"]
        faint, smooth = lines[0], lines[1]
        assert faint.get_alpha() < 0.5 and list(faint.get_ydata()) == pytest.approx(raw.tolist())
        assert list(smooth.get_ydata()) == pytest.approx(smoothed(raw.reset_index(drop=True), 0.5).tolist())
        assert any("EMA" in t.get_text() for t in ax.get_legend().get_texts())
    finally:
        plt.close(fig)
    fig = plot_curves(metrics, summary, metric="eval")        # evaluations are not smoothed
    try:
        assert not any("EMA" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    finally:
        plt.close(fig)


@pytest.mark.parametrize("smooth", ["1", "-0.1", "nan"])
def test_bad_smoothing_is_one_line(tmp_path, smooth):
    d = write_results(tmp_path / "r")
    result = runner.invoke(app, ["plot", str(d), "--smooth", smooth])
    assert result.exit_code == 2 and "--smooth must be in [0, 1)" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("bad, why", [("c.jpg", "unsupported file type '.jpg'"),
                                      ("c", "unsupported file type '(none)'"),
                                      ("missing/c.png", "does not exist")])
def test_bad_output_paths(tmp_path, bad, why):
    d = write_results(tmp_path / "r")
    with pytest.raises(BenchError, match=re.escape(why)):
        plot_results([d], tmp_path / bad)
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_missing_dir(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        plot_results([tmp_path / "none"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# Output paths the system refuses, each as the user would type it.
OUT_PATHS = {
    "name over 255 bytes": lambda tmp: tmp / ("a" * 300 + ".png"),
    "multibyte name over 255 bytes": lambda tmp: tmp / ("é" * 130 + ".png"),       # 260 bytes, 130 chars
    "path over 4096 bytes": lambda tmp: tmp.joinpath(*["d" * 200] * 22, "x.png"),
    "path over 4096 bytes through an existing folder": lambda tmp: Path(f"{tmp}/{'d/../' * 900}x.png"),
    "missing folder under /proc": lambda tmp: Path("/proc/nonexistent-dir/x.png"),
    "/proc itself": lambda tmp: Path("/proc/x.png"),
}


@pytest.mark.parametrize("command", ["plot", "table"])
@pytest.mark.parametrize("case", list(OUT_PATHS))
def test_unwritable_out_path_is_one_error_showing_it(tmp_path, command, case):
    d = write_results(tmp_path / "r")
    (tmp_path / "d").mkdir()
    out = OUT_PATHS[case](tmp_path)
    if command == "table":
        out = out.with_suffix(".csv")
    assert len(os.fsencode(out.name)) > 255 or len(os.fsencode(str(out))) > 4096 or str(out).startswith("/proc")
    before = snapshot(tmp_path)
    message = one_error(runner.invoke(app, [command, str(d), "--out", str(out)]))
    assert str(out) in message                            # the path as given ...
    assert ".tmp" not in message and ".part" not in message and ".write-test" not in message   # ... not a temp
    assert snapshot(tmp_path) == before
