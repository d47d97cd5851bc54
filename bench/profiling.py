"""Where the time of a Hessian-vector product goes (``esgd-bench perf --profile``).

The floor that ``perf`` holds an exact product to counts matmul and convolution FLOPs only: it assumes
the product's arithmetic runs as fast as the forward+backward's.  When a product measures well above
its floor, the question is which operations take the difference.  This profiles one HVP step and one
plain step of the same trainer with ``torch.profiler`` (self time per operator, so nothing is counted
twice), subtracts, and groups the extra time of the product into:

* ``matmul/conv``: the operators whose FLOPs the floor counts (matrix products, convolutions and their
  backward kernels);
* ``normalisation``: BatchNorm and LayerNorm kernels and their backward, whose double backward is
  elementwise work the FLOP count does not see;
* ``elementwise``: the remaining aten operators (activations, their derivatives, additions, copies);
* ``compiled``: the kernels ``torch.compile`` generated (one profiler entry per compiled graph), where
  a compiled product's elementwise and normalisation work runs fused; its convolutions and matrix
  products stay library calls and count under ``matmul/conv``;
* ``autograd``: the autograd engine's own nodes (``...Backward0``), Python-side bookkeeping included.

Three steps of each kind are profiled after the timing rounds (the kernels are warm) and averaged, so
the figures are about as noisy as three steps; compare them with the timed medians, not across runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

import pandas as pd
import torch

__all__ = ["profile_product", "CATEGORIES"]

CATEGORIES = ("matmul/conv", "normalisation", "elementwise", "compiled", "autograd")
COMPILED_GRAPH = "compiled graph (fused kernels)"
# the graph's range on the CPU; its generated kernels (triton on CUDA, C++ on the CPU) where they are named
_COMPILED = re.compile(r"CompiledFxGraph|Torch-Compiled Region|CompiledFunction|^triton_|^cpp_fused")
_MATMUL = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_?convolution.*|conv\d?d|mkldnn_convolution.*"
                     r"|cudnn_convolution.*|convolution_backward.*|_scaled_dot_product.*)$")
_NORM = re.compile(r"^aten::(native_batch_norm.*|batch_norm.*|_batch_norm.*|cudnn_batch_norm.*"
                   r"|native_layer_norm.*|layer_norm.*|miopen_batch_norm.*)$")


def category(name: str) -> str:
    if name == COMPILED_GRAPH:
        return "compiled"
    if _MATMUL.match(name):
        return "matmul/conv"
    if _NORM.match(name):
        return "normalisation"
    if name.startswith("aten::"):
        return "elementwise"
    return "autograd"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side announces its start and stop on file descriptor 2; keep the command's
    own output clean of it."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _self_times(trainer: Any) -> dict[str, float]:
    """Self time per operator (ms) of one step of ``trainer``."""
    from torch.profiler import ProfilerActivity, profile
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _quiet_stderr(), profile(activities=activities) as prof:
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        # a compiled graph's entry is named by a hash that changes with every compilation
        key = COMPILED_GRAPH if _COMPILED.search(event.key) else event.key
        out[key] = out.get(key, 0.0) + us / 1e3
    return out


def _add(into: dict[str, float], times: dict[str, float], repeats: int) -> None:
    for k, v in times.items():
        into[k] = into.get(k, 0.0) + v / repeats


def profile_product(trainer: Any, task: str, label: str, repeats: int = 3) -> pd.DataFrame:
    """One row per category and one per operator (the eight that add most): the time of a plain step,
    of an HVP step (each the mean of ``repeats`` profiled steps), the difference, and the difference in
    units of the plain step's total."""
    hvp: dict[str, float] = {}
    plain: dict[str, float] = {}
    for _ in range(repeats):
        while not trainer.is_hvp():
            trainer.step()
        _add(hvp, _self_times(trainer), repeats)
        _add(plain, _self_times(trainer), repeats)       # the step after an HVP step is a plain one
    total_plain = sum(plain.values())
    ops = pd.DataFrame([{"op": k, "category": category(k), "plain_ms": plain.get(k, 0.0), "hvp_ms": hvp.get(k, 0.0)}
                        for k in sorted(set(plain) | set(hvp))])
    ops["extra_ms"] = ops["hvp_ms"] - ops["plain_ms"]
    rows = []
    for cat in CATEGORIES:
        g = ops[ops["category"] == cat]
        rows.append({"kind": "category", "name": cat, "plain_ms": g["plain_ms"].sum(), "hvp_ms": g["hvp_ms"].sum(),
                     "extra_ms": g["extra_ms"].sum()})
    rows.append({"kind": "category", "name": "total", "plain_ms": ops["plain_ms"].sum(),
                 "hvp_ms": ops["hvp_ms"].sum(), "extra_ms": ops["extra_ms"].sum()})
    for r in ops.sort_values("extra_ms", ascending=False).head(8).itertuples(index=False):
        rows.append({"kind": "op", "name": r.op, "category": r.category, "plain_ms": r.plain_ms,
                     "hvp_ms": r.hvp_ms, "extra_ms": r.extra_ms})
    table = pd.DataFrame(rows)
    table.insert(0, "optimizer", label)
    table.insert(0, "task", task)
    table["extra_vs_plain_step"] = table["extra_ms"] / total_plain if total_plain else float("nan")
    return table
