"""The configuration of ``esgd-bench run`` and ``sweep``: one typed value, checked in one place.

Whatever a value's source, the command line, a ``--config`` JSON or TOML file, or the folder a
``--resume`` continues, it passes through :func:`make_config`, which checks its type and range and
says in one line which value is wrong and where it came from.  A file's ``"synthetic": "no"`` is an
error, not a truthy string.  Settings that only make sense together (``--nproc`` with ``--jobs``, a
sub-batch product with ``--accumulate``, a grid too large to plan) are refused here too, before any
task is built or any cell trains.
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import tasks
from tasks import TaskConfig
from tasks.base import resolve_options

from .cluster import EXECUTORS, ClusterOptions, require_submitit
from .errors import BenchError
from .optimizers import OptimizerChoice, parse_optimizer
from .schedules import Schedule, parse_schedule
from .steps import check_precision, check_route

__all__ = ["BenchConfig", "make_config", "DEFAULT_OPTIMIZERS", "MAX_CELLS", "resolve_device"]

DEFAULT_OPTIMIZERS = ("esgd-m", "esgd", "sgd", "adam")
MAX_CELLS = 100_000        # a larger grid is a typo (--seeds 100000000), not a benchmark
ALIASES = {"opt": "optimizers", "task": "tasks", "option": "options"}


@dataclass(frozen=True)
class BenchConfig:
    """Everything ``run`` and ``sweep`` can be told, typed and checked (build it with :func:`make_config`)."""

    tasks: tuple[str, ...]
    optimizers: tuple[OptimizerChoice, ...]
    seeds: int = 3
    steps: int | None = None              # None: each task's default
    lr: float | None = None               # one lr for every optimizer that does not fix its own
    lrs: tuple[float, ...] | None = None  # the sweep's grid (None: lr_grid's default)
    sweep: bool = False
    batch_size: int | None = None
    eval_every: int | None = None
    device: str = "cpu"                   # resolved: cpu or cuda
    out: Path | None = None
    data_dir: Path | None = None
    download: bool = False
    synthetic: bool = False
    jobs: int = 1
    resume: bool = False
    force: bool = False                   # write into a folder that holds files the suite did not write
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # per task
    accumulate: int = 1                   # micro-batches per optimizer step
    nproc: int = 1                        # data-parallel processes
    compile: bool = False
    threads: int | None = None            # torch threads of a sequential run (None: torch's default)
    precision: str = "fp32"               # fp32, bf16 (autocast) or fp16 (autocast and loss scaling)
    schedule: Schedule | None = None      # None: each task's default schedule
    snapshot_every: float = 60.0          # seconds between a running cell's snapshots; 0: none
    executor: str = "local"               # local, slurm or submitit-local (bench.cluster)
    cluster: ClusterOptions = ClusterOptions()
    wait: bool = False                    # with a cluster executor: wait for the cells and show the tables

    def task_config(self, task: str, seed: int = 0) -> TaskConfig:
        return TaskConfig(seed=seed, device=self.device, batch_size=self.batch_size, data_dir=self.data_dir,
                          download=self.download, synthetic=self.synthetic,
                          options=dict(self.options.get(task, {})))

    def schedule_for(self, task: str) -> Schedule:
        """The schedule ``task`` is trained with: the one given, else the task's own default."""
        return self.schedule or parse_schedule(tasks.get_task(task).default_schedule)

    def to_json(self) -> dict[str, Any]:
        """The settings as meta.json records them (and ``--resume`` compares them)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["optimizers"] = [c.label for c in self.optimizers]
        data["tasks"], data["lrs"] = list(self.tasks), list(self.lrs) if self.lrs is not None else None
        data["options"] = {t: dict(o) for t, o in self.options.items()}
        data["cluster"] = dataclasses.asdict(self.cluster)
        data["schedule"] = self.schedule.label if self.schedule is not None else None
        for key in ("out", "data_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data


# -- one checker per kind of value -------------------------------------------------------------------
def _int(low: int) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {v!r}")
        return v
    return check


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BenchError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise BenchError(f"{name} must be true or false, got {v!r}")
    return v


def _path(name: str, v: Any) -> Path:
    if isinstance(v, Path) or (isinstance(v, str) and v.strip()):
        return Path(v).expanduser()
    raise BenchError(f"{name} must be a folder path, got {v!r}")


def _names(name: str, v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in items):
        raise BenchError(f"{name} must be a name or a list of names, got {v!r}")
    if not items:
        raise BenchError(f"{name} is empty")
    return tuple(x.strip() for x in items)


def _optimizers(name: str, v: Any) -> tuple[OptimizerChoice, ...]:
    items = [v] if isinstance(v, (str, OptimizerChoice)) else v
    if not isinstance(items, (list, tuple)) or not items \
            or not all(isinstance(x, (str, OptimizerChoice)) for x in items):
        raise BenchError(f"{name} must be an optimizer name or a list of them, got {v!r}")
    return tuple(parse_optimizer(x) for x in items)


def _lrs(name: str, v: Any) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise BenchError(f"{name} must be a non-empty list of learning rates, got {v!r}")
    return tuple(_positive(name, x) for x in v)


def _device(name: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in ("cpu", "cuda", "auto"):
        raise BenchError(f"{name} must be cpu, cuda or auto, got {v!r}")
    return v.lower()


def _seconds(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BenchError(f"{name} must be a number of seconds >= 0, got {v!r}")
    return float(v)


def _executor(name: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in EXECUTORS:
        raise BenchError(f"{name} must be one of {', '.join(EXECUTORS)}, got {v!r}")
    return v.lower()


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise BenchError(f"{name} must be a non-empty text, got {v!r}")
    return v.strip()


def _sbatch(name: str, v: Any) -> dict[str, str]:
    if not isinstance(v, Mapping) or not all(isinstance(k, str) and k.strip() and isinstance(x, (str, int, float))
                                             and not isinstance(x, bool) for k, x in v.items()):
        raise BenchError(f"{name} must be a table of sbatch options, e.g. constraint = \"a100\", got {v!r}")
    return {k.strip().removeprefix("--"): str(x) for k, x in v.items()}


def _precision(name: str, v: Any) -> str:
    from .steps import PRECISIONS
    if not isinstance(v, str) or v.lower() not in PRECISIONS:
        raise BenchError(f"{name} must be one of {', '.join(PRECISIONS)}, got {v!r}")
    return v.lower()


def _schedule(name: str, v: Any) -> Schedule:
    try:
        return parse_schedule(v)
    except BenchError as err:
        raise BenchError(f"{name}: {err}") from None


def _options(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise BenchError(f"{name} must be a table of key = value, got {v!r}")
    for key, value in v.items():
        if not isinstance(key, str) or not key.strip() or isinstance(value, (dict, list, tuple)) \
                or value is None:
            raise BenchError(f"{name}: expected key = number, text or boolean, got {key!r} = {value!r}")
    return {k.strip(): v for k, v in v.items()}


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "tasks": _names, "optimizers": _optimizers, "seeds": _int(1), "steps": _int(1), "lr": _positive,
    "lrs": _lrs, "sweep": _bool, "batch_size": _int(1), "eval_every": _int(1), "device": _device,
    "out": _path, "data_dir": _path, "download": _bool, "synthetic": _bool, "jobs": _int(1),
    "resume": _bool, "force": _bool, "options": _options, "accumulate": _int(1), "nproc": _int(1),
    "compile": _bool, "threads": _int(1), "precision": _precision, "schedule": _schedule,
    "snapshot_every": _seconds,
    "executor": _executor, "wait": _bool,
    # what a cluster executor asks the scheduler for (bench.cluster.ClusterOptions)
    "partition": _text, "time_min": _int(1), "gpus_per_task": _int(0), "cpus_per_task": _int(1),
    "mem_gb": _positive, "account": _text, "qos": _text, "sbatch": _sbatch, "array_parallelism": _int(1),
    "nodes": _int(1),
}
CLUSTER_KEYS = tuple(f.name for f in fields(ClusterOptions))
KEYS = tuple(_CHECKS)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def make_config(command_line: Mapping[str, Any], file: Mapping[str, Any] | None = None,
                file_name: str | os.PathLike | None = None, *, sweep: bool = False) -> BenchConfig:
    """Merge the command line over a config file over the defaults, checking every value.

    ``None`` on the command line means "not given".  File keys may use dashes (``batch-size``) and the
    command line's names (``opt``, ``task``, ``option``); unknown keys are an error.  Options from the
    two sources are merged key by key.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in (file or {}).items():
        key = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if key not in _CHECKS or key == "sweep":
            known = ", ".join(k for k in KEYS if k != "sweep")
            raise BenchError(f"--config {file_name}: unknown key {key!r}; valid keys: {known}")
        values[key] = _CHECKS[key](f"{key!r} in --config {file_name}", value)
        where[key] = f"{key!r} in --config {file_name}"
    for key, value in command_line.items():
        if value is None:
            continue
        checked = _CHECKS[key](_flag(key), value)
        values[key] = {**values.get(key, {}), **checked} if key == "options" else checked
        where[key] = _flag(key)
    values.setdefault("optimizers", tuple(parse_optimizer(n) for n in DEFAULT_OPTIMIZERS))
    values.setdefault("seeds", 2 if sweep else 3)
    if "tasks" not in values:
        raise BenchError("no task given")
    options = _split_options(values.pop("options", {}), values["tasks"])
    cluster = {k: values.pop(k) for k in CLUSTER_KEYS if k in values}
    if cluster and values.get("executor", "local") == "local":
        given = ", ".join(where[k] for k in cluster)
        raise BenchError(f"{given}: scheduler options need --executor slurm or submitit-local")
    config = BenchConfig(**values, options=options, sweep=sweep, cluster=ClusterOptions(**cluster))
    config = replace(config, device=resolve_device(values.get("device", "auto")))
    _check_together(config, where)
    return config


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is there, else ``cpu``; ``cuda`` without one is an error."""
    import torch
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def _split_options(options: Mapping[str, Any], task_names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``task.key`` goes to that task; a bare ``key`` to every task that declares it (or to the only
    task), and it is an error when no task has it."""
    per: dict[str, dict[str, Any]] = {t: {} for t in task_names}
    for t in task_names:
        tasks.get_task(t)
    for key, value in options.items():
        scope, dot, bare = key.rpartition(".")
        if dot:
            if scope not in per:
                raise BenchError(f"option {key!r} is scoped to {scope!r}, which is not among the tasks "
                                 f"({', '.join(task_names)})")
            per[scope][bare] = value
        elif len(per) == 1:
            next(iter(per.values()))[key] = value
        else:
            takers = [t for t in per if key in (tasks.get_task(t).options or {})]
            if not takers:
                raise BenchError(f"no task among {', '.join(task_names)} has option {key!r} "
                                 f"(scope it as TASK.{key}=...)")
            for t in takers:
                per[t][key] = value
    # Typed as the task reads them ("8" from the command line is 8), so settings compare equal on --resume.
    for t, given in per.items():
        declared = tasks.get_task(t).options
        if declared and given:
            resolved = resolve_options(t, declared, given)
            per[t] = {k: resolved[k] for k in given}
    return per


def _check_together(c: BenchConfig, where: Mapping[str, str]) -> None:
    cpus = os.cpu_count() or 1
    check_precision(c.precision, c.device)
    if c.executor != "local":
        require_submitit()
        if c.jobs > 1:
            raise BenchError(f"--jobs and --executor {c.executor} cannot be combined: every cell is a job of its own")
        if c.nproc % c.cluster.nodes:
            raise BenchError(f"--nproc {c.nproc} does not split over --nodes {c.cluster.nodes}")
    elif c.wait:
        raise BenchError("--wait needs --executor slurm or submitit-local (a local run always waits)")
    if c.nproc > 1 and c.jobs > 1:
        raise BenchError("--nproc and --jobs cannot be combined: each cell already uses --nproc processes")
    if c.nproc > 1 and c.compile:
        raise BenchError("--compile together with --nproc > 1 is not supported")
    if c.jobs > cpus:
        raise BenchError(f"{where.get('jobs', '--jobs')} {c.jobs}: this machine has {cpus} CPUs; use at most {cpus}")
    if c.nproc > 1 and c.device == "cpu" and c.nproc > cpus and c.executor != "slurm":
        raise BenchError(f"{where.get('nproc', '--nproc')} {c.nproc}: this machine has {cpus} CPUs; "
                         f"use at most {cpus} processes")
    if c.nproc > 1 and c.device == "cuda" and c.executor == "local":
        import torch
        if torch.cuda.device_count() < c.nproc:
            raise BenchError(f"--nproc {c.nproc} needs {c.nproc} GPUs, this machine has "
                             f"{torch.cuda.device_count()}")
    lrs = 1
    for choice in c.optimizers:
        if c.sweep and choice.lr is not None:
            raise BenchError(f"sweep: {choice.label!r} fixes lr, which the sweep varies")
        check_route(choice, accumulate=c.accumulate, world=c.nproc, compile=c.compile, precision=c.precision)
        method = choice.given.get("hvp_method", "autograd")
        if c.compile and choice.second_order and method == "autograd" and "hvp_method" in choice.given:
            raise BenchError(f"{choice.label}: a compiled model cannot be differentiated twice; with "
                             "--compile use hvp_method='finite-difference' (the default there: leave it unset)")
        if c.compile and choice.second_order and not _takes("hvp_method", choice):
            raise BenchError(f"--compile: {choice.name} has no hvp_method option, so it cannot get "
                             "Hessian-vector products from a compiled model (they need double backward)")
    if c.sweep:
        lrs = len(c.lrs) if c.lrs else 7
    cells = len(c.tasks) * len(c.optimizers) * lrs * c.seeds
    if cells > MAX_CELLS:
        raise BenchError(f"the grid has {cells:,} cells ({len(c.tasks)} task(s) x {len(c.optimizers)} "
                         f"optimizer(s) x {lrs} lr(s) x {c.seeds:,} seed(s)); at most {MAX_CELLS:,} are "
                         "allowed: lower --seeds or the grid")


def _takes(keyword: str, choice: OptimizerChoice) -> bool:
    import inspect
    return keyword in inspect.signature(choice.spec.factory).parameters
