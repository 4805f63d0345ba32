"""The reading commands: ``inspect`` (what a checkpoint holds) and ``scan`` (which files can
run code when loaded)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import (
    EXIT_DANGEROUS,
    EXIT_UNPROVEN,
    EXIT_UNVETTED,
    CheckpointError,
    DangerousCheckpointError,
)
from .app import EPILOG, cli, fail
from .fixes import warning_texts
from .options import FILTER, FMT, echo_remote_usage, given, output_options, remote_usage


@cli.command(epilog=EPILOG)
@click.argument("path", type=str)
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor.")
@FILTER
@FMT
@output_options
def inspect(
    path: str,
    show_tensors: bool,
    name_filter: str | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    fmt: str,
) -> None:
    """Show what is inside a checkpoint without loading it.

    Reads only the metadata: format, tensors, dtypes, the device each storage was saved
    from, state dicts and their key prefixes, other entries, and the globals the pickle
    names. Nothing in the file is executed, and torch is not imported. PATH may be a URL
    (https://, hf://, s3://, gs://: only the metadata bytes are fetched, by range requests).

    \b
    Example:
      ckpttool inspect best.pth
      ckpttool inspect best.pth --tensors --filter 'model.*'
      ckpttool inspect best.pth --json | jq .devices
      ckpttool inspect hf://org/model/pytorch_model.bin -v
    """
    from .. import render
    from ..analysis import report
    from ..readers import open_checkpoint

    if as_json and given(click.get_current_context(), "fmt"):
        raise click.UsageError("--fmt formats tables; --json prints JSON: give one of them")
    try:
        ckpt = open_checkpoint(path)
    except DangerousCheckpointError as err:  # hostile and broken: report what it names
        if as_json:
            click.echo(render.to_json(warning_texts(report.broken(path, err))))
        fail(err)
    except CheckpointError as err:
        fail(err)
    rep = warning_texts(report.build(ckpt, tensor_filter=name_filter))
    if name_filter and not rep["tensors"] and not quiet:
        click.echo(
            f"note: no tensor name matches --filter {render.escape(name_filter)!r} "
            f"({rep['tensor_count']} tensors; the pattern must match a whole dotted name, "
            "e.g. 'model.*')",
            err=True,
        )
    usage = remote_usage()
    if usage is not None:
        rep["remote"] = usage
    echo_remote_usage(verbose and not quiet)
    if as_json:
        click.echo(render.to_json(rep))
    elif not quiet:
        click.echo(render.summary(rep, fmt))
        if show_tensors or name_filter:
            click.echo("")
            click.echo(render.tensors_table(rep, fmt))
    _danger_exit(path, rep)


def _danger_exit(path: str, rep: dict[str, Any]) -> None:
    """Exit 3, saying so on stderr, when the pickle names dangerous globals."""
    from ..render import escape

    dangerous = [g["name"] for g in rep["globals"] if g["kind"] == "dangerous"]
    if dangerous:
        click.echo(
            f"Danger: {escape(path)}: the pickle names dangerous globals "
            f"({', '.join(dangerous[:5])}); torch.load(weights_only=False) would run them",
            err=True,
        )
        sys.exit(EXIT_DANGEROUS)


@cli.command(epilog=EPILOG)
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=str)
@output_options
def scan(paths: tuple[str, ...], as_json: bool, quiet: bool, verbose: bool) -> None:
    """Prove which files are safe to load, without loading them.

    Reads only pickles and headers (never tensor bytes) of each file, and of each
    checkpoint file under each folder (recursively: Hugging Face snapshots, sharded
    indexes, DCP and DeepSpeed folders, numpy arrays), the way torch's (or numpy's) loader
    reads them. One line per file: safe (every call loading makes is to an allowlisted
    callable), unvetted code (loading imports and runs classes or TorchScript nobody
    vetted: whole pickled models), unreadable (cannot be read, or not provably as torch
    reads it), or dangerous, with what decides it. Exits 0 only if every file is safe:
    3 if any is dangerous, else 6 if any is unreadable, else 5 if any holds unvetted code.
    A PATH may be a URL, or a folder URL: a Hub repo (hf://org/name), a bucket prefix, an
    HTTP folder with an index page.

    \b
    Example:
      ckpttool scan downloads/model.bin
      ckpttool scan ~/.cache/huggingface/hub --json \\
        | jq '.files[] | select(.verdict != "safe")'
      ckpttool scan hf://org/model s3://bucket/checkpoints/ -v
    """
    from .. import render
    from ..ops.scan import scan as do_scan

    result = do_scan(paths)
    usage = remote_usage()
    echo_remote_usage(verbose and not quiet)
    if as_json:
        out = result.to_json()
        if usage is not None:
            out["remote"] = usage
        click.echo(render.to_json(out))
    elif not quiet:
        for f in result.files:
            click.echo(render.escape(_scan_line(f)))
    worst, n = result.worst, len(result.files)
    bad = [f.path for f in result.files if f.verdict == worst]
    shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    if worst == "dangerous":
        line = f"Danger: {len(bad)} of {n} files can run code when loaded: {shown}"
    elif worst == "unreadable":
        line = f"Error: {len(bad)} of {n} files cannot be proven safe (unreadable): {shown}"
    elif worst == "unvetted code":
        line = f"Unvetted: {len(bad)} of {n} files run unvetted code when loaded: {shown}"
    else:
        return
    click.echo(render.escape(line), err=True)
    sys.exit(SCAN_EXIT[worst])


SCAN_EXIT = {
    "dangerous": EXIT_DANGEROUS,
    "unreadable": EXIT_UNPROVEN,
    "unvetted code": EXIT_UNVETTED,
}


def _scan_line(f: Any) -> str:
    why = f.error or ", ".join(f"{g.name} ({'; '.join(g.uses)})" for g in f.deciding[:5])
    if not why and f.reasons:
        why = f.reasons[0]
    more = f" and {len(f.deciding) - 5} more" if len(f.deciding) > 5 else ""
    return f"{f.verdict:<13} {f.path}" + (f": {why}{more}" if why else "")
