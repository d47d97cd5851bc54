"""Small configurations and a plain training loop shared by the task tests."""

from __future__ import annotations

import torch

import tasks
from bench.optimizers import needs_create_graph, parse_optimizer
from esgd import hvp_attention
from tasks import TaskConfig, TaskDataError, TaskSpec

# Per base task: options that keep a test step in milliseconds.  A task not listed here is built with
# its defaults, on synthetic data when its real data is absent, so a new task is tested unchanged.
SMALL = {
    "mnist": dict(options={"width": 64}, batch_size=32),
    "cifar": dict(synthetic=True, batch_size=8, options={"eval_size": 64}),
    "mnist-cnn": dict(batch_size=16, options={"eval_size": 64}),
    "charlm": dict(batch_size=8, options={"layers": 1, "width": 32, "heads": 2, "context": 16,
                                          "eval_windows": 64}),
}
# "A few steps": enough for every optimizer at its registry learning rate to get past its first,
# sometimes overshooting, steps; fewer where the data is synthetic and only finiteness is checked.
FEW_STEPS = {"cifar": 5}


def few_steps(spec: TaskSpec) -> int:
    return FEW_STEPS.get(spec.base or spec.name, 20)


def small_config(spec: TaskSpec, seed: int = 0) -> TaskConfig:
    return TaskConfig(seed=seed, **SMALL.get(spec.base or spec.name, {}))


def build_small(spec: TaskSpec, seed: int = 0) -> tasks.Problem:
    config = small_config(spec, seed)
    try:
        return spec.build(config)
    except TaskDataError:
        return spec.build(TaskConfig(seed=seed, synthetic=True, batch_size=config.batch_size,
                                     options=config.options))


def train(problem: tasks.Problem, task: str, opt_name: str, steps: int, seed: int = 0) -> list[float]:
    """``steps`` optimizer steps as the runner takes them; the unscaled training losses."""
    choice = parse_optimizer(opt_name)
    opt = choice.create(problem.model.parameters(), task=task, seed=seed)
    losses = []
    for _, batch in zip(range(steps), problem.batches):
        opt.zero_grad(set_to_none=True)
        graph = needs_create_graph(opt, choice.second_order)
        with hvp_attention(graph):      # attention's fused kernels cannot be differentiated twice
            loss = problem.loss(batch)
        loss.backward(create_graph=graph)
        opt.step()
        losses.append(loss.item() / problem.loss_scale)
    opt.zero_grad(set_to_none=True)   # drop any graph still hanging off .grad
    return losses


def held_loss(problem: tasks.Problem, batch) -> float:
    with torch.no_grad():
        return problem.loss(batch).item() / problem.loss_scale
