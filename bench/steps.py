"""The gradient work of one optimizer step, by every route the suite trains with.

:class:`StepRoute` is the one place that decides how a step's gradients and Hessian-vector products are
computed; the training loop (:mod:`bench.train`) and ``esgd-bench perf`` both call it, so what is timed
is what is trained.  The routes:

* first order: ``loss.backward()``;
* the exact product: ``loss.backward(create_graph=...)`` on the steps that take one, the product in
  ``opt.step()``;
* the sub-batch estimate (``hvp_fraction < 1``): a plain backward for the update and, on product steps,
  the product of the loss on the first ``ceil(f * B)`` rows of the batch through ``opt.accumulate_hvp``;
  with ``hvp_paired``, those rows (rounded up to an even count) split into two halves whose products give
  the paired estimate of ``(H z)^2`` through ``opt.accumulate_hvp_pair``;
* gradient accumulation (``accumulate = K``): K micro-batches, each loss divided by K, each product
  folded into the step's sum right after its backward, so one double-backward graph is alive at a time;
* data parallel (``torch.distributed``, N ranks): each rank takes its contiguous shard of the global
  batch through DistributedDataParallel, and its local product outside DDP's reducer
  (:mod:`esgd.distributed` averages the products);
* finite differences (``hvp_method="finite-difference"``, e.g. a compiled model): ``opt.step(closure)``
  evaluates the gradient a second time at a moved point, with the random state rewound;
* the compiled exact product (``hvp_compiled``): on product steps, loss, gradient and product from one
  forward-over-reverse pass compiled with ``torch.compile`` (:class:`esgd.ForwardOverReverse`); other
  steps are plain.

The batch size stays the global, per-optimizer-step batch, so every combination sees the same data and,
to float rounding, takes the same steps as one process with one batch.

Every route runs in one of three precisions (:data:`PRECISIONS`): ``fp32``; ``bf16``, the forward (and so
the graph the products are taken through) under ``torch.autocast`` with bfloat16; ``fp16``, the same with
float16 and a ``torch.amp.GradScaler``, whose scale the esgd optimizers take out of the gradient and of
the product themselves, skipping a step whose gradients overflowed.  Parameters and optimizer state stay
in float32.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from esgd import DoubleBackwardUnsupportedError, ForwardOverReverse, hvp_attention
from esgd._base import rng_state, set_rng_state
from tasks import Problem

from .errors import BenchError
from .optimizers import OptimizerChoice, needs_create_graph

__all__ = ["StepRoute", "DDPRoute", "split_batch", "sub_batch", "pair_batches", "world_and_rank", "backend_for",
           "check_route", "check_precision", "autocast", "compile_in_place", "compiled_extras",
           "double_backward_error", "PRECISIONS"]

FINITE_DIFFERENCE = "finite-difference"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The forward's context for ``precision``: ``torch.autocast`` for bf16 and fp16, nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision that is unknown or that this torch cannot run on ``device``, in one line."""
    if precision not in PRECISIONS:
        raise BenchError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is None:
        return
    try:
        with autocast(precision, device):
            x = torch.ones(2, 2, device=device, requires_grad=True)
            (x @ x).sum().backward()
        if precision == "fp16":
            torch.amp.GradScaler(torch.device(device).type)
    except (RuntimeError, AttributeError, TypeError, ValueError) as err:
        raise BenchError(f"--precision {precision} is not supported on {device} by torch {torch.__version__} "
                         f"({' '.join(str(err).split())[:120]})") from None


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _tensors(batch: Any) -> list[Any]:
    if isinstance(batch, dict):
        return list(batch.values())
    return list(batch) if isinstance(batch, (tuple, list)) else [batch]


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (a tensor, or a tuple/list/dict of tensors sharing dim 0) cut into ``parts`` equal pieces."""
    if parts == 1:
        return [batch]
    tensors = _tensors(batch)
    if batch is None or not tensors or not all(isinstance(t, torch.Tensor) and t.dim() for t in tensors):
        raise BenchError("this task has no data batch to split (--accumulate and --nproc need a data task "
                         "such as mnist)")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors) or n % parts:
        raise BenchError(f"batch size {n} does not split into {parts} equal parts (--nproc x --accumulate); "
                         "choose a --batch-size divisible by it")
    pieces = [t.split(n // parts) for t in tensors]
    out = []
    for k in range(parts):
        items = [p[k] for p in pieces]
        out.append(dict(zip(batch, items)) if isinstance(batch, dict) else type(batch)(items)
                   if isinstance(batch, (tuple, list)) else items[0])
    return out


def sub_batch(batch: Any, fraction: float) -> Any:
    """The first ``ceil(fraction * B)`` rows of a batch whose tensors share their first dimension B;
    ``None`` when ``fraction >= 1`` or the batch has no rows to take (the caller uses the whole batch)."""
    rows = _rows(batch) if fraction < 1 else None
    if rows is None:
        return None
    return _first_rows(batch, max(1, math.ceil(fraction * rows)))


def _first_rows(batch: Any, n: int) -> Any:
    return batch[:n] if isinstance(batch, torch.Tensor) else type(batch)(t[:n] for t in _tensors(batch))


def pair_batches(batch: Any, fraction: float) -> tuple[Any, Any, float] | None:
    """Two disjoint halves of the first ``ceil(fraction * B)`` rows of a batch, rounded up to an even
    count, and the fraction of the batch they cover; ``None`` when the batch has no rows to split or
    fewer than two (the caller takes the exact product of the whole batch)."""
    rows = _rows(batch)
    if rows is None or rows < 2:
        return None
    half = max(1, math.ceil(min(fraction, 1.0) * rows / 2))
    part = _first_rows(batch, 2 * half)
    a, b = split_batch(part, 2)
    return a, b, 2 * half / rows


def _rows(batch: Any) -> int | None:
    """The common first dimension of a batch's tensors (a tensor, tuple or list), else ``None``."""
    parts = _tensors(batch)
    if batch is None or isinstance(batch, dict) or not parts \
            or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in parts):
        return None
    rows = {t.shape[0] for t in parts}
    return rows.pop() if len(rows) == 1 else None


def check_route(choice: OptimizerChoice, *, accumulate: int = 1, world: int = 1, compile: bool = False,
                hvp_method: str | None = None, precision: str = "fp32") -> None:
    """Refuse a choice whose loop options do not fit the route: the sub-batch estimate takes one
    exact product of part of one batch, so it cannot be combined with micro-batches, ranks or finite
    differences (a compiled model gets those); fp16's loss scaling and finite differences are not
    combined either."""
    method = hvp_method or choice.given.get("hvp_method", "autograd")
    if compile and choice.second_order and "hvp_method" not in choice.given:
        method = FINITE_DIFFERENCE
    if precision == "fp16" and choice.second_order and method == FINITE_DIFFERENCE:
        raise BenchError(f"{choice.label}: --precision fp16 scales the loss, which the finite-difference "
                         "product does not follow; use bf16, or the exact product without --compile")
    if precision == "fp16" and choice.second_order \
            and not getattr(choice.spec.factory, "_step_supports_amp_scaling", False):
        raise BenchError(f"{choice.label}: --precision fp16 needs an optimizer that takes the loss scale out "
                         "of its Hessian-vector products itself (_step_supports_amp_scaling); use bf16")
    if choice.second_order and (choice.hvp_fraction < 1 or choice.hvp_paired) \
            and (accumulate > 1 or world > 1 or compile or method != "autograd"):
        what = "hvp_paired" if choice.hvp_paired else "hvp_fraction < 1"
        raise BenchError(f"{choice.label}: {what} needs the exact product (hvp_method="
                         "'autograd') and works without --accumulate, --nproc and --compile")
    if choice.second_order and choice.hvp_compiled:
        if choice.hvp_fraction < 1 and not choice.hvp_paired:
            raise BenchError(f"{choice.label}: hvp_compiled takes the exact product of the whole batch or of "
                             "two halves (hvp_paired); it does not combine with hvp_fraction < 1 alone")
        if accumulate > 1 or world > 1 or compile or method != "autograd" or precision != "fp32":
            raise BenchError(f"{choice.label}: hvp_compiled compiles the product itself, of one batch on one "
                             "process, in float32: it works without --accumulate, --nproc, --compile, "
                             "hvp_method and --precision bf16/fp16")


class DDPRoute:
    """Route the calls of ``module`` through a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper.

    Tasks close over their model, so the wrapper cannot simply replace it: ``module.forward`` is
    overridden on the instance to call the DDP wrapper, which calls the module's own forward.  Calls
    without grad (evaluation) and calls inside :meth:`local` run the module alone, outside DDP's reducer.
    """

    def __init__(self, module: nn.Module, **ddp_options: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel
        self.module = module
        self.ddp = DistributedDataParallel(module, **ddp_options)
        self._own = type(module).forward.__get__(module)
        self._direct = False
        module.forward = self._forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._direct or not torch.is_grad_enabled():
            return self._own(*args, **kwargs)
        self._direct = True       # DDP calls the module back: that call runs the real forward
        try:
            return self.ddp(*args, **kwargs)
        finally:
            self._direct = False

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Calls of the module run it alone (this rank's graph, free for double backward)."""
        before, self._direct = self._direct, True
        try:
            yield
        finally:
            self._direct = before

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class StepRoute:
    """One optimizer step's gradient work (see the module docstring for the routes).

    ``forward_backward(batch)`` leaves this step's gradients in ``.grad`` (the global mean under DDP),
    folds exact products into the optimizer and returns the loss; ``step()`` updates.  ``stop`` is
    polled once per step under DDP and travels to every rank inside the loss's all-reduce, so all ranks
    stop at the same step.
    """

    def __init__(self, problem: Problem, opt: torch.optim.Optimizer, choice: OptimizerChoice, *,
                 accumulate: int = 1, stop: Callable[[], bool] | None = None, precision: str = "fp32") -> None:
        self.problem, self.opt, self.accumulate, self.stop = problem, opt, accumulate, stop
        self.second_order = choice.second_order
        self.fraction = choice.hvp_fraction if self.second_order else 1.0
        self.paired = self.second_order and choice.hvp_paired
        self.world, self.rank = world_and_rank()
        self.finite_difference = self.second_order and getattr(opt, "hvp_method", "") == FINITE_DIFFERENCE
        check_route(choice, accumulate=accumulate, world=self.world, hvp_method=getattr(opt, "hvp_method", None),
                    precision=precision)
        self.device = next(problem.model.parameters()).device
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.route: DDPRoute | None = None
        if accumulate * self.world > 1:      # a batch that does not split is an input error, up front
            first = next(problem.batches)
            split_batch(first, accumulate * self.world)
            problem.batches = itertools.chain([first], problem.batches)
        if self.world > 1:
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.route = DDPRoute(problem.model, device_ids=ids)
            if self.second_order:
                from esgd import distributed as esgd_dist
                esgd_dist.setup(opt)
        self._replay: tuple[Any, tuple] | None = None
        self._loss: torch.Tensor | None = None
        self.forward_over_reverse = ForwardOverReverse(problem.model, problem.loss) \
            if self.second_order and choice.hvp_compiled else None

    def is_hvp_step(self) -> bool:
        """Whether the coming step takes a Hessian-vector product."""
        if not self.second_order:
            return False
        is_hvp = getattr(self.opt, "is_hvp_step", None)
        return bool(is_hvp()) if callable(is_hvp) else needs_create_graph(self.opt, True)

    def forward_backward(self, batch: Any) -> torch.Tensor:
        if self.accumulate == 1 and self.world == 1 and not self.finite_difference:
            return self._simple(batch)
        if self.finite_difference and self.opt.is_hvp_step():
            self._replay = (batch, rng_state(self.device))
        loss = self._parts(batch)
        if self.world > 1:
            # The stop flag rides along with the loss, so every rank sees it at the same step.
            flag = float(self.stop is not None and self.stop())
            buf = torch.stack([loss.double(), torch.tensor(flag, dtype=torch.float64, device=self.device)])
            dist.all_reduce(buf)
            if buf[1] > 0:
                raise KeyboardInterrupt
            loss = (buf[0] / self.world).to(loss.dtype)
        self._loss = loss
        return loss

    def _forward_loss(self, batch: Any, graph: bool = True) -> torch.Tensor:
        # Fused attention kernels cannot be differentiated twice: the forwards whose graph is built take
        # the math kernel (see esgd.attention); every other forward (graph=False) keeps the fused one.
        graph = graph and self.second_order and needs_create_graph(self.opt, True)
        with autocast(self.precision, self.device), hvp_attention(graph):
            return self.problem.loss(batch)

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the backward starts from: times the GradScaler's scale under fp16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _simple(self, batch: Any) -> torch.Tensor:
        problem, opt = self.problem, self.opt
        graph = self.second_order and needs_create_graph(opt, True)
        if graph and self.forward_over_reverse is not None and not self.paired:
            with autocast(self.precision, self.device):
                return self.forward_over_reverse.backward(opt, batch)
        pair = pair_batches(batch, self.fraction) if graph and self.paired else None
        part = sub_batch(batch, self.fraction) if graph and not self.paired else None
        loss = self._forward_loss(batch, graph=part is None and pair is None)
        if part is None and pair is None:
            self._scaled(loss).backward(create_graph=graph)
            return loss
        self._scaled(loss).backward()
        # The extra forwards must not move the model's buffers (BatchNorm's running statistics).
        buffers = [(b, b.detach().clone()) for b in problem.model.buffers()]
        try:
            if pair is not None and self.forward_over_reverse is not None:   # compiled: fp32 only
                self.forward_over_reverse.accumulate_pair(opt, (pair[0],), (pair[1],), pair[2])
            elif pair is not None:
                opt.accumulate_hvp_pair(self._scaled(self._forward_loss(pair[0])),
                                        self._scaled(self._forward_loss(pair[1])), pair[2])
            else:
                opt.accumulate_hvp(self._scaled(self._forward_loss(part)))
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return loss

    def _parts(self, batch: Any) -> torch.Tensor:
        """K micro-batches of this rank's shard; exact products folded in as each backward ends."""
        opt, k_parts = self.opt, self.accumulate
        exact = self.second_order and not self.finite_difference and needs_create_graph(opt, True)
        shard = split_batch(batch, self.world)[self.rank] if self.world > 1 else batch
        total = None
        for k, part in enumerate(split_batch(shard, k_parts)):
            sync = self.route.ddp.no_sync() if self.route is not None and k < k_parts - 1 \
                else contextlib.nullcontext()
            with sync:
                loss = self._forward_loss(part)
                loss = loss / k_parts if k_parts > 1 else loss
                self._scaled(loss).backward(create_graph=exact and self.route is None)
            if exact and self.route is None:
                opt.accumulate_hvp()          # frees this micro-batch's double-backward graph
            elif exact:
                with self.route.local():      # this rank's product; hvp_reduce averages it in step()
                    local = self._forward_loss(part)
                opt.accumulate_hvp(self._scaled(local / k_parts if k_parts > 1 else local))
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def step(self) -> None:
        opt = self.opt
        if self.scaler is not None:      # skips a step whose gradients overflowed, then adapts the scale
            self.scaler.step(opt)
            self.scaler.update()
            return
        if not (self.finite_difference and opt.is_hvp_step()):
            opt.step()
            return
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:     # the gradient at theta is already in .grad
                return self._loss
            batch, rng = self._replay
            set_rng_state(rng, self.device)   # same dropout masks as the first evaluation
            opt.zero_grad(set_to_none=True)
            return self._parts(batch)

        opt.step(closure)

    def close(self) -> None:
        if self.route is not None:
            self.route.remove()


def _forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


def compile_in_place(model: nn.Module, **options: Any) -> nn.Module:
    """Compile ``model``'s forward in place (``options`` go to ``torch.compile``); returns ``model``.

    Tasks close over their model, so it is compiled where it stands rather than replaced by a wrapper.
    ``model.compile()`` would do that, but before torch 2.14 it compiles nothing when the module's
    forward is torch's own (``nn.Sequential``, the MNIST MLP): Dynamo skips frames in torch's files.
    The frame compiled here is this file's, which inlines the module's forward; the module is its
    argument, not a closure, so fresh models of one architecture share a graph.
    """
    model.forward = functools.partial(torch.compile(_forward, **options), model)
    return model


def compiled_extras(choice: OptimizerChoice) -> dict[str, Any]:
    """The optimizer keywords a compiled model needs: finite-difference products for a second-order
    optimizer (compiled graphs cannot be differentiated twice) unless the choice sets ``hvp_method``."""
    if not choice.second_order or "hvp_method" in choice.given:
        return {}
    return {"hvp_method": FINITE_DIFFERENCE}


def double_backward_error(err: BaseException, optimizer: str) -> Exception | None:
    """The one-line error for a torch failure caused by differentiating a compiled graph with
    ``create_graph=True`` (torch words it differently depending on what was compiled before in the
    process: "double backward", or "donated buffers ... requires create_graph=False"); else ``None``."""
    if isinstance(err, DoubleBackwardUnsupportedError):
        return err
    text = str(err)
    if isinstance(err, RuntimeError) and ("double backward" in text or "donated buffer" in text):
        return DoubleBackwardUnsupportedError(
            f"{optimizer}: the compiled model cannot be differentiated twice; construct the optimizer with "
            "hvp_method='finite-difference' and call opt.step(closure) (with --compile, leave hvp_method "
            "unset); it needs first-order gradients only")
    return None
