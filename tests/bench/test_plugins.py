"""User optimizers (``--opt package.module:ClassName``) and entry-point plugins, via the CLI: parsing,
second-order detection (the ``second_order`` flag, timm's ``is_second_order`` property, a callable
``should_create_graph``), classes that fail in the ways a user's class can, and broken plugins.

The plugin tests write a tiny distribution (a package plus ``<name>.dist-info`` with ``entry_points.txt``)
into a temp dir on ``sys.path``, where ``importlib.metadata`` finds it exactly as it finds an installed one.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import tasks
from bench import plugins
from bench.errors import OptimizerSpecError
from bench.optimizers import get_optimizer, list_optimizers, parse_optimizer
from cli import app
from tasks.plugins import PluginWarning

runner = CliRunner(env={"COLUMNS": "250"})
STEPS = 20

# The fake plugin: a first-order optimizer, second-order ones (they need backward(create_graph=True)),
# one of them marked the way timm marks its own, a task, and classes that fail in the ways a user's
# class can.
FAKE_MODULE = '''
import itertools
import torch
from tasks import Problem, TaskSpec


class SignSGD(torch.optim.Optimizer):
    """Sign descent: p -= lr * sign(grad)."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad.sign())


class CurvatureStep(torch.optim.Optimizer):
    """Gradient step divided by 1 + |H g|; the Hessian-vector product needs the gradient's graph."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        # differentiates p.grad again, as timm's AdaHessian does: needs backward(create_graph=True)
        hvs = torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads])
        with torch.no_grad():
            for group in self.param_groups:
                for p, hv in zip(params, hvs):
                    p.sub_(group["lr"] * p.grad / (1 + hv.abs()))
        for p in params:
            p.grad = p.grad.detach()


class CurvatureSGD(CurvatureStep):
    """The curvature-scaled step, saying so the way the esgd optimizers do: should_create_graph()."""

    def should_create_graph(self):
        return True


class FlaggedFirstOrder(CurvatureSGD):
    second_order = False


class TimmCurvature(CurvatureStep):
    """The curvature-scaled step marked as timm marks AdaHessian: a read-only is_second_order property."""

    @property
    def is_second_order(self):
        return True


class Quitter(SignSGD):
    def __init__(self, params, lr=0.01):
        import sys
        sys.exit(7)


class NoDefaultLR(SignSGD):
    def __init__(self, params, lr):
        super().__init__(params, lr)


class Picky(SignSGD):
    def __init__(self, params, lr=0.01, width=1):
        if width != 1:
            raise RuntimeError("width must be 1")
        super().__init__(params, lr)


class Bowl(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.full((4,), 3.0))

    def forward(self):
        return (self.x ** 2).sum()


def build(config):
    model = Bowl().to(config.device)

    def evaluate():
        with torch.no_grad():
            return {"value": model().item()}

    return Problem(model=model, batches=itertools.repeat(None), loss=lambda _batch: model(),
                   evaluate=evaluate, data_source="none (analytic)")


TASK = TaskSpec(name="fake-bowl", description="Plugin task: sum of squares", build=build,
                default_steps=30, default_batch_size=1, data_source="none (analytic)",
                eval_metric="value", higher_is_better=False, default_eval_every=10)
NOT_AN_OPTIMIZER = 42
'''


def _write_dist(root: Path, package: str, module: str, entry_points: str) -> None:
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(module)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture(autouse=True)
def clean_registries():
    """Every test starts and ends with no plugin and no --opt class cached, and no fake module imported."""
    plugins.reset()
    yield
    plugins.reset()
    for name in [m for m in sys.modules if m.split(".")[0].startswith("fakeplug")]:
        del sys.modules[name]


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    _write_dist(tmp_path, "fakeplug_good", FAKE_MODULE, """
        [esgd_bench.optimizers]
        signsgd = fakeplug_good:SignSGD
        timmcurv = fakeplug_good:TimmCurvature

        [esgd_bench.tasks]
        fake-bowl = fakeplug_good:TASK
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _run(tmp_path, task, *opts, steps=STEPS):
    out = tmp_path / "out"
    args = ["run", task, "--seeds", 1, "--steps", steps, "--out", out]
    for opt in opts:
        args += ["--opt", opt]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return pd.read_csv(out / "summary.csv"), pd.read_csv(out / "metrics.csv")


def _decreased(metrics: pd.DataFrame, optimizer: str) -> bool:
    loss = metrics[metrics["optimizer"] == optimizer].sort_values("step")["loss"]
    return len(loss) == STEPS and loss.iloc[-1] < loss.iloc[0]


# -- --opt package.module:ClassName ------------------------------------------------------------------
def test_torch_rmsprop_by_class_path(tmp_path):
    summary, metrics = _run(tmp_path, "rosenbrock", "torch.optim:RMSprop:lr=1e-3", "torch.optim:RMSprop")
    assert summary["optimizer"].tolist() == ["torch.optim:RMSprop:lr=0.001", "torch.optim:RMSprop"]
    assert summary["lr"].tolist() == [1e-3, 0.01]       # the override, then RMSprop's own default
    assert (summary["status"] == "ok").all() and summary["hvp_time_ms"].isna().all()
    assert _decreased(metrics, "torch.optim:RMSprop:lr=0.001")


def test_class_path_parses_and_round_trips():
    choice = parse_optimizer(" torch.optim:RMSprop:lr=1e-3,alpha=0.9 ")
    assert (choice.name, dict(choice.given)) == ("torch.optim:RMSprop", {"lr": 1e-3, "alpha": 0.9})
    assert choice.label == "torch.optim:RMSprop:alpha=0.9,lr=0.001"
    assert parse_optimizer("torch.optim:RMSprop:alpha=0.9,lr=0.001") == choice
    assert parse_optimizer(choice.label) == choice
    adam = parse_optimizer("adam:lr=0.1")                               # registered names are not imports
    assert (adam.name, dict(adam.given)) == ("adam", {"lr": 0.1})
    spec = get_optimizer("torch.optim:SGD")
    assert spec.name not in [s.name for s in list_optimizers()]       # ad hoc, never listed


def test_second_order_detection(fake_plugin, tmp_path):
    assert get_optimizer("fakeplug_good:CurvatureSGD").second_order         # callable should_create_graph
    assert not get_optimizer("fakeplug_good:FlaggedFirstOrder").second_order   # the class attribute wins
    assert not get_optimizer("fakeplug_good:SignSGD").second_order
    summary, metrics = _run(tmp_path, "rosenbrock", "fakeplug_good:CurvatureSGD:lr=1e-3")
    row = summary.iloc[0]
    # The HVP inside step() fails unless the runner built the graph; every step is an HVP step.
    assert row["status"] == "ok" and row["hvp_steps"] == STEPS, row.to_dict()
    assert _decreased(metrics, "fakeplug_good:CurvatureSGD:lr=0.001")


def test_timm_style_second_order_class(fake_plugin, tmp_path):
    """timm marks its second-order optimizers with a read-only ``is_second_order`` property (and has no
    should_create_graph); such a class, whose step() differentiates p.grad again, trains ok both as
    ``--opt module:Class`` and as a plugin entry."""
    import fakeplug_good
    cls = fakeplug_good.TimmCurvature
    assert not hasattr(cls, "should_create_graph") and isinstance(vars(cls)["is_second_order"], property)
    assert plugins.is_second_order(cls)
    assert not plugins.is_second_order(fakeplug_good.SignSGD)
    assert plugins.is_second_order(fakeplug_good.CurvatureSGD)
    assert not plugins.is_second_order(fakeplug_good.FlaggedFirstOrder)
    assert get_optimizer("fakeplug_good:TimmCurvature").second_order
    assert parse_optimizer("fakeplug_good:TimmCurvature:lr=1e-3").second_order
    assert get_optimizer("timmcurv").second_order                          # the plugin entry
    summary, metrics = _run(tmp_path, "rosenbrock", "fakeplug_good:TimmCurvature:lr=1e-3", "timmcurv:lr=1e-3")
    assert summary["optimizer"].tolist() == ["fakeplug_good:TimmCurvature:lr=0.001", "timmcurv:lr=0.001"]
    for row in summary.to_dict("records"):
        # not an error from autograd ("does not require grad"): the loop built the gradient's graph
        assert row["status"] == "ok" and row["hvp_steps"] == STEPS, row
        assert not isinstance(row["error"], str) or not row["error"], row
    assert _decreased(metrics, "fakeplug_good:TimmCurvature:lr=0.001") and _decreased(metrics, "timmcurv:lr=0.001")


@pytest.mark.parametrize("spec, fragment", [
    ("nosuch_pkg_zz.optim:Fancy", "no module named 'nosuch_pkg_zz'"),
    ("fakeplug_broken:Opt", "importing fakeplug_broken failed: ModuleNotFoundError"),
    ("fakeplug_exits:Opt", "importing fakeplug_exits failed: SystemExit: 7"),
    ("fakeplug_good:Nope", "fakeplug_good has no attribute 'Nope'"),
    ("torch.optim:RMSProp", "Did you mean 'RMSprop'?"),
    ("torch.optim.lr_scheduler:StepLR", "not a torch.optim.Optimizer subclass"),
    ("fakeplug_good:NOT_AN_OPTIMIZER", "is not a class (got int)"),
    ("torch.optim:Optimizer", "abstract base class"),
    ("torch.optim:RMSprop:lr=-1", "Invalid learning rate"),
    ("torch.optim:RMSprop:lrr=1", "Did you mean 'lr'?"),
    ("torch.optim:RMSprop:alpha=high", "bad value for alpha"),
    ("fakeplug_good:Picky:width=2", "RuntimeError: width must be 1"),
    ("fakeplug_good:Quitter", "SystemExit: 7"),
    ("fakeplug_good:NoDefaultLR", "no default learning rate"),
    ("torch.optim:RMSprop:lr", "expected name:key=value"),
])
def test_bad_class_paths_one_line_exit_2(fake_plugin, tmp_path, spec, fragment):
    (fake_plugin / "fakeplug_broken.py").write_text("import nosuch_dependency_zz\n")
    (fake_plugin / "fakeplug_exits.py").write_text("import sys\nsys.exit(7)\n")
    out = tmp_path / "o"
    res = invoke("run", "rosenbrock", "--opt", spec, "--steps", 2, "--seeds", 1, "--out", out)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.output and not (out / "summary.csv").exists()
    with pytest.raises(OptimizerSpecError):
        parse_optimizer(spec)


def test_class_whose_constructor_calls_sys_exit(fake_plugin, tmp_path):
    """A user class whose __init__ calls sys.exit(7) is refused while the choice is checked: one
    ``error:`` line and exit code 2, not the class's 7, and nothing trained or written."""
    out = tmp_path / "o"
    res = invoke("run", "rosenbrock", "--opt", "fakeplug_good:Quitter", "--opt", "adam", "--steps", 2,
                 "--seeds", 1, "--out", out)
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fakeplug_good:Quitter" in lines[0], res.stderr
    assert "Traceback" not in res.output and not out.exists()


def test_class_without_default_lr_runs_with_one(fake_plugin, tmp_path):
    summary, _ = _run(tmp_path, "rosenbrock", "fakeplug_good:NoDefaultLR:lr=1e-3")
    assert summary["lr"].tolist() == [1e-3] and (summary["status"] == "ok").all()


# -- entry points -------------------------------------------------------------------------------------
def test_fake_plugin_distribution_listed_and_run(fake_plugin, tmp_path):
    listed = invoke("optimizers")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if "signsgd" in line)
    assert "fakeplug-good" in row and "Sign descent" in row and "fakeplug_good.SignSGD" in row
    row = next(line for line in listed.stdout.splitlines() if "timmcurv" in line)
    assert "fakeplug_good.TimmCurvature" in row and "second" in row
    assert "built-in" in next(line for line in listed.stdout.splitlines() if " adam " in line)
    shown = invoke("tasks", "fake*")
    assert shown.exit_code == 0 and "fake-bowl" in shown.stdout and "fakeplug-good" in shown.stdout
    assert tasks.get_task("fake-bowl-loss-x10").base == "fake-bowl"     # scaled variants come for free

    summary, metrics = _run(tmp_path, "fake-bowl", "signsgd", "adam:lr=0.1")
    assert summary["optimizer"].tolist() == ["signsgd", "adam:lr=0.1"]
    assert (summary["status"] == "ok").all() and summary["lr"].tolist() == [0.01, 0.1]
    assert _decreased(metrics, "signsgd") and _decreased(metrics, "adam:lr=0.1")

    # Gone once the distribution is off the path and the caches are reset: nothing leaks to other tests.
    sys.path.remove(str(fake_plugin))
    plugins.reset()
    assert "signsgd" not in [s.name for s in list_optimizers()]
    assert "fake-bowl" not in [t.name for t in tasks.list_tasks()]


def test_broken_plugins_are_skipped_with_one_warning_line_each(fake_plugin, tmp_path, monkeypatch):
    other = tmp_path / "other"
    _write_dist(other, "fakeplug_bad", textwrap.dedent("""
        from bench.optimizers import get_optimizer
        ADAM = get_optimizer("adam")
        NOT_AN_OPTIMIZER = "sgd"
        """), """
        [esgd_bench.optimizers]
        missing = fakeplug_nowhere:Thing
        stringy = fakeplug_bad:NOT_AN_OPTIMIZER
        clash = fakeplug_bad:ADAM
        nolr = fakeplug_good:NoDefaultLR

        [esgd_bench.tasks]
        badtask = fakeplug_bad:NOT_AN_OPTIMIZER
        """)
    monkeypatch.syspath_prepend(str(other))
    with pytest.warns(PluginWarning) as caught:
        names = [s.name for s in list_optimizers()]
        task_names = [t.name for t in tasks.list_tasks()]
    assert {"adam", "sgd", "signsgd"} <= set(names) and "fake-bowl" in task_names
    skipped = sorted(str(w.message).split("'")[1] for w in caught)
    assert skipped == ["badtask", "clash", "missing", "nolr", "stringy"]
    assert any("nolr" in str(w.message) and "no default lr" in str(w.message) for w in caught)

    plugins.reset()
    res = invoke("optimizers")
    assert res.exit_code == 0 and "signsgd" in res.stdout
    warned = res.stderr.strip().splitlines()
    assert len(warned) == 4 and all(w.startswith("warning: skipping plugin ") for w in warned), res.stderr
    assert any("'clash' (plugin fakeplug-bad 0.1" in w and "already registered" in w for w in warned)
