"""Where the cells of a grid run: this process, a pool of worker processes, or a data-parallel group.

Every executor takes the planned :class:`~bench.train.Cell` list and two callbacks, ``progress(cell,
step, loss)`` and ``result(cell, RunResult)``, and returns whether it was stopped.  The caller (the grid,
:mod:`bench.grid`) records each result as it arrives, so a crash or a stop loses at most the cells that
were running.

Stopping is handled in one place, :class:`StopSignals`: in the process that runs the grid, Ctrl-C
(SIGINT) and SIGTERM (what ``timeout``, ``kill`` and job schedulers send) both end the running cells as
``interrupted``; worker processes ignore both and stop when the parent tells them to, so each returns
what it logged.  The signal that came first decides the exit code (130 or 143).

* :class:`Sequential` trains the cells one after another in this process (cleanest timings).
* :class:`Pool` runs them in ``jobs`` fresh processes forked from a server that has imported torch once
  (``cpu_count // jobs`` threads each); each cell has a process of its own, so each has its own peak RSS.
* :class:`Distributed` (``--nproc N``) spawns N processes that join a gloo (CPU) or NCCL (GPU) group
  through a file store in a private temporary folder (no port to race for, loopback only) and train
  the cells in lockstep; rank 0 streams progress and results back.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as _queue
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

from esgd import DoubleBackwardUnsupportedError

from .errors import BenchError
from .train import Cell, RunResult

__all__ = ["StopSignals", "Executor", "Sequential", "Pool", "Distributed", "error_result", "Throttle"]

OnProgress = Callable[[Cell, int, float], None]
OnResult = Callable[[Cell, RunResult], None]


class StopSignals:
    """SIGINT and SIGTERM handling for the process that runs a grid (installed in the main thread only).

    Cooperative (a grid whose cells poll :meth:`requested` between steps): the first signal is recorded
    and the running cells end after their current step, as ``interrupted``, with a snapshot to continue
    from; a second signal raises ``KeyboardInterrupt`` at once.  Not cooperative: the first signal
    raises.  Inside :meth:`deferred` a raise waits for the end of the block, so a cell's files are
    written whole.  ``received`` is the first signal's number (``None`` if none came).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, cooperative: bool = False) -> None:
        self.cooperative = cooperative
        self.received: int | None = None
        self._count = 0
        self._saved: dict[int, Any] = {}
        self._deferring = False
        self._pending = False

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self._count += 1
        if self.received is None:
            self.received = signum
        if self._count > 1 + self.cooperative:      # already raising: let the writes finish
            return
        if self.cooperative and self._count == 1:
            sys.stderr.write("stopping: the running cells end after their current step "
                             "(signal again to stop at once)\n")
            return
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        before, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = before
        if self._pending and not before:
            self._pending = False
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()


def _ignore_signals() -> None:
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Throttle:
    """Forward progress at most every ``interval`` seconds, plus the last step."""

    def __init__(self, send: Callable[[int, float], None], steps: int, interval: float = 0.1) -> None:
        self.send, self.steps, self.interval, self.last = send, steps, interval, 0.0

    def __call__(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or step == self.steps:
            self.last = now
            self.send(step, loss)


def error_result(cell: Cell, error: str) -> RunResult:
    """The summary of a cell whose process died before it could report."""
    summary = {"task": cell.task, "optimizer": cell.optimizer.label, "opt_name": cell.optimizer.name,
               "lr": cell.lr, "seed": cell.seed, "steps": 0, "status": "error", "error": error,
               "device": cell.task_config.device, "synthetic": cell.task_config.synthetic}
    return RunResult([], summary, "error")


class Executor:
    """Runs cells; returns True when it was stopped (the stopped cells are reported as interrupted).
    ``stop()`` is polled between steps: once it is true the running cells end after their step."""

    def run(self, cells: Sequence[Cell], progress: OnProgress, result: OnResult,
            stop: Callable[[], bool] = lambda: False) -> bool:
        raise NotImplementedError


class Sequential(Executor):
    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, cells: Sequence[Cell], progress: OnProgress, result: OnResult,
            stop: Callable[[], bool] = lambda: False) -> bool:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for cell in cells:
                if stop():
                    return True
                res = cell.run(progress=Throttle(lambda s, loss, c=cell: progress(c, s, loss), cell.steps),
                               stop=stop)
                result(cell, res)
                if res.status == "interrupted":
                    return True
        except KeyboardInterrupt:       # between cells, or while a result was recorded
            return True
        finally:
            torch.set_num_threads(before)
        return False


# -- worker processes (--jobs) -------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(progress: Any, stop: Any, threads: int) -> None:
    _ignore_signals()       # the parent decides, through ``stop``
    torch.set_num_threads(threads)
    _WORKER.update(progress=progress, stop=stop)


def _worker_run(index: int, cell: Cell) -> RunResult:
    progress, stop = _WORKER["progress"], _WORKER["stop"]
    send = Throttle(lambda step, loss: progress.put((index, step, loss)), cell.steps, 0.25)
    return cell.run(progress=send, stop=stop.is_set)


def process_context(preload: list[str], *, cuda: bool = False) -> Any:
    """A fork server that has imported ``preload`` once (spawn where fork servers do not exist).

    With ``cuda``, spawn: importing the compiler's modules can initialise CUDA in the server (it asks
    for the device's capability), and CUDA cannot be used again in a process forked after that."""
    if not cuda and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
        return ctx
    return mp.get_context("spawn")


class Pool(Executor):
    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    def run(self, cells: Sequence[Cell], progress: OnProgress, result: OnResult,
            stop: Callable[[], bool] = lambda: False) -> bool:
        # torch._dynamo is imported lazily by the first optimizer constructed (seconds): once, here.
        ctx = process_context(["bench.train", "torch._dynamo"],
                              cuda=any(torch.device(c.task_config.device).type == "cuda" for c in cells))
        queue, event = ctx.Queue(), ctx.Event()
        stopped = False
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, event, self.threads), max_tasks_per_child=1) as pool:
            futures: dict[Future, Cell] = {pool.submit(_worker_run, i, c): c for i, c in enumerate(cells)}
            pending = set(futures)

            def drain() -> None:
                try:
                    while True:
                        i, step, loss = queue.get_nowait()
                        progress(cells[i], step, loss)
                except _queue.Empty:
                    pass

            def collect(done: Any) -> None:
                nonlocal stopped
                for fut in done:
                    if fut.cancelled():
                        continue
                    try:
                        res = fut.result()
                    except Exception as err:  # noqa: BLE001 - a dead worker is one failed cell
                        res = error_result(futures[fut], f"{type(err).__name__}: {err}")
                    result(futures[fut], res)
                    stopped |= res.status == "interrupted"
                stopped |= event.is_set()

            try:
                while pending:
                    if stop() and not event.is_set():
                        event.set()         # the running cells end after their step
                        for fut in pending:
                            fut.cancel()    # the ones not started yet do not start
                    done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    drain()
                    collect(done)
                    pending = {f for f in pending if not f.cancelled()}
            except KeyboardInterrupt:
                stopped = True
                event.set()
                for fut in pending:
                    fut.cancel()
                done, _ = wait(pending, timeout=60)
                drain()
                collect(done)
        return stopped


# -- the --nproc launcher -------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, backend: str, init: str, cells: list[Cell], threads: int,
               messages: Any, stop: Any) -> None:
    import torch.distributed as dist
    _ignore_signals()       # the parent decides; the flag travels inside the per-step all-reduce
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
        for i, cell in enumerate(cells):
            send = Throttle(lambda s, loss, i=i: messages.put(("progress", i, s, loss)), cell.steps, 0.25) \
                if rank == 0 else None
            res = cell.run(progress=send, stop=stop.is_set)
            if rank == 0:
                messages.put(("result", i, res))
            if res.status == "interrupted":
                break
    except DoubleBackwardUnsupportedError as err:
        messages.put(("fatal", rank, "double-backward", str(err)))
    except Exception as err:   # noqa: BLE001 - reported to the parent as one line
        messages.put(("fatal", rank, type(err).__name__, str(err)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Distributed(Executor):
    def __init__(self, nproc: int, device: str) -> None:
        from .steps import backend_for
        self.nproc, self.backend = nproc, backend_for(device)
        self.threads = max(1, (os.cpu_count() or 1) // nproc)

    def run(self, cells: Sequence[Cell], progress: OnProgress, result: OnResult,
            stop: Callable[[], bool] = lambda: False) -> bool:
        ctx = mp.get_context("spawn")
        messages, event = ctx.Queue(), ctx.Event()
        stopped, fatal, finished = False, None, set()
        with tempfile.TemporaryDirectory(prefix="esgd-bench-dist-") as tmp:
            init = "file://" + os.path.join(tmp, "store")
            procs = [ctx.Process(target=_rank_main, args=(r, self.nproc, self.backend, init, list(cells),
                                                          self.threads, messages, event))
                     for r in range(self.nproc)]
            for p in procs:
                p.start()

            def pump(deadline: float | None) -> None:
                nonlocal fatal, stopped
                while fatal is None and (deadline is None or time.monotonic() < deadline):
                    if stop():
                        event.set()         # travels to every rank inside the per-step all-reduce
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
                        progress(cells[msg[1]], msg[2], msg[3])
                    elif msg[0] == "result":
                        finished.add(msg[1])
                        result(cells[msg[1]], msg[2])
                        stopped |= msg[2].status == "interrupted"
                    else:
                        fatal = msg

            try:
                try:
                    pump(None)
                except KeyboardInterrupt:
                    stopped = True
                    event.set()
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
                    result(todo[0], error_result(todo[0], f"rank {rank} died ({text})"))
                return stopped
            raise BenchError(f"--nproc rank {rank}: {text}" if kind in ("BenchError", "ValueError") else
                             f"--nproc rank {rank}: {kind}: {text}")
        return stopped
