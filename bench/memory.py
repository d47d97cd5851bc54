"""Peak memory of a few training steps, each measured in a fresh process.

A process's peak resident size depends on everything it did before, so ``esgd-bench perf`` trains each
(task, optimizer) for a few steps, Hessian-vector-product steps included, in a process of its own forked
from a server that has imported torch only (on CUDA, spawned: see
:func:`bench.executors.process_context`).  On the CPU the peak is ``VmHWM`` over the measured steps, and
``extra_mb`` is its rise above the size once the task is built and a no-grad forward has loaded the
kernels: the training state, i.e. gradients, optimizer state, activations and the product's graph.  On
CUDA it is ``max_memory_allocated`` above what the built task holds.  With ``warmup`` steps, those run
before the peak is reset and the measured steps begin: a compiled product compiles on its first step,
and the compiler's own peak is not the step's (what the compiled code and the compiler's caches keep
stays in the figure).  The probe also counts parameters whose ``.grad`` still carries a graph after the
steps: a graph that outlives its step is a leak.
"""

from __future__ import annotations

import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import tasks
from tasks import TaskConfig

from .errors import BenchError
from .optimizers import parse_optimizer
from .steps import StepRoute, sub_batch

__all__ = ["peak_memory", "probe"]

_PROBE_LR = 1e-4      # the memory of a step does not depend on the rate; a small one stays finite


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def probe(task: str, spec: str, config: TaskConfig, steps: int, threads: int, precision: str = "fp32",
          warmup: int = 0, **extra: Any) -> dict[str, float]:
    """Train ``steps`` steps of ``spec`` on ``task`` in this process and report its peak memory."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    cuda = torch.device(config.device).type == "cuda"
    choice = parse_optimizer(spec)
    torch.manual_seed(config.seed)
    problem = tasks.build_task(task, config)
    opt = choice.create(problem.model.parameters(), task=task, seed=config.seed, lr=_PROBE_LR, **extra)
    route = StepRoute(problem, opt, choice, precision=precision)
    with torch.no_grad():       # load the forward kernels on two rows, so the baseline holds them
        batch = next(problem.batches)
        two = sub_batch(batch, 2 / len(batch[0])) if isinstance(batch, (tuple, list)) else None
        problem.loss(two if two is not None else batch)
    base = torch.cuda.memory_allocated() / 2**20 if cuda else _status_kb("VmRSS") / 1024

    def train(n: int) -> int:
        hvps = 0
        for _ in range(n):
            hvps += route.is_hvp_step()
            opt.zero_grad(set_to_none=True)
            route.forward_backward(next(problem.batches))
            route.step()
        return hvps

    train(warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
    hvps = train(steps)
    leaked = [n for n, p in problem.model.named_parameters() if p.grad is not None and p.grad.requires_grad]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_kb("VmHWM") / 1024
    return {"peak_mb": peak, "base_mb": base, "extra_mb": peak - base, "hvp_steps": hvps,
            "graph_left_on_grad": len(leaked)}


def peak_memory(jobs: list[tuple[str, str, str, TaskConfig, dict[str, Any]]], steps: int, threads: int,
                precision: str = "fp32", warmup: int = 0) -> dict[tuple[str, str], dict[str, float]]:
    """``{(key, spec): probe result}`` for each ``(key, task, spec, config, extra)``, one fresh process each."""
    from .executors import process_context
    if not jobs:
        return {}
    # torch._dynamo is imported lazily by the first optimizer step (seconds), torch._inductor by the
    # first compiled product: preload both once, so that neither counts as a route's training state.
    ctx = process_context(["bench.memory", "torch._dynamo", "torch._inductor.compile_fx"],
                          cuda=any(torch.device(job[3].device).type == "cuda" for job in jobs))
    out = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for key, task, spec, config, extra in jobs:
            try:
                out[(key, spec)] = pool.submit(probe, task, spec, config, steps, threads, precision, warmup,
                                               **extra).result()
            except Exception as err:   # noqa: BLE001 - a dead probe process: one line, timings kept
                raise BenchError(f"perf: the peak-memory probe of {spec} on {key} failed "
                                 f"({type(err).__name__}: {err}); the timings are written already") from None
    return out
