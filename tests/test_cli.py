"""The esgd-bench command line through Typer's CliRunner: good paths and every bad input (one line, exit 2)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import tasks
from bench.optimizers import list_optimizers
from bench.store import METRICS_COLUMNS, SUMMARY_COLUMNS
from cli import app

runner = CliRunner(env={"COLUMNS": "250"})
STEPS = "30"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.startswith("esgd-bench ")


def test_run_writes_the_store(tmp_path):
    out = tmp_path / "d"
    res = invoke("run", "rosenbrock", "--opt", "esgd-m", "--opt", "esgd", "--opt", "sgd", "--opt", "adam",
                 "--seeds", 2, "--steps", STEPS, "--out", out)
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout and "mean ± std" in res.stdout
    summary, metrics = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "metrics.csv")
    meta = json.loads((out / "meta.json").read_text())
    assert set(SUMMARY_COLUMNS) <= set(summary.columns) and set(METRICS_COLUMNS) <= set(metrics.columns)
    assert len(summary) == 8 and (summary["status"] == "ok").all()
    esgd_m = summary[summary["optimizer"] == "esgd-m"]
    assert (esgd_m["hvp_steps"] > 0).all() and (esgd_m["hvp_time_ms"] > 0).all()
    assert summary[summary["optimizer"].isin(["sgd", "adam"])]["hvp_time_ms"].isna().all()
    assert len(metrics) == 8 * int(STEPS)
    for key in ("command", "config", "environment", "data_sources", "started", "finished", "jobs"):
        assert meta[key] is not None
    assert json.loads((out / "manifest.json").read_text())["kind"] == "esgd-bench results"
    assert len(list((out / "cells").glob("*.json"))) == 8
    assert meta["environment"]["torch"] == torch.__version__ and meta["config"]["steps"] == int(STEPS)


def test_run_two_tasks_config_file_and_options(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'opt = ["adam:lr=0.1"]\nseeds = 1\nsteps = {STEPS}\n[options]\n"rosenbrock.dim" = "4"\n')
    out = tmp_path / "two"
    res = invoke("run", "rosenbrock", "quadratic", "--config", cfg, "--out", out, "--option", "quadratic.dim=3")
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(out / "summary.csv")
    assert summary["task"].tolist() == ["rosenbrock", "quadratic"] and (summary["lr"] == 0.1).all()
    assert summary["optimizer"].tolist() == ["adam:lr=0.1"] * 2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tasks"]["rosenbrock"]["parameters"] == 4 and meta["tasks"]["quadratic"]["parameters"] == 3


def test_sweep_reports_best_lr(tmp_path):
    out = tmp_path / "s"
    res = invoke("sweep", "rosenbrock", "--opt", "sgd", "--lrs", "1e-4,1e-3,1", "--seeds", 1, "--steps", STEPS,
                 "--out", out)
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["lr"]) == [1e-4, 1e-3, 1.0]
    assert summary.set_index("lr").loc[1.0, "status"] == "diverged"
    assert "best lr for sgd on rosenbrock: 0.001" in res.stdout
    assert "diverged: rosenbrock sgd:lr=1 seed 0" in res.stderr or "diverged: rosenbrock sgd seed 0" in res.stderr


def test_run_with_a_diverged_optimizer_exits_1_and_keeps_the_rest(tmp_path):
    out = tmp_path / "d"
    res = invoke("run", "rosenbrock", "--opt", "sgd:lr=1", "--opt", "adam", "--seeds", 1, "--steps", STEPS,
                 "--out", out)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("diverged:")]
    assert len(lines) == 1 and "sgd:lr=1 seed 0" in lines[0] and "Traceback" not in res.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["status"]) == ["diverged", "ok"]


def test_resume_skips_finished(tmp_path):
    out = tmp_path / "r"
    assert invoke("run", "rosenbrock", "--opt", "adam", "--seeds", 1, "--steps", STEPS, "--out", out).exit_code == 0
    first = pd.read_csv(out / "summary.csv")
    res = invoke("run", "rosenbrock", "--opt", "adam", "--opt", "sgd", "--seeds", 1, "--steps", STEPS,
                 "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(out / "summary.csv")
    assert summary["optimizer"].tolist() == ["adam", "sgd"]
    assert summary.iloc[0]["wall_time_s"] == first.iloc[0]["wall_time_s"]      # not re-run


def test_ctrl_c_exits_130_and_keeps_the_store(tmp_path, monkeypatch):
    import bench.display

    def interrupt(self, cell, step, loss):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.display.RichReporter, "update", interrupt)
    out = tmp_path / "i"
    res = invoke("run", "rosenbrock", "--opt", "adam", "--opt", "sgd", "--seeds", 1, "--steps", STEPS, "--out", out)
    assert res.exit_code == 130 and "interrupted" in res.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert summary["status"].tolist() == ["interrupted"] and len(pd.read_csv(out / "metrics.csv")) == 1


@pytest.mark.parametrize("kind, names", [("tasks", [t.name for t in tasks.list_tasks()]),
                                         ("optimizers", [o.name for o in list_optimizers()])])
def test_registry_tables(kind, names):
    res = invoke(kind)
    assert res.exit_code == 0
    for name in names:
        assert name in res.stdout
    one = invoke(kind, names[0])
    assert one.exit_code == 0 and names[0] in one.stdout


def _bad_inputs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    unknown_key = tmp_path / "k.json"
    unknown_key.write_text('{"stepz": 3}')
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "manifest.json").write_text('{"kind": "esgd-bench results", "format": 2}')
    (taken / "cells").mkdir()
    (taken / "cells" / "x.json").write_text('{"summary": {"task": "rosenbrock", "optimizer": "adam", "lr": 1, '
                                             '"seed": 0, "status": "ok"}}')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.csv").write_text("mine\n")
    lazy_bool = tmp_path / "lazy.json"
    lazy_bool.write_text('{"synthetic": "no"}')
    run = ["run", "rosenbrock", "--steps", "5", "--out", str(tmp_path / "o")]
    return [
        (["run", "rosenbrok"], "Did you mean 'rosenbrock'"),
        (run + ["--opt", "adamm"], "Did you mean 'adam'"),
        (run + ["--opt", "adam:lrr=1"], "Did you mean 'lr'"),
        (run + ["--opt", "adam:lr=x"], "bad value for lr"),
        (["run", "rosenbrock", "--steps", "abc"], "--steps"),
        (run + ["--steps", "0"], "--steps"),
        (run + ["--seeds", "-1"], "--seeds"),
        (run + ["--lr", "-1"], "--lr"),
        (run + ["--lr", "inf"], "--lr"),
        (run + ["--jobs", "0"], "--jobs"),
        (run + ["--device", "tpu"], "--device"),
        (["run", "rosenbrock", "--out", str(blocker / "sub")], "cannot write"),
        (["run", "rosenbrock", "--out", str(taken)], "--resume"),
        (run + ["--option", "dim"], "key=value"),
        (run + ["--option", "width=64"], "no option 'width'"),
        (run + ["--option", "dim=abc"], "dim"),
        (run + ["--config", str(tmp_path / "missing.json")], "--config"),
        (run + ["--config", str(bad_json)], "not valid JSON"),
        (run + ["--config", str(unknown_key)], "stepz"),
        (run + ["--config", str(lazy_bool)], "'synthetic' in --config"),
        (["run", "rosenbrock", "--out", str(foreign)], "did not write"),
        (run + ["--seeds", "100000000"], "at most 100,000"),
        (run + ["--jobs", "64"], "CPUs"),
        (["run", "mnist", "--nproc", "64", "--out", str(tmp_path / "o")], "CPUs"),
        (["run", "mnist", "--opt", "adam", "--opt", "esgd-m-sub", "--accumulate", "2", "--out", str(tmp_path / "o")],
         "hvp_fraction"),
        (["run", "mnist", "--batch-size", "100000", "--out", str(tmp_path / "o")], "batch size"),
        (["run", "mnist", "--option", "eval_size=-5", "--out", str(tmp_path / "o")], "eval_size=-5"),
        (["sweep", "rosenbrock", "--opt", "sgd", "--lrs", ",,,"], "--lrs is empty"),
        (["sweep", "rosenbrock"], "--opt"),
        (["sweep", "rosenbrock", "--opt", "sgd", "--lrs", "1e-3,abc"], "--lrs"),
        (["sweep", "rosenbrock", "--opt", "sgd:lr=1"], "fixes lr"),
        (["tasks", "nosuch*"], "no task matches"),
        (["optimizers", "nosuch*"], "no optimizer matches"),
        (["run", "cifar", "--data-dir", str(tmp_path / "empty"), "--steps", "1"], "CIFAR"),
        (["run"], "Missing argument"),
        (["run", "rosenbrock", "--bogus"], "No such option"),
    ] + ([] if torch.cuda.is_available() else [(run + ["--device", "cuda"], "CUDA is not available")])


def test_bad_inputs_one_line_exit_2(tmp_path):
    for args, fragment in _bad_inputs(tmp_path):
        res = invoke(*args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2, (args, res.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, res.stderr)
        assert "Traceback" not in res.output
        assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["metrics.csv"]


@pytest.mark.parametrize("entry, needle", [
    ({"synthetic": "no"}, "'synthetic' in --config"), ({"resume": "no"}, "'resume' in --config"),
    ({"download": "false"}, "'download' in --config"), ({"optimizers": 3}, "'optimizers' in --config"),
    ({"device": 1}, "'device' in --config"), ({"out": 5}, "'out' in --config"),
    ({"data_dir": []}, "'data_dir' in --config"), ({"seeds": "3"}, "'seeds' in --config"),
    ({"options": 3}, "'options' in --config"), ({"steps": True}, "'steps' in --config"),
    ({"opt": ["adam", 7]}, "'optimizers' in --config"),
])
def test_config_values_are_type_checked(tmp_path, entry, needle):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(entry))
    res = invoke("run", "rosenbrock", "--steps", "2", "--out", tmp_path / "o", "--config", path)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_help_and_version_import_nothing_heavy():
    """A command-line tool answers --help at once: neither torch nor pandas is imported for it."""
    import subprocess
    import sys
    code = ("import sys\nfrom typer.testing import CliRunner\nimport cli\n"
            "for args in (['--help'], ['--version'], ['run', '--help']):\n"
            "    assert CliRunner().invoke(cli.app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
