"""esgd-bench: the command-line front end (a thin Typer app; the logic lives in bench/ and tasks/).

Every bad input ends as one ``error: ...`` line on stderr and exit code 2, with no traceback: usage
errors from the parser too (:class:`_OneLineErrors`), not only the ones the commands raise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table
try:    # typer 0.29 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:    # pragma: no cover - typer releases that depend on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

import esgd

_ERR = "error: "


class _OneLineErrors(TyperGroup):
    """Typer's rich usage-error box, cut to the one line the project promises (exit code 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with _plugin_warnings_one_line():
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
def _plugin_warnings_one_line() -> Iterator[None]:
    """A broken plugin is skipped with a PluginWarning (bench/plugins.py); show it as one line."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__name__ == "PluginWarning":
                typer.echo(f"warning: {_one_line(str(message))}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


app = typer.Typer(help="Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineErrors)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"esgd-bench {esgd.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None) -> None:
    """Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers."""


# -- shared plumbing of run and sweep ------------------------------------------------------------------
def _stdout() -> Console:
    """Where results go: a terminal's own width; piped or logged output gets 160 columns (rich would
    squeeze a wide table into 80 and cut its headers), unless COLUMNS says otherwise."""
    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=160)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(_ERR + _one_line(message), err=True)
    raise typer.Exit(code)


def _input_errors() -> tuple[type[BaseException], ...]:
    from bench.optimizers import OptimizerSpecError, UnknownOptimizerError
    from bench.results import ResultsError
    from bench.runner import BenchError
    from tasks import TaskDataError, UnknownTaskError
    from tasks.base import TaskOptionError
    return (BenchError, UnknownTaskError, UnknownOptimizerError, OptimizerSpecError, TaskDataError,
            TaskOptionError, ResultsError, esgd.DoubleBackwardUnsupportedError)


def _read_config(path: Path) -> dict[str, Any]:
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


def _parse_options(items: list[str] | None) -> dict[str, str]:
    options = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            _fail(f"--option expects key=value (or task.key=value), got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _parse_lrs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--lrs expects comma-separated numbers such as 1e-3,1e-2,1e-1, got {text!r}")


def _execute(given: dict[str, Any], config_file: Optional[Path], sweep: bool) -> None:
    """Merge command line over config file over defaults, run, print the tables and the path."""
    from bench.display import RichReporter, summary_table, sweep_table
    from bench.results import load_summary
    from bench.runner import BenchConfig, RunInterrupted, best_lrs, run_benchmark

    data = _read_config(config_file) if config_file else {}
    if data.get("options") is not None and not isinstance(data["options"], dict):
        _fail("--config: 'options' must be a table of key = value")
    given = {k: v for k, v in given.items() if v not in (None, [], {})}
    merged = {**data, **given, "sweep": sweep}
    if "options" in data and "options" in given:
        merged["options"] = {**data["options"], **given["options"]}
    merged.setdefault("seeds", 2 if sweep else 3)
    if sweep and not (merged.get("optimizers") or merged.get("opt")):
        _fail("sweep needs at least one --opt NAME")
    out, err = _stdout(), Console(stderr=True)
    try:
        config = BenchConfig.from_mapping(merged)
        with RichReporter(err, show_lr=sweep) as reporter:
            path = run_benchmark(config, reporter=reporter, argv=["esgd-bench"] + sys.argv[1:])
    except RunInterrupted as stop:
        typer.echo(f"interrupted: everything logged so far is in {stop.out}", err=True)
        raise typer.Exit(130)
    except _input_errors() as error:
        _fail(str(error))
    summary = load_summary(path)
    for table in summary_table(summary):
        out.print(table)
    if sweep:
        best = best_lrs(summary)
        out.print(sweep_table(best))
        for r in best[best["best"]].to_dict("records"):
            out.print(f"best lr for {r['optimizer']} on {r['task']}: {r['lr']:g} "
                      f"(mean final loss {r['mean_final_loss']:.4g})")
    out.print(f"results: {path}")
    failed = summary[summary["status"] == "error"]
    for r in failed.to_dict("records"):
        typer.echo(f"{_ERR}{r['task']} {r['optimizer']} seed {r['seed']}: {_one_line(r['error'])}", err=True)
    diverged = summary[summary["status"] == "diverged"]
    for r in diverged.to_dict("records"):
        typer.echo(f"diverged: {r['task']} {r['optimizer']} seed {r['seed']} at step {r['steps']} "
                   f"(loss {r['final_loss']:.4g}); its rows are kept in {path}", err=True)
    # A sweep explores rates that diverge on purpose; a run whose optimizer diverged is a failed run.
    if len(failed) or (len(diverged) and not sweep):
        raise typer.Exit(1)


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
_Option = Annotated[Optional[list[str]], typer.Option(
    "--option", help="Task option key=value (task.key=value for one of several tasks), repeatable.")]


@app.command()
def run(task: Annotated[list[str], typer.Argument(help="Task name(s); several share one results folder.")],
        opt: _Opt = None, seeds: _Seeds = None, steps: _Steps = None,
        lr: Annotated[Optional[float], typer.Option(help="Learning rate for every optimizer named.")] = None,
        batch_size: _BatchSize = None, eval_every: _EvalEvery = None, device: _Device = None,
        out: _Out = None, data_dir: _DataDir = None, download: _Download = None, synthetic: _Synthetic = None,
        jobs: _Jobs = None, config: _Config = None, resume: _Resume = None, option: _Option = None,
        accumulate: Annotated[Optional[int], typer.Option(
            help="Micro-batches per optimizer step (gradient accumulation; --batch-size is the step's).")] = None,
        nproc: Annotated[Optional[int], typer.Option(
            help="Data-parallel processes (torch.distributed: gloo on CPU, NCCL on GPU; DDP).")] = None,
        compile: Annotated[Optional[bool], typer.Option(
            "--compile", help="torch.compile the model; second-order optimizers use finite-difference "
                              "Hessian-vector products.")] = None) -> None:
    """Train optimizers side by side on TASK over several seeds (default: esgd-m, esgd, sgd, adam)."""
    _execute(dict(tasks=task, optimizers=opt, seeds=seeds, steps=steps, lr=lr, batch_size=batch_size,
                  eval_every=eval_every, device=device, out=out, data_dir=data_dir, download=download,
                  synthetic=synthetic, jobs=jobs, resume=resume, options=_parse_options(option),
                  accumulate=accumulate, nproc=nproc, compile=compile),
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
          config: _Config = None, resume: _Resume = None, option: _Option = None) -> None:
    """Learning-rate sweep: a log-spaced grid per optimizer, best lr by mean final loss over seeds."""
    _execute(dict(tasks=task, optimizers=opt, lrs=_parse_lrs(lrs) if lrs is not None else None, seeds=seeds,
                  steps=steps, batch_size=batch_size, eval_every=eval_every, device=device, out=out,
                  data_dir=data_dir, download=download, synthetic=synthetic, jobs=jobs, resume=resume,
                  options=_parse_options(option)),
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
    table = Table(title="Tasks")
    from bench.plugins import task_source
    for col in ("name", "description", "steps", "batch", "eval metric", "data source", "source"):
        table.add_column(col, overflow="fold")
    for s in specs:
        better = "↑" if s.higher_is_better else "↓"
        table.add_row(s.name, s.description, str(s.default_steps), str(s.default_batch_size),
                      f"{s.eval_metric} {better}", s.data_source, task_source(s.base or s.name))
    _stdout().print(table)


@app.command("optimizers")
def optimizers_cmd(pattern: Annotated[str, typer.Argument(help="fnmatch pattern, e.g. 'esgd*'.")] = "*") -> None:
    """List the registered optimizers with their default learning rates."""
    from bench.optimizers import list_optimizers
    from bench.plugins import optimizer_source
    specs = list_optimizers(pattern)
    if not specs:
        _no_match("optimizer", pattern, [s.name for s in list_optimizers()])
    table = Table(title="Optimizers", caption="Also: any torch.optim.Optimizer subclass as "
                                              "--opt package.module:ClassName[:key=value,...]")
    for col in ("name", "order", "default lr (per task)", "defaults", "description", "source"):
        table.add_column(col, overflow="fold")
    for s in specs:
        lrs = ", ".join(f"{k}: {v:g}" for k, v in sorted(s.lrs.items()))
        defaults = ", ".join(f"{k}={v}" for k, v in s.defaults.items()) or "--"
        table.add_row(s.name, "second" if s.second_order else "first", lrs, defaults, s.description,
                      optimizer_source(s.name))
    _stdout().print(table)


# -- reports: plot, table, scale, report, regress (issue 5; logic in bench.plots/tables/scale/report/regress)
_Dirs = Annotated[list[Path], typer.Argument(help="Result folder(s) written by `esgd-bench run`.")]
_Target = Annotated[Optional[float], typer.Option(
    help="Time-to-target threshold on the eval metric. (default: the task's target)")]
_TargetLoss = Annotated[Optional[float], typer.Option(
    help="Time to reach this training loss instead of the eval-metric target.")]


def _choice(option: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        _fail(f"{option} must be one of {', '.join(valid)}, got {value!r}")
    return value


def _report_errors() -> tuple[type[BaseException], ...]:
    from bench.regress import RegressError
    from bench.tables import ReportError
    return (ReportError, RegressError) + _input_errors()


@app.command()
def plot(dirs: _Dirs,
         x: Annotated[str, typer.Option(help="x-axis: step or time (training wall-clock seconds).")] = "step",
         metric: Annotated[str, typer.Option(help="loss (training) or eval (the task's eval metric).")] = "loss",
         log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y-axis.")] = False,
         out: Annotated[Optional[Path], typer.Option(
             help="Image file, .png, .svg or .pdf. (default: <first folder>/<metric>_vs_<x>.png)")] = None) -> None:
    """Curves of every optimizer: mean over seeds with a min-max band, HVP steps marked."""
    from bench.plots import plot_results
    _choice("--x", x, ("step", "time"))
    _choice("--metric", metric, ("loss", "eval"))
    out = out or dirs[0] / f"{metric}_vs_{x}.png"
    try:
        path = plot_results(dirs, out, x=x, metric=metric, log_y=log_y)
    except (*_report_errors(), ValueError, OSError) as error:
        _fail(str(error))
    _stdout().print(f"plot: {path}")


@app.command()
def table(dirs: _Dirs,
          format: Annotated[str, typer.Option("--format", help="rich, markdown or csv.")] = "rich",
          target: _Target = None, target_loss: _TargetLoss = None,
          out: Annotated[Optional[Path], typer.Option(help="Also write the table to FILE.csv or FILE.md.")] = None
          ) -> None:
    """Wall-clock table per task x optimizer: step and HVP cost, cost vs SGD/Adam, time to target, final loss."""
    from bench.tables import load_results, render_table, wall_clock_table, write_table
    _choice("--format", format, ("rich", "markdown", "csv"))
    try:
        frame = wall_clock_table(*load_results(dirs)[:2], target=target, target_loss=target_loss)
        if out is not None:
            write_table(frame, out)
    except (*_report_errors(), OSError) as error:
        _fail(str(error))
    shown = render_table(frame, format)
    if format == "rich":
        _stdout().print(shown)
    else:
        typer.echo(shown, nl=False)


@app.command()
def scale(task: Annotated[str, typer.Argument(help="Base task, e.g. rosenbrock, quadratic or mnist.")],
          kind: Annotated[str, typer.Option(help="loss (multiply the loss) or params (rescale the parameters).")],
          factors: Annotated[str, typer.Option(help="Comma-separated scale factors.")]
          = "1e-3,1e-2,1e-1,1,1e1,1e2,1e3",
          opt: _Opt = None, steps: _Steps = None,
          seeds: Annotated[int, typer.Option(help="Seeds per optimizer and factor.")] = 1,
          lr: Annotated[Optional[float], typer.Option(help="One lr for every optimizer (default: each "
                                                           "one's registry lr for the task).")] = None,
          flat_spread: Annotated[float, typer.Option(
              help="Call a line flat when (max - min) / min(|max|, |min|) of final loss <= this.")] = 0.5,
          device: _Device = None, option: _Option = None,
          out: Annotated[Optional[Path], typer.Option(
              help="Output folder. (default: results/scale-<task>-<kind>-<timestamp>)")] = None) -> None:
    """Scale-invariance study: each optimizer at ONE lr on TASK scaled by each factor; final loss vs factor."""
    import datetime as dt
    import os
    from rich.progress import Progress
    from bench import scale as study
    from bench.runner import _environment, resolve_device
    from tasks import TaskConfig
    _choice("--kind", kind, ("loss", "params"))
    if not flat_spread >= 0:
        _fail(f"--flat-spread must be a number >= 0, got {flat_spread}")
    try:
        factor_list = study.parse_factors(factors)
        optimizers = list(opt or study.DEFAULT_OPTIMIZERS)
        lrs = study.check_study(task, kind, optimizers, steps=steps, seeds=seeds, lr=lr)
        dev = resolve_device(device or "auto")
        config = TaskConfig(device=dev, options=_parse_options(option))
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = out or Path("results") / f"scale-{task}-{kind}-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            _fail(f"output folder {out} is not writable")
        total = len(optimizers) * len(factor_list) * seeds
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task(f"scale {task} ({kind})", total=total)
            runs = study.run_scale_study(task, kind, factors=factor_list, optimizers=optimizers, steps=steps,
                                         seeds=seeds, lr=lr, task_config=config,
                                         on_run=lambda row: progress.advance(bar))
        meta = {"command": "esgd-bench " + " ".join(sys.argv[1:]), "task": task, "kind": kind,
                "factors": factor_list, "optimizers": optimizers, "lrs": lrs, "steps": steps, "seeds": seeds,
                "options": dict(config.options), "synthetic": bool(runs["synthetic"].any()),
                "environment": _environment(dev)}
        paths = study.write_scale_outputs(runs, out, flat_spread=flat_spread, meta=meta)
    except OSError as error:
        _fail(f"cannot write to {out}: {error.strerror or error}")
    except (*_report_errors(), ValueError) as error:
        _fail(str(error))
    _stdout().print(study.scale_rich_table(runs, flat_spread))
    _stdout().print(f"scale study: {paths['runs']} and {paths['plot']}")
    if (runs["status"] == "interrupted").any():
        typer.echo(f"interrupted: the runs finished so far are in {out}", err=True)
        raise typer.Exit(130)


@app.command()
def report(dirs: _Dirs,
           out: Annotated[Optional[Path], typer.Option(help="Report folder. (default: <first folder>/report)")]
           = None,
           target: _Target = None, target_loss: _TargetLoss = None,
           title: Annotated[Optional[str], typer.Option(help="Page title.")] = None) -> None:
    """One Markdown page with the curves, the wall-clock table and the environment, images next to it."""
    from bench.report import build_report
    out = out or dirs[0] / "report"
    try:
        page = build_report(dirs, out, target=target, target_loss=target_loss, title=title)
    except (*_report_errors(), ValueError, OSError) as error:
        _fail(str(error))
    _stdout().print(f"report: {page}")


@app.command()
def regress(baseline: Annotated[Path, typer.Option(help="Baseline JSON.")] = Path("results/baselines/ci.json"),
            update: Annotated[bool, typer.Option("--update", help="Rerun the suite and rewrite the baseline.")]
            = False,
            tolerance_sigma: Annotated[float, typer.Option(help="K: allowed worsening in seed std units.")] = 3.0,
            rel_floor: Annotated[float, typer.Option(help="Least std assumed, as a fraction of the mean.")] = 0.05,
            out: Annotated[Optional[Path], typer.Option(help="Also write the comparison to FILE.csv.")] = None
            ) -> None:
    """Pinned fast convergence suite vs the committed baseline; exit 1 on any regression."""
    import os
    import time
    from rich.progress import Progress
    from bench import regress as rg
    suite = rg.PINNED_SUITE
    try:
        tol = rg.Tolerance(sigma=tolerance_sigma, rel_floor=rel_floor)
        old = None if update else rg.read_baseline(baseline, suite)
        if update and baseline.exists() and not os.access(baseline, os.W_OK):
            _fail(f"baseline {baseline} is not writable")
        n = len(suite.cases) * len(suite.optimizers) * len(suite.seeds)
        start = time.perf_counter()
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("regression suite", total=n)
            runs = rg.run_suite(suite, on_run=lambda row: progress.advance(bar))
        seconds = time.perf_counter() - start
        if (runs["status"] == "interrupted").any():
            typer.echo("interrupted: nothing compared, the baseline is unchanged", err=True)
            raise typer.Exit(130)
        if update:
            new = rg.make_baseline(runs, suite, seconds=seconds)
            rg.write_baseline(new, baseline)
            old = new
        result = rg.compare(runs, old, tol)
        if out is not None:
            from bench.results import write_csv_atomic
            write_csv_atomic(result, out)
    except OSError as error:
        _fail(str(error.strerror or error) + (f": {error.filename}" if error.filename else ""))
    except _report_errors() as error:
        _fail(str(error))
    console = _stdout()
    console.print(rg.regress_rich_table(result, tol))
    console.print(f"suite: {n} runs in {seconds:.1f} s"
                  + (f"; baseline written to {baseline}" if update else f"; baseline {baseline}"))
    failed = result[~result["passed"].astype(bool)]
    if len(failed):
        names = ", ".join(f"{r.task}/{r.optimizer} ({r.reason})" for r in failed.itertuples(index=False))
        typer.echo(f"regression: {len(failed)} of {len(result)} rows failed: {names}", err=True)
        raise typer.Exit(1)


@app.command()
def perf(task: Annotated[str, typer.Option(help="mnist, cifar or all.")] = "all",
         device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
         out: Annotated[Optional[Path], typer.Option(help="Output folder. (default: results/perf-<timestamp>)")]
         = None,
         compile: Annotated[bool, typer.Option("--compile", help="Also time compiled models (second order "
                                                                 "by finite differences).")] = False,
         rounds: Annotated[Optional[int], typer.Option(help="Timed rounds per task. (default: mnist 12, "
                                                            "cifar 5)")] = None,
         batch_size: _BatchSize = None,
         widths: Annotated[str, typer.Option(help="MLP widths of the parameter sweep, comma-separated; "
                                                  "'none' skips it.")] = "110,678,2789",
         memory: Annotated[bool, typer.Option(help="Measure peak memory in fresh processes.")] = True,
         threads: Annotated[Optional[int], typer.Option(help="torch threads. (default: torch's)")] = None,
         option: _Option = None) -> None:
    """Step cost of ESGD-M (exact, sub-batch and finite-difference HVP), ESGD, SGD and Adam, as ratios."""
    from bench import perf as pf
    from bench.runner import BenchError
    names = ["mnist", "cifar"] if task == "all" else [task]
    _choice("--task", task, ("mnist", "cifar", "all"))
    _choice("--device", device, ("cpu", "cuda", "auto"))
    try:
        width_list = [] if widths.strip().lower() in ("none", "") else [int(w) for w in widths.split(",")]
    except ValueError:
        _fail(f"--widths expects comma-separated integers such as 110,678,2789, got {widths!r}")
    options: dict[str, dict[str, str]] = {}
    for key, value in _parse_options(option).items():
        scope, dot, bare = key.rpartition(".")
        for name in ([scope] if dot else names):
            if name not in names:
                _fail(f"--option {key}: {scope!r} is not among the tasks ({', '.join(names)})")
            options.setdefault(name, {})[bare] = value
    config = pf.PerfConfig(tasks=names, device=device, out=out, compile=compile, rounds=rounds,
                           batch_size=batch_size, widths=width_list, memory=memory, threads=threads,
                           options=options)
    console = _stdout()
    try:
        with console.status("perf") as status:
            path, result = pf.run_perf(config, argv=["esgd-bench"] + sys.argv[1:],
                                       progress=lambda what, i, n: status.update(f"perf: {what} ({i + 1}/{n})"))
    except (*_input_errors(), BenchError, ValueError) as error:
        _fail(str(error))
    for shown in pf.perf_table(result):
        console.print(shown)
    console.print(pf.targets_table(pf.target_checks(result)))
    console.print(f"perf: {path / 'perf.csv'} and {path / 'meta.json'}")
