"""The results store and its readers: atomic writes that never leave half a file or a temporary file,
reading results folders back (hand-built ones and ones written by a run; torn, foreign and duplicate
input), the seed aggregation, and a full disk in the middle of a run."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench import store
from bench.errors import BenchError, ResultsError, StoreWriteError
from bench.readers import ResultsWarning, aggregate_summary, load_meta, load_results
from bench.store import summary_frame, write_csv, write_figure, write_json, write_text
from cli import app
from tests.bench.fake_results import (CUTS, TINY_RUN, frames, run_copy, run_folder,  # noqa: F401
                                      tear_summary, write_results)

runner = CliRunner()
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- writing ------------------------------------------------------------------------------------------------
def test_csv_roundtrip(tmp_path):
    path = tmp_path / "summary.csv"
    write_csv(pd.DataFrame({"a": [1, 2], "b": [0.5, math.nan]}), path)
    back = pd.read_csv(path)
    assert back["a"].tolist() == [1, 2] and math.isnan(back["b"][1])
    assert sorted(os.listdir(tmp_path)) == ["summary.csv"]


def test_json_non_finite_and_paths(tmp_path):
    path = tmp_path / "meta.json"
    write_json({"x": math.nan, "y": -math.inf, "p": tmp_path, "t": (1, 2)}, path)
    assert json.loads(path.read_text()) == {"x": None, "y": None, "p": str(tmp_path), "t": [1, 2]}


def test_half_written_csv_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.csv"
    write_csv(pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}), path)
    before = path.read_bytes()

    def half_then_crash(self, fh, **kw):
        fh.write("a,b\n3,")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(StoreWriteError) as info:
        write_csv(pd.DataFrame({"a": [3], "b": [4.0]}), path)
    monkeypatch.undo()
    assert str(info.value) == f"cannot write {path}: No space left on device"    # the target, not a temp
    assert info.value.exit_code == 1
    assert path.read_bytes() == before                                            # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["summary.csv"]                        # no temporary file


def _figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


# Each writer, the file it replaces, and what a failure must leave behind.
WRITERS = {
    "csv": ("summary.csv", lambda p: write_csv(pd.DataFrame({"a": [3]}), p)),
    "json": ("meta.json", lambda p: write_json({"x": 2}, p)),
    "text": ("table.md", lambda p: write_text(p, "| new |\n")),
    "figure": ("curves.png", lambda p: write_figure(_figure(), p)),
}


def _fail_with(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_failed_write_leaves_old_file_and_names_target(tmp_path, monkeypatch, writer, where):
    name, write = WRITERS[writer]
    path = tmp_path / name
    path.write_bytes(b"old contents\n")
    monkeypatch.setattr(store.os, where, _fail_with(ENOSPC))
    with pytest.raises(StoreWriteError) as info:
        write(path)
    monkeypatch.undo()
    plt.close("all")
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert path.read_bytes() == b"old contents\n"
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_ctrl_c_at_replace_leaves_old_file_and_no_temporary(tmp_path, monkeypatch, writer):
    name, write = WRITERS[writer]
    path = tmp_path / name
    path.write_bytes(b"old contents\n")
    monkeypatch.setattr(store.os, "replace", _fail_with(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(path)
    monkeypatch.undo()
    plt.close("all")
    assert path.read_bytes() == b"old contents\n"
    assert sorted(os.listdir(tmp_path)) == [name]


def test_write_into_missing_folder_names_target(tmp_path):
    path = tmp_path / "missing" / "summary.csv"
    with pytest.raises(StoreWriteError, match=re.escape(f"cannot write {path}: No such file or directory")):
        write_csv(pd.DataFrame({"a": [1]}), path)


# -- reading ------------------------------------------------------------------------------------------------
def test_load_results_of_hand_built_folders(tmp_path):
    dirs = [write_results(tmp_path / "r0"), write_results(tmp_path / "r1", task="quadratic")]
    results = load_results(dirs)
    metrics, summary = frames()
    assert len(results.summary) == 2 * len(summary) and len(results.metrics) == 2 * len(metrics)
    assert results.summary["result_dir"].tolist() == [str(dirs[0])] * 7 + [str(dirs[1])] * 7
    assert set(results.metrics["result_dir"]) == {str(d) for d in dirs}
    assert [m["result_dir"] for m in results.metas] == [str(d) for d in dirs]
    assert results.metas[0]["threads"] == 2 and results.metas[1]["config"]["task"] == "quadratic"
    assert load_meta(dirs[1])["config"] == {"task": "quadratic", "steps": 4}


def test_load_results_of_a_run_folder(run_folder):
    d = run_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResultsWarning)       # merged files agree with the cells
        results = load_results([d])
    assert results.summary["seed"].tolist() == [0, 1] and set(results.summary["status"]) == {"ok"}
    assert len(results.metrics) == 2 * 5
    assert results.metas[0]["config"]["steps"] == 5


def test_load_errors(tmp_path):
    with pytest.raises(ResultsError, match=re.escape(f"results folder {tmp_path / 'nope'} does not exist")):
        load_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="is not an esgd-bench results folder"):
        load_results([tmp_path / "empty"])
    with pytest.raises(ResultsError, match="no results folder given"):
        load_results([])
    with pytest.raises(ResultsError, match="no meta.json"):
        load_meta(tmp_path / "empty")
    assert issubclass(ResultsError, BenchError)


@pytest.mark.parametrize("where", list(CUTS))
def test_torn_summary_of_hand_built_folder_is_an_error(tmp_path, where):
    """Without cell files the merged summary is all there is: a torn one is refused, naming the file,
    instead of counting the cut run as failed or leaving it out."""
    d = write_results(tmp_path / "r")
    path = tear_summary(d, where)
    with pytest.raises(ResultsError, match=re.escape(f"{path} is damaged: line 8 ")):
        load_results([d])


def test_torn_summary_that_keeps_key_and_status_is_an_error(tmp_path):
    """A cut after the status keeps the cell key and status but loses the fields after them, here
    ``synthetic`` (the report would drop its SYNTHETIC DATA banner): the last row has fewer fields than
    the header and the file no final newline, so it is refused as well."""
    d = write_results(tmp_path / "r", synthetic=True)
    path = d / "summary.csv"
    head, last = path.read_text().rstrip("\n").rsplit("\n", 1)
    path.write_text(head + "\n" + last[:last.index(",ok,") + len(",ok,none (ana")])
    with pytest.raises(ResultsError, match=re.escape(f"{path} is damaged: line 8 ")):
        load_results([d])


def test_torn_metrics_of_hand_built_folder_is_an_error(tmp_path):
    """The last metrics row cut inside a number (eval_dist 0.003 cut to ``0.``) must not be read as
    another value (0.0 reaches any lower-is-better target)."""
    d = write_results(tmp_path / "r")
    path = d / "metrics.csv"
    head, last = path.read_text().rstrip("\n").rsplit("\n", 1)
    assert last.endswith(",0.003,0.7")
    path.write_text(head + "\n" + last[:len(last) - len("003,0.7")])
    with pytest.raises(ResultsError, match=re.escape(f"{path} is damaged: line {len(frames()[0]) + 1} ")):
        load_results([d])


@pytest.mark.parametrize("damage", ["torn", "deleted", "foreign"])
def test_damaged_summary_of_run_folder_reads_the_cells(run_copy, damage):
    d = run_copy
    path = d / "summary.csv"
    if damage == "torn":
        text = path.read_text().rstrip("\n")
        path.write_text(text[:len(text) - len(text.rsplit("\n", 1)[1]) // 2])
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_text("a,b\n1,2\n")
    with pytest.warns(ResultsWarning) as caught:
        results = load_results([d])
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert results.summary["status"].tolist() == ["ok", "ok"] and len(results.metrics) == 10


@pytest.mark.parametrize("name, text, why", [
    ("meta.json", "[1, 2]", "expected a JSON object, found list"),
    ("meta.json", '"text"', "expected a JSON object, found str"),
    ("meta.json", "null", "expected a JSON object, found NoneType"),
    ("meta.json", "{", "not valid JSON"),
    ("summary.csv", "a,b\n1,2\n", "is not an esgd-bench summary file (no column task, optimizer, lr, seed, status)"),
    ("metrics.csv", "a,b\n1,2\n", "is not an esgd-bench metrics file (no column task, optimizer, lr, seed, step)"),
])
def test_foreign_file_is_an_error_naming_it(tmp_path, name, text, why):
    d = write_results(tmp_path / "r")
    (d / name).write_text(text)
    with pytest.raises(ResultsError) as info:
        load_results([d])
    assert str(d / name) in str(info.value) and why in str(info.value)
    assert "\n" not in str(info.value)


def test_non_object_meta_of_run_folder_is_an_error(run_copy):
    d = run_copy
    (d / "meta.json").write_text("[1, 2]")
    with pytest.raises(ResultsError, match=re.escape(f"{d / 'meta.json'} is not an esgd-bench file")):
        load_results([d])


@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink"])
def test_folder_given_twice_is_read_once(tmp_path, spelling):
    d = write_results(tmp_path / "r")
    (tmp_path / "sub").mkdir()
    other = {"same": str(d), "dot": f"{d}/.", "dotdot": str(tmp_path / "sub" / ".." / "r"),
             "symlink": str(tmp_path / "link")}[spelling]
    if spelling == "symlink":
        os.symlink(d, other)
    with pytest.warns(ResultsWarning, match="is given more than once") as caught:
        results = load_results([d, other])
    assert len([w for w in caught if w.category is ResultsWarning]) == 1   # pandas < 2.0.2 adds numpy's own
    assert len(results.summary) == 7 and len(results.metrics) == len(frames()[0]) and len(results.metas) == 1


def test_same_cells_in_two_folders_are_counted_once(tmp_path):
    d = write_results(tmp_path / "r")
    copy = shutil.copytree(d, tmp_path / "copy")
    with pytest.warns(ResultsWarning, match=r"7 cell\(s\) of .*copy") as caught:
        results = load_results([d, copy])
    assert len([w for w in caught if w.category is ResultsWarning]) == 1   # pandas < 2.0.2 adds numpy's own
    assert len(results.summary) == 7 and set(results.summary["result_dir"]) == {str(d)}
    assert len(results.metrics) == len(frames()[0]) and set(results.metrics["result_dir"]) == {str(d)}


# -- aggregation --------------------------------------------------------------------------------------------
def test_aggregate_summary_maths():
    rows = [("adam", 0, 1.0, "ok"), ("adam", 1, 3.0, "ok"), ("adam", 2, math.nan, "diverged"),
            ("sgd", 0, 2.0, "ok")]
    df = summary_frame({"task": "t", "optimizer": o, "lr": 0.1, "seed": s, "final_loss": f,
                        "eval_metric": "acc", "eval_value": f / 10, "status": st,
                        "step_time_ms": 2 * f} for o, s, f, st in rows)
    agg = aggregate_summary(df).set_index("optimizer")
    assert agg.loc["adam", "runs"] == "2/3" and agg.loc["adam", "statuses"] == "diverged"
    assert agg.loc["adam", "final_loss_mean"] == pytest.approx(2.0)
    assert agg.loc["adam", "final_loss_std"] == pytest.approx(math.sqrt(2.0))     # sample std
    assert agg.loc["adam", "step_time_ms_mean"] == pytest.approx(4.0)
    assert agg.loc["sgd", "final_loss_mean"] == 2.0 and math.isnan(agg.loc["sgd", "final_loss_std"])
    assert list(df.columns[:len(store.SUMMARY_COLUMNS)]) == store.SUMMARY_COLUMNS


# -- a full disk during a run -------------------------------------------------------------------------------
@pytest.mark.parametrize("cell_file", [".csv", ".json"])
def test_full_disk_during_a_run_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, cell_file):
    """The disk fills up while a cell's file is written: one ``error:`` line, exit 1, and the files
    written before (manifest.json, meta.json, summary.csv) are whole; the folder can be resumed."""
    real_fsync = os.fsync
    synced = []

    def fsync(fd):
        """The real fsync, except for the chosen file of the first cell: the disk is full."""
        target = os.readlink(f"/proc/self/fd/{fd}")        # the temporary file being written
        if os.path.basename(os.path.dirname(target)) == "cells":
            synced.append(target)
            if cell_file == ".csv" or len(synced) == 2:     # a cell writes its .csv, then its .json
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    out = tmp_path / "run"
    monkeypatch.setattr(store.os, "fsync", fsync)
    res = runner.invoke(app, ["run", "rosenbrock", "--opt", "adam", "--seeds", "1", "--steps", "5",
                              "--out", str(out)])
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(out / "cells") in errors[0]
    assert json.loads((out / "manifest.json").read_text())["kind"] == "esgd-bench results"
    assert isinstance(json.loads((out / "meta.json").read_text())["config"], dict)
    assert pd.read_csv(out / "summary.csv").columns.tolist()[:4] == ["task", "optimizer", "opt_name", "lr"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]      # no temporary file left
    assert not list((out / "cells").glob("*.json"))                            # the cell never committed

    res = runner.invoke(app, TINY_RUN[:4] + ["--seeds", "1", "--steps", "5", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert load_results([out]).summary["status"].tolist() == ["ok"]
