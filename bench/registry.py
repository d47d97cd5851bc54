"""The optimizer registry's entries, after timm's optimizer factory: small frozen dataclasses.

An entry has a lowercase name, a factory (an optimizer class), default hyperparameters, default learning
rates per task, a one-line description, and ``second_order``: whether the training loop must build the
gradient's graph (``backward(create_graph=...)``) for the optimizer's Hessian-vector products.  The
built-in entries are registered here; :mod:`bench.plugins` adds user classes and installed plugins, and
:mod:`bench.optimizers` is what the rest of the suite looks names up in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from esgd import ESGD, AdaHessian, ESGDMax, PlainESGD, Sophia
from tasks import UnknownTaskError
from tasks.scaled import parse_name

__all__ = ["OptimizerSpec", "LOOP_OPTIONS", "register_optimizer", "unregister_optimizer", "registered",
           "default_lr"]

# Options of the training loop rather than of an optimizer's constructor, accepted by the optimizers
# that take a product of another loss (esgd.HessianOptimizer.accumulate_hvp(loss)).  hvp_fraction = f
# < 1 takes each product on the loss of the first ceil(f * B) rows of the batch only (a plain backward
# gives the update's gradient): the sub-batch estimate of Sophia (Liu et al. 2023); 1 is the exact one.
# hvp_paired = True splits those rows into two halves and takes the paired estimate of (H z)^2 from
# their two products (esgd.HessianOptimizer.accumulate_hvp_pair), which takes out most of the sampling
# noise a small sub-batch squares into the curvature; only for optimizers whose curvature is that square.
# hvp_compiled = True takes the exact product by forward-over-reverse differentiation compiled with
# torch.compile (esgd.ForwardOverReverse): the same product, with the element-wise work fused.
LOOP_OPTIONS: dict[str, Any] = {"hvp_fraction": 1.0, "hvp_paired": False, "hvp_compiled": False}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    second_order: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Default learning rate per task family (a scaled variant uses its base task's entry); "*" is the
    # fallback.  docs/learning-rates.md says how each value was chosen.
    lrs: Mapping[str, float] = field(default_factory=dict)

    @property
    def takes_loop_options(self) -> bool:
        """Whether the loop options (``hvp_fraction``, ``hvp_paired``, ``hvp_compiled``) apply: the factory is an esgd
        optimizer."""
        from esgd import HessianOptimizer
        return self.second_order and isinstance(self.factory, type) \
            and issubclass(self.factory, HessianOptimizer)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    if spec.name != spec.name.lower():
        raise ValueError(f"optimizer names are lowercase, got {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_optimizer(name: str) -> None:
    """Remove an entry (plugins that are unloaded, tests); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, OptimizerSpec]:
    """The entries registered so far, by name (a copy)."""
    return dict(_REGISTRY)


def default_lr(spec: OptimizerSpec, task: str | None) -> float | None:
    """The entry's learning rate for ``task`` (scaled variants fall back to their base task)."""
    if task is not None:
        for key in (task, _base_task(task)):
            if key in spec.lrs:
                return spec.lrs[key]
    return spec.lrs.get("*", spec.defaults.get("lr"))


def _base_task(task: str) -> str | None:
    try:
        parsed = parse_name(task)
    except UnknownTaskError:     # a bad factor: the task itself will say so when it is built
        return None
    return parsed[0] if parsed else None


# Default learning rates, chosen by `esgd-bench sweep` on validation data (docs/learning-rates.md has the
# protocol, the commands and the tables).  "cifar" repeats the mnist-cnn rates, a ResNet of the same
# family: they were not tuned on CIFAR-10.  "*" (tasks added by plugins) repeats MNIST's.
_ESGD_M_LRS = {"*": 0.03, "mnist": 0.03, "mnist-cnn": 0.1, "cifar": 0.1, "charlm": 0.3, "rosenbrock": 10.0,
               "quadratic": 1.0}
register_optimizer(OptimizerSpec(
    name="esgd-m", factory=ESGD, second_order=True,
    description="ESGD-M (esgd.ESGD): Hessian-diagonal preconditioning with quasi-hyperbolic (Nesterov) momentum",
    lrs=_ESGD_M_LRS))
register_optimizer(OptimizerSpec(
    name="esgd-m-sub", factory=ESGD, second_order=True,
    description="ESGD-M with each product on 1/8 of the batch (hvp_fraction=0.125, a cheaper estimate)",
    defaults={"hvp_fraction": 0.125}, lrs=_ESGD_M_LRS))
register_optimizer(OptimizerSpec(
    name="esgd-m-pair", factory=ESGD, second_order=True,
    description="ESGD-M with the paired estimate of (Hz)^2 from two 1/16 halves of the batch (hvp_fraction="
                "0.125, hvp_paired=True): as cheap as esgd-m-sub, centred where the loss is a sum over rows "
                "(not under BatchNorm; esgd-bench bias measures it)",
    defaults={"hvp_fraction": 0.125, "hvp_paired": True}, lrs=_ESGD_M_LRS))
register_optimizer(OptimizerSpec(
    name="esgd-m-lazy", factory=ESGD, second_order=True,
    description="ESGD-M with the exact product of the whole batch every 40 steps instead of 10 "
                "(update_d_every=40): a quarter of the products, no sub-batch bias; add hvp_compiled=true "
                "for the compiled product",
    defaults={"update_d_every": 40}, lrs=_ESGD_M_LRS))
register_optimizer(OptimizerSpec(
    name="esgd-m-max", factory=ESGDMax, second_order=True,
    description="ESGD-M keeping max(beta2 * d, (Hz)^2), an infinity norm, instead of the EMA (esgd.ESGDMax)",
    lrs={"*": 0.3, "mnist": 0.3, "rosenbrock": 10.0, "quadratic": 1.0}))
register_optimizer(OptimizerSpec(
    name="esgd", factory=PlainESGD, second_order=True,
    description="Plain ESGD of Dauphin et al. 2015 (esgd.PlainESGD): running average of (Hz)^2, no momentum",
    lrs={"*": 0.01, "mnist": 0.01, "mnist-cnn": 0.03, "cifar": 0.03, "charlm": 0.03, "rosenbrock": 3.0,
         "quadratic": 0.1}))
register_optimizer(OptimizerSpec(
    name="sgd", factory=torch.optim.SGD, second_order=False,
    description="SGD with Nesterov momentum 0.9 (torch.optim.SGD)",
    defaults={"momentum": 0.9, "nesterov": True},
    lrs={"*": 0.1, "mnist": 0.1, "mnist-cnn": 0.3, "cifar": 0.3, "charlm": 0.03, "rosenbrock": 1e-3,
         "quadratic": 0.01}))
register_optimizer(OptimizerSpec(
    name="adam", factory=torch.optim.Adam, second_order=False,
    description="Adam (torch.optim.Adam, foreach)",
    lrs={"*": 1e-3, "mnist": 1e-3, "mnist-cnn": 3e-3, "cifar": 3e-3, "charlm": 1e-3, "rosenbrock": 1.0,
         "quadratic": 1e-3}))
register_optimizer(OptimizerSpec(
    name="adahessian", factory=AdaHessian, second_order=True,
    description="AdaHessian (Yao et al. 2021): Adam with an EMA of (z*Hz)^2, whose mean is diag(H^2); "
                "conv-kernel averaging; a product every step",
    lrs={"*": 0.03, "mnist": 0.03, "mnist-cnn": 0.03, "cifar": 0.03, "charlm": 0.03, "rosenbrock": 4.0,
         "quadratic": 0.3}))
register_optimizer(OptimizerSpec(
    name="sophia", factory=Sophia, second_order=True,
    description="Sophia-H (Liu et al. 2023): momentum / max(rho * EMA of z*Hz, eps), clipped to 1",
    lrs={"*": 1e-3, "mnist": 1e-3, "mnist-cnn": 3e-4, "cifar": 3e-4, "charlm": 3e-4, "rosenbrock": 0.03,
         "quadratic": 0.01}))

