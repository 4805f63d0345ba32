"""The ``ckpttool`` command line: Click wiring only; the library does the work."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
from tabulate import tabulate_formats

from . import __version__
from .errors import EXIT_DANGEROUS, CheckpointError

EPILOG = """\b
Exit codes:
  0    success
  1    bad input (unreadable, corrupt or unsupported file) or a failed write
  2    usage error
  3    the pickle names dangerous globals (inspect reports them; writers refuse)
  130  interrupted (Ctrl-C / SIGTERM); nothing was written
"""


def _fail(err: CheckpointError) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(err.exit_code)


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CheckpointError as err:
        _fail(err)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="ckpttool")
def cli() -> None:
    """Inspect, fix and convert PyTorch checkpoints without running their code."""


@cli.command(epilog=EPILOG)
@click.argument("path", type=click.Path(path_type=str))
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor.")
@click.option("--filter", "name_filter", metavar="GLOB", help="Only tensors whose name matches.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--fmt",
    type=click.Choice(tabulate_formats),
    default="simple",
    show_default=True,
    help="Table format (any tabulate format).",
)
def inspect(
    path: str, show_tensors: bool, name_filter: str | None, as_json: bool, fmt: str
) -> None:
    """Show what is inside a checkpoint without loading it.

    Reads only the metadata: format, tensors, dtypes, the device each storage was saved
    from, state dicts and their key prefixes, other entries, and the globals the pickle
    names. Nothing in the file is executed, and torch is not imported.

    \b
    Example:
      ckpttool inspect best.pth
      ckpttool inspect best.pth --tensors --filter 'model.*'
      ckpttool inspect best.pth --json | jq .devices
    """
    from . import render, report
    from .readers import open_checkpoint

    ckpt = _run(lambda: open_checkpoint(path))
    rep = report.build(ckpt, tensor_filter=name_filter)
    if as_json:
        click.echo(render.to_json(rep))
    else:
        click.echo(render.summary(rep, fmt))
        if show_tensors or name_filter:
            click.echo("")
            click.echo(render.tensors_table(rep, fmt))
    dangerous = [g["name"] for g in rep["globals"] if g["kind"] == "dangerous"]
    if dangerous:
        click.echo(
            f"Danger: {render.escape(path)}: the pickle names dangerous globals "
            f"({', '.join(dangerous[:5])}); torch.load(weights_only=False) would run them",
            err=True,
        )
        sys.exit(EXIT_DANGEROUS)


def main() -> None:
    """Entry point: run the CLI, exiting quietly when stdout is closed early (``| head``)."""
    try:
        cli(standalone_mode=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
