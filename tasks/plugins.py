"""Tasks from installed packages: the ``esgd_bench.tasks`` entry points, and the shared loader.

A distribution declares ``[project.entry-points."esgd_bench.tasks"] mytask = "mypkg.bench:TASK"``; the
object is a :class:`~tasks.base.TaskSpec` or a list of them.  Entry points are read once, lazily.  A plugin
that fails to load (an import error, the wrong kind of object, a name that is taken) is skipped with one
:class:`PluginWarning` naming the entry point and its distribution, so one broken package cannot take the
built-in tasks (or the other plugins) down with it.  :func:`load_entry_points` is the same loop for any
group; the optimizer registry uses it for ``esgd_bench.optimizers``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import warnings
from typing import Callable, TypeVar

from .base import TaskSpec

__all__ = ["TASK_GROUP", "PluginWarning", "describe", "load_entry_points", "load_task_plugins"]

TASK_GROUP = "esgd_bench.tasks"
T = TypeVar("T")


class PluginWarning(UserWarning):
    """A plugin entry point that could not be loaded and was skipped."""


def describe(err: BaseException) -> str:
    """``Type: message`` on one line (just the type when the message is empty)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_entry_points(group: str, convert: Callable[[object, metadata.EntryPoint], list[T]]
                      ) -> list[tuple[T, str]]:
    """``(item, origin)`` for every item that ``convert(loaded_object, entry_point)`` returns, over the
    group's entry points in name order; an entry point whose loading or conversion raises is skipped
    with one :class:`PluginWarning`.  ``origin`` reads ``plugin DIST VERSION (module:attr)``."""
    found: list[tuple[T, str]] = []
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name} {dist.version}" if dist is not None else "plugin"
        try:
            items = convert(ep.load(), ep)
        except BaseException as err:    # whatever a third-party import does, even sys.exit()
            if isinstance(err, KeyboardInterrupt):
                raise
            warnings.warn(f"skipping plugin {ep.name!r} ({origin}, {group} = {ep.value}): {describe(err)}",
                          PluginWarning, stacklevel=2)
            continue
        found += [(item, f"{origin} ({ep.value})") for item in items]
    return found


def load_task_plugins(taken: dict[str, TaskSpec]) -> dict[str, tuple[TaskSpec, str]]:
    """The tasks of every ``esgd_bench.tasks`` entry point whose names are not in ``taken``, with
    their origin."""
    found: dict[str, tuple[TaskSpec, str]] = {}

    def convert(obj: object, ep: metadata.EntryPoint) -> list[TaskSpec]:
        specs = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        names = [getattr(spec, "name", None) for spec in specs]
        for i, spec in enumerate(specs):
            if not isinstance(spec, TaskSpec):
                raise TypeError(f"{ep.value} gives a {type(spec).__name__}, not a tasks.TaskSpec")
            if spec.name in taken or spec.name in found or spec.name in names[:i]:
                raise ValueError(f"task {spec.name!r} is already registered")
        return specs

    for spec, origin in load_entry_points(TASK_GROUP, convert):
        found[spec.name] = (spec, origin)
    return found
