"""``esgd-bench bias``: is a cheap curvature estimate centred on the whole batch's squared product?

Training with a cheap route over seeds answers whether it converges like the exact product; this answers
the question underneath in minutes, on the task's own model and batches.  ESGD-M divides each step by
the square root of an average of :math:`(H z)^2`; an estimate whose expectation is larger than the whole
batch's :math:`(H z)^2` makes the denominators larger and the steps smaller, however long the average.
So, at one point of training, for each of ``samples`` fresh batches and Rademacher probes :math:`z`,
this takes the whole batch's exact :math:`(H z)^2` and, with the same probe and batch, each cheap route's
estimate of it: the squared product of its sub-batch (``hvp_fraction``), or the paired estimate of its
two halves (``hvp_paired``, :func:`esgd._base.paired_estimate`, the optimizer's own arithmetic).
Reported, for the whole model and for each parameter tensor:

* ``ratio``: the sum of the estimates over the sum of the exact squares, over elements and samples (a
  summary weighted by curvature: per element the ratio varies), with a 95% interval from resampling
  the samples;
* ``top_share``: the largest single sample's share of the estimates' (absolute) sum.  Where it is
  large the estimates are heavy-tailed: the mean of a few dozen of them then usually falls below its
  expectation, and the resampled interval is too narrow;
* ``floored``: the same with the paired estimate's noise floor applied as the optimizer applies it:
  per element, the larger of the averaged estimate and the averaged floor (or, for an optimizer that
  floors each step, ``d_max`` and ``ESGDMax``, the average of each step's larger one).  For a sub-batch
  route it equals ``ratio``.

The point is reached by training with the reference (ESGD-M, exact product, the task's learning rate,
held constant) for ``at_step`` steps, with the step code of :func:`bench.train.train`.  Products are
taken in train mode, as on a training step; BatchNorm's running statistics are restored after every
extra forward, so the measurement does not move the model.  Results: ``bias.csv`` (long format: one row
per route and parameter tensor, ``all`` for the model) and ``meta.json``.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

import tasks
from esgd import ESGDMax
from esgd._base import paired_estimate, rademacher
from esgd.attention import hvp_attention
from tasks import TaskConfig

from .config import resolve_device
from .environment import environment
from .errors import BenchError
from .optimizers import OptimizerChoice, parse_optimizer
from .steps import StepRoute, _rows, pair_batches, sub_batch
from .store import check_folder, write_csv, write_json

__all__ = ["BiasConfig", "run_bias", "estimate", "product_fn", "DEFAULT_ROUTES"]

DEFAULT_ROUTES = ("esgd-m-sub", "esgd-m-pair")
_RESAMPLES = 2000
_MIN_SAMPLES = 10          # fewer make the resampled interval meaningless
_PROBE_SEED = 7919


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


def _check(choice: OptimizerChoice) -> OptimizerChoice:
    """Only estimates of ``(H z)^2`` from exact products of part of the batch can be compared here."""
    if not choice.second_order or not getattr(choice.spec.factory, "squares_products", False):
        raise BenchError(f"bias: {choice.label} does not build its curvature from the squared product "
                         "(H z)^2; choose an ESGD route such as esgd-m-sub or esgd-m-pair")
    if choice.setting("hvp_method", "autograd") != "autograd" or choice.hvp_compiled:
        raise BenchError(f"bias: {choice.label}: only the double-backward product of a sub-batch or two "
                         "halves is measured here (no hvp_method or hvp_compiled)")
    return choice


def _parts(choice: OptimizerChoice, batch: Any) -> tuple[tuple, float]:
    """The rows a route's products take: ``((half_a, half_b), covers)`` or ``((part,), 1.0)``."""
    pair = pair_batches(batch, choice.hvp_fraction) if choice.hvp_paired else None
    if pair is not None:
        return (pair[0], pair[1]), pair[2]
    part = None if choice.hvp_paired else sub_batch(batch, choice.hvp_fraction)
    return (batch if part is None else part,), 1.0


def _whole_batch(choice: OptimizerChoice, batch: Any, rows: int) -> bool:
    """Whether the route's products cover the whole batch, which leaves nothing to compare."""
    parts, covers = _parts(choice, batch)
    return covers >= 1 if len(parts) == 2 else _rows(parts[0]) == rows


def _rows_text(choice: OptimizerChoice, batch: Any) -> str:
    """The rows one product of the route takes, as the table shows them: ``2 x 8`` or ``16``."""
    parts, _ = _parts(choice, batch)
    return f"2 x {_rows(parts[0])}" if len(parts) == 2 else str(_rows(parts[0]))


def _floors_each_step(choice: OptimizerChoice) -> bool:
    """Whether the optimizer floors each step's paired estimate (a running maximum) instead of the average."""
    factory = choice.spec.factory
    return bool(choice.setting("d_max", False)) or (isinstance(factory, type) and issubclass(factory, ESGDMax))


def product_fn(problem: Any, params: list[torch.Tensor]) -> Callable[[Any, list], list]:
    """``hvp(batch, probe)``: the exact product of ``problem.loss(batch)`` along ``probe``, by double
    backward in train mode, the model's buffers restored afterwards."""
    buffers = list(problem.model.buffers())

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
    return hvp


def estimate(choice: OptimizerChoice, hvp: Callable[[Any, list], list], batch: Any,
             probe: list) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The route's per-element estimate of the whole batch's ``(H z)^2`` for one batch and probe, and
    the paired estimate's noise floor (``None`` for a sub-batch)."""
    parts, covers = _parts(choice, batch)
    if len(parts) == 2:
        return paired_estimate(hvp(parts[0], probe), hvp(parts[1], probe), covers)
    return [h * h for h in hvp(parts[0], probe)], None


def _ratio(est: torch.Tensor, exact: torch.Tensor, gen: torch.Generator) -> tuple[float, float, float]:
    """Sum of estimates over sum of exact squares, and a 95% interval from resampling the samples (the
    same picks for both, since each sample's estimate and exact square share a batch and probe)."""
    ratio = float(est.sum() / exact.sum())
    picks = torch.randint(0, len(est), (_RESAMPLES, len(est)), generator=gen)
    boot = est[picks].sum(1) / exact[picks].sum(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return ratio, low, high


def _train_to(problem: Any, choice: OptimizerChoice, task: str, seed: int, steps: int) -> float:
    """Train ``steps`` steps with the reference at a constant learning rate; the last training loss."""
    opt = choice.create(problem.model.parameters(), task=task, seed=seed)
    route = StepRoute(problem, opt, choice)
    loss = math.nan
    try:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = route.forward_backward(next(problem.batches)).item() / problem.loss_scale
            if not math.isfinite(loss):
                raise BenchError(f"bias: training {choice.label} on {task} reached a non-finite loss at step "
                                 f"{step}; choose a smaller --at-step or another --seed")
            route.step()
    finally:
        route.close()
    return loss


def _routes(config: BiasConfig) -> list[OptimizerChoice]:
    routes = [_check(parse_optimizer(r)) for r in config.routes]
    if not routes:
        raise BenchError("bias: name at least one route (--opt)")
    labels = [c.label for c in routes]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise BenchError(f"bias: route given more than once: {', '.join(twice)}")
    return routes


def run_bias(config: BiasConfig, *, argv: Sequence[str] | None = None,
             progress: Callable[[str], None] | None = None) -> tuple[Path, pd.DataFrame]:
    """Measure; returns the output folder and the table written to ``bias.csv``."""
    spec = tasks.get_task(config.task)
    for what, value, low in (("samples", config.samples, _MIN_SAMPLES), ("at_step", config.at_step, 0),
                             ("batch_size", config.batch_size, 2), ("threads", config.threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise BenchError(f"bias: {what} must be an integer >= {low}, got {value!r}")
    routes = _routes(config)
    reference = parse_optimizer(config.reference)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    torch.manual_seed(config.seed)
    problem = tasks.build_task(config.task, TaskConfig(
        seed=config.seed, device=device, batch_size=config.batch_size, synthetic=config.synthetic,
        data_dir=config.data_dir, options=dict(config.options)))
    first = next(problem.batches)
    problem.batches = itertools.chain([first], problem.batches)     # the stream as training sees it
    rows = _rows(first)
    if rows is None or rows < 2:
        raise BenchError(f"bias: {config.task}'s batches have no rows to split" if rows is None else
                         f"bias: a batch of {rows} row cannot be split; use --batch-size 2 or more")
    for choice in routes:
        if _whole_batch(choice, first, rows):
            raise BenchError(f"bias: {choice.label} takes its product of the whole batch of {rows} rows, "
                             "which leaves nothing to compare; give hvp_fraction < 1")
    out = Path(config.out) if config.out else \
        Path("results") / f"bias-{config.task}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    created = not out.exists()
    check_folder(out)
    used = {choice.label: _rows_text(choice, first) for choice in routes}   # every batch has ``rows`` rows
    try:
        table, last_loss = _measure(config, problem, routes, reference, used, rows, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()          # nothing was written: leave no empty folder behind
        raise
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


def _measure(config: BiasConfig, problem: Any, routes: list[OptimizerChoice], reference: OptimizerChoice,
             used: dict[str, str], rows: int,
             progress: Callable[[str], None] | None) -> tuple[pd.DataFrame, float]:
    """Train to the point, then sum each route's estimates and the exact squares over the samples."""
    model = problem.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    hvp = product_fn(problem, params)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        if progress:
            progress(f"training {reference.label} to step {config.at_step}")
        last_loss = _train_to(problem, reference, config.task, config.seed, config.at_step)
        gen = torch.Generator(device=params[0].device)
        gen.manual_seed(config.seed + _PROBE_SEED)     # other probes than the reference's training steps
        # Per sample and parameter tensor: the sum of the exact squares and of each route's estimates;
        # per element, the sums over samples (for the floored ratio).
        exact = torch.zeros(config.samples, len(params), dtype=torch.float64)
        ests = torch.zeros(len(routes), config.samples, len(params), dtype=torch.float64)
        exact_el = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        est_el = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in routes]
        floor_el = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in routes]
        for i in range(config.samples):
            if progress:
                progress(f"sample {i + 1}/{config.samples}")
            batch = next(problem.batches)
            probe = [rademacher(p.shape, gen, p.device, p.dtype) for p in params]
            squares = [(h * h).double() for h in hvp(batch, probe)]
            exact[i] = torch.stack([q.sum() for q in squares])
            for acc, q in zip(exact_el, squares):
                acc += q
            for r, choice in enumerate(routes):
                e, floors = estimate(choice, hvp, batch, probe)
                e = [x.double() for x in e]
                ests[r, i] = torch.stack([x.sum() for x in e])
                each_step = floors is not None and _floors_each_step(choice)
                for j, x in enumerate(e):
                    f = floors[j].double() if floors is not None else x
                    est_el[r][j] += torch.maximum(x, f) if each_step else x
                    floor_el[r][j] += torch.maximum(x, f) if each_step else f
            if not bool(exact[i].isfinite().all() and ests[:, i].isfinite().all()):
                raise BenchError(f"bias: a product on {config.task} was not finite (sample {i + 1})")
    boot = torch.Generator().manual_seed(config.seed)
    out = []
    for r, choice in enumerate(routes):
        # What the optimizer divides by, per element: the larger of the averaged estimate and floor.
        floored = [torch.maximum(e, f) for e, f in zip(est_el[r], floor_el[r])]
        parts = [("all", sum(p.numel() for p in params), ests[r].sum(1), exact.sum(1),
                  sum(float(x.sum()) for x in floored) / sum(float(x.sum()) for x in exact_el))]
        parts += [(n, p.numel(), ests[r, :, j], exact[:, j], float(floored[j].sum() / exact_el[j].sum()))
                  for j, (n, p) in enumerate(named)]
        for name, numel, est, ex, fl in parts:
            ratio, low, high = _ratio(est, ex, boot) if float(ex.sum()) > 0 else (math.nan,) * 3
            out.append({"task": config.task, "route": choice.label, "reference": reference.label,
                        "rows": used[choice.label], "batch_rows": rows, "parameter": name, "numel": numel,
                        "ratio": ratio, "low": low, "high": high, "floored": fl if math.isfinite(fl) else math.nan,
                        "top_share": float(est.abs().max() / est.abs().sum()) if float(est.abs().sum()) > 0
                        else math.nan,
                        "at_step": config.at_step, "samples": config.samples, "seed": config.seed})
    return pd.DataFrame(out), last_loss
