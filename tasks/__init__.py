"""tasks: the benchmark task registry, one task per file, found without edits elsewhere.

Every module in this package that defines ``TASK`` (a :class:`~tasks.base.TaskSpec`) or ``TASKS`` (a list
of them) is registered.  Scaled variants of every task (``<task>-loss-x<n>``, ``<task>-params-x<n>``) are
built on demand by :mod:`tasks.scaled`, for any factor ``n``.  Installed packages add tasks through the
``esgd_bench.tasks`` entry point group (:mod:`tasks.plugins`).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil

from .base import Problem, TaskConfig, TaskDataError, TaskOptionError, TaskSpec, UnknownTaskError

__all__ = ["Problem", "TaskConfig", "TaskDataError", "TaskOptionError", "TaskSpec", "UnknownTaskError",
           "get_task", "list_tasks", "build_task", "task_source", "reset"]

_NOT_TASKS = {"base", "scaled", "data", "plugins"}
BUILT_IN = "built-in"


def _discover() -> dict[str, TaskSpec]:
    found: dict[str, TaskSpec] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_TASKS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs = list(getattr(module, "TASKS", [])) + ([module.TASK] if hasattr(module, "TASK") else [])
        for spec in specs:
            if spec.name in found:
                raise RuntimeError(f"task {spec.name!r} is defined twice")
            found[spec.name] = spec
    return found


_BASE: dict[str, TaskSpec] | None = None
_SOURCES: dict[str, str] = {}


def _base_tasks() -> dict[str, TaskSpec]:
    global _BASE
    if _BASE is None:
        from .plugins import load_task_plugins
        found = _discover()
        _SOURCES.clear()
        for name, (spec, origin) in load_task_plugins(found).items():
            found[name] = spec
            _SOURCES[name] = origin
        _BASE = found
    return _BASE


def reset() -> None:
    """Forget the discovered tasks and plugins; the next lookup reads task files and entry points anew."""
    global _BASE
    _BASE = None
    _SOURCES.clear()


def task_source(name: str) -> str:
    """``built-in``, or the plugin distribution and object that registered ``name``."""
    _base_tasks()
    return _SOURCES.get(name, BUILT_IN)


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
