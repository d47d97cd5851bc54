"""Learning-rate schedules, as practitioners train: ``constant``, ``cosine`` and ``warmup-cosine``.

A schedule is written like an optimizer choice, ``name[:key=value,...]``: ``cosine:final=0.1``,
``warmup-cosine:warmup=100``.  :func:`parse_schedule` checks it once, when the command line or a
``--config`` file is read, and the resulting :class:`Schedule` travels inside each cell.  The runner
builds a ``torch.optim.lr_scheduler.LambdaLR`` from it and steps it after every optimizer step, so the
factor multiplies each parameter group's ``lr``:

* ``constant``: 1 throughout;
* ``cosine``: from 1 down to ``final`` along half a cosine over the run's steps;
* ``warmup-cosine``: linear from ``1/warmup`` up to 1 over the first ``warmup`` steps (default: 5% of
  the run), then the cosine over the rest.

ESGD-M has its own exponential warmup, ``lr * (1 - lr_warmup**t)``; it reads the group's ``lr`` at every
step, so a schedule multiplies on top of it (pass ``lr_warmup=0`` to the optimizer to switch its own
off).  Each task declares the schedule it is trained with by default (``TaskSpec.default_schedule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .errors import BenchError

__all__ = ["Schedule", "SCHEDULES", "parse_schedule", "build_scheduler"]

# Each schedule's parameters and their defaults; None means "derived from the run's length".
SCHEDULES: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"final": 0.0},
    "warmup-cosine": {"warmup": None, "final": 0.0},
}


@dataclass(frozen=True)
class Schedule:
    """A checked schedule: its name and the parameters given (the rest take :data:`SCHEDULES`' defaults)."""

    name: str = "constant"
    params: Mapping[str, float] = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        """The canonical spelling, as results record it: ``warmup-cosine:warmup=100``."""
        given = ",".join(f"{k}={self.params[k]:g}" for k in sorted(self.params))
        return f"{self.name}:{given}" if given else self.name

    def factor(self, steps: int) -> Callable[[int], float]:
        """The lr multiplier of the step that follows ``t`` completed steps, for a run of ``steps``."""
        final = float(self.params.get("final", 0.0))
        if self.name == "constant":
            return lambda t: 1.0
        warmup = 0
        if self.name == "warmup-cosine":
            given = self.params.get("warmup")
            warmup = int(given) if given is not None else max(1, round(0.05 * steps))
        decay = max(1, steps - warmup)

        def f(t: int) -> float:
            if t < warmup:
                return (t + 1) / warmup
            progress = min(1.0, (t - warmup) / decay)
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return f


def parse_schedule(text: str | Schedule) -> Schedule:
    """``name[:key=value,...]`` as a :class:`Schedule`; one clear line naming the valid choices otherwise."""
    if isinstance(text, Schedule):
        return text
    if not isinstance(text, str) or not text.strip():
        raise BenchError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {text!r}")
    name, _, rest = text.strip().partition(":")
    if name not in SCHEDULES:
        raise BenchError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    params: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in SCHEDULES[name]:
            known = ", ".join(SCHEDULES[name]) or "none"
            raise BenchError(f"schedule {name!r} has no parameter {item!r} (parameters: {known})")
        try:
            number = float(value)
        except ValueError:
            raise BenchError(f"schedule {name}: {key}={value!r} is not a number") from None
        if key == "warmup" and not (number >= 1 and number.is_integer()):
            raise BenchError(f"schedule {name}: warmup={value} must be a whole number of steps >= 1")
        if key == "final" and not 0.0 <= number <= 1.0:
            raise BenchError(f"schedule {name}: final={value} must be a fraction of the lr in [0, 1]")
        params[key] = number
    return Schedule(name, params)


def build_scheduler(schedule: Schedule, opt: torch.optim.Optimizer,
                    steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The scheduler to step after every optimizer step; ``None`` for ``constant`` (nothing to do)."""
    if schedule.name == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor(steps))
