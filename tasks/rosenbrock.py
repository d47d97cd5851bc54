"""Rosenbrock: the classic banana valley, 2-D from (-1.5, 2) or the chained N-D form (``dim`` option).

Deterministic and data-free: every "batch" is the same full objective, so it isolates the optimizer.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .base import Problem, TaskConfig, TaskSpec, resolve_options

OPTIONS = {"dim": 2}


class Rosenbrock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        start = torch.tensor([-1.5, 2.0]).repeat((dim + 1) // 2)[:dim]
        self.x = nn.Parameter(start.clone())

    def forward(self) -> torch.Tensor:
        x = self.x
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def build(config: TaskConfig) -> Problem:
    dim = resolve_options("rosenbrock", OPTIONS, config.options, at_least={"dim": 2})["dim"]
    model = Rosenbrock(dim).to(config.device)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"f": model().item(), "dist": (model.x - 1).norm().item()}

    return Problem(model=model, batches=itertools.repeat(None), loss=lambda _batch: model(),
                   evaluate=evaluate, data_source="none (analytic)", info={"dim": dim})


TASK = TaskSpec(name="rosenbrock", description="Rosenbrock function, 2-D from (-1.5, 2); option dim=N chains it",
                build=build, default_steps=500, default_batch_size=1, data_source="none (analytic)",
                eval_metric="dist", higher_is_better=False, target=1e-2, default_eval_every=50,
                options=OPTIONS)
