"""A small convex quadratic ``f(x) = 1/2 x^T A x - b^T x`` whose exact Hessian ``A`` is known.

``A = Q diag(lambda) Q^T`` with a random orthogonal ``Q`` and eigenvalues log-spaced from 1 to ``cond``,
so the Hessian is dense (not diagonal) and ill-conditioned, the setting where a diagonal preconditioner
is tested honestly.  The problem is drawn from ``problem_seed``, not the run seed, so every run sees the
same function; ``Problem.info["hessian"]`` holds ``A`` for tests of curvature estimates.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .base import Problem, TaskConfig, TaskSpec, resolve_options

OPTIONS = {"dim": 10, "cond": 100.0, "problem_seed": 0}


class Quadratic(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.x = nn.Parameter(torch.zeros_like(b))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ (self.a @ self.x) - self.b @ self.x


def build(config: TaskConfig) -> Problem:
    opt = resolve_options("quadratic", OPTIONS, config.options, at_least={"dim": 1, "cond": 1})
    gen = torch.Generator().manual_seed(opt["problem_seed"])
    q, _ = torch.linalg.qr(torch.randn(opt["dim"], opt["dim"], generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(opt["cond"])).item(), opt["dim"], dtype=torch.float64)
    a = (q * eig) @ q.T
    a = ((a + a.T) / 2).float()
    b = torch.randn(opt["dim"], generator=gen).float()
    model = Quadratic(a, b).to(config.device)
    x_star = torch.linalg.solve(model.a, model.b)
    f_star = (-0.5 * model.b @ x_star).item()

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"gap": model().item() - f_star, "dist": (model.x - x_star).norm().item()}

    return Problem(model=model, batches=itertools.repeat(None), loss=lambda _batch: model(),
                   evaluate=evaluate, data_source="none (analytic)",
                   info={"hessian": model.a.clone(), "x_star": x_star, "options": opt})


TASK = TaskSpec(name="quadratic", description="Convex quadratic, dense SPD Hessian (dim 10, cond 100), exact Hessian known",
                build=build, default_steps=300, default_batch_size=1, data_source="none (analytic)",
                eval_metric="gap", higher_is_better=False, target=1e-4, default_eval_every=25,
                options=OPTIONS)
