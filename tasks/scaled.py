"""Scaled variants of every task, the test bed of scale invariance (Dauphin et al. 2015).

``<task>-loss-x<n>`` minimises ``n * loss``; ``<task>-params-x<n>`` re-parametrises every parameter ``p``
as ``q = n * p``: the optimizer updates ``q`` (initialised to ``n * p``) while the model computes with
``q / n``, through ``torch.nn.utils.parametrize``.  Both leave the minimiser's function unchanged, so an
optimizer that is invariant to the scale follows the same trajectory; SGD does not, Adam only for the
loss.  Nothing here clips gradients: clipping would hide exactly the effect these variants show.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from torch import nn
from torch.nn.utils import parametrize

from .base import Problem, TaskConfig, TaskSpec, UnknownTaskError

__all__ = ["parse_name", "scaled_task", "listed_variants", "format_factor", "KINDS", "LISTED_FACTORS"]

KINDS = ("loss", "params")
LISTED_FACTORS = (1000.0, 0.001)
_NAME = re.compile(r"^(?P<base>.+)-(?P<kind>loss|params)-x(?P<factor>[^-].*)$")


def format_factor(factor: float) -> str:
    """``1000``, ``0.001``, ``1e6``: short, and the same for every spelling of one number."""
    text = repr(float(factor))     # shortest spelling that round-trips, so the name keeps the value
    text = text[:-2] if text.endswith(".0") else text
    mantissa, _, exp = text.partition("e")
    return f"{mantissa}e{int(exp)}" if exp else text


def parse_name(name: str) -> tuple[str, str, float] | None:
    """``(base, kind, factor)`` for a scaled-variant name, ``None`` when ``name`` is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    try:
        factor = float(match["factor"])
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise UnknownTaskError(f"bad scale factor {match['factor']!r} in task {name!r}: it must be a "
                               "positive finite number, e.g. 1000, 0.001 or 1e-3")
    return match["base"], match["kind"], factor


class _DivideBy(nn.Module):
    """The model sees ``q / n``; ``right_inverse`` makes the stored ``q`` start at ``n * p``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, q):
        return q / self.factor

    def right_inverse(self, p):
        return p * self.factor


def rescale_parameters(model: nn.Module, factor: float) -> None:
    """Re-parametrise every parameter of ``model`` in place."""
    owners, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:   # two parametrisations of one tensor would untie it
                raise ValueError(f"parameter {name!r} is shared between modules; params scaling does "
                                 "not support tied weights")
            seen.add(id(p))
            owners.append((module, name))
    for module, name in owners:
        parametrize.register_parametrization(module, name, _DivideBy(factor))


def scaled_task(spec: TaskSpec, kind: str, factor: float) -> TaskSpec:
    if kind not in KINDS:
        raise ValueError(f"scale kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if spec.base is not None:
        raise ValueError(f"task {spec.name!r} is already a scaled variant; scale {spec.base!r} instead")

    def build(config: TaskConfig) -> Problem:
        problem = spec.build(config)
        hessian = problem.info.get("hessian")
        if kind == "loss":
            base_loss = problem.loss
            problem.loss = lambda batch: base_loss(batch) * factor
            problem.loss_scale *= factor
            scaled_hessian = None if hessian is None else hessian * factor
        else:
            rescale_parameters(problem.model, factor)
            problem.param_scale *= factor
            # d^2 f(q / n) / dq^2 = H / n^2
            scaled_hessian = None if hessian is None else hessian / factor ** 2
        problem.info = {**problem.info, "scaled": {"kind": kind, "factor": factor}}
        if hessian is not None:
            problem.info["hessian"] = scaled_hessian
        return problem

    what = "loss multiplied by" if kind == "loss" else "parameters stored multiplied by"
    return replace(spec, name=f"{spec.name}-{kind}-x{format_factor(factor)}", build=build, base=spec.name,
                   description=f"{spec.name} with its {what} {format_factor(factor)} (scale-invariance test)")


def listed_variants(spec: TaskSpec) -> list[TaskSpec]:
    """The variants that ``esgd-bench tasks`` lists; any other factor works by name."""
    if spec.base is not None:
        return []
    return [scaled_task(spec, kind, f) for kind in KINDS for f in LISTED_FACTORS]
