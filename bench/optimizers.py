"""The optimizer registry, after timm's optimizer factory.

Entries are small frozen dataclasses: a lowercase name, a factory, default hyperparameters, per-task
default learning rates, a description and the ``second_order`` flag that tells the runner to call
``backward(create_graph=opt.should_create_graph())``.  ``get_optimizer`` raises with the valid names and a
close match; ``list_optimizers`` filters with fnmatch.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from esgd import ESGD, PlainESGD

__all__ = ["OptimizerSpec", "UnknownOptimizerError", "register_optimizer", "get_optimizer",
           "list_optimizers", "create_optimizer", "default_lr", "needs_create_graph"]


class UnknownOptimizerError(LookupError):
    """An optimizer name that is not in the registry."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    second_order: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Default learning rate per task family (a scaled variant uses its base task's entry); "*" is the
    # fallback.  How each value was chosen is written down in the README.
    lrs: Mapping[str, float] = field(default_factory=dict)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    if spec.name != spec.name.lower():
        raise ValueError(f"optimizer names are lowercase, got {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}.{hint} Valid names: {', '.join(valid)}") from None


def list_optimizers(pattern: str = "*") -> list[OptimizerSpec]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if fnmatch.fnmatch(n, pattern)]


def default_lr(spec: OptimizerSpec, task: str | None) -> float | None:
    """The registry's learning rate for ``task`` (scaled variants fall back to their base task)."""
    if task is not None:
        for key in (task, task.split("-")[0]):
            if key in spec.lrs:
                return spec.lrs[key]
    return spec.lrs.get("*", spec.defaults.get("lr"))


def needs_create_graph(opt: torch.optim.Optimizer) -> bool:
    """True when the next backward must build a graph (timm reads the same flag)."""
    should = getattr(opt, "should_create_graph", None)
    return bool(should()) if callable(should) else False


def create_optimizer(name: str | OptimizerSpec, params: Iterable, *, task: str | None = None,
                     seed: int | None = None, **overrides: Any) -> torch.optim.Optimizer:
    """Build a registered optimizer: defaults, then the task's learning rate, then ``overrides``.

    Second-order optimizers whose factory takes a ``generator`` get one seeded with ``seed``, so the
    probes are reproducible and independent of the global RNG.
    """
    spec = get_optimizer(name) if isinstance(name, str) else name
    params = list(params)
    kwargs = dict(spec.defaults)
    lr = default_lr(spec, task)
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.update(overrides)
    if spec.second_order and seed is not None and "generator" not in kwargs \
            and "generator" in inspect.signature(spec.factory).parameters:
        device = _first_device(params)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        kwargs["generator"] = gen
    return spec.factory(params, **kwargs)


def _first_device(params: list) -> torch.device:
    for p in params:
        if isinstance(p, dict):
            return _first_device(list(p["params"]))
        return p.device
    return torch.device("cpu")


def _sgd(params, **kw):
    return torch.optim.SGD(params, **kw)


def _adam(params, **kw):
    return torch.optim.Adam(params, **kw)


# The learning rates below are filled in from `esgd-bench sweep` runs (see the README's table).
register_optimizer(OptimizerSpec(
    name="esgd-m", factory=ESGD, second_order=True,
    description="ESGD-M: Hessian-diagonal preconditioning with quasi-hyperbolic (Nesterov) momentum",
    defaults={}, lrs={"*": 1.0}))
register_optimizer(OptimizerSpec(
    name="esgd", factory=PlainESGD, second_order=True,
    description="Plain ESGD (Dauphin et al. 2015): running average of (Hz)^2, Gaussian probes, no momentum",
    defaults={}, lrs={"*": 0.1}))
register_optimizer(OptimizerSpec(
    name="sgd", factory=_sgd, second_order=False,
    description="SGD with Nesterov momentum 0.9",
    defaults={"momentum": 0.9, "nesterov": True}, lrs={"*": 0.01}))
register_optimizer(OptimizerSpec(
    name="adam", factory=_adam, second_order=False,
    description="Adam (torch.optim.Adam, foreach)",
    defaults={}, lrs={"*": 1e-3}))
