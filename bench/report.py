"""A self-contained Markdown report of one or more results folders, fit for a pull request.

The page holds the loss curves (against steps and against wall-clock time), the evaluation curves, the
wall-clock table of :mod:`bench.tables`, the runs that did not finish cleanly, and the environment from
each directory's ``meta.json``; the images are written next to it and linked by relative paths, so the
folder can be moved or attached as a whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .plots import plot_curves, save_figure
from .readers import load_results
from .store import as_bool, check_folder, write_text
from .tables import markdown_table, wall_clock_table

__all__ = ["build_report", "environment_markdown"]

# meta.json keys (flattened) shown first, in this order, when present; every other scalar follows sorted.
_FIRST = ("command", "started", "finished", "environment.torch", "environment.python", "environment.platform",
          "environment.cpu", "environment.gpu", "environment.cuda", "environment.device",
          "environment.torch_threads", "environment.git_commit", "jobs", "world_size", "backend")


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _flatten(meta: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, dict) and key != "config":
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            flat[f"{prefix}{key}"] = value
    return flat


def environment_markdown(meta: dict) -> str:
    """A key/value table of a meta.json (the full resolved config goes in a folded JSON block)."""
    flat = _flatten({k: v for k, v in meta.items() if k != "result_dir"})
    keys = [k for k in _FIRST if k in flat] + sorted(k for k in flat if k not in _FIRST)
    table = pd.DataFrame({"key": keys, "value": [_cell(flat[k]) for k in keys]})
    lines = [table.to_markdown(index=False)]
    if isinstance(meta.get("config"), dict):
        lines += ["", "<details><summary>full resolved config</summary>", "", "```json",
                  json.dumps(meta["config"], indent=2, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _log_scale_helps(metrics: pd.DataFrame) -> bool:
    loss = pd.to_numeric(metrics["loss"], errors="coerce")
    loss = loss[np.isfinite(loss)]
    return bool(len(loss)) and loss.min() > 0 and loss.max() / loss.min() > 100


def build_report(dirs: Iterable[str | os.PathLike], out: str | os.PathLike, *, target: float | None = None,
                 target_loss: float | None = None, title: str | None = None) -> Path:
    """Write ``out/report.md`` and its images; returns the page's path."""
    dirs = [Path(d) for d in dirs]
    results = load_results(dirs)
    metrics, summary, metas = results.metrics, results.summary, results.metas
    out = check_folder(out, "report folder")
    synthetic = "synthetic" in summary and as_bool(summary["synthetic"]).any()
    log_y = _log_scale_helps(metrics)
    figures = [("loss_vs_step.png", "Training loss against optimizer steps", dict(x="step", metric="loss")),
               ("loss_vs_time.png", "Training loss against training wall-clock time",
                dict(x="time", metric="loss"))]
    if any(c.startswith("eval_") and metrics[c].notna().any() for c in metrics.columns):
        figures.append(("eval_vs_step.png", "Evaluation metric against optimizer steps",
                        dict(x="step", metric="eval")))
    images = []
    for name, caption, kw in figures:
        fig = plot_curves(metrics, summary, log_y=log_y and kw["metric"] == "loss", **kw)
        save_figure(fig, out / name)
        images.append((name, caption))

    table = wall_clock_table(metrics, summary, target=target, target_loss=target_loss)
    tasks = ", ".join(dict.fromkeys(summary["task"].astype(str)))
    opts = ", ".join(dict.fromkeys(summary["optimizer"].astype(str)))
    seeds = summary.groupby(["task", "optimizer"])["seed"].nunique()
    parts = [f"# {title or f'esgd-bench report: {tasks}'}", ""]
    if synthetic:
        parts += ["> **SYNTHETIC DATA.** Some runs used synthetic data: their losses and accuracies say "
                  "nothing about real data; only their timings are meaningful.", ""]
    parts += [f"Tasks: {tasks}. Optimizers: {opts}. Seeds per task x optimizer: "
              f"{seeds.min()}{'' if seeds.min() == seeds.max() else f' to {seeds.max()}'}. "
              f"Result directories: {', '.join(f'`{d}`' for d in dirs)}.", "",
              "Curves are the mean over seeds; the shaded band is the min-max over the same seeds; ticks mark "
              "the steps that computed a Hessian-vector product.", ""]
    for name, caption in images:
        parts += [f"## {caption}", "", f"![{caption}]({name})", ""]
    parts += ["## Wall-clock and convergence", "", markdown_table(table),
              "Step and HVP times are medians over seeds of each run's median; *HVP / grad* is the HVP step's "
              "extra cost in gradient evaluations (median forward+backward time); *amortised* is total "
              "training wall time / steps, everything included; *vs SGD / vs Adam* divide it by theirs; "
              "final loss and eval are mean ± sample std over the seeds whose status is ok.", ""]
    bad = summary[summary["status"].astype(str) != "ok"] if "status" in summary else summary.iloc[:0]
    if len(bad):
        shown = bad[["task", "optimizer", "seed", "status", "steps"]].astype(str)
        parts += ["## Runs that did not finish cleanly", "",
                  shown.apply(lambda c: c.str.replace("|", "\\|", regex=False)).to_markdown(index=False), ""]
    parts += ["## Environment", ""]
    for meta in metas:
        parts += [f"### `{meta['result_dir']}`", "", environment_markdown(meta)]
    return write_text(out / "report.md", "\n".join(parts))
