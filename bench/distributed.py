"""Scaling a benchmark step out (issue 8) and the finite-difference step for compiled models (issue 9).

:class:`ScaledStep` replaces the runner's one-batch forward/backward/step when a run accumulates
gradients over K micro-batches (``--accumulate K``), trains data-parallel (``--nproc N``: each rank takes
its contiguous shard of the global batch, DDP averages the gradients), or takes finite-difference
Hessian-vector products (``--compile``).  The batch size stays the global, per-optimizer-step batch, so
every combination sees the same data and, to float rounding, takes the same steps as one process with
one batch.  The second-order scheme under DDP is :mod:`esgd.distributed`'s: a plain backward through DDP
for the update, the local product through the unwrapped module, an all-reduce mean of the products.

:func:`run_cells` is the ``--nproc`` launcher: ``N`` spawned processes join a gloo (CPU) or NCCL (GPU)
process group through a file store in a private temporary folder (no port to race for, loopback only),
run the cells in lockstep, and rank 0 streams progress and results back to the parent, which writes the
store as for a sequential run.  Ctrl-C travels to every rank inside the per-step loss all-reduce, so all
ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue as _queue
import signal
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tasks import Problem

__all__ = ["split_batch", "world_and_rank", "DDPRoute", "ScaledStep", "run_cells", "backend_for"]

_STOP: Any = None     # the launcher's stop event, inside a rank process


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (a tensor, or a tuple/list/dict of tensors sharing dim 0) cut into ``parts`` equal pieces."""
    from .runner import BenchError
    if parts == 1:
        return [batch]
    tensors = (list(batch.values()) if isinstance(batch, dict) else list(batch)
               if isinstance(batch, (tuple, list)) else [batch])
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


class DDPRoute:
    """Route the calls of ``module`` through a :class:`DistributedDataParallel` wrapper.

    Tasks close over their model, so the wrapper cannot simply replace it: ``module.forward`` is
    overridden on the instance to call the DDP wrapper, which calls the module's own forward.  Calls
    without grad (evaluation) and calls inside :meth:`local` run the module alone, outside DDP's reducer.
    """

    def __init__(self, module: nn.Module, **ddp_options: Any) -> None:
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


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ScaledStep:
    """One optimizer step's gradient work for K micro-batches, N data-parallel ranks and/or
    finite-difference products; :meth:`make` returns ``None`` when the runner's plain loop suffices."""

    def __init__(self, problem: Problem, opt: torch.optim.Optimizer, *, accumulate: int,
                 second_order: bool) -> None:
        from esgd import distributed as esgd_dist
        self.problem, self.opt, self.accumulate = problem, opt, accumulate
        self.world, self.rank = world_and_rank()
        self.finite_difference = second_order and getattr(opt, "hvp_method", "autograd") == "finite-difference"
        self.device = next(problem.model.parameters()).device
        self.route: DDPRoute | None = None
        if self.world > 1:
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.route = DDPRoute(problem.model, device_ids=ids)
            if second_order:
                esgd_dist.setup(opt)
        self._batch: Any = None
        self._rng: tuple | None = None
        self._loss: torch.Tensor | None = None

    @classmethod
    def make(cls, problem: Problem, opt: torch.optim.Optimizer, *, accumulate: int = 1,
             second_order: bool = False) -> "ScaledStep | None":
        world, _ = world_and_rank()
        fd = second_order and getattr(opt, "hvp_method", "autograd") == "finite-difference"
        if accumulate == 1 and world == 1 and not fd:
            return None
        parts = accumulate * world
        if parts > 1:    # a batch that does not split is an input error, before any training
            first = next(problem.batches)
            split_batch(first, parts)
            problem.batches = itertools.chain([first], problem.batches)
        return cls(problem, opt, accumulate=accumulate, second_order=second_order)

    def forward_backward(self, batch: Any, *, reduce: bool = True) -> torch.Tensor:
        """Gradients of this step's loss in ``.grad`` (global mean under DDP) and the exact products
        folded into the optimizer; returns the loss (all-reduced when ``reduce``), detached."""
        opt, k_parts = self.opt, self.accumulate
        should = getattr(opt, "should_create_graph", None)
        exact = bool(should()) if callable(should) else False
        if reduce and self.finite_difference and opt.is_hvp_step():
            self._batch, self._rng = batch, _rng_state(self.device)
        shard = split_batch(batch, self.world)[self.rank] if self.world > 1 else batch
        total = torch.zeros(())
        for k, part in enumerate(split_batch(shard, k_parts)):
            sync = self.route.ddp.no_sync() if self.route is not None and k < k_parts - 1 \
                else contextlib.nullcontext()
            with sync:
                loss = self.problem.loss(part)
                loss = loss / k_parts if k_parts > 1 else loss
                loss.backward(create_graph=exact and self.route is None)
            if exact and self.route is None:
                opt.accumulate_hvp()          # frees this micro-batch's double-backward graph
            elif exact:
                with self.route.local():      # this rank's product; hvp_reduce averages it in step()
                    local = self.problem.loss(part)
                opt.accumulate_hvp(local / k_parts if k_parts > 1 else local)
            total = loss.detach() if k == 0 else total + loss.detach()
        if reduce and self.world > 1:
            # The stop flag rides along, so every rank sees Ctrl-C (and the same loss) at the same step.
            flag = float(_STOP is not None and _STOP.is_set())
            buf = torch.stack([total.double(), torch.tensor(flag, dtype=torch.float64, device=self.device)])
            dist.all_reduce(buf)
            if buf[1] > 0:
                raise KeyboardInterrupt
            total = (buf[0] / self.world).to(total.dtype)
        self._loss = total
        return total

    def step(self) -> None:
        opt = self.opt
        if not (self.finite_difference and opt.is_hvp_step()):
            opt.step()
            return
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:     # the gradient at theta is already in .grad
                return self._loss
            _set_rng_state(self._rng, self.device)   # same dropout masks as the first evaluation
            opt.zero_grad(set_to_none=True)
            return self.forward_backward(self._batch, reduce=False)

        opt.step(closure)

    def close(self) -> None:
        if self.route is not None:
            self.route.remove()


# -- the --nproc launcher ----------------------------------------------------------------------------
def _rank_main(rank: int, world: int, backend: str, init: str, cells: list, tcfgs: dict, steps_of: dict,
               eval_every: int | None, train_kwargs: dict, threads: int, messages: Any, stop: Any) -> None:
    global _STOP
    from esgd import DoubleBackwardUnsupportedError
    from .runner import _Throttle, train
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides; see ScaledStep's stop flag
    torch.set_num_threads(threads)
    _STOP = stop
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
        for i, cell in enumerate(cells):
            send = (lambda s, loss, i=i: messages.put(("progress", i, s, loss))) if rank == 0 else None
            result = train(cell.task, cell.optimizer, seed=cell.seed, steps=steps_of[cell.task],
                           overrides=dict(cell.overrides), task_config=tcfgs[cell.task], eval_every=eval_every,
                           progress_callback=_Throttle(send, steps_of[cell.task], 0.25) if send else None,
                           **train_kwargs)
            if rank == 0:
                messages.put(("result", i, result))
            if result.status == "interrupted":
                break
    except DoubleBackwardUnsupportedError as err:
        messages.put(("fatal", rank, "double-backward", str(err)))
    except Exception as err:   # noqa: BLE001 - reported to the parent as one line
        messages.put(("fatal", rank, type(err).__name__, str(err)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_cells(cells: Sequence[Any], *, nproc: int, device: str, tcfgs: dict, steps_of: dict,
              eval_every: int | None, train_kwargs: dict, threads: int,
              on_progress: Callable[[Any, int, float], None], on_result: Callable[[Any, Any], None]) -> bool:
    """Train ``cells`` with ``nproc`` data-parallel ranks; returns whether the run was interrupted.

    ``on_result(cell, result)`` gets rank 0's :class:`~bench.runner.RunResult` of each cell.  A rank that
    fails before or outside a training loop ends the run with :class:`~bench.runner.BenchError` (or
    :class:`esgd.DoubleBackwardUnsupportedError`) carrying its message.
    """
    from esgd import DoubleBackwardUnsupportedError
    from .runner import BenchError, _error_result
    backend = backend_for(device)
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise BenchError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    interrupted, fatal, finished = False, None, set()
    with tempfile.TemporaryDirectory(prefix="esgd-bench-dist-") as tmp:
        init = "file://" + os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, nproc, backend, init, list(cells), tcfgs, steps_of,
                                                      eval_every, train_kwargs, threads, messages, stop))
                 for r in range(nproc)]
        for p in procs:
            p.start()

        def pump(deadline: float | None) -> None:
            nonlocal fatal, interrupted
            while fatal is None and (deadline is None or time.monotonic() < deadline):
                try:
                    msg = messages.get(timeout=0.1)
                except _queue.Empty:
                    if all(p.exitcode is not None for p in procs):
                        return
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        fatal = ("fatal", procs.index(dead[0]), "exit", f"exit code {dead[0].exitcode}")
                    continue
                if msg[0] == "progress":
                    on_progress(cells[msg[1]], msg[2], msg[3])
                elif msg[0] == "result":
                    finished.add(msg[1])
                    on_result(cells[msg[1]], msg[2])
                    interrupted |= msg[2].status == "interrupted"
                else:
                    fatal = msg

        try:
            try:
                pump(None)
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                pump(time.monotonic() + 60)
        finally:
            for p in procs:
                p.join(timeout=5 if fatal is None else 0.5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
            messages.close()
    if fatal is not None:
        _, rank, kind, text = fatal
        if kind == "double-backward":
            raise DoubleBackwardUnsupportedError(text)
        if kind == "exit":
            todo = [c for i, c in enumerate(cells) if i not in finished]
            if todo:
                on_result(todo[0], _error_result(todo[0], tcfgs[todo[0].task], f"rank {rank} died ({text})"))
            return interrupted
        raise BenchError(f"--nproc rank {rank}: {text}" if kind in ("BenchError", "ValueError") else
                         f"--nproc rank {rank}: {kind}: {text}")
    return interrupted
