"""The optimizer registry, after timm's optimizer factory.

Entries are small frozen dataclasses: a lowercase name, a factory, default hyperparameters, per-task
default learning rates, a description and the ``second_order`` flag that tells the runner to call
``backward(create_graph=opt.should_create_graph())``.  ``get_optimizer`` raises with the valid names and a
close match; ``list_optimizers`` filters with fnmatch.  ``parse_opt_spec`` reads the command line's
``name:key=value,...`` form (``adam:lr=3e-4,betas=(0.9,0.95)``) and ``validate_overrides`` checks the keys
against the factory's signature and the values against its defaults' types, so a typo fails before any
training with one line naming the optimizer, the key and the valid keys.  Besides the registered names, a
spec may name any ``torch.optim.Optimizer`` subclass as ``package.module:ClassName[:key=value,...]``, and
installed packages may add entries through entry points; both live in :mod:`bench.plugins`.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from . import plugins
from esgd import ESGD, AdaHessian, ESGDMax, HessianOptimizer, PlainESGD, Sophia

__all__ = ["OptimizerSpec", "UnknownOptimizerError", "OptimizerSpecError", "register_optimizer",
           "get_optimizer", "list_optimizers", "create_optimizer", "default_lr", "needs_create_graph",
           "parse_opt_spec", "format_opt_spec", "validate_overrides", "option_names", "LOOP_OPTIONS"]


class UnknownOptimizerError(LookupError):
    """An optimizer name that is not in the registry."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class OptimizerSpecError(ValueError):
    """A malformed ``name:key=value`` spec, an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    second_order: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Default learning rate per task family (a scaled variant uses its base task's entry); "*" is the
    # fallback.  How each value was chosen is written down in the README.
    lrs: Mapping[str, float] = field(default_factory=dict)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    if spec.name != spec.name.lower():
        raise ValueError(f"optimizer names are lowercase, got {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_plugins() -> None:
    plugins.load_optimizer_plugins(register_optimizer)   # entry points, read once (bench/plugins.py)


def get_optimizer(name: str) -> OptimizerSpec:
    """A registered name, a plugin's name, or a ``package.module:ClassName`` reference."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if plugins.is_class_path(name):
        return plugins.class_path_spec(name)
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}.{hint} Valid names: {', '.join(valid)}, or any "
            "torch.optim.Optimizer subclass as package.module:ClassName") from None


def list_optimizers(pattern: str = "*") -> list[OptimizerSpec]:
    _load_plugins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if fnmatch.fnmatch(n, pattern)]


def default_lr(spec: OptimizerSpec, task: str | None) -> float | None:
    """The registry's learning rate for ``task`` (scaled variants fall back to their base task)."""
    if task is not None:
        for key in (task, task.split("-")[0]):
            if key in spec.lrs:
                return spec.lrs[key]
    return spec.lrs.get("*", spec.defaults.get("lr"))


def needs_create_graph(opt: torch.optim.Optimizer) -> bool:
    """True when the next backward must build a graph (timm reads the same flag)."""
    should = getattr(opt, "should_create_graph", None)
    return bool(should()) if callable(should) else False


def create_optimizer(name: str | OptimizerSpec, params: Iterable, *, task: str | None = None,
                     seed: int | None = None, **overrides: Any) -> torch.optim.Optimizer:
    """Build a registered optimizer: defaults, then the task's learning rate, then ``overrides``.

    Second-order optimizers whose factory takes a ``generator`` get one seeded with ``seed``, so the
    probes are reproducible and independent of the global RNG.
    """
    spec = get_optimizer(name) if isinstance(name, str) else name
    params = list(params)
    kwargs = dict(spec.defaults)
    lr = default_lr(spec, task)
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.update(overrides)
    loop = {k: kwargs.pop(k) for k in LOOP_OPTIONS if k in kwargs}
    if spec.second_order and seed is not None and "generator" not in kwargs \
            and "generator" in inspect.signature(spec.factory).parameters:
        device = _first_device(params)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        kwargs["generator"] = gen
    opt = spec.factory(params, **kwargs)
    if _takes_loop_options(spec):
        # Read by the training loop (bench.runner), not by the optimizer: see LOOP_OPTIONS.
        opt.hvp_fraction = float(loop.get("hvp_fraction", LOOP_OPTIONS["hvp_fraction"]))
    return opt


# Options of the training loop rather than of the optimizer's constructor, accepted by every spec whose
# optimizer is a HessianOptimizer (it has accumulate_hvp(loss)).  hvp_fraction = f < 1 makes the loop take
# each HVP step's product on the loss of the batch's first ceil(f * B) rows only (a plain backward gives
# the update's gradient), the sub-batch estimate of Sophia (Liu et al. 2023); 1 is the exact product.
LOOP_OPTIONS: dict[str, Any] = {"hvp_fraction": 1.0}


def _takes_loop_options(spec: OptimizerSpec) -> bool:
    return spec.second_order and isinstance(spec.factory, type) and issubclass(spec.factory, HessianOptimizer)


def _first_device(params: list) -> torch.device:
    for p in params:
        if isinstance(p, dict):
            return _first_device(list(p["params"]))
        return p.device
    return torch.device("cpu")


# -- command-line specs ---------------------------------------------------------------------------
_NO_OVERRIDE = {"params", "generator", "self"}


def option_names(spec: OptimizerSpec) -> list[str]:
    """The hyperparameters a spec string may set: the factory's keyword arguments."""
    params = inspect.signature(spec.factory).parameters
    names = [n for n, p in params.items() if n not in _NO_OVERRIDE
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names + [k for k in LOOP_OPTIONS if _takes_loop_options(spec) and k not in names]


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


def parse_opt_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"adam:lr=3e-4,weight_decay=0.1"`` -> ``("adam", {"lr": 3e-4, "weight_decay": 0.1})``.

    The name must be registered and every key a keyword of its factory; values are Python literals
    (numbers, ``true``/``false``, ``none``, tuples such as ``(0.9,0.95)``) checked by
    :func:`validate_overrides`.
    """
    name, rest = _split_name(text)
    spec = get_optimizer(name)
    overrides: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise OptimizerSpecError(
                    f"bad optimizer spec {text!r}: expected name:key=value[,key=value...], got {item!r}")
            if key in overrides:
                raise OptimizerSpecError(f"bad optimizer spec {text!r}: {key!r} given twice")
            overrides[key] = _parse_value(value)
    if "lr" not in overrides and default_lr(spec, None) is None and "lr" in option_names(spec):
        raise OptimizerSpecError(f"{spec.name} has no default learning rate; give one in the spec, "
                                 f"e.g. --opt {spec.name}:lr=1e-3")
    validate_overrides(spec, overrides)
    return spec.name, overrides


def _split_name(text: str) -> tuple[str, str]:
    """The name and the overrides' text; a ``package.module:ClassName`` reference keeps its case, and a
    registered name wins over a reference (``adam:lr`` is a malformed spec, not ``import adam``)."""
    ref = plugins.split_class_path(text)
    if ref is not None:
        head = ref[0].partition(":")[0].lower()
        if head not in _REGISTRY:
            _load_plugins()
        if head not in _REGISTRY:
            return ref
    name, _, rest = text.strip().partition(":")
    return name.strip().lower(), rest


def format_opt_spec(name: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The canonical label of a spec: ``adam`` or ``adam:lr=0.0003,weight_decay=0.1`` (keys sorted)."""
    if not overrides:
        return name
    items = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(overrides.items()))
    return f"{name}:{items}"


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_overrides(spec: OptimizerSpec | str, overrides: Mapping[str, Any]) -> None:
    """Raise :class:`OptimizerSpecError` for an unknown key, a value whose type does not match the
    factory's default, or a value the optimizer's constructor rejects (tried on a dummy parameter)."""
    spec = get_optimizer(spec) if isinstance(spec, str) else spec
    valid = option_names(spec)
    params = inspect.signature(spec.factory).parameters
    for key, value in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptimizerSpecError(f"{spec.name}: unknown option {key!r}.{hint} "
                                     f"Valid options: {', '.join(valid)}")
        if key in LOOP_OPTIONS and key not in params:
            if not (_number(value) and 0 < value <= 1):
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
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        create_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError) as err:
        raise OptimizerSpecError(f"{spec.name}: {err}") from None
    except Exception as err:    # a user class (--opt module:Class) may reject overrides any way it likes
        raise OptimizerSpecError(f"{spec.name}: {type(err).__name__}: {err}") from None


# Default learning rates, each chosen by `esgd-bench sweep` (best mean final loss on the grid; the README's
# "Learning rates" section has the tables):
#   mnist:      `esgd-bench sweep mnist --opt <all seven> --lrs 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,0.3,1
#               --seeds 1 --steps 300` (full 784-1024-1024-10 MLP, offline digits).
#   rosenbrock: `esgd-bench sweep rosenbrock --opt sgd --opt adam --opt esgd --opt esgd-m --steps 500 --seeds 1
#               --lrs 1e-4,...,1` (SGD diverges above 1e-3); adahessian/sophia with --lrs 1e-3,...,4;
#               esgd-m, esgd-m-max and esgd again with --lrs 0.3,1,3,10,30,100 (esgd-m's best is 10).
#   quadratic:  adahessian/sophia swept over 300 steps; the others keep the values the scale tests were made with.
# "*" (cifar and plugin tasks) repeats mnist's value: CIFAR-10 is not on this machine, so it was never swept.
register_optimizer(OptimizerSpec(
    name="esgd-m", factory=ESGD, second_order=True,
    description="ESGD-M: Hessian-diagonal preconditioning with quasi-hyperbolic (Nesterov) momentum",
    defaults={}, lrs={"*": 0.03, "mnist": 0.03, "rosenbrock": 10.0, "quadratic": 1.0}))
register_optimizer(OptimizerSpec(
    name="esgd-m-sub", factory=ESGD, second_order=True,
    description="ESGD-M with the HVP on 1/8 of the batch (hvp_fraction=0.125; Sophia's sub-batch estimate)",
    defaults={"hvp_fraction": 0.125}, lrs={"*": 0.03, "mnist": 0.03, "rosenbrock": 10.0, "quadratic": 1.0}))
register_optimizer(OptimizerSpec(
    name="esgd", factory=PlainESGD, second_order=True,
    description="Plain ESGD (Dauphin et al. 2015): running average of (Hz)^2, Gaussian probes, no momentum",
    defaults={}, lrs={"*": 0.01, "mnist": 0.01, "rosenbrock": 1.0, "quadratic": 0.1}))
register_optimizer(OptimizerSpec(
    name="sgd", factory=torch.optim.SGD, second_order=False,
    description="SGD with Nesterov momentum 0.9",
    defaults={"momentum": 0.9, "nesterov": True},
    lrs={"*": 0.1, "mnist": 0.1, "rosenbrock": 1e-3, "quadratic": 0.01}))
register_optimizer(OptimizerSpec(
    name="adam", factory=torch.optim.Adam, second_order=False,
    description="Adam (torch.optim.Adam, foreach)",
    defaults={}, lrs={"*": 1e-3, "mnist": 1e-3, "rosenbrock": 1.0, "quadratic": 1e-3}))
register_optimizer(OptimizerSpec(
    name="esgd-m-max", factory=ESGDMax, second_order=True,
    description="ESGD-M keeping max(beta2 * d, (Hz)^2), an infinity norm, instead of the EMA; no bias correction",
    defaults={}, lrs={"*": 0.1, "mnist": 0.1, "rosenbrock": 10.0, "quadratic": 1.0}))
register_optimizer(OptimizerSpec(
    name="adahessian", factory=AdaHessian, second_order=True,
    description="AdaHessian (Yao et al. 2021): Adam with Hutchinson diag(H)^2, conv-kernel averaging, HVP every step",
    defaults={}, lrs={"*": 0.03, "mnist": 0.03, "rosenbrock": 4.0, "quadratic": 0.3}))
register_optimizer(OptimizerSpec(
    name="sophia", factory=Sophia, second_order=True,
    description="Sophia-H (Liu et al. 2023): momentum / max(rho * EMA of Hutchinson diag(H), eps), clipped to 1",
    defaults={}, lrs={"*": 3e-4, "mnist": 3e-4, "rosenbrock": 0.1, "quadratic": 0.01}))
