"""torch.compile for the benchmark's tasks (issue 9).

A task's ``loss`` and ``evaluate`` close over its model, so the model is compiled in place with
``nn.Module.compile()`` (the module's own calls then run the compiled code) rather than replaced by the
wrapper ``torch.compile(model)`` returns.  Compiled graphs (aot_autograd) cannot be differentiated twice,
so second-order optimizers get their Hessian-vector products by finite differences of two first-order
gradients (``hvp_method="finite-difference"``, driven by ``opt.step(closure)``; see esgd/_base.py);
without ``--compile`` the exact double-backward product stays the default.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

import tasks
from tasks import Problem, TaskConfig

from .optimizers import OptimizerSpec

__all__ = ["COMPILED_HVP_METHOD", "compile_model", "build_compiled_problem", "hvp_overrides"]

COMPILED_HVP_METHOD = "finite-difference"


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """Compile ``model`` in place (``options`` go to ``torch.compile``) and return it."""
    model.compile(**options)
    return model


def build_compiled_problem(task: str, config: TaskConfig, **options: Any) -> Problem:
    """Build ``task`` with its model compiled in place: ``problem.loss`` and ``problem.evaluate`` run it."""
    problem = tasks.build_task(task, config)
    compile_model(problem.model, **options)
    return problem


def hvp_overrides(spec: OptimizerSpec, given: dict[str, Any], compiled: bool) -> dict[str, Any]:
    """Extra optimizer keywords for a compiled model: finite-difference products for a second-order
    optimizer whose factory has ``hvp_method``, unless the user chose a method explicitly (an explicit
    ``autograd`` then fails with :class:`esgd.DoubleBackwardUnsupportedError`, which says what to use)."""
    if not (compiled and spec.second_order) or "hvp_method" in given:
        return {}
    if "hvp_method" not in inspect.signature(spec.factory).parameters:
        from .runner import BenchError
        raise BenchError(f"--compile: {spec.name} has no hvp_method option, so it cannot get Hessian-vector "
                         "products from a compiled model (they need double backward)")
    return {"hvp_method": COMPILED_HVP_METHOD}


def double_backward_error(err: BaseException, optimizer: str) -> Exception | None:
    """The one-line error for a torch failure caused by differentiating a compiled graph with
    ``create_graph=True`` (torch words it differently depending on what was compiled before in the
    process: "double backward", or "donated buffers ... requires create_graph=False"); else ``None``."""
    from esgd import DoubleBackwardUnsupportedError
    text = str(err)
    if isinstance(err, DoubleBackwardUnsupportedError):
        return err
    if isinstance(err, RuntimeError) and ("double backward" in text or "donated buffer" in text):
        return DoubleBackwardUnsupportedError(
            f"{optimizer}: the compiled model cannot be differentiated twice; construct the optimizer with "
            "hvp_method='finite-difference' and call opt.step(closure) (with --compile, leave hvp_method "
            "unset); it needs first-order gradients only")
    return None
