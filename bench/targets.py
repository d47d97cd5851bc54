"""The ratios ``esgd-bench perf`` reports from its timed rounds, its performance targets, and whether a
measured table meets them.

An exact Hessian-vector product is held to its own arithmetic floor (the amortised step it would take
if the product ran at the speed of a forward+backward, by its counted FLOPs), since a fixed bound asks
the impossible of a model whose product has more arithmetic; a cheap estimate (sub-batch, paired,
finite differences, or the exact product taken less often: ``lazy``) is held to a fixed fraction above
Adam's step; the plain update and peak memory to fixed ratios to Adam's.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .timing import median

__all__ = ["TARGETS", "CHEAP_ROUTES", "HVP_EVERY", "summarise", "target_checks", "floor_flops"]

CHEAP_ROUTES = ("sub-batch", "paired", "finite-difference", "lazy")
TARGETS = {"update_vs_adam": 0.90, "amortised_exact_vs_floor": 1.05, "amortised_cheap_vs_adam": 1.07,
           "peak_mem_vs_adam": 1.2}
HVP_EVERY = 10              # amortisation: one HVP step in this many, unless a variant sets its own


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
    backward on some models), so no exact route is excused its extra work.  The exact product taken less
    often (``lazy``) is the same product, so its floor is built on the same count."""
    whole = ("exact", "lazy")
    exact = [v for k, v in own.items() if routes[k] in whole and math.isfinite(v)]
    least = min(exact) if exact else math.nan
    return {k: least if routes[k] in whole else v for k, v in own.items()}


def summarise(samples: dict[str, list[dict[str, float]]], ref: str = "adam",
              flop_evals: dict[str, float] | None = None,
              every: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Medians per variant and medians over rounds of the within-round ratios to ``ref``.

    A variant's amortised step is ((n - 1) plain + 1 HVP) / n with n its entry in ``every`` (default
    10).  With ``flop_evals`` (the product's FLOP-counted cost in gradient evaluations, per variant) also
    ``floor_vs_adam``: the amortised step the variant would take if its product ran at the speed of its
    own forward+backward, ((n - 1) plain + (plain + flop_evals x fwd+bwd)) / n, against Adam's step."""
    out = {}
    flop_evals, every = flop_evals or {}, every or {}
    for label, rows in samples.items():
        n = every.get(label, HVP_EVERY)
        s = {k: median([r[k] for r in rows]) for k in ("fb_ms", "update_ms", "plain_ms", "hvp_step_ms")}
        per_round = []
        for r in rows:
            hvp = r["hvp_step_ms"]
            per_round.append(r["plain_ms"] if math.isnan(hvp) else ((n - 1) * r["plain_ms"] + hvp) / n)
        s["amortised_ms"] = median(per_round)
        s["hvp_extra_ms"] = s["hvp_step_ms"] - s["plain_ms"]
        s["hvp_grad_evals"] = s["hvp_extra_ms"] / s["fb_ms"]
        s["hvp_step_vs_fb"] = s["hvp_step_ms"] / s["fb_ms"]
        if ref in samples:
            refs = samples[ref]
            ref_amortised = [x["plain_ms"] for x in refs]
            s["amortised_vs_adam"] = median([a / b for a, b in zip(per_round, ref_amortised)])
            s["update_vs_adam"] = median([a["update_ms"] / b["update_ms"] for a, b in zip(rows, refs)])
            s["fb_vs_adam"] = median([a["fb_ms"] / b["fb_ms"] for a, b in zip(rows, refs)])
            if label in flop_evals and math.isfinite(flop_evals[label]):
                s["hvp_flop_evals"] = flop_evals[label]
                s["floor_vs_adam"] = median([(a["plain_ms"] + flop_evals[label] * a["fb_ms"] / n)
                                             / b["plain_ms"] for a, b in zip(rows, refs)])
                s["amortised_vs_floor"] = s["amortised_vs_adam"] / s["floor_vs_adam"]
        s["hvp_every"] = n if math.isfinite(s["hvp_step_ms"]) else math.nan    # none for first order
        out[label] = s
    return out
