"""Loss and eval curves are written, non-empty, in every format; bad requests fail with one clear error."""

from __future__ import annotations

import pytest

from bench.plots import FORMATS, curve_frame, plot_curves, plot_results, save_figure
from bench.tables import ReportError, add_labels
from tests.bench.fake_results import frames, write_results


@pytest.mark.parametrize("x", ["step", "time"])
@pytest.mark.parametrize("metric", ["loss", "eval"])
@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_written_and_non_empty(tmp_path, x, metric, suffix):
    d = write_results(tmp_path / "r")
    out = plot_results([d], tmp_path / f"curves{suffix}", x=x, metric=metric, log_y=metric == "loss")
    data = out.read_bytes()
    assert len(data) > 5000
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]
    assert not list(tmp_path.glob(".*.tmp"))   # the atomic save left no temp file behind


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
    fig = plot_curves(*frames(synthetic=False))
    assert "SYNTHETIC" not in fig._suptitle.get_text()


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


@pytest.mark.parametrize("bad", ["c.jpg", "c", "missing/c.png"])
def test_bad_output_paths(tmp_path, bad):
    d = write_results(tmp_path / "r")
    with pytest.raises(ValueError):
        plot_results([d], tmp_path / bad)


def test_missing_dir(tmp_path):
    with pytest.raises(ReportError):
        plot_results([tmp_path / "none"], tmp_path / "c.png")


def test_formats_listed():
    assert set(FORMATS) == {".png", ".svg", ".pdf"}
