"""``esgd-bench perf``: what one training step of each optimizer costs, as ratios to Adam.

Method, after the "benchmark side by side, interleave, take medians" advice of airbench and pytorch's
``torch.utils.benchmark``: every optimizer variant trains its own copy of the same model (same seed) on
the same task, with exactly the step code of :func:`bench.train.train` (:class:`bench.steps.StepRoute`,
whatever the route).  After a warm-up, each *round* runs one
short cycle of every variant in turn (the order rotates from round to round) and times each step's two
regions: ``zero_grad`` + forward + backward (plus a sub-batch product on its HVP steps), and
``loss.item()`` + ``step()``.  A cycle is one HVP step followed by two plain steps (``update_d_every=3``,
``d_warmup=1``, untimed steps in between if the schedule's period is longer: the per-step work does not
depend on the schedule); the plain figures come from the steps
that follow a plain step.  Ratios to Adam are taken within each round and then the median over rounds,
so a load spike from the machine's other users hits both sides of a ratio.

Ratios of compiled variants are to eager Adam. Derived figures: ``hvp_extra`` = HVP step - plain step;
``hvp_grad_evals`` = ``hvp_extra`` / plain forward+backward (how many gradient evaluations one product
costs); ``hvp_flop_evals``, the same by counting matmul and convolution FLOPs (``torch.utils.flop_counter``
over one HVP step and one plain step): the product's arithmetic floor, which kernels can approach but
not beat; ``amortised`` = (9 plain + 1 HVP) / 10, one exact product every 10 steps (the schedule with
``update_d_every=10``, after its 20-step warm-up; a variant whose entry sets another interval n, such as
``esgd-m-lazy``'s 40, is amortised over its own: ((n - 1) plain + 1 HVP) / n); ``floor_vs_adam`` = (9
plain + (plain + ``hvp_flop_evals`` x forward+backward)) / 10 (over n steps likewise) against Adam's step,
the amortised step if the product ran at the speed of a forward+backward, per round (:mod:`bench.targets`
holds exact routes to it). A parameter-count sweep times MLPs of about 0.1 M, 1 M and 10 M parameters.
Peak memory: each (task, variant) trains a few steps, HVP steps included, in a fresh process forked
from a server that has imported torch only, after one untimed cycle (a compiled product compiles there);
CPU: the peak resident set size (``VmHWM``) over the measured steps, and its rise above the size once
the task (data and model) is built and a no-grad forward has loaded the kernels, i.e. the training
state: gradients, optimizer state, activations and the HVP's graph; CUDA: ``max_memory_allocated``, and
its rise above the built task.
``--compile`` adds the same variants with the model compiled (second order by finite differences).
On CUDA every region is timed with CUDA events.  Results: ``perf.csv`` and ``meta.json``; a variant that
fails in its warm-up is left out, its reason kept in ``meta.json`` (``not_measured``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

import tasks
from tasks import TaskConfig

from .config import resolve_device
from .environment import environment, load_average
from .errors import BenchError
from .optimizers import OptimizerChoice, parse_optimizer
from .memory import peak_memory
from .steps import StepRoute, check_precision, compile_in_place, compiled_extras
from .targets import CHEAP_ROUTES, HVP_EVERY, TARGETS, floor_flops, summarise, target_checks
from .store import check_folder, write_csv, write_json

__all__ = ["PerfConfig", "Variant", "VARIANTS", "SWEEP_WIDTHS", "TARGETS", "run_perf", "target_checks"]


@dataclass(frozen=True)
class Variant:
    label: str
    spec: str            # the optimizer as the command line writes it
    route: str           # how the product is taken: exact, sub-batch, paired, finite-difference, lazy
                         # (exact, less often), or "" (none)

    @property
    def choice(self) -> OptimizerChoice:
        return parse_optimizer(self.spec)

    @property
    def every(self) -> int:
        """One product in this many steps once warmed up: the choice's own ``update_d_every`` where it
        sets one (``esgd-m-lazy``), else the ten steps every exact route is compared at."""
        return int(self.choice.setting("update_d_every", HVP_EVERY)) if self.choice.second_order else HVP_EVERY


VARIANTS = (Variant("esgd-m", "esgd-m", "exact"),
            Variant("esgd-m-compiled", "esgd-m:hvp_compiled=true", "exact"),
            Variant("esgd-m-sub", "esgd-m-sub", "sub-batch"),
            Variant("esgd-m-pair", "esgd-m-pair", "paired"),
            Variant("esgd-m-pair-compiled", "esgd-m-pair:hvp_compiled=true", "paired"),
            Variant("esgd-m-fd", "esgd-m:hvp_method=finite-difference", "finite-difference"),
            Variant("esgd-m-lazy", "esgd-m-lazy", "lazy"),
            Variant("esgd-m-lazy-compiled", "esgd-m-lazy:hvp_compiled=true", "lazy"),
            Variant("esgd", "esgd", "exact"), Variant("sgd", "sgd", ""), Variant("adam", "adam", ""))
SWEEP_VARIANTS = ("esgd-m", "esgd-m-sub", "adam")
MEMORY_VARIANTS = ("esgd-m", "esgd-m-compiled", "esgd-m-sub", "esgd-m-pair", "esgd-m-fd", "adam")  # sweep: esgd-m, adam
SWEEP_WIDTHS = (110, 678, 2789)        # 784-w-w-10 MLPs of 0.10 M, 1.00 M and 10.0 M parameters
ALL_TASKS = ("mnist", "mnist-cnn", "cifar", "charlm")
_ROUNDS = {"cifar": 5, "mnist-cnn": 5, "charlm": 4}    # default rounds per task (others: PerfConfig.rounds)
TIMING_LR = 1e-4
_CYCLE = 3                             # HVP step, plain step, plain step


@dataclass
class PerfConfig:
    tasks: list[str] = field(default_factory=lambda: ["mnist", "cifar"])
    device: str = "auto"
    out: Path | None = None
    compile: bool = False
    rounds: int | None = None           # None: 12, or the task's entry in _ROUNDS
    warmup_cycles: int = 2
    batch_size: int | None = None
    widths: Sequence[int] = SWEEP_WIDTHS
    memory: bool = True
    threads: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)   # per task, e.g. {"mnist": {"width": 64}}
    variants: Sequence[Variant] = VARIANTS
    precision: str = "fp32"             # fp32, bf16 or fp16: the forward under autocast (bench.steps)
    profile: bool = False               # also profile one HVP and one plain step of each exact route


# -- timing ----------------------------------------------------------------------------------------
class _Marks:
    """Time stamps of a cycle: ``perf_counter`` on CPU, CUDA events on CUDA (read after one sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _schedule(variant: Variant) -> dict[str, int]:
    """A product every _CYCLE steps after one warm-up step, whichever way the optimizer counts (the
    per-step work does not depend on the schedule); cycle() lines up on it."""
    return {"update_d_every": _CYCLE, "d_warmup": 1} if variant.choice.second_order else {}


class _Trainer:
    """One variant's model and optimizer, stepping exactly as :func:`bench.train.train` does."""

    def __init__(self, task: str, variant: Variant, config: TaskConfig, compiled: bool,
                 precision: str = "fp32") -> None:
        choice = variant.choice
        self.variant, self.second_order = variant, choice.second_order
        torch.manual_seed(config.seed)
        self.problem = tasks.build_task(task, config)
        # The cost of a step does not depend on the learning rate; a small one keeps every model finite
        # over the timed steps (a registry lr may diverge on synthetic data, and NaNs would end the run).
        extra: dict[str, Any] = {"lr": choice.lr or TIMING_LR}
        if compiled:
            compile_in_place(self.problem.model)
            extra.update(compiled_extras(choice))
        extra.update(_schedule(variant))
        self.opt = choice.create(self.problem.model.parameters(), task=task, seed=config.seed, **extra)
        self.route = StepRoute(self.problem, self.opt, choice, precision=precision)
        self.params = sum(p.numel() for p in self.problem.model.parameters())

    def is_hvp(self) -> bool:
        return self.route.is_hvp_step()

    def step(self, marks: _Marks | None = None) -> bool:
        """One training step; with ``marks``, stamps before, between the regions and after."""
        batch = next(self.problem.batches)
        hvp = self.is_hvp()
        if marks:
            marks.mark()
        self.opt.zero_grad(set_to_none=True)
        loss = self.route.forward_backward(batch)
        if marks:
            marks.mark()
        if not math.isfinite(loss.item()):
            raise BenchError(f"perf: {self.variant.label} produced a non-finite loss")
        self.route.step()
        if marks:
            marks.mark()
        return hvp

    def cycle(self) -> dict[str, float]:
        """Time one cycle (HVP step, plain, plain); first-order optimizers: three plain steps."""
        if self.second_order:
            while not self.is_hvp():      # line up on the schedule (a no-op after the first cycle)
                self.step()
        marks, kinds = _Marks(self.device), []
        for _ in range(_CYCLE):
            kinds.append(self.step(marks))
        if self.second_order and kinds != [True, False, False]:
            raise RuntimeError(f"perf: {self.variant.label}: unexpected HVP schedule {kinds}")
        d = marks.durations_ms()
        fb, up = d[0::3], d[1::3]        # per step: [fwd+bwd, update, gap to the next stamp]
        out = {"fb_ms": fb[-1], "update_ms": up[-1], "plain_ms": fb[-1] + up[-1]}
        out["hvp_step_ms"] = fb[0] + up[0] if kinds[0] else math.nan
        return out

    def flops(self) -> tuple[float, float]:
        """Matmul and convolution FLOPs (``torch.utils.flop_counter``) of one HVP step and one plain
        step: the arithmetic the product adds, whatever the kernels' speed."""
        from torch.utils.flop_counter import FlopCounterMode
        while not self.is_hvp():
            self.step()
        counts = []
        for _ in range(2):
            with FlopCounterMode(display=False) as counter:
                self.step()
            counts.append(float(counter.get_total_flops()))
        return counts[0], counts[1]

    @property
    def device(self) -> torch.device:
        return next(self.problem.model.parameters()).device

    def close(self) -> None:
        self.route.close()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _warm_up(trainers: dict[str, _Trainer], warmup: int, task: str, failed: list[dict[str, str]]) -> None:
    """Run ``warmup`` cycles of each variant; one that fails (a product the installed torch cannot compile,
    say) is taken out, its one-line reason added to ``failed``, and the others measured; Adam may not fail."""
    for label, t in list(trainers.items()):
        try:
            for _ in range(warmup):
                t.cycle()
        except Exception as err:   # noqa: BLE001 - any failure of one variant: one line, others measured
            if label == "adam":       # eager Adam: every ratio is to it (a compiled copy may fail alone)
                raise BenchError(f"perf: adam failed, and every ratio is to it ({_one_line(err)})") from None
            failed.append({"task": task, "optimizer": label, "reason": _one_line(err)})
            t.close()
            del trainers[label]


def _measure(trainers: dict[str, _Trainer], rounds: int,
             tick: Callable[[], None] | None = None) -> dict[str, list[dict[str, float]]]:
    """Timed rounds, each one cycle of every variant, the order rotating (after :func:`_warm_up`)."""
    labels = list(trainers)
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in labels}
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            try:
                samples[label].append(trainers[label].cycle())
            except Exception as err:   # noqa: BLE001 - after the warm-up, a failure ends the run in one line
                raise (err if isinstance(err, BenchError) else
                       BenchError(f"perf: {label} failed in a timed round ({_one_line(err)})")) from None
        if tick:
            tick()
    return samples


def _applies(variant: Variant, compiled: bool, precision: str) -> bool:
    """Whether ``variant`` is timed in this mode: with the model compiled, second order is finite
    differences already, so the cheap and the compiled-product variants would repeat it; fp16's loss
    scaling is not followed by finite differences, and the compiled product runs in float32 only."""
    if compiled and (variant.route in CHEAP_ROUTES or variant.choice.hvp_compiled):
        return False
    if precision != "fp32" and variant.choice.hvp_compiled:
        return False
    return not (precision == "fp16" and variant.route == "finite-difference")


# -- the whole benchmark -----------------------------------------------------------------------------
def run_perf(config: PerfConfig, *, argv: Sequence[str] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> tuple[Path, pd.DataFrame]:
    """Run the benchmark; returns the output folder and the table written to ``perf.csv``."""
    for name in config.tasks:
        tasks.get_task(name)
    for what, value in (("rounds", config.rounds), ("warmup_cycles", config.warmup_cycles),
                        ("batch_size", config.batch_size), ("threads", config.threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < (0 if what == "warmup_cycles" else 1)):
            raise BenchError(f"perf: {what} must be a positive integer, got {value!r}")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in config.widths):
        raise BenchError(f"perf: sweep widths must be positive integers, got {list(config.widths)}")
    if not any(v.label == "adam" for v in config.variants):
        raise BenchError("perf: the variants must include adam (every ratio is to Adam)")
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    out = check_folder(Path(config.out) if config.out else
                       Path("results") / f"perf-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    started, load_start = time.time(), load_average()
    rows: list[dict[str, Any]] = []
    profiles: list[pd.DataFrame] = []
    memory_jobs: list[tuple[str, str, str, TaskConfig, dict[str, Any]]] = []
    not_measured: list[dict[str, str]] = []     # variants that failed in their warm-up, with the reason
    modes = [False, True] if config.compile else [False]
    n_units = len(config.tasks) + (1 if config.widths else 0) + (1 if config.memory else 0)
    unit = 0

    def say(what: str) -> None:
        if progress:
            progress(what, unit, n_units)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        for task in config.tasks:
            say(f"timing {task}")
            tcfg = TaskConfig(seed=0, device=device, batch_size=config.batch_size, synthetic=True,
                              options=dict(config.options.get(task, {})))
            trainers: dict[str, _Trainer] = {}
            for compiled in modes:
                for v in config.variants:
                    if _applies(v, compiled, config.precision):
                        trainers[v.label + ("@compiled" if compiled else "")] = _Trainer(task, v, tcfg, compiled,
                                                                                         config.precision)
            rounds = config.rounds or _ROUNDS.get(task, 12)
            _warm_up(trainers, config.warmup_cycles + (2 if config.compile else 0), task, not_measured)
            samples = _measure(trainers, rounds)
            own_flops = {}
            for key, t in trainers.items():
                if t.second_order and "@" not in key:     # the counter does not see inside compiled models
                    hvp_flops, plain_flops = t.flops()
                    own_flops[key] = (hvp_flops - plain_flops) / plain_flops if plain_flops else math.nan
            routes = {k: t.variant.route for k, t in trainers.items()}
            summary = summarise(samples, flop_evals=floor_flops(own_flops, routes),
                                 every={k: t.variant.every for k, t in trainers.items()})
            for key, s in summary.items():
                label, _, mode = key.partition("@")
                t = trainers[key]
                rows.append({"section": "task", "task": task, "mode": mode or "eager", "optimizer": label,
                             "hvp_route": t.variant.route if not mode or not t.second_order else
                             "finite-difference", "params": t.params,
                             "batch_size": config.batch_size or tasks.get_task(task).default_batch_size,
                             "threads": threads, "rounds": rounds, "precision": config.precision, **s,
                             "route_flop_evals": own_flops.get(key, math.nan)})
            if config.profile:
                from .profiling import profile_product
                for key, t in trainers.items():
                    if "@" not in key and t.variant.route == "exact":
                        profiles.append(profile_product(t, task, key))
            for t in trainers.values():
                t.close()
            del trainers
            gc.collect()
            if config.memory:
                memory_jobs += [(task, task, v.spec, tcfg, _schedule(v)) for v in config.variants
                                if v.label in MEMORY_VARIANTS and v.label in summary]
            unit += 1

        if config.widths:
            say("parameter sweep")
            for w in config.widths:
                tcfg = TaskConfig(seed=0, device=device, batch_size=config.batch_size, synthetic=True,
                                  options={"width": w})
                trainers = {v.label: _Trainer("mnist", v, tcfg, False, config.precision)
                            for v in config.variants if v.label in SWEEP_VARIANTS}
                _warm_up(trainers, 1, f"mlp-{w}", not_measured)
                summary = summarise(_measure(trainers, max(3, (config.rounds or 12) // 4)))
                for label, s in summary.items():
                    t = trainers[label]
                    rows.append({"section": "sweep", "task": f"mlp-{w}", "mode": "eager", "optimizer": label,
                                 "hvp_route": t.variant.route, "params": t.params,
                                 "batch_size": config.batch_size or tasks.get_task("mnist").default_batch_size,
                                 "threads": threads, "rounds": max(3, (config.rounds or 12) // 4),
                                 "precision": config.precision, **s,
                                 "us_per_kparam": s["amortised_ms"] * 1e3 / (t.params / 1e3)})
                    if config.memory and label in ("esgd-m", "adam"):
                        memory_jobs.append((f"mlp-{w}", "mnist", t.variant.spec, tcfg, _schedule(t.variant)))
                del trainers
                gc.collect()
            unit += 1

    def write() -> pd.DataFrame:
        table = pd.DataFrame(rows)
        meta = {
            "command": " ".join(argv) if argv is not None else "run_perf()",
            "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1), "device": device, "threads": threads,
            "load_average_start": load_start, "load_average_end": load_average(),
            "config": {**{k: getattr(config, k) for k in ("tasks", "compile", "rounds", "warmup_cycles",
                                                            "batch_size", "memory", "options", "precision",
                                                            "profile")},
                       "widths": list(config.widths),
                       "variants": [dataclasses.asdict(v) for v in config.variants]},
            "method": __doc__.split("\n\n", 1)[1].strip(), "hvp_every": HVP_EVERY, "cycle": _CYCLE,
            "targets": TARGETS, "target_checks": target_checks(table), "not_measured": not_measured,
            "environment": environment(device),
            "peak_memory": "cuda max_memory_allocated" if device == "cuda" else "cpu VmHWM in a fresh process",
            "data": "synthetic batches of the task's shape (timing does not depend on the values)",
        }
        write_csv(table, out / "perf.csv")
        if profiles:
            write_csv(pd.concat(profiles, ignore_index=True), out / "profile.csv")
        write_json(meta, out / "meta.json")
        table.attrs["not_measured"] = not_measured
        return table

    write()      # the timings are kept even if a memory probe fails
    if config.memory:
        say("peak memory (fresh processes)")
        mem = peak_memory(memory_jobs, steps=2 * _CYCLE, threads=threads, precision=config.precision,
                          warmup=_CYCLE)
        for row in rows:
            if row["mode"] != "eager":
                continue
            spec = next(v.spec for v in config.variants if v.label == row["optimizer"])
            m, ref = mem.get((row["task"], spec)), mem.get((row["task"], "adam"))
            if m and ref:
                row.update({"peak_mem_mb": m["peak_mb"], "peak_extra_mb": m["extra_mb"],
                            "peak_mem_vs_adam": m["peak_mb"] / ref["peak_mb"],
                            "peak_extra_vs_adam": m["extra_mb"] / ref["extra_mb"] if ref["extra_mb"] > 0 else math.nan,
                            "graph_left_on_grad": m["graph_left_on_grad"]})
        unit += 1

    return out, write()
