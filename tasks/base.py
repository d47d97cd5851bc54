"""The uniform task interface that the runner sees, after benchopt's one-task-per-file layout.

A task file defines ``TASK = TaskSpec(...)``; its ``build(config)`` returns a :class:`Problem`: the model
(an ``nn.Module`` holding every trainable parameter), an endless stream of training batches, the
training loss of a batch, and an evaluation.  The runner never looks inside a task, so a new file under
``tasks/`` is a new benchmark with no edit anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["TaskSpec", "TaskConfig", "Problem", "TaskDataError"]


class TaskDataError(RuntimeError):
    """The data a task needs is missing; the message says where it looked and the ways out."""


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
    returns a dict of floats that contains ``eval_metric`` of the spec; it runs under ``torch.no_grad``
    and must leave the model in training mode.
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
