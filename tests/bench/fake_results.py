"""A small hand-built results store (issue 4's format) whose table numbers can be worked out by hand.

Task rosenbrock (eval metric dist, lower is better, default target 1e-2), 4 steps per run, eval at steps 2
and 4; wall time grows linearly, so step k of a run of total wall time W is logged at W * k / 4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.results import write_csv_atomic, write_json_atomic

NAN = math.nan
STEPS = 4

# opt, seed, wall_time_s, step_time_ms, hvp_time_ms, final_loss, eval_value, fwd_bwd_ms per step,
# is_hvp per step, eval_dist at steps 2 and 4, status, losses per step
RUNS = [
    ("sgd", 0, 0.4, 90.0, NAN, 1.0, 0.5, [10, 10, 10, 10], [0, 0, 0, 0], (0.9, 0.5), "ok", [4, 3, 2, 1.0]),
    ("sgd", 1, 0.6, 110.0, NAN, 3.0, 0.7, [20, 20, 20, 20], [0, 0, 0, 0], (0.9, 0.7), "ok", [4, 3.5, 3.2, 3.0]),
    ("sgd", 2, 0.1, 50.0, NAN, NAN, NAN, [20, NAN, NAN, NAN], [0, 0, 0, 0], (NAN, NAN), "diverged",
     [4, NAN, NAN, NAN]),
    ("adam", 0, 0.5, 120.0, NAN, 2.0, 0.2, [15, 15, 15, 15], [0, 0, 0, 0], (0.3, 0.2), "ok", [4, 3, 2.5, 2.0]),
    ("adam", 1, 0.7, 130.0, NAN, 2.0, 0.4, [15, 15, 15, 15], [0, 0, 0, 0], (0.009, 0.4), "ok", [4, 3, 2.5, 2.0]),
    ("esgd-m", 0, 0.8, 150.0, 60.0, 0.5, 0.001, [1000, 1000, 30, 40], [1, 1, 0, 0], (0.05, 0.001), "ok",
     [4, 2, 1, 0.5]),
    ("esgd-m", 1, 1.0, 170.0, 80.0, 0.7, 0.003, [1000, 1000, 50, 60], [1, 1, 0, 0], (0.008, 0.003), "ok",
     [4, 1.4, 1, 0.7]),
]

# The table's numbers, worked out by hand from RUNS (see the module docstring).
EXPECTED = {
    "sgd": dict(runs=3, runs_ok=2, step_ms=100.0, hvp_ms=NAN, amortised_ms=125.0, vs_sgd=1.0, vs_adam=125 / 150,
                ttt_reached=0, ttt_s=NAN, final_loss_mean=2.0, final_loss_std=math.sqrt(2.0),
                eval_mean=0.6, eval_std=math.sqrt(0.02), hvp_x_grad=NAN),
    "adam": dict(runs=2, runs_ok=2, step_ms=125.0, hvp_ms=NAN, amortised_ms=150.0, vs_sgd=150 / 125, vs_adam=1.0,
                 ttt_reached=1, ttt_s=0.35, final_loss_mean=2.0, final_loss_std=0.0, eval_mean=0.3,
                 eval_std=math.sqrt(0.02), hvp_x_grad=NAN),
    # amortised: 800/4 = 200 and 1000/4 = 250 ms; non-HVP fwd_bwd: 30, 40, 50, 60 -> median 45
    "esgd-m": dict(runs=2, runs_ok=2, step_ms=160.0, hvp_ms=70.0, amortised_ms=225.0, vs_sgd=225 / 125,
                   vs_adam=225 / 150, ttt_reached=2, ttt_s=(0.8 + 0.5) / 2, final_loss_mean=0.6,
                   final_loss_std=math.sqrt(0.02), eval_mean=0.002, eval_std=math.sqrt(2e-6),
                   hvp_x_grad=70 / 45),
}


def frames(task: str = "rosenbrock", synthetic: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics, summary = [], []
    for opt, seed, wall, step_ms, hvp_ms, final, ev, fb, hvp, dist, status, losses in RUNS:
        for k in range(1, STEPS + 1):
            if math.isnan(losses[k - 1]):
                break
            metrics.append({"task": task, "optimizer": opt, "lr": 0.1, "seed": seed, "step": k,
                            "wall_time_s": wall * k / STEPS, "loss": losses[k - 1],
                            "is_hvp_step": bool(hvp[k - 1]), "step_ms": step_ms, "data_ms": 0.0,
                            "fwd_bwd_ms": fb[k - 1], "hvp_ms": hvp_ms if hvp[k - 1] else NAN, "update_ms": 1.0,
                            "eval_dist": dist[k // 2 - 1] if k % 2 == 0 else NAN,
                            "eval_f": losses[k - 1] if k % 2 == 0 else NAN})
        summary.append({"task": task, "optimizer": opt, "opt_name": opt, "lr": 0.1, "seed": seed,
                        "steps": STEPS if status == "ok" else 1, "final_loss": final, "eval_metric": "dist",
                        "eval_value": ev, "wall_time_s": wall, "step_time_ms": step_ms,
                        "hvp_time_ms": hvp_ms, "hvp_steps": sum(hvp), "peak_mem_mb": 100.0,
                        "status": status, "data_source": "none (analytic)", "synthetic": synthetic,
                        "device": "cpu"})
    return pd.DataFrame(metrics), pd.DataFrame(summary)


def write_results(folder: Path, task: str = "rosenbrock", synthetic: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    metrics, summary = frames(task, synthetic)
    write_csv_atomic(metrics, folder / "metrics.csv")
    write_csv_atomic(summary, folder / "summary.csv")
    write_json_atomic({"command": "esgd-bench run rosenbrock (hand-built test data)", "torch": "2.x",
                       "python": "3.x", "device": "cpu", "threads": 2,
                       "config": {"task": task, "steps": STEPS}}, folder / "meta.json")
    return folder
