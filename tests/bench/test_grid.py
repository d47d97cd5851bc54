"""The benchmark grid: planning, the results folder it keeps, resume, ownership, locking and jobs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bench.config import make_config
from bench.errors import BenchError, RunInterrupted
from bench.grid import Reporter, best_lrs, lr_grid, plan_cells, run_benchmark
from bench.optimizers import default_lr, get_optimizer, parse_optimizer
from bench.readers import load_meta, load_results
from bench.store import METRICS_COLUMNS, ResultsFolder
from bench.train import train

STEPS = 30

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def config(tmp_path, **kw):
    settings = dict(tasks=["rosenbrock"], optimizers=["esgd-m", "sgd:lr=1", "adam"], seeds=2, steps=STEPS,
                    out=tmp_path / "r", eval_every=10)
    settings.update(kw)
    return make_config(settings)


class _Stopper(Reporter):
    """Ctrl-C while cell number ``at`` (0-based) runs; counts the cells that started."""

    def __init__(self, at=None):
        self.at, self.started, self.seen = at, [], set()

    def update(self, cell, step, loss):
        if cell.key not in self.seen:
            self.seen.add(cell.key)
            self.started.append(cell)
        if self.at is not None and len(self.started) - 1 == self.at:
            raise KeyboardInterrupt


def test_benchmark_store_interrupt_and_resume(tmp_path):
    cfg = config(tmp_path)
    out = cfg.out
    with pytest.raises(RunInterrupted) as stop:
        run_benchmark(cfg, reporter=_Stopper(at=4), argv=["esgd-bench", "test"])
    assert stop.value.exit_code == 130
    res = load_results([out])
    assert res.summary["status"].tolist() == ["ok", "ok", "diverged", "diverged", "interrupted"]
    assert set(METRICS_COLUMNS) <= set(res.metrics.columns) and "eval_dist" in res.metrics.columns
    assert len(res.metrics[res.metrics.optimizer == "adam"]) > 0     # the interrupted cell's steps are kept
    meta = load_meta(out)
    assert meta["command"] == "esgd-bench test" and meta["jobs"] == 1 and meta["finished"]

    with pytest.raises(BenchError, match="--resume"):
        run_benchmark(cfg)                                         # never clobbers a folder silently
    with pytest.raises(BenchError, match="steps"):
        run_benchmark(config(tmp_path, steps=STEPS + 1, resume=True))

    again = _Stopper()
    result = run_benchmark(config(tmp_path, resume=True), reporter=again)
    assert [(c.optimizer.label, c.seed) for c in again.started] == [("adam", 0), ("adam", 1)]
    assert result.summary["status"].tolist() == ["ok", "ok", "diverged", "diverged", "ok", "ok"]
    m = result.metrics
    assert len(m[(m.optimizer == "adam") & (m.seed == 0)]) == STEPS    # the partial rows were replaced
    assert len(load_meta(out)["sessions"]) == 2
    assert load_results([out]).summary.equals(result.summary.assign(result_dir=str(out))) or \
        load_results([out]).summary["status"].tolist() == result.summary["status"].tolist()


@pytest.mark.parametrize("key, first, second", [
    ("compile", dict(), dict(compile=True)),
    ("accumulate", dict(tasks=["mnist"], batch_size=32, options={"width": 8}),
     dict(tasks=["mnist"], batch_size=32, options={"width": 8}, accumulate=2)),
    ("data_dir", dict(), dict(data_dir="elsewhere")),
    ("download", dict(), dict(download=True)),
    ("synthetic", dict(tasks=["mnist"], options={"width": 8}), dict(tasks=["mnist"], options={"width": 8},
                                                                     synthetic=True)),
])
def test_resume_refuses_settings_that_change_what_a_cell_computes(tmp_path, key, first, second):
    run_benchmark(config(tmp_path, optimizers=["adam"], seeds=1, steps=2, **first))
    before = (tmp_path / "r" / "summary.csv").read_bytes()
    with pytest.raises(BenchError, match=f"--resume: .* made with {key}="):
        run_benchmark(config(tmp_path, optimizers=["adam", "sgd"], seeds=1, steps=2, resume=True, **second))
    assert (tmp_path / "r" / "summary.csv").read_bytes() == before


def test_resume_refuses_another_data_source(tmp_path):
    run_benchmark(config(tmp_path, tasks=["mnist"], optimizers=["adam"], seeds=1, steps=2, options={"width": 8}))
    meta_path = tmp_path / "r" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tasks"]["mnist"]["data_source"] = "mnist-torchvision (60,000 train / 10,000 test)"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BenchError, match="trained on 'mnist-torchvision"):
        run_benchmark(config(tmp_path, tasks=["mnist"], optimizers=["adam"], seeds=2, steps=2,
                             options={"width": 8}, resume=True))


def test_a_folder_with_files_the_suite_did_not_write_is_not_written_into(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.csv").write_text("mine\n1\n")
    (out / "meta.json").write_text('{"mine": true}')
    with pytest.raises(BenchError, match="did not write .*--force"):
        run_benchmark(config(tmp_path, optimizers=["adam"], seeds=1, steps=2))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "metrics.csv"]
    assert (out / "metrics.csv").read_text() == "mine\n1\n"
    run_benchmark(config(tmp_path, optimizers=["adam"], seeds=1, steps=2, force=True))
    assert load_results([out]).summary["status"].tolist() == ["ok"]


def test_a_results_folder_that_lost_its_summary_keeps_every_cell(tmp_path):
    run_benchmark(config(tmp_path, optimizers=["adam", "sgd"], seeds=1, steps=3))
    out = tmp_path / "r"
    (out / "summary.csv").unlink()
    before = (out / "metrics.csv").read_text()
    with pytest.raises(BenchError, match="already holds results"):      # a plain rerun is refused...
        run_benchmark(config(tmp_path, optimizers=["esgd-m"], seeds=1, steps=3))
    assert (out / "metrics.csv").read_text() == before                  # ...and writes nothing
    result = run_benchmark(config(tmp_path, optimizers=["adam", "sgd", "esgd-m"], seeds=1, steps=3, resume=True))
    assert result.summary["optimizer"].tolist() == ["adam", "sgd", "esgd-m"]
    assert len(result.metrics) == 9


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    cfg = config(tmp_path, optimizers=["adam"], seeds=1, steps=2)
    with ResultsFolder.open(cfg.out):
        with pytest.raises(BenchError, match="being written by another esgd-bench process"):
            run_benchmark(make_config(dict(tasks=["rosenbrock"], optimizers=["sgd"], seeds=1, steps=2,
                                           out=cfg.out, resume=True)))
    run_benchmark(cfg)          # the lock goes with the first writer


@pytest.mark.parametrize("spawn", [False, True])
def test_parallel_jobs(tmp_path, monkeypatch, spawn):
    """Workers from the fork server, and spawned ones (what CUDA cells get): the same losses."""
    if spawn:
        from bench import executors
        asked = []

        def context(preload, *, cuda=False):
            asked.append(cuda)
            return executors.mp.get_context("spawn")
        monkeypatch.setattr(executors, "process_context", context)
    result = run_benchmark(config(tmp_path, optimizers=["esgd-m", "adam"], seeds=1, jobs=2))
    if spawn:
        assert asked == [False]          # CPU cells; CUDA ones would ask for spawn themselves
    s = result.summary
    assert s["optimizer"].tolist() == ["esgd-m", "adam"] and (s["status"] == "ok").all()
    assert len(result.metrics) == 2 * STEPS and load_meta(result.out)["jobs"] == 2
    serial = train("rosenbrock", "esgd-m", seed=0, steps=STEPS)
    assert result.metrics.query("optimizer == 'esgd-m'")["loss"].tolist() == \
        pytest.approx([r["loss"] for r in serial.rows])


def test_cuda_cells_ask_for_spawned_workers(monkeypatch):
    from bench import executors
    from bench.train import Cell
    from tasks import TaskConfig
    asked = []

    def context(preload, *, cuda=False):
        asked.append(cuda)
        raise RuntimeError("stop here")
    monkeypatch.setattr(executors, "process_context", context)
    for device in ("cpu", "cuda"):
        cell = Cell("rosenbrock", parse_optimizer("adam"), 0.1, 0, 3, task_config=TaskConfig(device=device))
        with pytest.raises(RuntimeError, match="stop here"):
            executors.Pool(2).run([cell], lambda *a: None, lambda *a: None)
    assert asked == [False, True]


@pytest.mark.parametrize("kw, fragment", [
    (dict(batch_size=100_000, tasks=["mnist"]), "batch size must be between 1 and the 4,000"),
    (dict(options={"eval_size": "-5"}, tasks=["mnist"]), "eval_size=-5 must be >= 0"),
    (dict(options={"width": "1000000"}, tasks=["mnist"]), "out of memory while building the task"),
])
def test_a_task_that_cannot_train_fails_before_any_cell(tmp_path, kw, fragment):
    with pytest.raises(Exception, match=fragment):
        run_benchmark(config(tmp_path, optimizers=["adam"], seeds=1, steps=2, **kw))
    assert not (tmp_path / "r").exists()


def test_sweep_grid_and_best():
    assert lr_grid(parse_optimizer("esgd-m")) == [0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0]
    grid = lr_grid(parse_optimizer("adam"), "mnist")
    assert len(grid) == 7 and grid[3] == pytest.approx(default_lr(get_optimizer("adam"), "mnist"))
    cells = plan_cells(make_config(dict(tasks=["rosenbrock"], optimizers=["sgd"], seeds=2, lrs=[0.1, 1.0]),
                                   sweep=True))
    assert [(c.lr, c.seed) for c in cells] == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    # Rosenbrock has no validation data: the rule is the mean training loss over the last 10% of steps.
    summary = pd.DataFrame({"task": "rosenbrock", "optimizer": "sgd", "lr": [0.1, 0.1, 1.0, 1.0, 3.0, 3.0],
                            "seed": [0, 1] * 3, "tail_loss": [2.0, 4.0, 1.0, 2.0, 0.1, math.nan],
                            "final_loss": [0.0, 0.0, 9.0, 9.0, 0.0, 0.0],
                            "status": ["ok", "ok", "ok", "ok", "ok", "diverged"]})
    best = best_lrs(summary).set_index("lr")
    assert best.loc[0.1, "score"] == 3.0 and math.isnan(best.loc[3.0, "score"])   # a diverged seed fails the lr
    assert (best["criterion"] == "tail_loss").all() and best["best"].tolist() == [False, True, False]


@pytest.mark.parametrize("task", ["mnist", "mnist-cnn", "cifar"])
def test_a_sweep_picks_by_the_validation_metric_where_training_loss_disagrees(task):
    # lr 0.1 trains to the lower loss but validates worse: it overfits.  The pick is lr 0.01.
    summary = pd.DataFrame({"task": task, "optimizer": "adam", "lr": [0.01, 0.01, 0.1, 0.1],
                            "seed": [0, 1] * 2, "final_loss": [0.5, 0.6, 0.01, 0.02],
                            "tail_loss": [0.5, 0.6, 0.01, 0.02], "eval_value": [0.95, 0.93, 0.90, 0.91],
                            "test_value": [0.5, 0.5, 0.99, 0.99], "status": "ok"})
    best = best_lrs(summary).set_index("lr")
    assert (best["criterion"] == "val_acc").all() and bool(best.loc[0.01, "best"]) and not best.loc[0.1, "best"]
    assert best.loc[0.01, "score"] == pytest.approx(0.94)
    # and lower-is-better metrics pick the minimum
    summary["task"], summary["eval_value"] = "charlm", [2.0, 2.2, 2.5, 2.4]
    assert best_lrs(summary).set_index("lr")["best"].tolist() == [True, False]


def test_a_sweep_records_its_rule_and_budget(tmp_path):
    result = run_benchmark(make_config(dict(tasks=["rosenbrock"], optimizers=["sgd", "adam"], seeds=2, steps=3,
                                            lrs=[0.01, 0.1], out=tmp_path / "s"), sweep=True))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    chosen = meta["selection"]["rosenbrock"]
    assert chosen == result.selection["rosenbrock"]
    assert chosen["criterion"] == "tail_loss" and chosen["grid_points"] == {"sgd": 2, "adam": 2}
    assert chosen["seeds"] == 2 and chosen["steps"] == 3 and chosen["runs"] == 8
    assert "tail_loss" in result.summary and result.summary["tail_loss"].notna().all()


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "{not json"])
def test_resume_with_a_meta_json_that_is_not_an_object_is_one_error_naming_it(tmp_path, text):
    run_benchmark(config(tmp_path, optimizers=["adam"], seeds=1, steps=2))
    (tmp_path / "r" / "meta.json").write_text(text)
    with pytest.raises(BenchError, match=r"meta\.json"):
        run_benchmark(config(tmp_path, optimizers=["adam", "sgd"], seeds=1, steps=2, resume=True))
    assert (tmp_path / "r" / "meta.json").read_text() == text
