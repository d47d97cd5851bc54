"""tasks: the benchmark task registry, one task per file, found without edits elsewhere.

Every module in this package that defines ``TASK`` (a :class:`~tasks.base.TaskSpec`) or ``TASKS`` (a list
of them) is registered.  Scaled variants of every task (``<task>-loss-x<n>``, ``<task>-params-x<n>``) are
built on demand by :mod:`tasks.scaled`, for any factor ``n``.  Installed packages add tasks through the
``esgd_bench.tasks`` entry point group (see :mod:`bench.plugins`).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil

from .base import Problem, TaskConfig, TaskDataError, TaskOptionError, TaskSpec

__all__ = ["Problem", "TaskConfig", "TaskDataError", "TaskOptionError", "TaskSpec", "UnknownTaskError",
           "get_task", "list_tasks", "build_task"]

_SKIP = {"base", "scaled", "data"}


class UnknownTaskError(LookupError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


def _discover() -> dict[str, TaskSpec]:
    found: dict[str, TaskSpec] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _SKIP or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs = list(getattr(module, "TASKS", [])) + ([module.TASK] if hasattr(module, "TASK") else [])
        for spec in specs:
            if spec.name in found:
                raise RuntimeError(f"task {spec.name!r} is defined twice")
            found[spec.name] = spec
    return found


_BASE: dict[str, TaskSpec] | None = None


def _base_tasks() -> dict[str, TaskSpec]:
    global _BASE
    if _BASE is None:
        from bench import plugins     # third-party tasks: the esgd_bench.tasks entry points
        found = _discover()
        found.update(plugins.load_task_plugins(found))
        _BASE = found
    return _BASE


def get_task(name: str) -> TaskSpec:
    base = _base_tasks()
    if name in base:
        return base[name]
    from . import scaled
    parsed = scaled.parse_name(name)
    if parsed is not None and parsed[0] in base:
        return scaled.scaled_task(base[parsed[0]], parsed[1], parsed[2])
    close = difflib.get_close_matches(name, [t.name for t in list_tasks()], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}.{hint} Valid names: {', '.join(sorted(base))}, and their "
                           "scaled variants <task>-loss-x<n> and <task>-params-x<n> (e.g. mnist-loss-x1000)")


def list_tasks(pattern: str = "*", *, variants: bool = True) -> list[TaskSpec]:
    """Registered tasks, and with ``variants`` the listed scaled variants, filtered with fnmatch."""
    specs = list(_base_tasks().values())
    if variants:
        from . import scaled
        specs += [v for s in list(specs) for v in scaled.listed_variants(s)]
    return sorted((s for s in specs if fnmatch.fnmatch(s.name, pattern)), key=lambda s: s.name)


def build_task(name: str, config: TaskConfig | None = None) -> Problem:
    return get_task(name).build(config or TaskConfig())
