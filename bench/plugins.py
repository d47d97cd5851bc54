"""User optimizers and third-party plugins for the optimizer and task registries (issue 7).

Two ways in, after the ``module:attr`` object references of Python packaging's entry points:

* ``--opt package.module:ClassName[:key=value,...]`` names any importable ``torch.optim.Optimizer``
  subclass.  :func:`class_path_spec` imports it and builds an :class:`~bench.optimizers.OptimizerSpec` on
  the fly, named by the reference as typed; it is second order when the class says ``second_order = True``
  or has a callable ``should_create_graph`` (the flag ESGD-M and timm's second-order optimizers carry);
  its default learning rate is the constructor's own.
* Installed distributions declare entry points in the groups ``esgd_bench.optimizers`` (each loads to an
  ``OptimizerSpec`` or an ``Optimizer`` subclass, registered under the entry point's name) and
  ``esgd_bench.tasks`` (each loads to a :class:`~tasks.TaskSpec` or a list of them).  They are read once,
  lazily, the first time a registry is listed or asked for a name it does not have built in.

A plugin that fails to load (import error, wrong kind of object, a name that is taken) is skipped with one
:class:`PluginWarning` naming the entry point and its distribution, so one broken package cannot take the
built-in optimizers and tasks down with it; the command line prints it as one ``warning:`` line.  A bad
``--opt module:Class`` reference is the user's own input and raises
:class:`~bench.optimizers.OptimizerSpecError` (one line, exit code 2).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import inspect
import math
import re
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from tasks import TaskSpec

    from .optimizers import OptimizerSpec

__all__ = ["OPTIMIZER_GROUP", "TASK_GROUP", "PluginWarning", "is_class_path", "split_class_path",
           "class_path_spec", "load_optimizer_plugins", "load_task_plugins", "optimizer_source",
           "task_source", "reset"]

OPTIMIZER_GROUP = "esgd_bench.optimizers"
TASK_GROUP = "esgd_bench.tasks"
BUILT_IN = "built-in"

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CLASS_PATH = re.compile(rf"\s*(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})\s*(?::(?P<rest>.*))?", re.S)
# Plugin optimizer names go through the same ``name:key=value`` parser as the built-in ones.
_PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")


class PluginWarning(UserWarning):
    """A plugin entry point that could not be loaded and was skipped."""


# Caches, emptied by reset(): what each loaded plugin registered, and the --opt module:Class specs.
_state: dict[str, bool] = {"optimizers": False}
_optimizer_sources: dict[str, str] = {}
_task_sources: dict[str, str] = {}
_class_specs: dict[str, "OptimizerSpec"] = {}


# -- --opt package.module:ClassName -----------------------------------------------------------------
def split_class_path(text: str) -> tuple[str, str] | None:
    """``"torch.optim:RMSprop:lr=1e-3"`` -> ``("torch.optim:RMSprop", "lr=1e-3")``; None for other text.

    A reference is a dotted module path, ``:`` and an attribute name; the module must be dotted or the
    attribute capitalised (a class), so that ``adam:lr`` stays a malformed registry spec rather than an
    import of a module called ``adam``.  The caller gives registered names precedence.
    """
    m = _CLASS_PATH.fullmatch(text)
    if m is None or not ("." in m["module"] or m["attr"][0].isupper()):
        return None
    return f"{m['module']}:{m['attr']}", (m["rest"] or "")


def is_class_path(name: str) -> bool:
    found = split_class_path(name)
    return found is not None and not found[1]


def _spec_error(message: str) -> Exception:
    from .optimizers import OptimizerSpecError
    return OptimizerSpecError(message)


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def class_path_spec(name: str) -> OptimizerSpec:
    """The spec of the optimizer class ``package.module:ClassName`` (imported once, then cached)."""
    if name in _class_specs:
        return _class_specs[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise _spec_error(f"--opt {name}: no module named {err.name!r} (is it installed, or on "
                              "PYTHONPATH?)") from None
        raise _spec_error(f"--opt {name}: importing {module_name} failed: {_describe(err)}") from None
    except Exception as err:     # the user's module raised while importing: still one line
        raise _spec_error(f"--opt {name}: importing {module_name} failed: {_describe(err)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(obj, "__name__", module_name)
            choices = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, choices, n=1) \
                or [n for n in choices if n.lower() == part.lower()]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _spec_error(f"--opt {name}: {where} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    spec = _wrap_class(obj, name, f"{obj.__module__}.{obj.__qualname__}" if inspect.isclass(obj) else name,
                       what=f"--opt {name}")
    _class_specs[name] = spec
    return spec


def _class_default_lr(cls: type) -> float | None:
    try:
        param = inspect.signature(cls).parameters.get("lr")
    except (TypeError, ValueError):
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    value = param.default
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        return None
    return float(value)


def _second_order(cls: type) -> bool:
    flag = getattr(cls, "second_order", None)
    if isinstance(flag, bool):
        return flag
    return callable(getattr(cls, "should_create_graph", None))


def _wrap_class(obj: Any, name: str, source: str, *, what: str) -> OptimizerSpec:
    """An OptimizerSpec around an Optimizer subclass; raises OptimizerSpecError for anything else."""
    from .optimizers import OptimizerSpec
    if not inspect.isclass(obj):
        raise _spec_error(f"{what}: {source} is not a class (got {type(obj).__name__}); expected a "
                          "torch.optim.Optimizer subclass")
    if obj is torch.optim.Optimizer:
        raise _spec_error(f"{what}: torch.optim.Optimizer is the abstract base class; name a subclass")
    if not issubclass(obj, torch.optim.Optimizer):
        raise _spec_error(f"{what}: {source} is not a torch.optim.Optimizer subclass")
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else f"{obj.__qualname__} from {obj.__module__}"
    lr = _class_default_lr(obj)
    return OptimizerSpec(name=name, factory=obj, description=first, second_order=_second_order(obj),
                         defaults={}, lrs={"*": lr} if lr is not None else {})


# -- entry points ------------------------------------------------------------------------------------
def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def _origin(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"plugin {dist.name} {dist.version}" if dist is not None else "plugin"


def _skip(ep: metadata.EntryPoint, group: str, err: BaseException) -> None:
    warnings.warn(f"skipping plugin {ep.name!r} ({_origin(ep)}, {group} = {ep.value}): {_describe(err)}",
                  PluginWarning, stacklevel=4)


def load_optimizer_plugins(register: Callable[[OptimizerSpec], Any]) -> None:
    """Register every ``esgd_bench.optimizers`` entry point, once; a broken one is skipped with a warning."""
    if _state["optimizers"]:
        return
    _state["optimizers"] = True
    from .optimizers import OptimizerSpec
    for ep in _entry_points(OPTIMIZER_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, OptimizerSpec):
                spec = obj
            else:
                spec = _wrap_class(obj, ep.name.lower(), ep.value, what=f"entry point {ep.name}")
            if spec.lrs.get("*", spec.defaults.get("lr")) is None:
                # the runner plans every cell with a learning rate; a plugin must bring a default one
                raise ValueError(f"{ep.value} has no default lr: give the constructor one, or the "
                                 "OptimizerSpec lrs={'*': ...}")
            if not _PLUGIN_NAME.fullmatch(spec.name):
                raise ValueError(f"optimizer name {spec.name!r} must be lowercase letters, digits and ._+-")
            register(spec)
        except Exception as err:     # whatever a third-party import raises, keep the built-ins usable
            _skip(ep, OPTIMIZER_GROUP, err)
            continue
        _optimizer_sources[spec.name] = f"{_origin(ep)} ({ep.value})"


def load_task_plugins(taken: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
    """The tasks of every ``esgd_bench.tasks`` entry point whose names are not in ``taken``."""
    from tasks import TaskSpec
    found: dict[str, TaskSpec] = {}
    _task_sources.clear()
    for ep in _entry_points(TASK_GROUP):
        try:
            obj = ep.load()
            specs = list(obj) if isinstance(obj, (list, tuple)) else [obj]
            for spec in specs:
                if not isinstance(spec, TaskSpec):
                    raise TypeError(f"{ep.value} gives a {type(spec).__name__}, not a tasks.TaskSpec")
                if spec.name in taken or spec.name in found:
                    raise ValueError(f"task {spec.name!r} is already registered")
        except Exception as err:
            _skip(ep, TASK_GROUP, err)
            continue
        for spec in specs:
            found[spec.name] = spec
            _task_sources[spec.name] = f"{_origin(ep)} ({ep.value})"
    return found


def optimizer_source(name: str) -> str:
    """``built-in``, or the plugin distribution and object that registered ``name``."""
    return _optimizer_sources.get(name, BUILT_IN)


def task_source(name: str) -> str:
    return _task_sources.get(name, BUILT_IN)


def reset() -> None:
    """Forget every plugin and ``--opt module:Class`` spec, so the next lookup reads entry points anew."""
    from . import optimizers
    import tasks
    for name in _optimizer_sources:
        optimizers._REGISTRY.pop(name, None)
    _optimizer_sources.clear()
    _task_sources.clear()
    _class_specs.clear()
    _state["optimizers"] = False
    tasks._BASE = None     # the task registry rediscovers its files and plugins on the next lookup
