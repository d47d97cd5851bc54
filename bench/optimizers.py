"""The optimizer registry as the suite uses it: look names up, list them, and read a user's choice.

A choice on the command line is ``name[:key=value,...]`` (``adam:lr=3e-4,betas=(0.9,0.95)``), where the
name is a registered one (:mod:`bench.registry`, plugins included) or any ``torch.optim.Optimizer``
subclass as ``package.module:ClassName`` (:mod:`bench.plugins`).  :func:`parse_optimizer` reads it once
into an :class:`OptimizerChoice`: the entry, the keyword arguments given, and the training loop's options.
It checks the keys against the constructor's signature, the values against its defaults' types, and
builds the optimizer once on a dummy parameter, so a typo or a value the class rejects fails before any
training with one line naming the optimizer, the key and the valid keys.  Everything downstream uses the
typed choice; nothing parses the text again.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from . import plugins
from .errors import OptimizerSpecError, UnknownOptimizerError
from .registry import LOOP_OPTIONS, OptimizerSpec, default_lr, registered

__all__ = ["OptimizerChoice", "get_optimizer", "list_optimizers", "parse_optimizer", "option_names",
           "needs_create_graph", "class_name", "default_lr"]


def get_optimizer(name: str) -> OptimizerSpec:
    """A registered name, a plugin's name, or a ``package.module:ClassName`` reference."""
    found = registered().get(name)
    if found is not None:
        return found
    ref = plugins.split_class_path(name)
    if ref is not None and not ref[1]:
        return plugins.class_path_spec(ref[0])
    plugins.load_optimizer_plugins()
    found = registered().get(name)
    if found is not None:
        return found
    valid = plugins.names()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownOptimizerError(f"unknown optimizer {name!r}.{hint} Valid names: {', '.join(valid)}, or any "
                                "torch.optim.Optimizer subclass as package.module:ClassName")


def list_optimizers(pattern: str = "*") -> list[OptimizerSpec]:
    plugins.load_optimizer_plugins()
    every = registered()
    return [every[n] for n in sorted(every) if fnmatch.fnmatch(n, pattern)]


def class_name(spec: OptimizerSpec) -> str:
    """Where the class is imported from, as users write it: ``esgd.ESGD``, ``torch.optim.Adam``."""
    cls = spec.factory
    for package in ("esgd", "torch.optim"):
        module = __import__(package, fromlist=["_"])
        if getattr(module, getattr(cls, "__name__", ""), None) is cls:
            return f"{package}.{cls.__name__}"
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"


def needs_create_graph(opt: torch.optim.Optimizer, second_order: bool) -> bool:
    """Whether the next backward must build the gradient's graph: the optimizer's own
    ``should_create_graph()`` when it has one (esgd's optimizers), else its entry's flag."""
    should = getattr(opt, "should_create_graph", None)
    return bool(should()) if callable(should) else second_order


_NOT_OPTIONS = {"params", "generator", "self"}


def option_names(spec: OptimizerSpec) -> list[str]:
    """The keys a choice may set: the factory's keyword arguments, and the loop's options."""
    params = inspect.signature(spec.factory).parameters
    names = [n for n, p in params.items() if n not in _NOT_OPTIONS
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names + [k for k in LOOP_OPTIONS if spec.takes_loop_options and k not in names]


@dataclass(frozen=True)
class OptimizerChoice:
    """One optimizer as the user chose it: the entry and the ``key=value`` settings they gave.

    ``given`` holds the settings as typed (their canonical text is :attr:`label`, which names the runs
    in every result); :meth:`create` builds the optimizer from the entry's defaults, the task's default
    learning rate, ``given`` and the caller's extras, in that order.  ``hvp_fraction`` is an option of
    the training loop, not of the constructor, and so are ``hvp_paired`` and ``hvp_compiled``.
    """

    spec: OptimizerSpec
    given: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def second_order(self) -> bool:
        return self.spec.second_order

    @property
    def lr(self) -> float | None:
        """The learning rate fixed in the choice itself (``adam:lr=3e-4``), else ``None``."""
        return self.given.get("lr")

    def setting(self, key: str, default: Any = None) -> Any:
        """``key`` as the user gave it, else the entry's default, else ``default``."""
        return self.given.get(key, self.spec.defaults.get(key, default))

    @property
    def hvp_fraction(self) -> float:
        return float(self.setting("hvp_fraction", 1.0))

    @property
    def hvp_paired(self) -> bool:
        return bool(self.setting("hvp_paired", False))

    @property
    def hvp_compiled(self) -> bool:
        return bool(self.setting("hvp_compiled", False))

    @property
    def label(self) -> str:
        """``adam`` or ``adam:lr=0.0003,weight_decay=0.1`` (keys sorted): the runs' name in results."""
        if not self.given:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.given.items()))

    def lr_for(self, task: str | None) -> float | None:
        return self.lr if self.lr is not None else default_lr(self.spec, task)

    def create(self, params: Iterable, *, task: str | None = None, seed: int | None = None,
               **extra: Any) -> torch.optim.Optimizer:
        """Build the optimizer.  Second-order optimizers that take a ``generator`` get one seeded with
        ``seed``, so the probes are reproducible and independent of the global RNG."""
        params = list(params)
        kwargs = {k: v for k, v in self.spec.defaults.items() if k not in LOOP_OPTIONS}
        lr = default_lr(self.spec, task)
        if lr is not None:
            kwargs["lr"] = lr
        kwargs.update((k, tuple(v) if isinstance(v, list) else v) for k, v in self.given.items()
                      if k not in LOOP_OPTIONS)
        kwargs.update(extra)
        if self.second_order and seed is not None and "generator" not in kwargs \
                and "generator" in inspect.signature(self.spec.factory).parameters:
            gen = torch.Generator(device=_first_device(params))
            gen.manual_seed(seed)
            kwargs["generator"] = gen
        return self.spec.factory(params, **kwargs)


def _first_device(params: list) -> torch.device:
    for p in params:
        if isinstance(p, dict):
            return _first_device(list(p["params"]))
        return p.device
    return torch.device("cpu")


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets, so ``betas=(0.9,0.99)`` stays one item."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()     # a bare word such as probe=rademacher


def _split_name(text: str) -> tuple[str, str]:
    """The name and the settings' text; a ``package.module:ClassName`` reference keeps its case, and a
    registered name wins over a reference (``adam:lr`` is a malformed choice, not ``import adam``)."""
    ref = plugins.split_class_path(text)
    if ref is not None and ref[0].partition(":")[0].lower() not in plugins.names():
        return ref
    name, _, rest = text.strip().partition(":")
    return name.strip().lower(), rest


def parse_optimizer(text: str | OptimizerChoice) -> OptimizerChoice:
    """``"adam:lr=3e-4,weight_decay=0.1"`` -> a checked :class:`OptimizerChoice` (a choice passes through).

    Values are Python literals (numbers, ``true``/``false``, ``none``, tuples such as ``(0.9,0.95)``) or
    bare words.
    """
    if isinstance(text, OptimizerChoice):
        return text
    if not isinstance(text, str):
        raise OptimizerSpecError(f"an optimizer is a name such as 'adam' or 'adam:lr=3e-4', got {text!r}")
    name, rest = _split_name(text)
    spec = get_optimizer(name)
    given: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise OptimizerSpecError(
                    f"bad optimizer {text!r}: expected name:key=value[,key=value...], got {item!r}")
            if key in given:
                raise OptimizerSpecError(f"bad optimizer {text!r}: {key!r} given twice")
            given[key] = _parse_value(value)
    if "lr" not in given and default_lr(spec, None) is None and "lr" in option_names(spec):
        raise OptimizerSpecError(f"{spec.name} has no default learning rate; give one, e.g. "
                                 f"--opt {spec.name}:lr=1e-3")
    choice = OptimizerChoice(spec, given)
    _check(choice)
    return choice


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(choice: OptimizerChoice) -> None:
    """Keys, value types and one construction on a dummy parameter (the constructor's own checks)."""
    spec, valid = choice.spec, option_names(choice.spec)
    params = inspect.signature(spec.factory).parameters
    for key, value in choice.given.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptimizerSpecError(f"{spec.name}: unknown option {key!r}.{hint} "
                                     f"Valid options: {', '.join(valid)}")
        if key in LOOP_OPTIONS and key not in params:
            if isinstance(LOOP_OPTIONS[key], bool):
                if not isinstance(value, bool):
                    raise OptimizerSpecError(f"{spec.name}: bad value for {key}: {value!r} (must be true or false)")
            elif not (_number(value) and 0 < value <= 1):
                raise OptimizerSpecError(f"{spec.name}: bad value for {key}: {value!r} "
                                         "(must be a fraction of the batch in (0, 1])")
            continue
        default = spec.defaults.get(key, params[key].default)
        ok = True
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif _number(default):
            ok = _number(value) and math.isfinite(value)
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default) \
                and all(_number(x) and math.isfinite(x) for x in value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        if not ok:
            raise OptimizerSpecError(f"{spec.name}: bad value for {key}: {value!r} "
                                     f"(expected something like {default!r})")
    if choice.hvp_paired and not getattr(spec.factory, "squares_products", False):
        raise OptimizerSpecError(f"{spec.name}: hvp_paired replaces the squared product (H z)^2, and this "
                                 "optimizer's curvature is not built from that square (esgd-m, esgd-m-max "
                                 "and esgd are)")
    try:
        choice.create([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise OptimizerSpecError(f"{spec.name}: {' '.join(str(err).split())}") from None
    except BaseException as err:    # a user's class may reject settings any way, even with sys.exit()
        if isinstance(err, KeyboardInterrupt):
            raise
        text = " ".join(str(err).split())
        raise OptimizerSpecError(f"{spec.name}: {type(err).__name__}{': ' + text if text else ''}") from None
