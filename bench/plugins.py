"""User optimizers and third-party plugins for the optimizer registry.

Two ways in, after the ``module:attr`` object references of Python packaging's entry points:

* ``--opt package.module:ClassName[:key=value,...]`` names any importable ``torch.optim.Optimizer``
  subclass; :func:`class_path_spec` imports it and builds an entry on the fly, named by the reference as
  typed, whose default learning rate is the constructor's own.
* Installed distributions declare entry points in the group ``esgd_bench.optimizers``; each loads to an
  :class:`~bench.registry.OptimizerSpec` or an ``Optimizer`` subclass (registered under the entry point's
  name).  They are read once, the first time the registry is listed or asked for a name it does not
  have; a broken one is skipped with one :class:`~tasks.plugins.PluginWarning`.

A class is second order (the loop builds the gradient's graph) when it says so the way the ecosystem
does: a boolean ``second_order`` attribute, timm's ``is_second_order`` property, or a callable
``should_create_graph`` (the esgd optimizers' method).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import inspect
import math
import re
from typing import Any

import torch

from tasks.plugins import describe, load_entry_points

from .errors import OptimizerSpecError
from .registry import OptimizerSpec, register_optimizer, registered, unregister_optimizer

__all__ = ["OPTIMIZER_GROUP", "split_class_path", "class_path_spec", "load_optimizer_plugins",
           "optimizer_source", "is_second_order", "reset"]

OPTIMIZER_GROUP = "esgd_bench.optimizers"
BUILT_IN = "built-in"

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CLASS_PATH = re.compile(rf"\s*(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})\s*(?::(?P<rest>.*))?", re.S)
# Plugin names go through the same ``name:key=value`` parser as the built-in ones.
_PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")

_loaded = False
_sources: dict[str, str] = {}
_class_specs: dict[str, OptimizerSpec] = {}


def split_class_path(text: str) -> tuple[str, str] | None:
    """``"torch.optim:RMSprop:lr=1e-3"`` -> ``("torch.optim:RMSprop", "lr=1e-3")``; None for other text.

    The module must be dotted or the attribute capitalised (a class), so that ``adam:lr`` stays a
    malformed registry choice rather than an import of a module called ``adam``.
    """
    m = _CLASS_PATH.fullmatch(text)
    if m is None or not ("." in m["module"] or m["attr"][0].isupper()):
        return None
    return f"{m['module']}:{m['attr']}", (m["rest"] or "")


def class_path_spec(name: str) -> OptimizerSpec:
    """The entry of the optimizer class ``package.module:ClassName`` (imported once, then cached)."""
    if name in _class_specs:
        return _class_specs[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise OptimizerSpecError(f"--opt {name}: no module named {err.name!r} (is it installed, or on "
                                     "PYTHONPATH?)") from None
        raise OptimizerSpecError(f"--opt {name}: importing {module_name} failed: {describe(err)}") from None
    except BaseException as err:    # the user's module raised (or called sys.exit) while importing
        if isinstance(err, KeyboardInterrupt):
            raise
        raise OptimizerSpecError(f"--opt {name}: importing {module_name} failed: {describe(err)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(obj, "__name__", module_name)
            choices = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, choices, n=1) \
                or [n for n in choices if n.lower() == part.lower()]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptimizerSpecError(f"--opt {name}: {where} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    spec = _wrap_class(obj, name, name, what=f"--opt {name}")
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


def is_second_order(cls: type) -> bool:
    """Whether ``cls`` needs ``backward(create_graph=True)``: its ``second_order`` flag, else timm's
    ``is_second_order`` (a property, read on an uninitialised instance), else a callable
    ``should_create_graph``."""
    flag = inspect.getattr_static(cls, "second_order", None)
    if isinstance(flag, bool):
        return flag
    timm_flag = inspect.getattr_static(cls, "is_second_order", None)
    if isinstance(timm_flag, bool):
        return timm_flag
    if isinstance(timm_flag, property):
        try:
            return bool(timm_flag.fget(cls.__new__(cls)))
        except Exception:   # noqa: BLE001 - it declares the property: building the graph is the safe side
            return True
    return callable(getattr(cls, "should_create_graph", None))


def _wrap_class(obj: Any, name: str, source: str, *, what: str) -> OptimizerSpec:
    """An entry around an Optimizer subclass; :class:`OptimizerSpecError` for anything else."""
    if not inspect.isclass(obj):
        raise OptimizerSpecError(f"{what}: {source} is not a class (got {type(obj).__name__}); expected a "
                                 "torch.optim.Optimizer subclass")
    if obj is torch.optim.Optimizer:
        raise OptimizerSpecError(f"{what}: torch.optim.Optimizer is the abstract base class; name a subclass")
    if not issubclass(obj, torch.optim.Optimizer):
        raise OptimizerSpecError(f"{what}: {source} is not a torch.optim.Optimizer subclass")
    doc = (inspect.getdoc(obj) or "").strip()
    first = doc.splitlines()[0] if doc else f"{obj.__qualname__} from {obj.__module__}"
    lr = _class_default_lr(obj)
    return OptimizerSpec(name=name, factory=obj, description=first, second_order=is_second_order(obj),
                         defaults={}, lrs={"*": lr} if lr is not None else {})


def load_optimizer_plugins() -> None:
    """Register every ``esgd_bench.optimizers`` entry point, once; a broken one is skipped."""
    global _loaded
    if _loaded:
        return
    _loaded = True

    def convert(obj: object, ep: metadata.EntryPoint) -> list[OptimizerSpec]:
        spec = obj if isinstance(obj, OptimizerSpec) else \
            _wrap_class(obj, ep.name.lower(), ep.value, what=f"entry point {ep.name}")
        if spec.lrs.get("*", spec.defaults.get("lr")) is None:
            # every cell is planned with a learning rate; a plugin must bring a default one
            raise ValueError(f"{ep.value} has no default lr: give the constructor one, or the "
                             "OptimizerSpec lrs={'*': ...}")
        if not _PLUGIN_NAME.fullmatch(spec.name):
            raise ValueError(f"optimizer name {spec.name!r} must be lowercase letters, digits and ._+-")
        register_optimizer(spec)
        return [spec]

    for spec, origin in load_entry_points(OPTIMIZER_GROUP, convert):
        _sources[spec.name] = origin


def optimizer_source(name: str) -> str:
    """``built-in``, or the plugin distribution and object that registered ``name``."""
    return _sources.get(name, BUILT_IN)


def reset() -> None:
    """Forget every plugin and class-path entry, so the next lookup reads entry points anew."""
    global _loaded
    for name in _sources:
        unregister_optimizer(name)
    _sources.clear()
    _class_specs.clear()
    _loaded = False
    import tasks
    tasks.reset()


def names() -> list[str]:
    """Every registered name, plugins included."""
    load_optimizer_plugins()
    return sorted(registered())
