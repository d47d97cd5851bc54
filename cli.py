"""esgd-bench: the command-line front end (a thin Typer app; the logic lives in bench/ and tasks/).

Every bad input ends as one ``error: ...`` line on stderr and exit code 2, with no traceback: usage errors
from the parser too (:class:`_OneLineErrors`), not only the ones the commands raise.  Ctrl-C ends a
command with exit code 130 and SIGTERM with 143, after everything logged so far is written.  Nothing
heavy (torch, pandas) is imported before a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer

try:    # typer 0.29 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:    # pragma: no cover - typer releases that depend on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

if TYPE_CHECKING:
    from rich.console import Console

_ERR = "error: "
_WARNINGS = ("PluginWarning", "ResultsWarning")      # shown as one ``warning:`` line each


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _safe_streams() -> None:
    """A terminal or pipe whose encoding cannot spell a character (``±`` on an ASCII locale) gets a
    replacement character instead of a UnicodeEncodeError after the run."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")


class _OneLineErrors(TyperGroup):
    """Typer's rich usage-error box, cut to the one line the project promises (exit code 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _safe_streams()
        try:
            with _warnings_one_line():
                rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help())
            sys.exit(2)
        except ClickException as err:
            typer.echo(_ERR + _one_line(err.format_message()), err=True)
            sys.exit(err.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@contextlib.contextmanager
def _warnings_one_line() -> Iterator[None]:
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__name__ in _WARNINGS:
                typer.echo(f"warning: {_one_line(str(message))}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


app = typer.Typer(help="Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineErrors,
                  rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            number = version("esgd-bench")
        except PackageNotFoundError:     # run from a source tree that is not installed
            import esgd
            number = esgd.__version__
        typer.echo(f"esgd-bench {number}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None) -> None:
    """Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers."""


# -- shared plumbing -----------------------------------------------------------------------------------
def _stdout() -> Console:
    """Where results go: a terminal's own width; piped or logged output gets 160 columns (rich would
    squeeze a wide table into 80 and cut its headers), unless COLUMNS says otherwise."""
    import os
    from rich.console import Console
    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=160)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(_ERR + _one_line(message), err=True)
    raise typer.Exit(code)


def _input_errors() -> tuple[type[BaseException], ...]:
    from esgd import DoubleBackwardUnsupportedError
    from bench.errors import BenchError
    from tasks import TaskDataError, TaskOptionError, UnknownTaskError
    return (BenchError, UnknownTaskError, TaskDataError, TaskOptionError, DoubleBackwardUnsupportedError)


@contextlib.contextmanager
def _guarded() -> Iterator[Any]:
    """Run a command: its input errors become one line and exit 2 (or the error's own code), Ctrl-C and
    SIGTERM exit 130 and 143 after the command has written what it logged."""
    from bench.errors import RunInterrupted, exit_code_for_signal
    from bench.executors import StopSignals
    with StopSignals() as signals:
        try:
            yield signals
        except RunInterrupted as stop:
            typer.echo(f"interrupted: everything logged so far is in {stop.out}", err=True)
            raise typer.Exit(stop.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(exit_code_for_signal(signals.received or 2)) from None
        except _input_errors() as error:
            _fail(str(error), getattr(error, "exit_code", 2))


def _stderr() -> Console:
    from rich.console import Console
    return Console(stderr=True)


def _read_config(path: Path) -> dict[str, Any]:
    import json
    import tomllib
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except OSError as err:
        _fail(f"--config {path}: {err.strerror or err}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(f"--config {path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {err}")
    if not isinstance(data, dict):
        _fail(f"--config {path}: expected a table/object of options")
    return data


def _parse_options(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            _fail(f"--option expects key=value (or task.key=value), got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _parse_sbatch(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().lstrip("-") or not value.strip():
            _fail(f"--sbatch expects KEY=VALUE, e.g. constraint=a100, got {item!r}")
        out[key.strip().lstrip("-")] = value.strip()
    return out


def _cluster(executor, wait, partition, time_min, gpus_per_task, cpus_per_task, mem_gb, account, qos, sbatch,
             array_parallelism, nodes) -> dict[str, Any]:
    return dict(executor=executor, wait=wait, partition=partition, time_min=time_min, gpus_per_task=gpus_per_task,
                cpus_per_task=cpus_per_task, mem_gb=mem_gb, account=account, qos=qos, sbatch=_parse_sbatch(sbatch),
                array_parallelism=array_parallelism, nodes=nodes)


def _parse_lrs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts:
        _fail(f"--lrs is empty: give comma-separated numbers such as 1e-3,1e-2,1e-1, got {text!r}")
    try:
        return [float(x) for x in parts]
    except ValueError:
        _fail(f"--lrs expects comma-separated numbers such as 1e-3,1e-2,1e-1, got {text!r}")


def _submitted(result: Any, waited: bool) -> bool:
    """After a cluster submission: say where the cells went; True when there is nothing more to show."""
    if not result.submitted:
        return False
    ids = ", ".join(dict.fromkeys(str(e["job_id"]).split("_")[0] for e in result.submitted))
    typer.echo(f"submitted {len(result.submitted)} cell(s) to {result.submitted[0]['executor']} as job {ids}; "
               f"follow them with: esgd-bench status {result.out}")
    return not waited


def _report_failures(summary: Any, out: Path, sweep: bool) -> None:
    failed = summary[summary["status"] == "error"]
    for r in failed.to_dict("records"):
        typer.echo(f"{_ERR}{r['task']} {r['optimizer']} seed {r['seed']}: {_one_line(r['error'])}", err=True)
    diverged = summary[summary["status"] == "diverged"]
    for r in diverged.to_dict("records"):
        typer.echo(f"diverged: {r['task']} {r['optimizer']} seed {r['seed']} at step {r['steps']} "
                   f"(loss {r['final_loss']:.4g}); its rows are kept in {out}", err=True)
    # A sweep explores rates that diverge on purpose; a run whose optimizer diverged is a failed run.
    if len(failed) or (len(diverged) and not sweep):
        raise typer.Exit(1)


def _execute(given: dict[str, Any], config_file: Optional[Path], sweep: bool) -> None:
    """Merge the command line over a config file, run, print the tables and the folder."""
    if sweep and not given.get("optimizers") and not (config_file and
                                                      {"opt", "optimizers"} & set(_read_config(config_file))):
        _fail("sweep needs at least one --opt NAME")
    with _guarded():
        from bench.config import make_config
        from bench.display import RichReporter, summary_table, sweep_table
        from bench.grid import best_lrs, run_benchmark
        config = make_config(given, _read_config(config_file) if config_file else None, config_file,
                             sweep=sweep)
        with RichReporter(_stderr(), show_lr=sweep) as reporter:
            result = run_benchmark(config, reporter=reporter, argv=["esgd-bench"] + sys.argv[1:])
    if _submitted(result, config.wait):
        return
    out = _stdout()
    for table in summary_table(result.summary):
        out.print(table)
    for task, info in sorted(result.tasks.items()):
        ref = info.get("reference")
        if ref and task in set(result.summary.get("task", [])):
            out.print(f"{task}: {info['eval_metric']} to beat: {ref['value']:.4g}, {ref['what']}")
    if sweep:
        best = best_lrs(result.summary)
        out.print(sweep_table(best))
        for task, budget in sorted(result.selection.items()):
            grids = ", ".join(f"{o} {n}" for o, n in budget["grid_points"].items())
            out.print(f"{task}: {budget['rule']}; budget per optimizer: {budget['seeds']} seed(s) x "
                      f"{budget['steps']} steps, grid points: {grids}")
        for r in best[best["best"]].to_dict("records"):
            out.print(f"best lr for {r['optimizer']} on {r['task']}: {r['lr']:g} "
                      f"(mean {r['criterion']} {r['score']:.4g})")
    out.print(f"results: {result.out}")
    _report_failures(result.summary, result.out, sweep)


_Opt = Annotated[Optional[list[str]], typer.Option(
    "--opt", help="Optimizer, repeatable; NAME or NAME:key=value,... (e.g. adam:lr=3e-4,weight_decay=0.1), "
                  "or any torch.optim.Optimizer class as package.module:ClassName[:key=value,...].")]
_Seeds = Annotated[Optional[int], typer.Option(help="Seeds per optimizer (0..N-1). (default: run 3, sweep 2)")]
_Steps = Annotated[Optional[int], typer.Option(help="Training steps. (default: the task's)")]
_BatchSize = Annotated[Optional[int], typer.Option(help="Batch size. (default: the task's)")]
_EvalEvery = Annotated[Optional[int], typer.Option(help="Evaluate every N steps (and at the end).")]
_Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or auto. (default: auto)")]
_Out = Annotated[Optional[Path], typer.Option(help="Results folder. (default: results/<task>-<timestamp>)")]
_DataDir = Annotated[Optional[Path], typer.Option(help="Where datasets live (MNIST, CIFAR-10).")]
_Download = Annotated[Optional[bool], typer.Option("--download", help="Download missing datasets.")]
_Synthetic = Annotated[Optional[bool], typer.Option("--synthetic", help="Random data of the task's shape (timing).")]
_Jobs = Annotated[Optional[int], typer.Option(help="Parallel worker processes (timings are cleanest with 1).")]
_Config = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file with these options.")]
_Resume = Annotated[Optional[bool], typer.Option("--resume", help="Continue --out, skipping finished cells.")]
_Force = Annotated[Optional[bool], typer.Option(
    "--force", help="Write into an --out folder that holds files esgd-bench did not write.")]
_Threads = Annotated[Optional[int], typer.Option(help="torch threads of a sequential run. (default: torch's)")]
_Precision = Annotated[Optional[str], typer.Option(
    help="fp32, bf16 (forward under autocast) or fp16 (autocast and loss scaling). (default: fp32)")]
_Schedule = Annotated[Optional[str], typer.Option(
    help="Learning-rate schedule: constant, cosine[:final=F] or warmup-cosine[:warmup=STEPS,final=F] "
         "(default: the task's own; see esgd-bench tasks).")]
_Executor = Annotated[Optional[str], typer.Option(
    help="local (this process, or --jobs), slurm (one job array through submitit) or submitit-local "
         "(the same through submitit on this machine).")]
_Wait = Annotated[Optional[bool], typer.Option(
    "--wait", help="With slurm or submitit-local: wait for the cells, then show the tables.")]
_Partition = Annotated[Optional[str], typer.Option(help="Slurm partition.")]
_TimeMin = Annotated[Optional[int], typer.Option(help="Time limit of one cell's job, minutes. (default: 60)")]
_GpusPerTask = Annotated[Optional[int], typer.Option(help="GPUs per task (per rank with --nproc).")]
_CpusPerTask = Annotated[Optional[int], typer.Option(help="CPUs per task; also the task's torch threads.")]
_MemGb = Annotated[Optional[float], typer.Option(help="Memory per node, GB.")]
_Account = Annotated[Optional[str], typer.Option(help="Slurm account.")]
_Qos = Annotated[Optional[str], typer.Option(help="Slurm quality of service.")]
_Sbatch = Annotated[Optional[list[str]], typer.Option(
    "--sbatch", help="Any other sbatch option as KEY=VALUE (e.g. constraint=a100), repeatable.")]
_ArrayParallelism = Annotated[Optional[int], typer.Option(help="The most array tasks running at once.")]
_Nodes = Annotated[Optional[int], typer.Option(help="Nodes per cell: a --nproc N cell spread over them.")]
_Option = Annotated[Optional[list[str]], typer.Option(
    "--option", help="Task option key=value (task.key=value for one of several tasks), repeatable.")]


@app.command()
def run(task: Annotated[list[str], typer.Argument(help="Task name(s); several share one results folder.")],
        opt: _Opt = None, seeds: _Seeds = None, steps: _Steps = None,
        lr: Annotated[Optional[float], typer.Option(help="Learning rate for every optimizer named.")] = None,
        batch_size: _BatchSize = None, eval_every: _EvalEvery = None, device: _Device = None,
        out: _Out = None, data_dir: _DataDir = None, download: _Download = None, synthetic: _Synthetic = None,
        jobs: _Jobs = None, config: _Config = None, resume: _Resume = None, force: _Force = None,
        threads: _Threads = None, precision: _Precision = None, schedule: _Schedule = None,
        option: _Option = None, accumulate: Annotated[Optional[int], typer.Option(
            help="Micro-batches per optimizer step (gradient accumulation; --batch-size is the step's).")] = None,
        nproc: Annotated[Optional[int], typer.Option(
            help="Data-parallel processes (torch.distributed: gloo on CPU, NCCL on GPU; DDP).")] = None,
        compile: Annotated[Optional[bool], typer.Option(
            "--compile", help="torch.compile the model; second-order optimizers use finite-difference "
                              "Hessian-vector products.")] = None,
        executor: _Executor = None, wait: _Wait = None, partition: _Partition = None, time_min: _TimeMin = None,
        gpus_per_task: _GpusPerTask = None, cpus_per_task: _CpusPerTask = None, mem_gb: _MemGb = None,
        account: _Account = None, qos: _Qos = None, sbatch: _Sbatch = None,
        array_parallelism: _ArrayParallelism = None, nodes: _Nodes = None) -> None:
    """Train optimizers side by side on TASK over several seeds (default: esgd-m, esgd, sgd, adam)."""
    _execute(dict(tasks=task, optimizers=opt, seeds=seeds, steps=steps, lr=lr, batch_size=batch_size,
                  eval_every=eval_every, device=device, out=out, data_dir=data_dir, download=download,
                  synthetic=synthetic, jobs=jobs, resume=resume, force=force, threads=threads,
                  precision=precision, schedule=schedule, options=_parse_options(option),
                  accumulate=accumulate, nproc=nproc,
                  compile=compile, **_cluster(executor, wait, partition, time_min, gpus_per_task, cpus_per_task,
                                              mem_gb, account, qos, sbatch, array_parallelism, nodes)),
             config, sweep=False)


@app.command()
def sweep(task: Annotated[list[str], typer.Argument(help="Task name(s).")],
          opt: _Opt = None,
          lrs: Annotated[Optional[str], typer.Option(
              help="Comma-separated grid (default: 7 log-spaced points, 1e-3..1 for esgd-m, "
                   "three decades around the registry default otherwise).")] = None,
          seeds: _Seeds = None, steps: _Steps = None, batch_size: _BatchSize = None,
          eval_every: _EvalEvery = None, device: _Device = None, out: _Out = None, data_dir: _DataDir = None,
          download: _Download = None, synthetic: _Synthetic = None, jobs: _Jobs = None,
          config: _Config = None, resume: _Resume = None, force: _Force = None, threads: _Threads = None,
          precision: _Precision = None, schedule: _Schedule = None, option: _Option = None,
          executor: _Executor = None, wait: _Wait = None, partition: _Partition = None, time_min: _TimeMin = None,
          gpus_per_task: _GpusPerTask = None, cpus_per_task: _CpusPerTask = None, mem_gb: _MemGb = None,
          account: _Account = None, qos: _Qos = None, sbatch: _Sbatch = None,
          array_parallelism: _ArrayParallelism = None, nodes: _Nodes = None) -> None:
    """Learning-rate sweep: a log-spaced grid per optimizer, best lr by the validation metric (tail loss without data)."""
    _execute(dict(tasks=task, optimizers=opt, lrs=_parse_lrs(lrs), seeds=seeds, steps=steps,
                  batch_size=batch_size, eval_every=eval_every, device=device, out=out, data_dir=data_dir,
                  download=download, synthetic=synthetic, jobs=jobs, resume=resume, force=force,
                  threads=threads, precision=precision, schedule=schedule, options=_parse_options(option),
                  **_cluster(executor, wait, partition, time_min, gpus_per_task, cpus_per_task, mem_gb, account,
                             qos, sbatch, array_parallelism, nodes)),
             config, sweep=True)


def _no_match(kind: str, pattern: str, names: list[str]) -> None:
    _fail(f"no {kind} matches {pattern!r}; {kind}s: {', '.join(names)}")


@app.command("tasks")
def tasks_cmd(pattern: Annotated[str, typer.Argument(help="fnmatch pattern, e.g. 'mnist*'.")] = "*") -> None:
    """List the benchmark tasks (scaled variants take any factor, e.g. mnist-loss-x1000)."""
    import tasks as registry
    specs = registry.list_tasks(pattern)
    if not specs:
        _no_match("task", pattern, [t.name for t in registry.list_tasks()])
    from rich.table import Table
    table = Table(title="Tasks")
    for col in ("name", "description", "steps", "batch", "schedule", "eval metric", "data source", "source"):
        table.add_column(col, overflow="fold")
    for s in specs:
        better = "↑" if s.higher_is_better else "↓"
        table.add_row(s.name, s.description, str(s.default_steps), str(s.default_batch_size),
                      s.default_schedule, f"{s.eval_metric} {better}", s.data_source, registry.task_source(s.base or s.name))
    _stdout().print(table)


@app.command("optimizers")
def optimizers_cmd(pattern: Annotated[str, typer.Argument(help="fnmatch pattern, e.g. 'esgd*'.")] = "*") -> None:
    """List the registered optimizers, the class behind each and their default learning rates."""
    from bench.optimizers import class_name, list_optimizers
    from bench.plugins import optimizer_source
    specs = list_optimizers(pattern)
    if not specs:
        _no_match("optimizer", pattern, [s.name for s in list_optimizers()])
    from rich.table import Table
    table = Table(title="Optimizers", caption="Also: any torch.optim.Optimizer subclass as "
                                              "--opt package.module:ClassName[:key=value,...]")
    for col in ("name", "class", "order", "default lr (per task)", "defaults", "description", "source"):
        table.add_column(col, overflow="fold")
    for s in specs:
        lrs = ", ".join(f"{k}: {v:g}" for k, v in sorted(s.lrs.items()))
        defaults = ", ".join(f"{k}={v}" for k, v in s.defaults.items()) or "--"
        table.add_row(s.name, class_name(s), "second" if s.second_order else "first", lrs, defaults,
                      s.description, optimizer_source(s.name))
    _stdout().print(table)


# -- reading results: plot, table, report ----------------------------------------------------------------
_Dirs = Annotated[list[Path], typer.Argument(help="Results folder(s) written by `esgd-bench run`.")]
_Target = Annotated[Optional[float], typer.Option(
    help="Time-to-target threshold on the eval metric. (default: the task's target)")]
_TargetLoss = Annotated[Optional[float], typer.Option(
    help="Time to reach this training loss instead of the eval-metric target.")]
_Only = Annotated[Optional[list[str]], typer.Option(
    "--only", help="Show only this optimizer (as the results name it), repeatable.")]


def _choice(option: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        _fail(f"{option} must be one of {', '.join(valid)}, got {value!r}")
    return value


@app.command()
def plot(dirs: _Dirs,
         x: Annotated[str, typer.Option(
             help="x-axis: step, time (training wall-clock seconds) or both (one row each).")] = "step",
         metric: Annotated[str, typer.Option(help="loss (training) or eval (the task's eval metric).")] = "loss",
         log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y-axis.")] = False,
         smooth: Annotated[float, typer.Option(
             help="EMA weight for the loss curves, in [0, 1); the raw curve stays faint behind. 0: off.")] = 0.9,
         out: Annotated[Optional[Path], typer.Option(
             help="Image file, .png, .svg or .pdf. (default: <first folder>/<metric>_vs_<x>.png)")] = None,
         only: _Only = None) -> None:
    """Curves of every optimizer: mean over seeds with a min-max band, HVP steps marked."""
    _choice("--x", x, ("step", "time", "both"))
    _choice("--metric", metric, ("loss", "eval"))
    if not (0.0 <= smooth < 1.0):
        _fail(f"--smooth must be in [0, 1), got {smooth:g}")
    with _guarded():
        from bench.plots import plot_results
        path = plot_results(dirs, out or dirs[0] / f"{metric}_vs_{x}.png", x=x, metric=metric, log_y=log_y,
                            smooth=smooth, only=only)
    _stdout().print(f"plot: {path}")


@app.command()
def table(dirs: _Dirs,
          format: Annotated[str, typer.Option("--format", help="rich, markdown or csv.")] = "rich",
          target: _Target = None, target_loss: _TargetLoss = None,
          out: Annotated[Optional[Path], typer.Option(help="Also write the table to FILE.csv or FILE.md.")] = None,
          against: Annotated[Optional[str], typer.Option(
              help="Instead: does each optimizer end like this one? Mean tail loss and test metric "
                   "against its min-max over seeds (e.g. --against esgd-m for the cheap estimates).")] = None,
          only: _Only = None) -> None:
    """Wall-clock table per task x optimizer: step and HVP cost, cost vs SGD/Adam, time to target, final loss."""
    _choice("--format", format, ("rich", "markdown", "csv"))
    with _guarded():
        from bench.readers import load_results
        from bench.tables import TABLE_SUFFIXES, render_table, wall_clock_table, write_table
        if out is not None:
            from bench.store import check_output_file
            check_output_file(out, TABLE_SUFFIXES)
        results = load_results(dirs, only)
        if against is not None:
            from bench.agreement import agreement_table, render_agreement, write_agreement
            frame = agreement_table(results.summary, against)
            if out is not None:
                write_agreement(frame, out)
            shown = render_agreement(frame, format)
        else:
            frame = wall_clock_table(results.metrics, results.summary, target=target, target_loss=target_loss)
            if out is not None:
                write_table(frame, out)
            shown = render_table(frame, format)
    if format == "rich":
        _stdout().print(shown)
    else:
        typer.echo(shown, nl=False)


@app.command()
def report(dirs: _Dirs,
           out: Annotated[Optional[Path], typer.Option(help="Report folder. (default: <first folder>/report)")]
           = None,
           target: _Target = None, target_loss: _TargetLoss = None,
           title: Annotated[Optional[str], typer.Option(help="Page title.")] = None) -> None:
    """One Markdown page with the curves, the wall-clock table and the environment, images next to it."""
    with _guarded():
        from bench.report import build_report
        page = build_report(dirs, out or dirs[0] / "report", target=target, target_loss=target_loss, title=title)
    _stdout().print(f"report: {page}")


@app.command()
def status(folder: Annotated[Path, typer.Argument(help="A results folder written by run, sweep or scale.")]) -> None:
    """The grid at a glance: done, running, queued, failed (with its error and log), diverged."""
    with _guarded():
        from bench.status import grid_status, status_counts
        frame = grid_status(folder)
    counts = status_counts(frame)
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    _stdout().print(f"{folder}: {len(frame)} cell(s): {shown or 'none planned'}")
    rest = frame[frame["state"] != "done"]
    if len(rest):
        from rich.table import Table
        table = Table(title="cells not done")
        for col in ("task", "optimizer", "lr", "seed", "state", "steps", "error", "log"):
            table.add_column(col, overflow="fold")
        for r in rest.itertuples(index=False):
            table.add_row(r.task, r.optimizer, f"{r.lr:g}", str(r.seed), r.state,
                          "" if r.steps is None or r.steps != r.steps else str(int(r.steps)), r.error, r.log)
        _stdout().print(table)


# -- studies: scale, regress, perf ------------------------------------------------------------------------
@app.command()
def scale(task: Annotated[str, typer.Argument(help="Base task, e.g. rosenbrock, quadratic or mnist.")],
          kind: Annotated[str, typer.Option(help="loss (multiply the loss) or params (rescale the parameters).")],
          factors: Annotated[str, typer.Option(help="Comma-separated scale factors.")]
          = "1e-3,1e-2,1e-1,1,1e1,1e2,1e3",
          opt: _Opt = None, steps: _Steps = None,
          seeds: Annotated[Optional[int], typer.Option(help="Seeds per optimizer and factor. (default: 1)")] = None,
          lr: Annotated[Optional[float], typer.Option(help="One lr for every optimizer (default: each "
                                                           "one's registry lr for the task).")] = None,
          flat_spread: Annotated[float, typer.Option(
              help="Call a line flat when (max - min) / min(|max|, |min|) of final loss <= this.")] = 0.5,
          device: _Device = None, option: _Option = None, jobs: _Jobs = None, resume: _Resume = None,
          force: _Force = None, config: _Config = None, precision: _Precision = None,
          executor: _Executor = None, wait: _Wait = None, partition: _Partition = None, time_min: _TimeMin = None,
          gpus_per_task: _GpusPerTask = None, cpus_per_task: _CpusPerTask = None, mem_gb: _MemGb = None,
          account: _Account = None, qos: _Qos = None, sbatch: _Sbatch = None,
          array_parallelism: _ArrayParallelism = None, nodes: _Nodes = None,
          out: Annotated[Optional[Path], typer.Option(
              help="Results folder. (default: results/<task>-loss-x...-<timestamp>)")] = None) -> None:
    """Scale-invariance study: each optimizer at ONE lr on TASK scaled by each factor; final loss vs factor."""
    _choice("--kind", kind, ("loss", "params"))
    if not flat_spread >= 0:
        _fail(f"--flat-spread must be a number >= 0, got {flat_spread}")
    with _guarded():
        from bench import scale as study
        from bench.display import RichReporter
        from bench.grid import run_benchmark
        from bench.readers import load_results
        factor_list = study.parse_factors(factors)
        settings = dict(optimizers=opt, seeds=seeds, steps=steps, lr=lr, device=device, out=out, jobs=jobs,
                        resume=resume, force=force, precision=precision, options=_parse_options(option),
                        **_cluster(executor, wait, partition, time_min, gpus_per_task, cpus_per_task, mem_gb,
                                   account, qos, sbatch, array_parallelism, nodes))
        cfg = study.scale_config(task, kind, factor_list, settings,
                                 _read_config(config) if config else None, config)
        with RichReporter(_stderr()) as reporter:
            result = run_benchmark(cfg, reporter=reporter, argv=["esgd-bench"] + sys.argv[1:])
        if _submitted(result, cfg.wait):
            return
        runs = study.scale_runs(load_results([result.out]))
        paths = study.write_scale_outputs(runs, result.out, flat_spread=flat_spread,
                                          study={"task": task, "kind": kind, "factors": factor_list})
    _stdout().print(study.scale_rich_table(runs, flat_spread))
    _stdout().print(f"scale study: {paths['runs']} and {paths['plot']}")


@app.command()
def bias(task: Annotated[str, typer.Argument(help="Task name, e.g. mnist, mnist-cnn or charlm.")],
         opt: Annotated[Optional[list[str]], typer.Option(
             "--opt", help="A cheap ESGD route, repeatable, e.g. esgd-m-pair or "
                           "esgd-m:hvp_fraction=0.25,hvp_paired=true. (default: esgd-m-sub and esgd-m-pair)")]
         = None,
         at_step: Annotated[int, typer.Option(help="Steps of exact ESGD-M before measuring.")] = 100,
         samples: Annotated[int, typer.Option(help="Batches (one probe each) to average over.")] = 64,
         seed: Annotated[int, typer.Option(help="Seed of the model, the batches and the probes.")] = 0,
         device: _Device = None, batch_size: _BatchSize = None, data_dir: _DataDir = None,
         synthetic: _Synthetic = None, threads: _Threads = None, option: _Option = None,
         out: Annotated[Optional[Path], typer.Option(help="Output folder. (default: results/bias-<task>-<timestamp>)")]
         = None) -> None:
    """Is a cheap curvature estimate centred on the whole batch's squared product?  Its mean against
    the exact (H z)^2 on TASK's batches, same probes, at one point of training."""
    console = _stdout()
    with _guarded():
        from bench import bias as bs
        from bench.display import bias_table
        config = bs.BiasConfig(task=task, routes=tuple(opt) if opt else bs.DEFAULT_ROUTES, at_step=at_step,
                               samples=samples, seed=seed, device=device or "auto", batch_size=batch_size,
                               synthetic=bool(synthetic), data_dir=data_dir, threads=threads, out=out,
                               options=_parse_options(option) or {})
        with console.status("bias") as status:
            path, table = bs.run_bias(config, argv=["esgd-bench"] + sys.argv[1:],
                                      progress=lambda what: status.update(f"bias: {what}"))
    console.print(bias_table(table))
    console.print(f"bias: {path / 'bias.csv'} and {path / 'meta.json'}")


@app.command()
def regress(baseline: Annotated[Path, typer.Option(help="Baseline JSON.")] = Path("results/baselines/ci.json"),
            update: Annotated[bool, typer.Option("--update", help="Rerun the suite and rewrite the baseline.")]
            = False,
            tolerance_sigma: Annotated[float, typer.Option(help="K: allowed worsening in seed std units.")] = 3.0,
            rel_floor: Annotated[float, typer.Option(help="Least std assumed, as a fraction of the mean.")] = 0.05,
            out: Annotated[Optional[Path], typer.Option(
                help="Keep the suite's results folder here, with the comparison as regress.csv.")] = None
            ) -> None:
    """Pinned fast convergence suite vs the committed baseline; exit 1 on any regression."""
    import time
    with _guarded():
        from bench import regress as rg
        from bench.display import RichReporter
        from bench.environment import environment
        from bench.store import check_folder, check_output_file, write_csv
        tol = rg.Tolerance(sigma=tolerance_sigma, rel_floor=rel_floor)
        old = None if update else rg.read_baseline(baseline)
        if update:
            check_folder(baseline.parent, "the folder of --baseline")
            check_output_file(baseline, (".json",), "--baseline")
        start = time.perf_counter()
        with RichReporter(_stderr()) as reporter:
            result = rg.run_suite(out=out, reporter=reporter)
        seconds = time.perf_counter() - start
        entries = rg.aggregate(result.summary, result.metrics)
        if update:
            old = rg.make_baseline(result.summary, result.metrics, environment("cpu"), seconds)
            rg.write_baseline(old, baseline)
        comparison = rg.compare(entries, old, tol)
        if out is not None:
            write_csv(comparison, out / "regress.csv")
    console = _stdout()
    console.print(rg.regress_rich_table(comparison, tol))
    console.print(f"suite: {len(result.summary)} runs in {seconds:.1f} s"
                  + (f"; baseline written to {baseline}" if update else f"; baseline {baseline}"))
    failed = comparison[~comparison["passed"].astype(bool)]
    if len(failed):
        names = ", ".join(f"{r.task}/{r.optimizer} ({r.reason})" for r in failed.itertuples(index=False))
        typer.echo(f"regression: {len(failed)} of {len(comparison)} rows failed: {names}", err=True)
        raise typer.Exit(1)


@app.command()
def perf(task: Annotated[str, typer.Option(help="mnist, mnist-cnn, cifar, charlm or all.")] = "all",
         device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
         out: Annotated[Optional[Path], typer.Option(help="Output folder. (default: results/perf-<timestamp>)")]
         = None,
         compile: Annotated[bool, typer.Option("--compile", help="Also time compiled models (second order "
                                                                 "by finite differences).")] = False,
         rounds: Annotated[Optional[int], typer.Option(help="Timed rounds per task. (default: mnist 12, "
                                                            "mnist-cnn and cifar 5, charlm 4)")] = None,
         batch_size: _BatchSize = None,
         widths: Annotated[str, typer.Option(help="MLP widths of the parameter sweep, comma-separated; "
                                                  "'none' skips it.")] = "110,678,2789",
         memory: Annotated[bool, typer.Option(help="Measure peak memory in fresh processes.")] = True,
         threads: Annotated[Optional[int], typer.Option(help="torch threads. (default: torch's)")] = None,
         precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (see run --help).")] = "fp32",
         profile: Annotated[bool, typer.Option("--profile", help="Also profile where each exact product's "
                                                                 "time goes (profile.csv).")] = False,
         option: _Option = None) -> None:
    """Step cost of ESGD-M (exact, sub-batch, paired and finite-difference HVP, and the exact one every 40
    steps), ESGD, SGD and Adam, as ratios to Adam, each exact route against its arithmetic floor."""
    from bench.perf import ALL_TASKS
    names = list(ALL_TASKS) if task == "all" else [task]
    _choice("--task", task, ALL_TASKS + ("all",))
    _choice("--device", device, ("cpu", "cuda", "auto"))
    try:
        width_list = [] if widths.strip().lower() in ("none", "") else [int(w) for w in widths.split(",")]
    except ValueError:
        _fail(f"--widths expects comma-separated integers such as 110,678,2789, got {widths!r}")
    options: dict[str, dict[str, str]] = {}
    for key, value in (_parse_options(option) or {}).items():
        scope, dot, bare = key.rpartition(".")
        for name in ([scope] if dot else names):
            if name not in names:
                _fail(f"--option {key}: {scope!r} is not among the tasks ({', '.join(names)})")
            options.setdefault(name, {})[bare] = value
    console = _stdout()
    with _guarded():
        from bench import perf as pf
        from bench.display import perf_table, targets_table
        config = pf.PerfConfig(tasks=names, device=device, out=out, compile=compile, rounds=rounds,
                               batch_size=batch_size, widths=width_list, memory=memory, threads=threads,
                               options=options, precision=precision, profile=profile)
        with console.status("perf") as status:
            path, result = pf.run_perf(config, argv=["esgd-bench"] + sys.argv[1:],
                                       progress=lambda what, i, n: status.update(f"perf: {what} ({i + 1}/{n})"))
    for shown in perf_table(result):
        console.print(shown)
    console.print(targets_table(pf.target_checks(result)))
    if (path / "profile.csv").is_file():
        import pandas as pd
        from bench.display import profile_tables
        for shown in profile_tables(pd.read_csv(path / "profile.csv")):
            console.print(shown)
    console.print(f"perf: {path / 'perf.csv'} and {path / 'meta.json'}"
                  + (f", {path / 'profile.csv'}" if (path / "profile.csv").is_file() else ""))
    failed = result.attrs.get("not_measured", [])
    for row in failed:      # the others are measured and written; the exit status says the table is short
        typer.echo(f"perf: {row['optimizer']} on {row['task']} was not measured ({row['reason']})", err=True)
    if failed:
        raise typer.Exit(1)
