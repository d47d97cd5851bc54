"""The runner behind ``esgd-bench run`` and ``esgd-bench sweep`` (issue 4).

:func:`train` is one run: a compact airbench-style loop over a task of :mod:`tasks` with one optimizer of
:mod:`bench.optimizers`, timed as :mod:`bench.timing` describes, stopped on divergence (a NaN/inf loss, or
a loss above 1e5 times the first step's loss) and on Ctrl-C, with everything logged up to then kept.
:func:`run_benchmark` runs the grid of (task, optimizer, lr, seed) cells, sequentially or in ``jobs``
worker processes, and keeps the results store of :mod:`bench.results` up to date after every finished
cell, so a crash loses at most the cells that were running; ``resume`` skips cells already finished.

Input problems (bad numbers, unwritable folders, unknown names, missing data) surface as
:class:`BenchError`, :class:`~tasks.UnknownTaskError`, :class:`~bench.optimizers.UnknownOptimizerError`,
:class:`~bench.optimizers.OptimizerSpecError` or :class:`~tasks.TaskDataError` before any training starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import multiprocessing as mp
import os
import platform
import queue as _queue
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

import tasks
from esgd import DoubleBackwardUnsupportedError
from tasks import TaskConfig, TaskDataError

from . import results as store
from .compiled import compile_model, double_backward_error, hvp_overrides
from .distributed import ScaledStep, backend_for, run_cells, split_batch, world_and_rank
from .optimizers import (create_optimizer, default_lr, format_opt_spec, get_optimizer,
                         needs_create_graph, parse_opt_spec)
from .timing import Clock, PeakMemory, attribute_hvp_cost, summarise_timings

__all__ = ["BenchError", "RunInterrupted", "RunResult", "BenchConfig", "Cell", "Reporter", "train",
           "run_benchmark", "plan_cells", "resolve_device", "lr_grid", "best_lrs", "DEFAULT_OPTIMIZERS",
           "DIVERGENCE_FACTOR", "FINISHED"]

DEFAULT_OPTIMIZERS = ("esgd-m", "esgd", "sgd", "adam")
DIVERGENCE_FACTOR = 1e5
# Statuses of a finished cell: --resume skips these (a diverged run is a result, and on CPU a re-run
# would diverge again); "interrupted" and "error" cells are run again.
FINISHED = ("ok", "diverged")


class BenchError(ValueError):
    """A bad input to the benchmark: the message is one line, fit for the command line."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a benchmark; everything finished or logged so far is in ``out``."""

    def __init__(self, out: Path) -> None:
        super().__init__(str(out))
        self.out = out


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    status: str


# -- one run ------------------------------------------------------------------------------------------
def train(task: str, optimizer: str, *, seed: int = 0, steps: int | None = None,
          overrides: dict | None = None, task_config: TaskConfig | None = None,
          eval_every: int | None = None,
          progress_callback: Callable[[int, float], None] | None = None,
          accumulate: int = 1, compile: bool = False) -> RunResult:
    """Train ``optimizer`` (a registry name or a ``name:key=value`` spec) on ``task`` for ``steps`` steps.

    ``overrides`` are extra optimizer keyword arguments on top of the spec's; the learning rate is
    ``overrides["lr"]`` when given, else the registry's default for the task.  ``task_config`` gives the
    device, batch size, data and task options (its seed is replaced by ``seed``).  ``progress_callback``
    is called as ``callback(step, loss)`` after every step, outside the timed regions; a
    ``KeyboardInterrupt`` raised anywhere in the loop ends the run with status ``"interrupted"``.
    Statuses: ``ok``, ``diverged``, ``interrupted``, ``error`` (an exception inside the loop; the
    summary's ``error`` column has its message).  Task and optimizer construction errors propagate.

    ``accumulate`` splits each batch into that many micro-batches per optimizer step; inside a
    ``torch.distributed`` process group each rank trains on its shard of the batch through DDP (see
    :mod:`bench.distributed`); ``compile`` compiles the model in place and gives second-order optimizers
    finite-difference products (:mod:`bench.compiled`).  A model that cannot be differentiated twice
    raises :class:`esgd.DoubleBackwardUnsupportedError` (an input error, not a failed cell).
    """
    spec_task = tasks.get_task(task)
    name, spec_overrides = parse_opt_spec(optimizer)
    spec = get_optimizer(name)
    kwargs = {**spec_overrides, **(overrides or {})}
    config = dataclasses.replace(task_config or TaskConfig(), seed=seed)
    steps = spec_task.default_steps if steps is None else steps
    eval_every = eval_every or spec_task.default_eval_every
    for what, value in (("steps", steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"{what} must be a positive integer, got {value!r}")

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    _check_int("accumulate", accumulate)
    if compile and world_and_rank()[0] > 1:
        raise BenchError("--compile together with --nproc > 1 is not supported")
    problem = tasks.build_task(task, config)
    if compile:
        compile_model(problem.model)
        kwargs.update(hvp_overrides(spec, kwargs, compile))
    opt = create_optimizer(spec, problem.model.parameters(), task=task, seed=seed, **kwargs)
    plan = ScaledStep.make(problem, opt, accumulate=accumulate, second_order=spec.second_order)
    fraction = getattr(opt, "hvp_fraction", 1.0)
    if fraction < 1 and (plan is not None or getattr(opt, "hvp_method", "autograd") != "autograd"):
        raise BenchError(f"{name}: hvp_fraction < 1 needs the exact product (hvp_method="
                         "'autograd') and works without --accumulate, --nproc and --compile")
    lr = float(opt.param_groups[0]["lr"])
    label = format_opt_spec(name, spec_overrides)
    clock, memory = Clock(config.device), PeakMemory(config.device)
    head = {"task": task, "optimizer": label, "lr": lr, "seed": seed}
    rows: list[dict[str, Any]] = []
    evals: dict[str, float] = {}
    status, error, wall = "ok", "", 0.0
    batches, scale = problem.batches, problem.loss_scale
    second_order = spec.second_order
    is_hvp = getattr(opt, "is_hvp_step", None) if second_order else None
    initial = None

    def evaluate(row: dict[str, Any]) -> None:
        if plan is not None and plan.rank > 0:    # rank 0 evaluates and reports for all ranks
            return
        evals.update(problem.evaluate())
        row.update({f"eval_{k}": float(v) for k, v in evals.items()})

    memory.reset()
    with warnings.catch_warnings():
        # backward(create_graph=True) warns of a parameter <-> .grad reference cycle; the optimizer
        # detaches the gradients at the end of every HVP step and zero_grad(set_to_none=True) drops
        # them, so the cycle never outlives the step.
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        try:
            for step in range(1, steps + 1):
                t0 = clock()
                batch = next(batches)
                t1 = clock()
                opt.zero_grad(set_to_none=True)
                hvp_step = second_order and (bool(is_hvp()) if callable(is_hvp) else needs_create_graph(opt))
                if plan is not None:
                    loss = plan.forward_backward(batch)
                elif second_order:
                    loss = problem.loss(batch)
                    backward_with_hvp(problem, opt, batch, loss, fraction)
                else:
                    loss = problem.loss(batch)
                    loss.backward()
                t2 = clock()
                value = loss.item() / scale
                if initial is None:
                    initial = value
                bad = not math.isfinite(value) or (initial > 0 and value > DIVERGENCE_FACTOR * initial)
                if not bad:
                    opt.step() if plan is None else plan.step()
                t3 = clock() if not bad else t2
                wall += t3 - t0
                row = {**head, "step": step, "wall_time_s": wall, "loss": value, "is_hvp_step": hvp_step,
                       "step_ms": (t3 - t0) * 1e3, "data_ms": (t1 - t0) * 1e3,
                       "fwd_bwd_ms": (t2 - t1) * 1e3, "hvp_ms": math.nan,
                       "update_ms": (t3 - t2) * 1e3 if not bad else math.nan}
                rows.append(row)
                if bad:
                    status = "diverged"
                    break
                if step % eval_every == 0 or step == steps:
                    evaluate(row)
                if progress_callback is not None:
                    progress_callback(step, value)
        except KeyboardInterrupt:
            status = "interrupted"
        except (DoubleBackwardUnsupportedError, BenchError):
            raise       # the same for every cell: an input error
        except Exception as err:    # noqa: BLE001 - recorded in the summary, the other cells go on
            fatal = double_backward_error(err, label) if compile and second_order else None
            if fatal is not None:
                raise fatal from err
            status, error = "error", f"{type(err).__name__}: {err}"
    if status == "diverged" and rows:
        try:
            evaluate(rows[-1])
        except Exception:   # noqa: BLE001 - a NaN model may not evaluate; the divergence is the result
            pass
    attribute_hvp_cost(rows)
    summary = {
        **head, "opt_name": name, "steps": len(rows),
        "final_loss": rows[-1]["loss"] if rows else math.nan,
        "eval_metric": spec_task.eval_metric,
        "eval_value": float(evals.get(spec_task.eval_metric, math.nan)),
        "wall_time_s": wall, **summarise_timings(rows), "peak_mem_mb": memory.peak_mb(),
        "status": status, "data_source": problem.data_source, "synthetic": bool(problem.synthetic),
        "device": str(config.device), "error": error,
        "hvp_method": getattr(opt, "hvp_method", "") if second_order else "", "accumulate": accumulate,
        "world_size": world_and_rank()[0], "compiled": bool(compile),
    }
    if plan is not None:
        plan.close()
    return RunResult(rows=rows, summary=summary, status=status)


def sub_batch(batch: Any, fraction: float) -> Any:
    """The first ``ceil(fraction * B)`` rows of a batch: a tensor, or a tuple/list of tensors that share
    their first dimension B (the tasks' ``(x, y)``).  ``None`` when ``fraction >= 1`` or the batch has
    no rows to take (rosenbrock's batch is ``None``): the caller then uses the whole batch."""
    if fraction >= 1:
        return None
    parts = [batch] if isinstance(batch, torch.Tensor) else batch
    if not isinstance(parts, (tuple, list)) or not parts \
            or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in parts):
        return None
    rows = {t.shape[0] for t in parts}
    if len(rows) != 1:
        return None
    n = max(1, math.ceil(fraction * rows.pop()))
    return batch[:n] if isinstance(batch, torch.Tensor) else type(batch)(t[:n] for t in parts)


def backward_with_hvp(problem: Any, opt: torch.optim.Optimizer, batch: Any, loss: torch.Tensor,
                      fraction: float = 1.0) -> None:
    """The backward of a second-order optimizer's step, and on an HVP step its product.

    ``fraction == 1``: ``backward(create_graph=...)`` and ``step()`` takes the exact product.  Below 1,
    on an HVP step a plain backward gives the update's gradient and ``accumulate_hvp`` the product of
    the loss on the batch's first ``ceil(fraction * B)`` rows (batches are shuffled, so a random subset),
    Sophia's sub-batch estimate at about ``fraction`` of the exact product's cost.  The extra forward
    must not move the model's buffers (BatchNorm running statistics), so they are restored after it.
    """
    part = sub_batch(batch, fraction) if needs_create_graph(opt) else None
    if part is None:
        loss.backward(create_graph=needs_create_graph(opt))
        return
    loss.backward()
    buffers = [(b, b.detach().clone()) for b in problem.model.buffers()]
    try:
        opt.accumulate_hvp(problem.loss(part))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


# -- the benchmark grid ------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Everything ``esgd-bench run`` / ``sweep`` can be told (the CLI and ``--config`` files map onto it)."""

    tasks: list[str]
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    seeds: int = 3
    steps: int | None = None              # None: each task's default
    lr: float | None = None               # overrides the registry default for every optimizer
    lrs: list[float] | None = None        # sweep grid (None with sweep=True: lr_grid's default)
    sweep: bool = False
    batch_size: int | None = None
    eval_every: int | None = None
    device: str = "auto"
    out: Path | None = None
    data_dir: Path | None = None
    download: bool = False
    synthetic: bool = False
    jobs: int = 1
    resume: bool = False
    options: dict[str, Any] = field(default_factory=dict)   # "key" for every task, "task.key" for one
    accumulate: int = 1                   # micro-batches per optimizer step (batch_size stays the step's)
    nproc: int = 1                        # data-parallel processes (torch.distributed, DDP)
    compile: bool = False                 # torch.compile the model; finite-difference HVPs

    FIELDS = ("tasks", "optimizers", "seeds", "steps", "lr", "lrs", "sweep", "batch_size", "eval_every",
              "device", "out", "data_dir", "download", "synthetic", "jobs", "resume", "options", "accumulate",
              "nproc", "compile")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "BenchConfig":
        """Build from a config file's mapping; unknown keys are an error. ``opt`` is an alias of
        ``optimizers`` and ``task`` of ``tasks``, matching the command line."""
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for alias, key in (("opt", "optimizers"), ("task", "tasks"), ("option", "options")):
            if alias in data:
                data[key] = data.pop(alias)
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise BenchError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(cls.FIELDS)}")
        for key in ("tasks", "optimizers"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
        return cls(**data)


@dataclass(frozen=True)
class Cell:
    task: str
    optimizer: str            # the label written to the store: name or canonical name:key=value spec
    lr: float
    seed: int
    overrides: tuple = ()     # (key, value) pairs given to train(), lr included

    @property
    def key(self) -> tuple:
        return (self.task, self.optimizer, round(self.lr, 15), self.seed)


def resolve_device(device: str) -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def lr_grid(optimizer: str, task: str | None = None, points: int = 7) -> list[float]:
    """The default sweep grid: log-spaced 1e-3..1 for ESGD-M (the seed's advice), otherwise three
    decades centred on the registry's default for ``task``."""
    name = parse_opt_spec(optimizer)[0]
    if name == "esgd-m":
        lo, hi = -3.0, 0.0
    else:
        centre = math.log10(default_lr(get_optimizer(name), task) or 1e-2)
        lo, hi = centre - 1.5, centre + 1.5
    return [float(f"{10 ** e:.3g}") for e in np.linspace(lo, hi, points)]


def _check_int(name: str, value: Any, low: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_lr(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise BenchError(f"{name} must be a positive finite number, got {value!r}")


def _validate(config: BenchConfig) -> None:
    if not config.tasks:
        raise BenchError("no task given")
    if not config.optimizers:
        raise BenchError("no optimizer given")
    _check_int("--seeds", config.seeds)
    _check_int("--steps", config.steps, allow_none=True)
    _check_int("--batch-size", config.batch_size, allow_none=True)
    _check_int("--eval-every", config.eval_every, allow_none=True)
    _check_int("--jobs", config.jobs)
    _check_int("--accumulate", config.accumulate)
    _check_int("--nproc", config.nproc)
    if config.nproc > 1 and config.jobs > 1:
        raise BenchError("--nproc and --jobs cannot be combined: each cell already uses --nproc processes")
    if config.nproc > 1 and config.compile:
        raise BenchError("--compile together with --nproc > 1 is not supported")
    if config.lr is not None:
        _check_lr("--lr", config.lr)
    for lr in config.lrs or []:
        _check_lr("--lrs", lr)
    if config.lrs is not None and not config.lrs:
        raise BenchError("--lrs is empty")
    for name in config.tasks:
        tasks.get_task(name)
    for text in config.optimizers:
        name, overrides = parse_opt_spec(text)
        if config.sweep and "lr" in overrides:
            raise BenchError(f"sweep: {text!r} fixes lr, which the sweep varies")


def _task_options(config: BenchConfig) -> dict[str, dict[str, Any]]:
    """Split ``options`` between the tasks: ``task.key`` goes to that task; a bare ``key`` to every
    task that declares it (or to the only task), and it is an error when no task has it."""
    per: dict[str, dict[str, Any]] = {t: {} for t in config.tasks}
    for key, value in config.options.items():
        scope, dot, bare = key.rpartition(".")
        if dot:
            if scope not in per:
                raise BenchError(f"option {key!r} is scoped to {scope!r}, which is not among the tasks "
                                 f"({', '.join(config.tasks)})")
            per[scope][bare] = value
            continue
        if len(per) == 1:
            next(iter(per.values()))[key] = value
            continue
        takers = [t for t in per if key in (tasks.get_task(t).options or {})]
        if not takers:
            raise BenchError(f"no task among {', '.join(config.tasks)} has option {key!r} "
                             f"(scope it as TASK.{key}=...)")
        for t in takers:
            per[t][key] = value
    return per


def _task_config(config: BenchConfig, task: str, device: str, options: dict[str, Any]) -> TaskConfig:
    return TaskConfig(seed=0, device=device, batch_size=config.batch_size,
                      data_dir=Path(config.data_dir) if config.data_dir else None,
                      download=config.download, synthetic=config.synthetic, options=dict(options))


def plan_cells(config: BenchConfig) -> list[Cell]:
    """Every (task, optimizer, lr, seed) of the grid, in run order (seed-major within an lr)."""
    cells = []
    for task in config.tasks:
        for text in config.optimizers:
            name, overrides = parse_opt_spec(text)
            label = format_opt_spec(name, overrides)
            if config.sweep:
                lrs = config.lrs or lr_grid(text, task)
            elif "lr" in overrides:
                lrs = [overrides["lr"]]
            elif config.lr is not None:
                lrs = [config.lr]
            else:
                lrs = [default_lr(get_optimizer(name), task)]
            for lr in lrs:
                for seed in range(config.seeds):
                    cells.append(Cell(task, label, float(lr), seed, tuple(sorted({"lr": float(lr)}.items()))))
    return cells


class Reporter:
    """What :func:`run_benchmark` tells its caller; the default does nothing (the CLI shows rich bars)."""

    def add(self, cell: Cell, steps: int, done: RunResult | None = None) -> None:
        """A planned cell; ``done`` is set for a cell skipped by ``resume``."""

    def update(self, cell: Cell, step: int, loss: float) -> None:
        """Progress of a running cell (called at most a few times a second)."""

    def finish(self, cell: Cell, result: RunResult) -> None:
        """A cell ended (with any status)."""


class _Throttle:
    """Forward progress at most every ``interval`` seconds, plus the last step."""

    def __init__(self, send: Callable[[int, float], None], steps: int, interval: float = 0.1) -> None:
        self.send, self.steps, self.interval, self.last = send, steps, interval, 0.0

    def __call__(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or step == self.steps:
            self.last = now
            self.send(step, loss)


def _default_out(config: BenchConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = "+".join(config.tasks) + ("-sweep" if config.sweep else "")
    out = Path("results") / f"{stem}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("results") / f"{stem}-{stamp}-{n}"
    return out


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise BenchError(f"cannot write to output folder {out}: {err.strerror or err}") from None


# Settings that change what a cell computes: a resumed store must have been made with the same ones.
_RESUME_KEYS = ("steps", "batch_size", "eval_every", "synthetic", "options", "device")


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: str) -> dict[str, Any]:
    import esgd
    env = {"esgd_bench_version": esgd.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "platform": platform.platform(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
           "git_commit": _git_commit()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _config_json(config: BenchConfig, device: str) -> dict[str, Any]:
    data = {k: getattr(config, k) for k in BenchConfig.FIELDS}
    data["device"] = device
    data["out"] = str(config.out) if config.out else None
    data["data_dir"] = str(config.data_dir) if config.data_dir else None
    return data


# -- worker processes (--jobs) -----------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(progress: Any, stop: Any, threads: int) -> None:
    # Ctrl-C reaches every process of the terminal's group; the parent alone decides, through ``stop``,
    # so that each worker ends its run as "interrupted" and returns what it logged.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER.update(progress=progress, stop=stop)


def _worker_run(index: int, cell: Cell, task_config: TaskConfig, steps: int | None,
                eval_every: int | None, accumulate: int = 1, compile: bool = False) -> RunResult:
    progress, stop = _WORKER["progress"], _WORKER["stop"]

    def callback(step: int, loss: float) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        progress.put((index, step, loss))

    return train(cell.task, cell.optimizer, seed=cell.seed, steps=steps, overrides=dict(cell.overrides),
                 task_config=task_config, eval_every=eval_every, accumulate=accumulate, compile=compile,
                 progress_callback=_Throttle(callback, steps or 0, 0.25))


# -- run_benchmark -----------------------------------------------------------------------------------
def run_benchmark(config: BenchConfig, *, reporter: Reporter | None = None,
                  argv: Sequence[str] | None = None) -> Path:
    """Run every cell of ``config`` and keep the store in ``config.out`` (default
    ``results/<task>[+<task>...]-<YYYYmmdd-HHMMSS>/``; several tasks share one folder) up to date.

    Returns the folder.  Raises :class:`RunInterrupted` (a ``KeyboardInterrupt``) after writing
    everything when interrupted; cells that end with status ``error`` are recorded and the others go on.
    """
    reporter = reporter or Reporter()
    _validate(config)
    device = resolve_device(config.device)
    options = _task_options(config)
    tcfgs = {t: _task_config(config, t, device, options[t]) for t in config.tasks}
    specs = {t: tasks.get_task(t) for t in config.tasks}
    steps_of = {t: config.steps or specs[t].default_steps for t in config.tasks}
    task_meta: dict[str, Any] = {}
    for t in config.tasks:     # build once up front: missing data or a bad option fails before training
        try:
            problem = tasks.build_task(t, tcfgs[t])
        except TaskDataError:
            raise
        except (ValueError, TypeError) as err:
            raise BenchError(f"{t}: {err}") from None
        if config.accumulate * config.nproc > 1:
            try:
                split_batch(next(problem.batches), config.accumulate * config.nproc)
            except BenchError as err:
                raise BenchError(f"{t}: {err}") from None
        task_meta[t] = {"description": specs[t].description, "steps": steps_of[t],
                        "eval_every": config.eval_every or specs[t].default_eval_every,
                        "batch_size": config.batch_size or specs[t].default_batch_size,
                        "eval_metric": specs[t].eval_metric, "higher_is_better": specs[t].higher_is_better,
                        "target": specs[t].target, "options": options[t],
                        "data_source": problem.data_source, "synthetic": bool(problem.synthetic),
                        "loss_scale": problem.loss_scale, "param_scale": problem.param_scale,
                        "parameters": sum(p.numel() for p in problem.model.parameters())}
        del problem
    cells = plan_cells(config)

    out = Path(config.out) if config.out else _default_out(config)
    has_store = (out / "summary.csv").exists()
    if has_store and not config.resume:
        raise BenchError(f"{out} already holds results: pass --resume to continue it, or choose another --out")
    _prepare_out(out)
    config_json = _config_json(config, device)
    old_metrics, old_summary, meta = pd.DataFrame(), pd.DataFrame(), {}
    if has_store:
        try:
            meta = store.load_meta(out)
            old_summary = store.load_summary(out).drop(columns="result_dir")
            old_metrics = store.load_metrics(out).drop(columns="result_dir")
        except store.ResultsError as err:
            raise BenchError(f"--resume: {err}") from None
        before = meta.get("config", {})
        for key in _RESUME_KEYS:
            if key in before and before[key] != config_json[key]:
                raise BenchError(f"--resume: {out} was made with {key}={before[key]!r}, now {config_json[key]!r}; "
                                 "use the same settings or another --out")

    def key_of(frame: pd.DataFrame) -> pd.Series:
        return pd.Series([(t, o, round(float(lr), 15), int(s)) for t, o, lr, s in
                          frame[store.CELL_KEY].itertuples(index=False)], index=frame.index, dtype=object)

    done_keys: set = set()
    if len(old_summary):
        finished = old_summary[old_summary["status"].isin(FINISHED)]
        done_keys = set(key_of(finished))
        old_summary = finished.reset_index(drop=True)
        old_metrics = old_metrics[key_of(old_metrics).isin(done_keys)] if len(old_metrics) else old_metrics

    threads = max(1, (os.cpu_count() or 1) // config.jobs) if config.jobs > 1 else torch.get_num_threads()
    session = {"argv": list(argv) if argv is not None else sys.argv, "started": _now(), "finished": None,
               "jobs": config.jobs, "threads_per_job": threads, "resumed": bool(has_store)}
    meta = {
        "command": " ".join(session["argv"]),
        "started": meta.get("started", session["started"]), "finished": None,
        "config": config_json, "tasks": {**meta.get("tasks", {}), **task_meta},
        "data_sources": {t: m["data_source"] for t, m in {**meta.get("tasks", {}), **task_meta}.items()},
        "environment": _environment(device), "jobs": config.jobs, "threads_per_job": threads,
        "peak_memory": PeakMemory(device).method, "timing": "see bench/timing.py",
        "sessions": meta.get("sessions", []) + [session],
        "world_size": config.nproc, "backend": backend_for(device) if config.nproc > 1 else None,
        "accumulate": config.accumulate, "compile": config.compile,
    }
    new_rows: list[dict[str, Any]] = []
    new_summary: list[dict[str, Any]] = []

    def write() -> None:
        frames = [f for f in (old_metrics, store.metrics_frame(new_rows) if new_rows else None)
                  if f is not None and len(f)]
        metrics = store.metrics_frame(pd.concat(frames, ignore_index=True).to_dict("records")) \
            if frames else store.metrics_frame([])
        sums = [f for f in (old_summary, store.summary_frame(new_summary) if new_summary else None)
                if f is not None and len(f)]
        summary = store.summary_frame(pd.concat(sums, ignore_index=True).to_dict("records")) \
            if sums else store.summary_frame([])
        if len(summary):    # plan order, whatever order the cells finished in
            order = {c.key: i for i, c in enumerate(cells)}
            rank = key_of(summary).map(lambda k: order.get(k, len(order)))
            summary = summary.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)
        meta["status_counts"] = summary["status"].value_counts().to_dict() if len(summary) else {}
        store.write_csv_atomic(metrics, out / "metrics.csv")
        store.write_csv_atomic(summary, out / "summary.csv")
        store.write_json_atomic(meta, out / "meta.json")

    def record(result: RunResult) -> None:
        new_rows.extend(result.rows)
        new_summary.append(result.summary)
        write()

    todo = []
    for cell in cells:
        if cell.key in done_keys:
            prev = old_summary[key_of(old_summary) == cell.key].iloc[0].to_dict()
            reporter.add(cell, steps_of[cell.task], RunResult([], prev, prev["status"]))
        else:
            reporter.add(cell, steps_of[cell.task])
            todo.append(cell)
    write()
    interrupted = False
    scaling = {"accumulate": config.accumulate, "compile": config.compile}
    try:
        if config.nproc > 1 and todo:
            def on_result(cell: Cell, result: RunResult) -> None:
                record(result)
                reporter.finish(cell, result)

            interrupted = run_cells(todo, nproc=config.nproc, device=device, tcfgs=tcfgs, steps_of=steps_of,
                                    eval_every=config.eval_every, train_kwargs=scaling,
                                    threads=max(1, (os.cpu_count() or 1) // config.nproc),
                                    on_progress=reporter.update, on_result=on_result)
        elif config.jobs > 1 and len(todo) > 1:
            interrupted = _run_parallel(todo, config, tcfgs, reporter, record, threads)
        else:
            for cell in todo:
                result = train(cell.task, cell.optimizer, seed=cell.seed, steps=steps_of[cell.task],
                               overrides=dict(cell.overrides), task_config=tcfgs[cell.task],
                               eval_every=config.eval_every, **scaling,
                               progress_callback=_Throttle(lambda s, l, c=cell: reporter.update(c, s, l),
                                                           steps_of[cell.task]))
                record(result)
                reporter.finish(cell, result)
                if result.status == "interrupted":
                    interrupted = True
                    break
    except KeyboardInterrupt:
        interrupted = True
    meta["finished"] = session["finished"] = _now()
    write()
    if interrupted:
        raise RunInterrupted(out)
    return out


def _run_parallel(todo: list[Cell], config: BenchConfig, tcfgs: dict[str, TaskConfig], reporter: Reporter,
                  record: Callable[[RunResult], None], threads: int) -> bool:
    """Run cells in fresh worker processes (one per cell, so each has its own peak RSS).

    A fork server that has imported torch and this package once forks each worker: a fresh process per
    cell without paying the torch import every time (spawn where fork servers do not exist).
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["bench.runner"])
    else:
        ctx = mp.get_context("spawn")
    progress, stop = ctx.Queue(), ctx.Event()
    interrupted = False
    with ProcessPoolExecutor(max_workers=config.jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress, stop, threads), max_tasks_per_child=1) as pool:
        futures: dict[Future, tuple[int, Cell]] = {}
        for i, cell in enumerate(todo):
            fut = pool.submit(_worker_run, i, cell, tcfgs[cell.task], config.steps or
                              tasks.get_task(cell.task).default_steps, config.eval_every,
                              config.accumulate, config.compile)
            futures[fut] = (i, cell)
        pending = set(futures)

        def drain() -> None:
            try:
                while True:
                    i, step, loss = progress.get_nowait()
                    reporter.update(todo[i], step, loss)
            except _queue.Empty:
                pass

        def collect(done: Iterable[Future]) -> None:
            nonlocal interrupted
            for fut in done:
                _, cell = futures[fut]
                if fut.cancelled():
                    continue
                try:
                    result = fut.result()
                except Exception as err:  # noqa: BLE001 - a dead worker is one failed cell
                    result = _error_result(cell, tcfgs[cell.task], f"{type(err).__name__}: {err}")
                record(result)
                reporter.finish(cell, result)
                interrupted |= result.status == "interrupted"

        try:
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                collect(done)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for fut in pending:
                fut.cancel()
            done, _ = wait(pending, timeout=60)
            drain()
            collect(done)
    return interrupted


def _error_result(cell: Cell, task_config: TaskConfig, error: str) -> RunResult:
    summary = {"task": cell.task, "optimizer": cell.optimizer, "opt_name": parse_opt_spec(cell.optimizer)[0],
               "lr": cell.lr, "seed": cell.seed, "steps": 0, "status": "error", "error": error,
               "device": task_config.device, "synthetic": task_config.synthetic}
    return RunResult([], summary, "error")


# -- sweep -------------------------------------------------------------------------------------------
def best_lrs(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (task, optimizer): mean final loss over seeds at each lr, and the best lr.

    An lr where any seed did not finish ``ok`` counts as infinitely bad: a rate that sometimes diverges
    is not a rate to recommend.  Returns one row per (task, optimizer, lr) with ``mean_final_loss``,
    ``runs`` and ``best`` (True on the winning lr; none when every lr failed).
    """
    rows = []
    for (task, opt, lr), g in summary.groupby(["task", "optimizer", "lr"], sort=True):
        ok = bool((g["status"] == "ok").all())
        loss = pd.to_numeric(g["final_loss"], errors="coerce")
        mean = float(loss.mean()) if ok and loss.notna().all() else math.inf
        rows.append({"task": task, "optimizer": opt, "lr": lr, "mean_final_loss": mean,
                     "std_final_loss": float(loss.std(ddof=1)) if ok else math.nan,
                     "runs": f"{int((g['status'] == 'ok').sum())}/{len(g)}"})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["best"] = False
    for _, g in table.groupby(["task", "optimizer"]):
        finite = g[np.isfinite(g["mean_final_loss"])]
        if len(finite):
            table.loc[finite["mean_final_loss"].idxmin(), "best"] = True
    return table
