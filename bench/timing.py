"""Honest step timing and peak memory of a training run, in the spirit of airbench's timing code.

Clock.  Each timed region is bracketed by ``time.perf_counter``; on CUDA the device is synchronised
before every reading, so a region's time is the work it launched, not the launch alone.  Evaluation,
logging and progress display happen outside the regions and never count as training time.

What one step logs (all in milliseconds):

* ``data_ms``: fetching the batch; ``fwd_bwd_ms``: ``zero_grad`` + forward + backward;
  ``update_ms``: ``opt.step()``; ``step_ms``: their sum, the step's measured training time.
* ``hvp_ms``: the extra work of a Hessian-vector-product step.  On such a step the backward builds the
  double-backward graph and ``step()`` differentiates the gradients once more, so both regions are
  longer than on a plain step.  The extra cost cannot be read off one clock, so it is measured as a
  difference against the same run's plain steps, after the run (:func:`attribute_hvp_cost`)::

      hvp_ms     = (fwd_bwd_raw - median plain fwd_bwd) + (update_raw - median plain update)
      fwd_bwd_ms = median plain fwd_bwd,  update_ms = median plain update

  so ``data_ms + fwd_bwd_ms + hvp_ms + update_ms == step_ms`` on every step.  Plain steps have
  ``hvp_ms = 0``.  Single-step values are noisy (a negative ``hvp_ms`` on a tiny problem is noise, kept
  unclipped so medians stay unbiased); summaries use medians.  A run with no plain step after the first
  one (fewer steps than the HVP warm-up, or an HVP on every step) has no reference: its HVP steps keep
  their raw times and ``hvp_ms`` is NaN.
* The first step pays for lazy allocation and kernel selection, so it is left out of every median.

Summary numbers (:func:`summarise_timings`): ``step_time_ms`` = median ``step_ms`` over plain steps;
``fwd_bwd_time_ms`` / ``update_time_ms`` = the plain medians; ``hvp_time_ms`` = median ``hvp_ms`` over
HVP steps (NaN for first-order optimizers); ``mean_step_ms`` = mean ``step_ms``, the amortised cost
including the HVP steps; ``hvp_steps`` counts HVP steps (the first included).

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` at the run's start.  On CPU the peak resident set size of the process
during the run: Linux lets a process reset its high-water mark (``echo 5 > /proc/self/clear_refs``),
after which ``VmHWM`` in ``/proc/self/status`` is the peak since the reset, so sequential runs in one
process are measured separately.  Where that reset is unavailable the fallback is ``ru_maxrss`` from
``resource.getrusage``, which is the process's maximum so far: in-process sequential runs then see the
largest value of any run before them (``--jobs`` runs each cell in its own process, which avoids it).
CPU RSS includes the interpreter and torch itself (a few hundred MB), not only the run's tensors.
"""

from __future__ import annotations

import math
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["Clock", "PeakMemory", "attribute_hvp_cost", "summarise_timings", "median", "mean"]


class Clock:
    """``perf_counter`` that first waits for the device, so regions measure finished work."""

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PeakMemory:
    """Peak memory of one run in MB; see the module docstring for what is measured where."""

    _STATUS = Path("/proc/self/status")

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.method = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "cpu_process_max_rss"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method == "cpu_peak_rss":
            try:
                match = re.search(r"VmHWM:\s+(\d+)\s+kB", self._STATUS.read_text())
                if match:
                    return int(match.group(1)) / 1024
            except OSError:
                pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def median(values: Sequence[float]) -> float:
    """The median of the finite values (NaN when there is none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def mean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there is none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


TAIL = 0.1      # a run's end: its last tenth of steps


def tail_mean(losses: Sequence[float], fraction: float = TAIL) -> float:
    """The mean loss over the last ``fraction`` of a run's steps (at least one; NaN when there is none,
    or when the run ended in NaN): one minibatch's loss alone varies by tens of percent from step to
    step, so the end of a run is judged on its tail."""
    losses = list(losses)
    if not losses:
        return math.nan
    return statistics.fmean(losses[-max(1, math.ceil(fraction * len(losses))):])


def _plain(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # Step 1 is warm-up; a step that stopped before its update (divergence) has no update time.
    return [r for r in rows if r["step"] > 1 and not r["is_hvp_step"] and math.isfinite(r["update_ms"])]


def attribute_hvp_cost(rows: list[dict[str, Any]]) -> None:
    """Fill ``hvp_ms`` and split each HVP step's raw times, in place (method in the module docstring).

    Expects ``fwd_bwd_ms`` and ``update_ms`` to hold the raw measured times of every step.
    """
    plain = _plain(rows)
    ref_fb = median([r["fwd_bwd_ms"] for r in plain])
    ref_up = median([r["update_ms"] for r in plain])
    for r in rows:
        if not r["is_hvp_step"]:
            r["hvp_ms"] = 0.0
        elif math.isnan(ref_fb) or math.isnan(ref_up) or not math.isfinite(r["update_ms"]):
            r["hvp_ms"] = math.nan
        else:
            r["hvp_ms"] = (r["fwd_bwd_ms"] - ref_fb) + (r["update_ms"] - ref_up)
            r["fwd_bwd_ms"], r["update_ms"] = ref_fb, ref_up


def summarise_timings(rows: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """The run's timing summary from rows already passed through :func:`attribute_hvp_cost`."""
    plain = _plain(rows)
    hvp = [r for r in rows if r["is_hvp_step"]]
    later = [r for r in rows if r["step"] > 1 and math.isfinite(r["update_ms"])]
    return {
        "step_time_ms": median([r["step_ms"] for r in plain]),
        "fwd_bwd_time_ms": median([r["fwd_bwd_ms"] for r in plain]),
        "update_time_ms": median([r["update_ms"] for r in plain]),
        "hvp_time_ms": median([r["hvp_ms"] for r in hvp if r["step"] > 1]),
        "mean_step_ms": mean([r["step_ms"] for r in later]),
        "hvp_steps": len(hvp),
    }
