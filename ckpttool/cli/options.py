"""Options and helpers the commands share: table formats, the key options of the writers and
how they become library arguments, shard sizes, and the writers' progress bars."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import signals
from .app import run_library

_FORMAT_EXAMPLES = ("simple", "github", "grid")


def table_format(value: str) -> str:
    """Check a --fmt value (tabulate silently falls back to ``simple`` on unknown names)."""
    from ..tables import tabulate_formats

    if value in tabulate_formats:
        return value
    from difflib import get_close_matches  # only for a name that is no format (1.5 ms)

    close = get_close_matches(value, tabulate_formats, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "e.g. " + ", ".join(_FORMAT_EXAMPLES)
    raise click.BadParameter(f"{value!r} is not one of the table formats: {hint} (see --help)")


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _progress_factory(quiet: bool) -> Callable[[int], Callable[[int], None] | None]:
    """Progress callbacks for the writers: a bar on stderr (a terminal) for jobs over 256 MB,
    none with -q; every callback also stops the write if a signal was swallowed meanwhile."""
    bars: list[Any] = []

    def make(total: int) -> Callable[[int], None] | None:
        if quiet or total < (256 << 20) or not sys.stderr.isatty():
            return lambda n: signals.check()
        from ..progress import Bar

        bar = Bar(total, "writing", sys.stderr)
        bars.append(bar)

        def update(n: int) -> None:
            signals.check()
            bar.update(n)

        update.phase = bar.phase  # type: ignore[attr-defined]  # see progress.phase
        return update

    make.bars = bars  # type: ignore[attr-defined]
    return make


def run_writer(quiet: bool, call: Callable[[Any], Any]) -> Any:
    """Run a writer with a progress-bar factory, erasing any bar it drew."""
    factory = _progress_factory(quiet)
    try:
        return run_library(lambda: call(factory))
    finally:
        for bar in getattr(factory, "bars", []):
            bar.close()


def run_ranked_writer(
    quiet: bool, as_json: bool, call: Callable[[Any, Any], Any]
) -> tuple[Any, bool, bool]:
    """Run a writer that torchrun may start in several ranks (``ops/ranks.py``): each rank
    writes its share and rank 0 alone reports. ``call(progress, ranks)``; returns the result
    and the ``quiet``, ``as_json`` this rank reports with."""
    from ..ops.ranks import Ranks

    ranks = Ranks.from_environment()
    if ranks is not None and ranks.rank != 0:
        quiet, as_json = True, False
    try:
        return run_writer(quiet, lambda progress: call(progress, ranks)), quiet, as_json
    finally:
        if ranks is not None:
            ranks.close()


def key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the writers: how to rename keys, cast, replace, verify."""
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
        click.option(
            "--dtype",
            type=click.Choice(["float16", "bfloat16", "float32"]),
            help="Cast floating-point tensors (others are untouched).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--no-verify", is_flag=True, help="Skip reading the output back."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# -- the vocabulary every command shares (README: "Conventions shared by every command") ----------
# Each shared option is defined once, here; tests/test_vocabulary.py checks every command
# spells it the same way.
STATE_DICT = click.option(
    "--state-dict",
    "state_dict",
    metavar="PATH",
    help="The state dict inside the checkpoint that key operations and checks apply to "
    "(e.g. model; default: the one found).",
)
ONLY = click.option(
    "--only", metavar="PATH", help="Write just this entry of the checkpoint (e.g. model, optim)."
)
ALL = click.option(
    "--all",
    "everything",
    is_flag=True,
    help="The whole checkpoint, not only the model state dict: every entry (optimizer, "
    "step, ...).",
)
FILTER = click.option(
    "--filter",
    "name_filter",
    metavar="GLOB",
    help="Only tensors whose name matches (a note on stderr when none does).",
)
JSON = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as one JSON document on stdout."
)
QUIET = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar and no report: errors are still one line on stderr, and the exit "
    "code says the rest.",
)
VERBOSE = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Say on stderr how many bytes and requests remote inputs (URLs) cost.",
)
FMT = click.option(
    "--fmt",
    metavar="FORMAT",
    default="simple",
    show_default=True,
    callback=lambda ctx, param, value: table_format(value),
    help="Table format: simple, github, grid, plain, tsv, ... (any tabulate format).",
)


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``, ``-q/--quiet`` and ``-v/--verbose``: how every command reports."""
    return JSON(QUIET(VERBOSE(fn)))


def deprecated_alias(old: str, new: str, dest: str) -> Callable[..., Any]:
    """A hidden ``old PATH`` option that still works as ``new`` (setting parameter ``dest``)
    and says so in one stderr line, even with -q: scripts written for the old spelling keep
    running while they are told the new one."""
    name = "deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(name)
            if value is not None:
                click.echo(f"warning: {old} is deprecated; use {new}", err=True)
                if kwargs.get(dest) not in (None, False):
                    raise click.UsageError(f"{old} is the old spelling of {new}: give one")
                kwargs[dest] = value
            return fn(*args, **kwargs)

        option = click.option(
            old, name, metavar="PATH", hidden=True, help=f"Deprecated spelling of {new}."
        )
        return option(command)

    return decorate


ALLOW_USER_CLASSES = click.option(
    "--allow-user-classes",
    is_flag=True,
    help="Also accept objects of classes from other modules (whole pickled models, configs, "
    "enums) and references to classes (an optimizer class in Lightning's hparams): loading the "
    "output imports those modules. Code is never written.",
)


def check_shard_folder(output_path: str) -> None:
    """--max-shard-size writes a folder: refuse a file name for it (transformers would find no
    weights in a folder called model.safetensors), with the command that does it right."""
    name = os.path.basename(os.path.normpath(output_path))
    if name.lower().endswith((".safetensors", ".json")) and not os.path.isdir(output_path):
        folder = os.path.join(os.path.dirname(os.path.normpath(output_path)) or ".", "")
        raise click.BadParameter(
            f"{output_path!r} is a file name, but --max-shard-size writes a folder (shards "
            f"and model.safetensors.index.json): give the folder, e.g. {folder!r}",
            param_hint="OUTPUT",
        )


def shard_size(max_shard_size: str | None, output_path: str) -> int | None:
    """The --max-shard-size in bytes (None without it), checking OUTPUT is a folder name."""
    if max_shard_size is None:
        return None
    from ..ops.prepare import parse_size

    try:
        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
    check_shard_folder(output_path)
    return shard


def is_shard_folder(path: str) -> bool:
    """Whether ``path`` is a folder of shards (DCP, DeepSpeed) that consolidate reads."""
    from ..readers import is_distributed_folder

    return is_distributed_folder(path)


def writer_kwargs(opts: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
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
    strip = (("module.",) if strip_module else ()) + tuple(opts.pop("strip_prefix"))
    add = tuple(opts.pop("add_prefix")) + (("module.",) if add_module else ())
    for prefix in dict.fromkeys(p for p in strip if p in add):
        said = (
            ("--strip-module" if strip_module else "--strip-prefix module."),
            ("--add-module" if add_module else "--add-prefix module."),
        )
        if prefix != "module.":
            said = (f"--strip-prefix {prefix}", f"--add-prefix {prefix}")
        raise click.UsageError(
            f"{said[0]} and {said[1]} undo each other (strip runs first, then add): give one"
        )
    kwargs = {
        "strip_prefix": strip,
        "add_prefix": add,
        "replace_prefix": tuple(replace),
        "verify": not opts.pop("no_verify"),
        **opts,  # dtype, force
    }
    return quiet, kwargs


# -- remote inputs: what reading them cost ------------------------------------------------------
def remote_usage() -> dict[str, Any] | None:
    """Bytes and requests the URLs read so far cost (None when no URL was read)."""
    remote = sys.modules.get("ckpttool.remote")
    if remote is None:
        return None
    usage = remote.traffic()
    return dict(usage.to_json()) if usage.requests else None


def echo_remote_usage(always: bool = False) -> None:
    """One stderr line per URL read, then the total (with ``always``, or not at all)."""
    from ..render import escape

    usage = remote_usage()
    if not always or usage is None:
        return
    for f in usage["files"]:
        click.echo(
            escape(f"remote: {f['url']}: {f['bytes']:,} bytes in {f['requests']} requests"),
            err=True,
        )
    if len(usage["files"]) > 1:
        click.echo(
            f"remote: {usage['bytes']:,} bytes in {usage['requests']} requests in all", err=True
        )
