"""esgd-bench: the command-line front end (a thin Typer app; the logic lives in bench/ and tasks/)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

import esgd

app = typer.Typer(help="Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"esgd-bench {esgd.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None) -> None:
    """Benchmark ESGD-M against ESGD, SGD, Adam and other optimizers."""
