"""The optimizer registry as users see it: parsing ``name:key=value`` choices, canonical labels, clear
errors, the ``optimizers`` listing, and a choice that is parsed (and its optimizer built) only once."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from bench import plugins
from bench.config import make_config
from bench.errors import OptimizerSpecError, UnknownOptimizerError
from bench.grid import run_benchmark
from bench.optimizers import (OptimizerChoice, class_name, default_lr, get_optimizer, list_optimizers,
                              needs_create_graph, option_names, parse_optimizer)
from bench.registry import OptimizerSpec, register_optimizer, registered, unregister_optimizer
from bench.train import train
from cli import app

NAMES = [s.name for s in list_optimizers()]
runner = CliRunner(env={"COLUMNS": "250"})


@pytest.mark.parametrize("name", NAMES)
def test_plain_name_and_lr_override(name):
    plain = parse_optimizer(name)
    assert isinstance(plain, OptimizerChoice)
    assert (plain.name, dict(plain.given), plain.label, plain.lr) == (name, {}, name, None)
    choice = parse_optimizer(f" {name.upper()}:lr=0.05 ")
    assert (choice.name, dict(choice.given), choice.lr) == (name, {"lr": 0.05}, 0.05)
    assert "lr" in option_names(get_optimizer(name))
    assert choice.label == f"{name}:lr=0.05"
    assert parse_optimizer(choice.label) == choice           # the label parses back to the same choice
    assert parse_optimizer(choice) is choice                 # a parsed choice passes through
    p = torch.nn.Parameter(torch.ones(3))
    opt = choice.create([p], task="rosenbrock", seed=0)
    assert opt.param_groups[0]["lr"] == 0.05
    opt = plain.create([p], task="rosenbrock", seed=0, lr=0.07)
    assert opt.param_groups[0]["lr"] == 0.07
    second = get_optimizer(name).second_order
    assert choice.second_order == second
    # The first step of a second-order optimizer takes a product: its own should_create_graph() says so,
    # whatever the entry's flag; a class without that method follows the flag.
    assert needs_create_graph(opt, second) == second
    assert needs_create_graph(opt, False) == second
    if not second:
        assert needs_create_graph(opt, True)


@pytest.mark.parametrize("name", NAMES)
def test_scaled_variant_uses_base_lr(name):
    spec = get_optimizer(name)
    assert default_lr(spec, "rosenbrock-loss-x1000") == default_lr(spec, "rosenbrock")
    assert parse_optimizer(name).lr_for("rosenbrock-params-x0.01") == default_lr(spec, "rosenbrock")
    # the base of a scaled variant is the whole task name before the scale, dashes and all
    assert default_lr(spec, "mnist-cnn-params-x10") == default_lr(spec, "mnist-cnn")


def test_several_keys_and_tuples():
    choice = parse_optimizer("adam:lr=3e-4,weight_decay=0.1,betas=(0.9,0.95),amsgrad=true")
    assert choice.name == "adam"
    assert dict(choice.given) == {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "amsgrad": True}
    assert choice.label == "adam:amsgrad=True,betas=(0.9,0.95),lr=0.0003,weight_decay=0.1"
    assert dict(parse_optimizer("esgd:probe=rademacher").given) == {"probe": "rademacher"}


@pytest.mark.parametrize("text, fragment", [
    ("adam:lrr=1", "Did you mean 'lr'"),
    ("adam:lr=abc", "bad value for lr"),
    ("adam:lr=nan", "bad value for lr"),
    ("adam:lr", "expected name:key=value"),
    ("adam:lr=1,lr=2", "given twice"),
    ("esgd-m:lr=-1", "Invalid lr"),
    ("esgd-m:betas=(0.9,)", "bad value for betas"),
    ("sgd:nesterov=1", "bad value for nesterov"),
])
def test_bad_specs(text, fragment):
    with pytest.raises(OptimizerSpecError, match=fragment.replace("(", r"\(")):
        parse_optimizer(text)


def test_unknown_name_suggests():
    with pytest.raises(UnknownOptimizerError, match="Did you mean 'adam'"):
        parse_optimizer("adamm:lr=1")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(OptimizerSpecError) as err:
        parse_optimizer("sgd:zzz=1")
    assert "momentum" in str(err.value) and "\n" not in str(err.value)


# -- the listing --------------------------------------------------------------------------------------
def _listed_rows(output: str) -> dict[str, list[str]]:
    """The first line of each row of the ``optimizers`` table, split into its cells, by name."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split("[│┃]", line)[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_listing_names_the_class_behind_each_entry():
    """``esgd`` (plain ESGD) and ``esgd-m`` are different classes, and the listing says which."""
    assert class_name(get_optimizer("esgd")) == "esgd.PlainESGD"
    assert class_name(get_optimizer("esgd-m")) == "esgd.ESGD"
    assert class_name(get_optimizer("adam")) == "torch.optim.Adam"
    res = runner.invoke(app, ["optimizers"])
    assert res.exit_code == 0, res.output
    rows = _listed_rows(res.stdout)
    header = rows["name"]
    assert header[:2] == ["name", "class"], header
    assert rows["esgd"][1] == "esgd.PlainESGD" and rows["esgd-m"][1] == "esgd.ESGD"
    assert rows["esgd-m-sub"][1] == "esgd.ESGD" and rows["sgd"][1] == "torch.optim.SGD"
    assert set(NAMES) <= set(rows)


def test_adahessian_description_is_not_diag_h_squared():
    """AdaHessian's EMA of (z*Hz)^2 has mean diag(H^2), not diag(H)^2."""
    description = get_optimizer("adahessian").description
    assert "diag(H)^2" not in description and "diag(H^2)" in description
    res = runner.invoke(app, ["optimizers", "adahessian"])
    assert res.exit_code == 0 and "diag(H)^2" not in res.stdout and "adahessian" in res.stdout


# -- parse once -----------------------------------------------------------------------------------------
COUNTED_MODULE = '''
import torch


class CountedSGD(torch.optim.SGD):
    """SGD that counts its constructions."""

    built = 0

    def __init__(self, params, lr=0.001, momentum=0.0):
        type(self).built += 1
        super().__init__(params, lr=lr, momentum=momentum)
'''


@pytest.fixture
def counted(tmp_path, monkeypatch, request):
    """The counting class, reachable as a registered name and as ``module:Class``."""
    (tmp_path / "fakecount_mod.py").write_text(textwrap.dedent(COUNTED_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    import fakecount_mod
    cls = fakecount_mod.CountedSGD
    assert "counted-sgd" not in registered()
    register_optimizer(OptimizerSpec(name="counted-sgd", factory=cls, description="counting SGD",
                                     second_order=False, lrs={"*": 1e-3}))
    try:
        yield cls
    finally:
        unregister_optimizer("counted-sgd")
        plugins.reset()
        sys.modules.pop("fakecount_mod", None)


@pytest.mark.parametrize("text", ["counted-sgd:momentum=0.5", "fakecount_mod:CountedSGD:momentum=0.5"])
def test_choice_is_parsed_and_checked_once(counted, tmp_path, text):
    """parse_optimizer builds the optimizer once to check it; the grid then builds only the run's own."""
    choice = parse_optimizer(text)
    cls = choice.spec.factory
    assert cls.built == 1
    config = make_config({"tasks": ["rosenbrock"], "optimizers": [choice], "seeds": 1, "steps": 3,
                          "device": "cpu", "out": tmp_path / "one"})
    assert config.optimizers == (choice,) and cls.built == 1
    result = run_benchmark(config)
    assert result.summary["status"].tolist() == ["ok"] and result.summary["optimizer"].tolist() == [choice.label]
    assert cls.built == 2
    assert train("rosenbrock", choice, steps=2).status == "ok"
    assert cls.built == 3
