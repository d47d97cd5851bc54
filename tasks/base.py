"""The uniform task interface that the runner sees, after benchopt's one-task-per-file layout.

A task file defines ``TASK = TaskSpec(...)``; its ``build(config)`` returns a :class:`Problem`: the model
(an ``nn.Module`` holding every trainable parameter), an endless stream of training batches, the
training loss of a batch, and an evaluation.  The runner never looks inside a task, so a new file under
``tasks/`` is a new benchmark with no edit anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["TaskSpec", "TaskConfig", "Problem", "TaskDataError", "TaskOptionError", "UnknownTaskError",
           "resolve_options"]


class UnknownTaskError(LookupError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:      # LookupError would quote the message
        return str(self.args[0])


class TaskDataError(RuntimeError):
    """The data a task needs is missing; the message says where it looked and the ways out."""


class TaskOptionError(ValueError):
    """A task option that the task does not have, or a value of the wrong kind."""


def resolve_options(task: str, defaults: Mapping[str, Any], given: Mapping[str, Any],
                    at_least: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``defaults`` updated with ``given``; values are coerced to the default's type (the CLI passes
    strings), an unknown name is an error rather than a silently ignored typo, and a number below its
    ``at_least`` bound (``eval_size=-5``) is an error rather than a run that measures nothing."""
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise TaskOptionError(f"task {task!r} has no option {key!r} (options: {known})")
        kind = type(defaults[key])
        if defaults[key] is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[key] = value
            continue
        try:
            if kind is bool:
                text = str(value).strip().lower()
                if text not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(text)
                out[key] = text in {"1", "true", "yes", "on"}
            elif kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                out[key] = kind(value)
        except (TypeError, ValueError):
            raise TaskOptionError(f"task {task!r}: option {key}={value!r} is not a valid "
                                  f"{kind.__name__}") from None
    for key, low in (at_least or {}).items():
        if not out[key] >= low:
            raise TaskOptionError(f"task {task!r}: option {key}={out[key]!r} must be >= {low:g}")
    return out


@dataclass(frozen=True)
class TaskConfig:
    """What a run asks of a task; every field has a default so tests can build tasks in one line."""

    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None          # None: the task's default_batch_size
    data_dir: Path | None = None           # None: the task's default (see tasks.data.default_data_dir)
    download: bool = False
    synthetic: bool = False
    options: dict[str, Any] = field(default_factory=dict)   # task-specific: width, dim, arch, augment...


@dataclass
class Problem:
    """One built task.

    ``loss(batch)`` is the objective the optimizer sees, loss scaling included; the runner logs
    ``loss / loss_scale`` so scaled variants are compared on the original objective.  ``evaluate()``
    returns a dict of floats that contains ``eval_metric`` of the spec, measured on the validation split
    where the task has one; it runs under ``torch.no_grad`` and must leave the model in training mode.
    ``test()``, where given, measures the held-out test split the same way; the runner calls it once, at
    the end of training, so that no choice made during tuning ever sees the test split.  ``reference``,
    where given, is a score in the eval metric's units that any learning must beat and what it is (for
    a language model, the unigram entropy of its training text); the runner records and prints it.
    """

    model: nn.Module
    batches: Iterator[Any]
    loss: Callable[[Any], torch.Tensor]
    evaluate: Callable[[], dict[str, float]]
    data_source: str
    synthetic: bool = False
    loss_scale: float = 1.0
    param_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)
    test: Callable[[], dict[str, float]] | None = None
    reference: tuple[str, float] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: what users type, what they see in ``esgd-bench tasks``, and how to build it."""

    name: str
    description: str
    build: Callable[[TaskConfig], Problem]
    default_steps: int
    default_batch_size: int
    data_source: str
    eval_metric: str                       # key of evaluate()'s dict used in summaries
    higher_is_better: bool
    target: float | None = None            # default target of eval_metric for time-to-target
    default_eval_every: int = 50
    base: str | None = None                # for scaled variants: the task they scale
    test_metric: str | None = None         # key of test()'s dict reported at the end, where there is one
    default_schedule: str = "constant"     # the lr schedule runs use unless told otherwise (bench.schedules)
    # option names and their defaults (``TaskConfig.options`` may set them); not hashed: a dict
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
