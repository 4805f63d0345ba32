"""The ``ckpttool`` command line: Click wiring only; the library does the work."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
from tabulate import tabulate_formats

from . import __version__
from .errors import EXIT_DANGEROUS, CheckpointError, DangerousCheckpointError

EPILOG = """\b
Exit codes:
  0    success
  1    bad input (unreadable, corrupt or unsupported file) or a failed write
  2    usage error
  3    the pickle names dangerous globals (inspect reports them; writers refuse)
  130  interrupted (Ctrl-C / SIGTERM); nothing was written
"""


def _fail(err: CheckpointError) -> None:
    from .render import escape

    prefix = "Danger: " if err.exit_code == EXIT_DANGEROUS else "Error: "
    click.echo(prefix + escape(str(err)), err=True)
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
@click.argument("path", type=str)
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
    from . import render
    from .analysis import report
    from .readers import open_checkpoint

    try:
        ckpt = open_checkpoint(path)
    except DangerousCheckpointError as err:  # hostile and broken: report what it names
        if as_json:
            click.echo(render.to_json(report.broken(path, err)))
        _fail(err)
    except CheckpointError as err:
        _fail(err)
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


def _progress_factory(quiet: bool) -> Callable[[int], Callable[[int], None] | None]:
    """A progress bar on stderr for large jobs (over 256 MB), silent with -q."""
    bars: list[Any] = []

    def make(total: int) -> Callable[[int], None] | None:
        if quiet or total < (256 << 20):
            return None
        bar = click.progressbar(length=total, label="writing", file=sys.stderr, show_eta=True)
        bar.__enter__()
        bars.append(bar)
        return bar.update

    make.bars = bars  # type: ignore[attr-defined]
    return make


def _run_writer(quiet: bool, call: Callable[[Any], Any]) -> Any:
    """Run a writer with a progress-bar factory, closing any bar it opened."""
    factory = _progress_factory(quiet)
    try:
        return _run(lambda: call(factory))
    finally:
        for bar in getattr(factory, "bars", []):
            bar.__exit__(None, None, None)


def key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by convert and to-safetensors: which state dict and how to rename keys."""
    options = [
        click.option("--strip-module", is_flag=True, help="Remove 'module.' (DataParallel/DDP)."),
        click.option("--add-module", is_flag=True, help="Add 'module.' where it is missing."),
        click.option("--strip-prefix", multiple=True, metavar="P", help="Remove prefix P."),
        click.option("--add-prefix", multiple=True, metavar="P", help="Add prefix P."),
        click.option(
            "--replace-prefix",
            multiple=True,
            metavar="OLD=NEW",
            help="Replace prefix OLD by NEW (e.g. _orig_mod.= or model.=).",
        ),
        click.option("--key", metavar="PATH", help="The state dict to rename (e.g. model)."),
        click.option(
            "--dtype",
            type=click.Choice(["float16", "bfloat16", "float32"]),
            help="Cast floating-point tensors (others are untouched).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--no-verify", is_flag=True, help="Skip reading the output back."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or report."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _writer_kwargs(opts: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Turn the shared options (``key_options``) into library keyword arguments.

    Returns (quiet, kwargs); ``opts`` is what Click passed for them.
    """
    replace = []
    for spec in opts.pop("replace_prefix"):
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r} is not OLD=NEW", param_hint="--replace-prefix")
        old, new = spec.split("=", 1)
        replace.append((old, new))
    strip_module, add_module = opts.pop("strip_module"), opts.pop("add_module")
    quiet = opts.pop("quiet")
    kwargs = {
        "strip_prefix": (("module.",) if strip_module else ()) + tuple(opts.pop("strip_prefix")),
        "add_prefix": tuple(opts.pop("add_prefix")) + (("module.",) if add_module else ()),
        "replace_prefix": tuple(replace),
        "verify": not opts.pop("no_verify"),
        **opts,  # key, dtype, force
    }
    return quiet, kwargs


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@click.option("--only", metavar="PATH", help="Write just this entry (e.g. model).")
@click.option(
    "--plain-objects",
    is_flag=True,
    help="Replace objects torch.load(weights_only=True) refuses (argparse.Namespace, numpy "
    "scalars and arrays, ...) by plain dicts, numbers and tensors.",
)
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be INPUT (still atomic).")
def convert(
    input_path: str,
    output_path: str,
    only: str | None,
    plain_objects: bool,
    in_place: bool,
    **opts: Any,
) -> None:
    """Re-save a checkpoint for CPU, optionally renaming keys.

    Writes a torch zip file in which every storage is tagged cpu, whatever device it was
    saved from, so a plain torch.load works anywhere. Storage bytes are copied as they are;
    the output is written to a temp file, verified, then renamed into place.

    \b
    Example:
      ckpttool convert ddp_best.pth best_cpu.pt --strip-module
      ckpttool convert model.safetensors model.pt --add-module
      ckpttool convert train.ckpt weights.pt --only state_dict --replace-prefix model.=
    """
    from .ops.convert import convert as do_convert
    from .render import escape

    quiet, kwargs = _writer_kwargs(opts)
    result = _run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            only=only,
            plain_objects=plain_objects,
            in_place=in_place,
            progress=progress,
            **kwargs,
        ),
    )
    if quiet:
        return
    for sd_path, n in result.renamed:
        where = f"'{escape(sd_path)}'" if sd_path else "(root)"
        click.echo(f"renamed {n} keys in state dict {where}", err=True)
    for r in result.replaced:
        click.echo(f"replaced {r}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    check = "verified" if result.verified else "not verified"
    click.echo(
        f"wrote {escape(output_path)}: {result.tensors} tensors in {result.storages} storages, "
        f"all on cpu ({check})",
        err=True,
    )


@cli.command(name="to-safetensors", epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@click.option("--all", "all_tensors", is_flag=True, help="Write every tensor, named by path.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Add to __metadata__.")
@click.option(
    "--duplicate-shared",
    is_flag=True,
    help="Write tied/shared tensors as independent copies instead of one copy + aliases.",
)
@click.option("--keep", multiple=True, metavar="NAME", help="Prefer NAME when deduplicating.")
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard into OUTPUT/ (a folder) with model.safetensors.index.json, e.g. 5GB.",
)
def to_safetensors(
    input_path: str,
    output_path: str,
    all_tensors: bool,
    metadata: tuple[str, ...],
    duplicate_shared: bool,
    keep: tuple[str, ...],
    max_shard_size: str | None,
    **opts: Any,
) -> None:
    """Write a checkpoint's tensors as safetensors (streamed, verified).

    By default writes the model state dict found in the checkpoint (a bare state dict, or
    model/state_dict/... inside a training checkpoint). Scalar entries (epoch, step) go to
    __metadata__ as strings with {"format": "pt"}; what is left out is reported. Tied
    weights are stored once and their aliases recorded in __metadata__.

    \b
    Example:
      ckpttool to-safetensors best.pth model.safetensors --strip-module
      ckpttool to-safetensors big.pt out/ --max-shard-size 5GB
    """
    from .ops.to_safetensors import parse_size
    from .ops.to_safetensors import to_safetensors as do_convert
    from .render import escape

    quiet, kwargs = _writer_kwargs(opts)
    meta = {}
    for spec in metadata:
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r} is not KEY=VALUE", param_hint="--metadata")
        k, v = spec.split("=", 1)
        meta[k] = v
    shard = None
    if max_shard_size is not None:
        try:
            shard = parse_size(max_shard_size)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
    result = _run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            all_tensors=all_tensors,
            metadata=meta,
            duplicate_shared=duplicate_shared,
            keep=keep,
            max_shard_size=shard,
            progress=progress,
            **kwargs,
        ),
    )
    if quiet:
        return
    if result.renamed:
        click.echo(f"renamed {result.renamed} keys", err=True)
    for alias, kept in result.aliases.items():
        click.echo(f"shared: {escape(alias)} is stored once as {escape(kept)}", err=True)
    for item in result.left_out:
        click.echo(f"left out: {escape(item)}", err=True)
    check = "verified" if result.verified else "not verified"
    where = escape(output_path)
    files = f" in {len(result.files) - 1} shards" if max_shard_size else ""
    click.echo(f"wrote {where}: {result.tensors} tensors{files} ({check})", err=True)
