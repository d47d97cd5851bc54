"""``esgd-bench bias``: is a cheap curvature estimate centred on the whole batch's squared product?

Training with a cheap route over seeds answers whether it converges like the exact product; this answers
the question underneath in a minute or two, on the task's own model and batches.  ESGD-M divides each
step by the square root of an average of :math:`(H z)^2`; a cheap estimate whose expectation is ``r``
times the whole batch's :math:`(H z)^2` shrinks every step by about :math:`\\sqrt{r}`, however long the
average.  So, at one point of training, for each of ``samples`` fresh batches and Rademacher probes
:math:`z`, this takes the whole batch's exact :math:`(H z)^2` and, with the same probe and batch, each
cheap route's estimate of it: the squared product of its sub-batch (``hvp_fraction``), or the paired
estimate of its two halves (``hvp_paired``, :func:`esgd._base.paired_estimate`, the optimizer's own
arithmetic).  The ratio of their sums over parameters and samples is reported with a 95% interval from
resampling the samples, for the whole model and for each parameter tensor.

The point is reached by training with the reference (ESGD-M, exact product, the task's learning rate)
for ``at_step`` steps, exactly as :func:`bench.train.train` steps.  Products are taken in train mode,
as on a training step; BatchNorm's running statistics are restored after every extra forward, so the
measurement does not move the model.  Results: ``bias.csv`` (long format: one row per route and
parameter tensor, ``all`` for the model) and ``meta.json``.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

import tasks
from esgd._base import paired_estimate, rademacher
from esgd.attention import hvp_attention
from tasks import TaskConfig

from .config import resolve_device
from .environment import environment
from .errors import BenchError
from .optimizers import OptimizerChoice, parse_optimizer
from .steps import StepRoute, _rows, pair_batches, sub_batch
from .store import check_folder, write_csv, write_json

__all__ = ["BiasConfig", "run_bias", "route_rows", "DEFAULT_ROUTES"]

DEFAULT_ROUTES = ("esgd-m-sub", "esgd-m-pair")
_RESAMPLES = 2000


@dataclass(frozen=True)
class BiasConfig:
    """What ``esgd-bench bias`` measures; see the module docstring."""

    task: str
    routes: tuple[str, ...] = DEFAULT_ROUTES
    reference: str = "esgd-m"
    at_step: int = 100
    samples: int = 64
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    synthetic: bool = False
    data_dir: Path | None = None
    threads: int | None = None
    out: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


def route_rows(choice: OptimizerChoice, rows: int) -> str:
    """How many rows one product of the route sees, e.g. ``2 x 8`` (paired) or ``16``."""
    if choice.hvp_paired:
        half = max(1, math.ceil(min(choice.hvp_fraction, 1.0) * rows / 2))
        return f"2 x {half}" if rows >= 2 else str(rows)
    return str(max(1, math.ceil(min(choice.hvp_fraction, 1.0) * rows)))


def _check(choice: OptimizerChoice) -> OptimizerChoice:
    """Only estimates of ``(H z)^2`` from exact products of part of the batch can be compared here."""
    if not choice.second_order or not getattr(choice.spec.factory, "squares_products", False):
        raise BenchError(f"bias: {choice.label} does not build its curvature from the squared product "
                         "(H z)^2; choose an ESGD route such as esgd-m-sub or esgd-m-pair")
    if {**choice.spec.defaults, **choice.given}.get("hvp_method", "autograd") != "autograd" or choice.hvp_compiled:
        raise BenchError(f"bias: {choice.label}: only the double-backward product of a sub-batch or two "
                         "halves is measured here (no hvp_method or hvp_compiled)")
    return choice


def _estimator(choice: OptimizerChoice, hvp: Callable[[Any, list], list]) -> Callable[[Any, list], list]:
    """The route's per-element estimate of the whole batch's ``(H z)^2`` for one batch and probe."""
    def estimate(batch: Any, probe: list) -> list:
        pair = pair_batches(batch, choice.hvp_fraction) if choice.hvp_paired else None
        if pair is not None:
            squares, _ = paired_estimate(hvp(pair[0], probe), hvp(pair[1], probe), pair[2])
            return squares
        part = None if choice.hvp_paired else sub_batch(batch, choice.hvp_fraction)
        return [h * h for h in hvp(batch if part is None else part, probe)]
    return estimate


def _ratio(est: torch.Tensor, exact: torch.Tensor, gen: torch.Generator) -> tuple[float, float, float]:
    """Sum of estimates over sum of exact squares, and a 95% interval from resampling the samples."""
    ratio = float(est.sum() / exact.sum())
    picks = torch.randint(0, len(est), (_RESAMPLES, len(est)), generator=gen)
    boot = est[picks].sum(1) / exact[picks].sum(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return ratio, low, high


def _train_to(problem: Any, choice: OptimizerChoice, task: str, seed: int, steps: int) -> float:
    """Train ``steps`` steps with the reference as ``bench.train.train`` does; the last loss."""
    opt = choice.create(problem.model.parameters(), task=task, seed=seed)
    route = StepRoute(problem, opt, choice)
    loss = math.nan
    try:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = route.forward_backward(next(problem.batches)).item()
            if not math.isfinite(loss):
                raise BenchError(f"bias: training {choice.label} on {task} reached a non-finite loss at step "
                                 f"{step}; choose a smaller --at-step or another --seed")
            route.step()
    finally:
        route.close()
    return loss


def run_bias(config: BiasConfig, *, argv: Sequence[str] | None = None,
             progress: Callable[[str], None] | None = None) -> tuple[Path, pd.DataFrame]:
    """Measure; returns the output folder and the table written to ``bias.csv``."""
    spec = tasks.get_task(config.task)
    for what, value, low in (("samples", config.samples, 2), ("at_step", config.at_step, 0),
                             ("batch_size", config.batch_size, 1), ("threads", config.threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise BenchError(f"bias: {what} must be an integer >= {low}, got {value!r}")
    routes = [_check(parse_optimizer(r)) for r in config.routes]
    if not routes:
        raise BenchError("bias: name at least one route (--opt)")
    reference = parse_optimizer(config.reference)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = check_folder(Path(config.out) if config.out else
                       Path("results") / f"bias-{config.task}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    started = time.time()
    torch.manual_seed(config.seed)
    problem = tasks.build_task(config.task, TaskConfig(
        seed=config.seed, device=device, batch_size=config.batch_size, synthetic=config.synthetic,
        data_dir=config.data_dir, options=dict(config.options)))
    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = [b for b in model.buffers()]

    def hvp(batch: Any, probe: list) -> list:
        saved = [b.detach().clone() for b in buffers]
        try:
            with hvp_attention(True):
                loss = problem.loss(batch)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]     # a parameter the loss uses
            return [h.detach() for h in torch.autograd.grad([grads[i] for i in live], params,
                                                            [probe[i] for i in live], allow_unused=True,
                                                            materialize_grads=True)]
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        if progress:
            progress(f"training {reference.label} to step {config.at_step}")
        last_loss = _train_to(problem, reference, config.task, config.seed, config.at_step)
        estimators = [_estimator(c, hvp) for c in routes]
        gen = torch.Generator(device=params[0].device)
        gen.manual_seed(config.seed)
        # Per sample and parameter tensor: the sum of exact squares and of each route's estimate.
        exact = torch.zeros(config.samples, len(params), dtype=torch.float64)
        ests = torch.zeros(len(routes), config.samples, len(params), dtype=torch.float64)
        rows_per_batch = None
        for i in range(config.samples):
            if progress:
                progress(f"sample {i + 1}/{config.samples}")
            batch = next(problem.batches)
            rows_per_batch = rows_per_batch or _rows(batch)
            probe = [rademacher(p.shape, gen, p.device, p.dtype) for p in params]
            exact[i] = torch.stack([(h * h).double().sum() for h in hvp(batch, probe)])
            for r, estimate in enumerate(estimators):
                ests[r, i] = torch.stack([e.double().sum() for e in estimate(batch, probe)])
            if not bool(exact[i].isfinite().all() and ests[:, i].isfinite().all()):
                raise BenchError(f"bias: a product on {config.task} was not finite (sample {i + 1})")
    boot = torch.Generator().manual_seed(config.seed)
    table_rows = []
    for r, choice in enumerate(routes):
        parts = [("all", sum(p.numel() for p in params), ests[r].sum(1), exact.sum(1))]
        parts += [(n, p.numel(), ests[r, :, j], exact[:, j]) for j, (n, p) in enumerate(zip(names, params))]
        for name, numel, est, ex in parts:
            ratio, low, high = _ratio(est, ex, boot) if float(ex.sum()) > 0 else (math.nan,) * 3
            table_rows.append({"task": config.task, "route": choice.label, "reference": reference.label,
                               "rows": route_rows(choice, rows_per_batch or 0), "batch_rows": rows_per_batch,
                               "parameter": name, "numel": numel, "ratio": ratio, "low": low, "high": high,
                               "at_step": config.at_step, "samples": config.samples, "seed": config.seed})
    table = pd.DataFrame(table_rows)
    write_csv(table, out / "bias.csv")
    write_json({"command": " ".join(argv) if argv is not None else "run_bias()",
                "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
                "seconds": round(time.time() - started, 1), "device": device,
                "threads": torch.get_num_threads(), "loss_at_step": last_loss,
                "data_source": problem.data_source, "synthetic": problem.synthetic,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()},
                "method": __doc__.split("\n\n", 1)[1].strip(), "environment": environment(device),
                "task_description": spec.description}, out / "meta.json")
    return out, table

