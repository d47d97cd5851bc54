"""One training run: a task, an optimizer, a seed, timed honestly and stopped when it diverges.

:func:`train` is a compact airbench-style loop over a task of :mod:`tasks`: fetch a batch, do the step's
gradient work by the route :class:`~bench.steps.StepRoute` chooses, update, log one row per step and
evaluate every ``eval_every`` steps outside the timed regions (:mod:`bench.timing`).  A run stops as
``diverged`` on a non-finite loss or one that rises above its first value by more than
:data:`DIVERGENCE_FACTOR` times that value's magnitude (1 when the first loss is 0), as
``interrupted`` on Ctrl-C or SIGTERM, and as ``error`` when the step raises (an out-of-memory too):
everything logged up to then is kept in the :class:`RunResult`.

A :class:`Cell` is one run of a benchmark grid with everything it needs, so that an executor
(:mod:`bench.executors`) can run it in this process, a worker process or a data-parallel group.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import tasks
from esgd import DoubleBackwardUnsupportedError
from tasks import TaskConfig

from .checkpoint import Snapshots, capture_rng, restore_rng
from .errors import BenchError
from .optimizers import OptimizerChoice, parse_optimizer
from .schedules import Schedule, build_scheduler, parse_schedule
from .steps import (StepRoute, autocast, check_precision, compile_in_place, compiled_extras, double_backward_error,
                    world_and_rank)
from .timing import Clock, PeakMemory, attribute_hvp_cost, summarise_timings, tail_mean

__all__ = ["Cell", "RunResult", "train", "DIVERGENCE_FACTOR", "is_diverged", "out_of_memory"]

DIVERGENCE_FACTOR = 1e5
Progress = Callable[[int, float], None]


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    status: str


@dataclass(frozen=True)
class Cell:
    """One run of a grid: what to train, with which optimizer, learning rate and seed, and how."""

    task: str
    optimizer: OptimizerChoice
    lr: float
    seed: int
    steps: int
    eval_every: int | None = None
    task_config: TaskConfig = TaskConfig()
    accumulate: int = 1
    compile: bool = False
    precision: str = "fp32"
    snapshot: str | None = None           # where the cell keeps its snapshot (bench.checkpoint)
    snapshot_every: float = 60.0          # seconds between snapshots
    schedule: Schedule = Schedule()       # the learning-rate schedule (bench.schedules)

    @property
    def key(self) -> tuple:
        return (self.task, self.optimizer.label, round(float(self.lr), 15), int(self.seed))

    def run(self, progress: Progress | None = None, stop: Callable[[], bool] | None = None) -> RunResult:
        return train(self.task, self.optimizer, seed=self.seed, steps=self.steps, lr=self.lr,
                     task_config=self.task_config, eval_every=self.eval_every, accumulate=self.accumulate,
                     compile=self.compile, precision=self.precision, progress=progress, stop=stop,
                     snapshot=self.snapshot, snapshot_every=self.snapshot_every, schedule=self.schedule)


def is_diverged(loss: float, first: float) -> bool:
    """A non-finite loss, or one that has risen above the first by ``DIVERGENCE_FACTOR`` times the first
    loss's magnitude (times 1 when the first loss is exactly 0, as for a problem that starts at 0)."""
    if not math.isfinite(loss):
        return True
    return loss - first > DIVERGENCE_FACTOR * (abs(first) if first != 0 else 1.0)


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's OutOfMemoryError, or the CPU allocator's)."""
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                              or "not enough memory" in text)


def train(task: str, optimizer: str | OptimizerChoice, *, seed: int = 0, steps: int | None = None,
          lr: float | None = None, task_config: TaskConfig | None = None, eval_every: int | None = None,
          accumulate: int = 1, compile: bool = False, precision: str = "fp32",
          progress: Progress | None = None, stop: Callable[[], bool] | None = None,
          snapshot: str | os.PathLike | None = None, snapshot_every: float = 60.0,
          schedule: str | Schedule | None = None) -> RunResult:
    """Train ``optimizer`` on ``task`` for ``steps`` steps (default: the task's).

    The learning rate is ``lr``, else the choice's own (``adam:lr=3e-4``), else the registry's default
    for the task.  ``task_config`` gives the device, batch size, data and task options (its seed is
    replaced by ``seed``).  ``progress(step, loss)`` is called after every step, outside the timed
    regions; ``stop()`` is polled once per step and ends the run as ``interrupted``, as does a
    ``KeyboardInterrupt``.  Inside a ``torch.distributed`` group each rank trains on its shard of the
    batch (rank 0 evaluates); ``compile`` compiles the model in place, and second-order optimizers then
    take finite-difference products.  ``precision`` (``fp32``, ``bf16``, ``fp16``) runs the forward,
    and the evaluation, under autocast (with loss scaling for fp16; see :mod:`bench.steps`).  With
    ``snapshot`` (a file path) the run saves its state there every ``snapshot_every`` seconds and when
    ``stop()`` ends it, continues from it when it is found at the start, and removes it when the run
    ends otherwise (on one process; see :mod:`bench.checkpoint`).  ``schedule`` (default: the task's)
    multiplies the learning rate step by step (:mod:`bench.schedules`).  Task and optimizer construction
    errors propagate; a model that cannot be differentiated twice raises
    :class:`esgd.DoubleBackwardUnsupportedError`.
    """
    choice = parse_optimizer(optimizer)
    spec_task = tasks.get_task(task)
    config = dataclasses.replace(task_config or TaskConfig(), seed=seed)
    steps = spec_task.default_steps if steps is None else steps
    eval_every = eval_every or spec_task.default_eval_every
    for what, value in (("steps", steps), ("eval_every", eval_every), ("accumulate", accumulate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"{what} must be a positive integer, got {value!r}")
    if compile and world_and_rank()[0] > 1:
        raise BenchError("--compile together with --nproc > 1 is not supported")
    check_precision(precision, (task_config or TaskConfig()).device)
    schedule = parse_schedule(schedule if schedule is not None else spec_task.default_schedule)

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    problem = tasks.build_task(task, config)
    extra: dict[str, Any] = {} if lr is None else {"lr": lr}
    if compile:
        compile_in_place(problem.model)     # the task's loss and evaluation run the compiled module
        extra.update(compiled_extras(choice))
    opt = choice.create(problem.model.parameters(), task=task, seed=seed, **extra)
    route = StepRoute(problem, opt, choice, accumulate=accumulate, stop=stop, precision=precision)
    scheduler = build_scheduler(schedule, opt, steps)
    head = {"task": task, "optimizer": choice.label, "lr": float(opt.param_groups[0]["lr"]), "seed": seed}
    clock, memory = Clock(config.device), PeakMemory(config.device)
    rows: list[dict[str, Any]] = []
    evals: dict[str, float] = {}
    status, error, wall, first, start, drawn = "ok", "", 0.0, None, 1, 0
    snaps = None
    if snapshot is not None and route.world == 1:
        snaps = Snapshots(snapshot, snapshot_every, {**head, "steps": steps, "precision": precision,
                                                     "accumulate": accumulate, "compile": bool(compile),
                                                     "schedule": schedule.label})
        saved = snaps.load()
        if saved is not None:       # continue where the cell was stopped
            problem.model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if route.scaler is not None and saved["scaler"] is not None:
                route.scaler.load_state_dict(saved["scaler"])
            if scheduler is not None and saved.get("scheduler") is not None:
                scheduler.load_state_dict(saved["scheduler"])
            for _ in range(saved["drawn"]):
                next(problem.batches)
            rows, evals, wall, first = saved["rows"], saved["evals"], saved["wall"], saved["first"]
            start, drawn = saved["step"] + 1, saved["drawn"]
            restore_rng(saved["rng"], config.device)

    def capture(step: int) -> dict[str, Any]:
        return {"step": step, "drawn": drawn, "rows": rows, "evals": evals, "wall": wall, "first": first,
                "model": problem.model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": route.scaler.state_dict() if route.scaler is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": capture_rng(config.device)}

    def evaluate(row: dict[str, Any]) -> None:
        if route.rank > 0:     # rank 0 evaluates and reports for all ranks
            return
        with autocast(precision, config.device):
            evals.update(problem.evaluate())
        row.update({f"eval_{k}": float(v) for k, v in evals.items()})

    memory.reset()
    with warnings.catch_warnings():
        # backward(create_graph=True) warns of a parameter <-> .grad reference cycle; the optimizer
        # detaches the gradients at the end of every HVP step and zero_grad(set_to_none=True) drops
        # them, so the cycle never outlives the step.
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        # A loss-scaled first step that overflows is skipped, and the schedule still advances: intended.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        try:
            for step in range(start, steps + 1):
                if stop is not None and route.world == 1 and stop():
                    if snaps is not None:
                        snaps.save(capture(step - 1))
                    raise KeyboardInterrupt
                step_lr = float(opt.param_groups[0]["lr"])
                t0 = clock()
                batch = next(problem.batches)
                drawn += 1
                t1 = clock()
                opt.zero_grad(set_to_none=True)
                hvp_step = route.is_hvp_step()
                loss = route.forward_backward(batch)
                t2 = clock()
                value = loss.item() / problem.loss_scale
                first = value if first is None else first
                bad = is_diverged(value, first)
                if not bad:
                    route.step()
                    if scheduler is not None:
                        scheduler.step()
                t3 = clock() if not bad else t2
                wall += t3 - t0
                row = {**head, "step": step, "step_lr": step_lr, "wall_time_s": wall, "loss": value,
                       "is_hvp_step": hvp_step,
                       "step_ms": (t3 - t0) * 1e3, "data_ms": (t1 - t0) * 1e3,
                       "fwd_bwd_ms": (t2 - t1) * 1e3, "hvp_ms": math.nan,
                       "update_ms": (t3 - t2) * 1e3 if not bad else math.nan, "precision": precision}
                rows.append(row)
                if bad:
                    status = "diverged"
                    break
                if step % eval_every == 0 or step == steps:
                    evaluate(row)
                if progress is not None:
                    progress(step, value)
                if snaps is not None and step < steps:
                    snaps.maybe_save(lambda: capture(step))
        except KeyboardInterrupt:
            status = "interrupted"
        except (DoubleBackwardUnsupportedError, BenchError):
            raise       # the same for every cell: an input error
        except Exception as err:    # noqa: BLE001 - recorded in the summary, the other cells go on
            fatal = double_backward_error(err, choice.label) if compile and choice.second_order else None
            if fatal is not None:
                raise fatal from err
            status, error = "error", _error_text(err)
    if status == "diverged" and rows:
        try:
            evaluate(rows[-1])
        except Exception:   # noqa: BLE001 - a NaN model may not evaluate; the divergence is the result
            pass
    tests: dict[str, float] = {}
    if problem.test is not None and route.rank == 0 and status == "ok":
        # Once, after the last step: nothing that tunes or stops a run ever sees the test split.
        with autocast(precision, config.device):
            tests = problem.test()
    if snaps is not None and status != "interrupted":
        snaps.discard()
    attribute_hvp_cost(rows)
    summary = {
        **head, "opt_name": choice.name, "steps": len(rows),
        "final_loss": rows[-1]["loss"] if rows else math.nan,
        "tail_loss": tail_mean([r["loss"] for r in rows]),
        "eval_metric": spec_task.eval_metric,
        "eval_value": float(evals.get(spec_task.eval_metric, math.nan)),
        "test_metric": spec_task.test_metric or "",
        "test_value": float(tests.get(spec_task.test_metric, math.nan)) if spec_task.test_metric else math.nan,
        "wall_time_s": wall, **summarise_timings(rows), "peak_mem_mb": memory.peak_mb(),
        "status": status, "data_source": problem.data_source, "synthetic": bool(problem.synthetic),
        "device": str(config.device), "error": error,
        "hvp_method": getattr(opt, "hvp_method", "") if choice.second_order else "",
        "accumulate": accumulate, "world_size": route.world, "compiled": bool(compile), "precision": precision,
        "schedule": schedule.label,
        "nonfinite_products": int(getattr(opt, "nonfinite_products", 0)),
        "continued_at_step": start - 1,     # > 0: this run went on from a snapshot taken at that step
    }
    route.close()
    return RunResult(rows=rows, summary=summary, status=status)


def _error_text(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if out_of_memory(err):
        return f"out of memory ({text[:200]}); try a smaller --batch-size or model"
    return f"{type(err).__name__}: {text}"
