"""What a result was measured on: versions, CPU, GPU, threads and the git commit, for ``meta.json``.

Every writer of results (runs, sweeps, the scale study, the regression baseline, ``perf``) records the
same description, so numbers from different folders can be told apart by the machine that made them.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["environment", "cpu_name", "git_commit", "now", "load_average"]


def now() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, or ``None`` outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how busy the machine was while it was timed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, CPU, thread count, device (and GPU) and git commit."""
    import torch

    import esgd
    env: dict[str, Any] = {
        "esgd_bench_version": esgd.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
        "git_commit": git_commit()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env
