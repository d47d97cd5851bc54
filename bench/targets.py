"""The performance targets of ``esgd-bench perf``, and whether a measured table meets them.

An exact Hessian-vector product is held to its own arithmetic floor (the amortised step it would take
if the product ran at the speed of a forward+backward, by its counted FLOPs), since a fixed bound asks
the impossible of a model whose product has more arithmetic; a cheap estimate (sub-batch, paired,
finite differences) is held to a fixed fraction above Adam's step; the plain update and peak memory
to fixed ratios to Adam's.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["TARGETS", "CHEAP_ROUTES", "target_checks", "floor_flops"]

CHEAP_ROUTES = ("sub-batch", "paired", "finite-difference")
TARGETS = {"update_vs_adam": 0.90, "amortised_exact_vs_floor": 1.05, "amortised_cheap_vs_adam": 1.07,
           "peak_mem_vs_adam": 1.2}


def target_checks(table: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per performance target and task: the measured ratio, the bound and whether it is met."""
    if table.empty:
        return []
    checks = []
    eager = table[(table["section"] == "task") & (table["mode"] == "eager")]
    for task, g in eager.groupby("task", sort=False):
        by = g.set_index("optimizer")

        def add(what: str, label: str, column: str, bound: float, floor: float | None = None) -> None:
            if label in by.index and column in by.columns and pd.notna(by.loc[label, column]):
                value = float(by.loc[label, column])
                checks.append({"task": task, "target": what, "optimizer": label, "floor": floor,
                               "value": value, "bound": bound, "met": bool(value <= bound)})

        add("plain update vs Adam", "esgd-m", "update_vs_adam", TARGETS["update_vs_adam"])
        for label in by.index:
            route = by.loc[label, "hvp_route"] if "hvp_route" in by.columns else ""
            if route == "exact" and "floor_vs_adam" in by.columns and pd.notna(by.loc[label, "floor_vs_adam"]):
                floor = float(by.loc[label, "floor_vs_adam"])
                add(f"amortised step, {label} (exact) within 5% of its floor", label, "amortised_vs_adam",
                    TARGETS["amortised_exact_vs_floor"] * floor, floor)
            elif route in CHEAP_ROUTES:
                add(f"amortised step, {label} ({route})", label, "amortised_vs_adam",
                    TARGETS["amortised_cheap_vs_adam"])
        for label in by.index.drop("adam", errors="ignore"):    # the variants whose memory was probed
            add(f"peak memory (process), {label}", label, "peak_mem_vs_adam", TARGETS["peak_mem_vs_adam"])
            add(f"peak memory (above start), {label}", label, "peak_extra_vs_adam", TARGETS["peak_mem_vs_adam"])
    return checks


def floor_flops(own: dict[str, float], routes: dict[str, str]) -> dict[str, float]:
    """The product cost (in gradient evaluations) each variant's floor is built on, from each variant's
    own FLOP count and route: a cheap route's own count; for the exact routes, the fewest FLOPs any of
    them counts, since they compute the same product (forward-over-reverse counts more than the double
    backward on some models), so no exact route is excused its extra work."""
    exact = [v for k, v in own.items() if routes[k] == "exact" and math.isfinite(v)]
    least = min(exact) if exact else math.nan
    return {k: least if routes[k] == "exact" else v for k, v in own.items()}
