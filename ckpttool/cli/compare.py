"""The comparing commands: ``diff`` (two checkpoints, key by key and tensor by tensor) and
``check`` (would load_state_dict succeed, and the convert command that fixes it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import EXIT_DANGEROUS, EXIT_DIFFERS
from .app import EPILOG, cli, run_library
from .fixes import fix_command
from .options import (
    ALL,
    FILTER,
    FMT,
    STATE_DICT,
    deprecated_alias,
    echo_remote_usage,
    output_options,
    remote_usage,
)

COMPARE_EPILOG = EPILOG  # exit code 4 (the inputs differ / would not load) is listed there


def _compare_bar(quiet: bool, bars: list[Any]) -> Callable[[int], Callable[[int], None] | None]:
    """A 'comparing' progress bar on stderr for large inputs (opened bars go to ``bars``)."""

    def make(total: int) -> Callable[[int], None] | None:
        if quiet or total < (256 << 20) or not sys.stderr.isatty():
            return None
        bar = click.progressbar(length=total, label="comparing", file=sys.stderr)
        bar.__enter__()
        bars.append(bar)
        return bar.update

    return make


def _danger_exit(names: tuple[str, ...]) -> None:
    if names:
        click.echo(
            f"Danger: the pickles name dangerous globals ({', '.join(names[:5])}); ckpttool "
            "never ran them, but torch.load(weights_only=False) would",
            err=True,
        )
        sys.exit(EXIT_DANGEROUS)


@cli.command(epilog=COMPARE_EPILOG)
@click.argument("a", metavar="A", type=str)
@click.argument("b", metavar="B", type=str)
@click.option("--values", is_flag=True, help="Compare values: max/mean abs diff, rel. L2, count.")
@click.option("--atol", type=float, default=0.0, help="Absolute tolerance (with --values).")
@click.option("--rtol", type=float, default=0.0, help="Relative tolerance (with --values).")
@ALL
@FILTER
@FMT
@output_options
def diff(
    a: str,
    b: str,
    values: bool,
    atol: float,
    rtol: float,
    everything: bool,
    name_filter: str | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    fmt: str,
) -> None:
    """Compare two checkpoints key by key and tensor by tensor (any formats, mixed).

    Compares the model state dicts (or with --all every tensor by path), aligning keys that
    differ only by a wrapper prefix; tensors bit for bit, streamed from both files; with
    --values also how far the values are. Non-tensor entries (epoch, args) are compared too.
    With -q nothing is printed: exit code 0 says they are the same, 4 that they differ.

    \b
    Example:
      ckpttool diff best.pth best.safetensors
      ckpttool diff before.pt after.pt --values --atol 1e-6
      ckpttool diff before.pt after.pt --filter 'encoder.*'
    """
    from ..ops.diff import diff as do_diff
    from ..render import to_json
    from ..render_diff import diff_dict, diff_text

    if (atol or rtol) and not values:
        raise click.UsageError("--atol and --rtol apply to --values: add --values")
    bars: list[Any] = []
    how: dict[str, Any] = {"values": values, "atol": atol, "rtol": rtol, "all_tensors": everything}
    try:
        progress = _compare_bar(quiet or as_json, bars)
        result = run_library(
            lambda: do_diff(a, b, **how, tensor_filter=name_filter, progress=progress)
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    if name_filter and not (result.tensors or result.only_a or result.only_b) and not quiet:
        _no_match(name_filter)
    out = diff_dict(result) if as_json else None
    usage = remote_usage()
    if out is not None and usage is not None:
        out["remote"] = usage
    echo_remote_usage(verbose and not quiet)
    if out is not None:
        click.echo(to_json(out))
    elif not quiet:
        click.echo(diff_text(result, fmt))
    _danger_exit(result.dangerous)
    sys.exit(0 if result.equal else EXIT_DIFFERS)


def _no_match(name_filter: str) -> None:
    """diff --filter matched no tensor: a note, as inspect says it."""
    from ..render import escape

    click.echo(
        f"note: no tensor name matches --filter {escape(name_filter)!r} (the pattern must "
        "match a whole dotted name, e.g. 'model.*')",
        err=True,
    )


@cli.command(epilog=COMPARE_EPILOG)
@click.argument("ckpt", metavar="CKPT", type=str)
@click.option("--against", metavar="REF", help="A checkpoint/safetensors/HF index with its keys.")
@click.option(
    "--model",
    "model_spec",
    metavar="MODULE:FACTORY",
    help="Build FACTORY() from MODULE on the meta device (imports and runs that code).",
)
@STATE_DICT
@output_options
@deprecated_alias("--key", "--state-dict", "state_dict")
def check(
    ckpt: str,
    against: str | None,
    model_spec: str | None,
    state_dict: str | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Say whether model.load_state_dict(sd, strict=True) would succeed, and how to fix it.

    The model is REF's state dict (a safetensors file, a Hugging Face index or folder, any
    checkpoint), or with --model a real model built on the meta device (no memory used; this
    imports and runs MODULE). Reports missing, unexpected and mismatched keys, grouped, and
    the fix: a prefix to strip/add/replace (the convert command), a transposed weight, a
    resized vocabulary, tied weights stored once, dtype casts.

    \b
    Example:
      ckpttool check ddp_best.pth --against model.safetensors
      ckpttool check train.ckpt --model mypkg.models:build_model
    """
    from ..ops.check import check as do_check
    from ..render import to_json
    from ..render_diff import check_dict, check_text

    if (against is None) == (model_spec is None):
        raise click.UsageError("give one of --against REF or --model MODULE:FACTORY")
    result = run_library(lambda: do_check(ckpt, against, model=model_spec, key=state_dict))
    command = fix_command(result, ckpt)
    usage = remote_usage()
    echo_remote_usage(verbose and not quiet)
    if as_json:
        out = check_dict(result, command)
        if usage is not None:
            out["remote"] = usage
        click.echo(to_json(out))
    elif not quiet:
        click.echo(check_text(result, command))
    _danger_exit(result.dangerous)
    sys.exit(0 if result.loads else EXIT_DIFFERS)
