"""The results store: atomic writes that never leave half a file, the loaders, the seed aggregation."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bench import results
from bench.results import (ResultsError, aggregate_summary, load_meta, load_metrics, load_summary,
                           write_csv_atomic, write_json_atomic)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_csv_roundtrip_and_atomic_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.csv"
    old = pd.DataFrame({"a": [1, 2], "b": [0.5, math.nan]})
    write_csv_atomic(old, path)
    back = pd.read_csv(path)
    assert back["a"].tolist() == [1, 2] and math.isnan(back["b"][1])

    def half_then_crash(self, fh, **kw):
        fh.write("a,b\n3,")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_csv_atomic(pd.DataFrame({"a": [3], "b": [4.0]}), path)
    monkeypatch.undo()
    assert pd.read_csv(path)["a"].tolist() == [1, 2]          # the old file, whole
    assert _leftovers(tmp_path) == []


def test_json_atomic_failure_at_rename(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_json_atomic({"x": math.nan, "p": tmp_path}, path)
    assert json.loads(path.read_text()) == {"x": None, "p": str(tmp_path)}

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic({"x": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text())["x"] is None
    assert _leftovers(tmp_path) == []


def test_loaders_many_dirs(tmp_path):
    dirs = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        write_csv_atomic(pd.DataFrame({"task": ["t"], "seed": [i]}), d / "summary.csv")
        write_csv_atomic(pd.DataFrame({"task": ["t", "t"], "step": [1, 2]}), d / "metrics.csv")
        write_json_atomic({"i": i}, d / "meta.json")
        dirs.append(d)
    s = load_summary(dirs)
    assert s["seed"].tolist() == [0, 1] and s["result_dir"].tolist() == [str(d) for d in dirs]
    assert len(load_metrics(dirs[0])) == 2 and set(load_metrics(dirs)["result_dir"]) == {str(d) for d in dirs}
    assert load_meta(dirs[1]) == {"i": 1}
    with pytest.raises(ResultsError, match="no summary.csv"):
        load_summary(tmp_path)
    with pytest.raises(ResultsError, match="no meta.json"):
        load_meta(tmp_path)


def test_aggregate_summary_maths():
    rows = [("adam", 0, 1.0, "ok"), ("adam", 1, 3.0, "ok"), ("adam", 2, math.nan, "diverged"),
            ("sgd", 0, 2.0, "ok")]
    df = results.summary_frame({"task": "t", "optimizer": o, "lr": 0.1, "seed": s, "final_loss": f,
                                "eval_metric": "acc", "eval_value": f / 10, "status": st,
                                "step_time_ms": 2 * f} for o, s, f, st in rows)
    agg = aggregate_summary(df).set_index("optimizer")
    assert agg.loc["adam", "runs"] == "2/3" and agg.loc["adam", "statuses"] == "diverged"
    assert agg.loc["adam", "final_loss_mean"] == pytest.approx(2.0)
    assert agg.loc["adam", "final_loss_std"] == pytest.approx(math.sqrt(2.0))     # sample std
    assert agg.loc["adam", "step_time_ms_mean"] == pytest.approx(4.0)
    assert agg.loc["sgd", "final_loss_mean"] == 2.0 and math.isnan(agg.loc["sgd", "final_loss_std"])
    assert list(df.columns[:len(results.SUMMARY_COLUMNS)]) == results.SUMMARY_COLUMNS
