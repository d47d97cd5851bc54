"""The optimizer registry's command-line specs: parsing, canonical labels and clear errors."""

from __future__ import annotations

import pytest
import torch

from bench.optimizers import (OptimizerSpecError, UnknownOptimizerError, create_optimizer, default_lr,
                              format_opt_spec, get_optimizer, list_optimizers, needs_create_graph,
                              option_names, parse_opt_spec, validate_overrides)

NAMES = [s.name for s in list_optimizers()]


@pytest.mark.parametrize("name", NAMES)
def test_plain_name_and_lr_override(name):
    assert parse_opt_spec(name) == (name, {})
    assert parse_opt_spec(f" {name.upper()}:lr=0.05 ") == (name, {"lr": 0.05})
    assert "lr" in option_names(get_optimizer(name))
    label = format_opt_spec(name, {"lr": 0.05})
    assert parse_opt_spec(label) == (name, {"lr": 0.05})
    p = torch.nn.Parameter(torch.ones(3))
    opt = create_optimizer(name, [p], task="rosenbrock", seed=0, lr=0.05)
    assert opt.param_groups[0]["lr"] == 0.05
    assert needs_create_graph(opt) == get_optimizer(name).second_order   # first step of a 2nd-order one is HVP


@pytest.mark.parametrize("name", NAMES)
def test_scaled_variant_uses_base_lr(name):
    spec = get_optimizer(name)
    assert default_lr(spec, "rosenbrock-loss-x1000") == default_lr(spec, "rosenbrock")


def test_several_keys_and_tuples():
    name, ov = parse_opt_spec("adam:lr=3e-4,weight_decay=0.1,betas=(0.9,0.95),amsgrad=true")
    assert name == "adam" and ov == {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "amsgrad": True}
    assert format_opt_spec(name, ov) == "adam:amsgrad=True,betas=(0.9,0.95),lr=0.0003,weight_decay=0.1"
    assert parse_opt_spec("esgd:probe=rademacher")[1] == {"probe": "rademacher"}


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
        parse_opt_spec(text)


def test_unknown_name_suggests():
    with pytest.raises(UnknownOptimizerError, match="Did you mean 'adam'"):
        parse_opt_spec("adamm:lr=1")


def test_validate_lists_valid_keys():
    with pytest.raises(OptimizerSpecError) as err:
        validate_overrides("sgd", {"zzz": 1})
    assert "momentum" in str(err.value)
