"""tasks: the benchmark task registry (one task per file; see tasks/base.py for the interface)."""

from .base import Problem, TaskConfig, TaskDataError, TaskSpec

__all__ = ["Problem", "TaskConfig", "TaskDataError", "TaskSpec"]
