"""The ``ckpttool`` command line: Click wiring only; the library does the work."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from . import signals

if signals.running_as("ckpttool"):
    # This process is the ckpttool program (its console script imports this module before it
    # calls main): take the signals now, before click is imported, and raise one caught
    # meanwhile once main() is running. Library users and tests importing this module keep
    # their own handlers.
    signals.install(defer=True)

import click

from . import __version__
from .errors import (
    EXIT_DANGEROUS,
    EXIT_DIFFERS,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ArgumentError,
    CheckpointError,
    DangerousCheckpointError,
)

EPILOG = """\b
Exit codes:
  0    success (also when a reader such as head closes the output early)
  1    bad input (unreadable, corrupt or unsupported file) or a failed write
  2    usage error
  3    the pickle names dangerous globals (inspect reports, writers refuse)
  130  interrupted (SIGINT, SIGTERM or SIGHUP); nothing was written
"""


# How to fix a library error, in this command line's flags (the library says it in its own
# argument names: ckpttool.errors.REMEDIES).
REMEDIES = {
    "force": "; pass --force to replace it",
    "in_place": "; pass --in-place to replace it",
    "key": " (--key)",
    "choose_key": "; choose one with --key",
    "key_or_all": ": choose one with --key PATH, or use --all",
    "all_tensors": ": use --all to write its tensors",
    "extract_torchscript": "; use `ckpttool to-safetensors --all` to extract its tensors",
    "allow_user_classes": "; pass --allow-user-classes to write them, or --plain-objects to "
    "replace them",
}


def error_line(err: CheckpointError) -> str:
    """The one line the command prints for ``err``: the library's words, the CLI's remedy."""
    text = err.message + (REMEDIES[err.remedy] if err.remedy else "")
    return f"{err.path}: {text}" if err.path is not None else text


def _fail(err: CheckpointError) -> None:
    from .render import escape

    bar = sys.modules.get("ckpttool.progress")
    if bar is not None:
        bar.clear_line()
    if isinstance(err, ArgumentError):  # the file does not hold what an option names
        flag = "--" + err.argument.replace("_", "-")
        click.echo(f"Error: Invalid value for '{flag}': {escape(error_line(err))}", err=True)
        sys.exit(EXIT_USAGE)
    prefix = "Danger: " if err.exit_code == EXIT_DANGEROUS else "Error: "
    click.echo(prefix + escape(error_line(err)), err=True)
    sys.exit(err.exit_code)


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CheckpointError as err:
        _fail(err)


class _Group(click.Group):
    """The root group: a reader that closes stdout early (``| head``) ends the command quietly,
    with exit 0: what it read was printed in full."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise  # another pipe: Click reports it (exit 1)
            _stdout_gone()
            ctx.exit(0)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _stdout_gone() -> None:
    """Point stdout at /dev/null so that flushing it at exit raises no second BrokenPipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="ckpttool")
def cli() -> None:
    """Inspect, fix and convert PyTorch checkpoints without running their code."""


@cli.command(epilog=EPILOG)
@click.argument("path", type=str)
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor.")
@click.option(
    "--filter",
    "name_filter",
    metavar="GLOB",
    help="Only tensors whose name matches (a note on stderr when none does).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--fmt",
    metavar="FORMAT",
    default="simple",
    show_default=True,
    callback=lambda ctx, param, value: _table_format(value),
    help="Table format: simple, github, grid, plain, tsv, ... (any tabulate format).",
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

    if as_json and _given(click.get_current_context(), "fmt"):
        raise click.UsageError("--fmt formats tables; --json prints JSON: give one of them")
    try:
        ckpt = open_checkpoint(path)
    except DangerousCheckpointError as err:  # hostile and broken: report what it names
        if as_json:
            click.echo(render.to_json(report.broken(path, err)))
        _fail(err)
    except CheckpointError as err:
        _fail(err)
    rep = report.build(ckpt, tensor_filter=name_filter)
    if name_filter and not rep["tensors"]:
        click.echo(
            f"note: no tensor name matches --filter {render.escape(name_filter)!r} "
            f"({rep['tensor_count']} tensors; the pattern must match a whole dotted name, "
            "e.g. 'model.*')",
            err=True,
        )
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


@cli.command(epilog=EPILOG)
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def scan(paths: tuple[str, ...], as_json: bool) -> None:
    """Tell which files can run code when loaded, without loading them.

    Reads only pickles and headers (never tensor bytes) of each file, and of each
    checkpoint file under each folder (recursively: Hugging Face snapshots, sharded
    indexes, DCP and DeepSpeed folders). One line per file: safe, user code (loading
    imports that module), or dangerous, with the globals that decide it. Exits 3 if any
    file is dangerous, 1 if any could not be read.

    \b
    Example:
      ckpttool scan downloads/model.bin
      ckpttool scan ~/.cache/huggingface/hub --json \\
        | jq '.files[] | select(.verdict != "safe")'
    """
    from . import render
    from .ops.scan import scan as do_scan

    result = do_scan(paths)
    if as_json:
        click.echo(render.to_json(result.to_json()))
    else:
        for f in result.files:
            why = f.error or ", ".join(f"{g.name} ({'; '.join(g.uses)})" for g in f.deciding[:5])
            more = f" and {len(f.deciding) - 5} more" if len(f.deciding) > 5 else ""
            line = f"{f.verdict:<10} {f.path}" + (f": {why}{more}" if why else "")
            click.echo(render.escape(line))
    n = len(result.files)
    if result.dangerous:
        shown = ", ".join(result.dangerous[:3]) + (" ..." if len(result.dangerous) > 3 else "")
        click.echo(
            render.escape(
                f"Danger: {len(result.dangerous)} of {n} files can run code when loaded: {shown}"
            ),
            err=True,
        )
        sys.exit(EXIT_DANGEROUS)
    if result.errors:
        click.echo(
            render.escape(
                f"Error: {len(result.errors)} of {n} files could not be scanned: "
                f"{', '.join(result.errors[:3])}"
            ),
            err=True,
        )
        sys.exit(1)


_FORMAT_EXAMPLES = ("simple", "github", "grid")


def _table_format(value: str) -> str:
    """Check a --fmt value (tabulate silently falls back to ``simple`` on unknown names)."""
    from difflib import get_close_matches

    from tabulate import tabulate_formats

    if value in tabulate_formats:
        return value
    close = get_close_matches(value, tabulate_formats, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "e.g. " + ", ".join(_FORMAT_EXAMPLES)
    raise click.BadParameter(f"{value!r} is not one of the table formats: {hint} (see --help)")


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


# -- diff and check -----------------------------------------------------------------------------
COMPARE_EPILOG = EPILOG.replace(
    "  130", "  4    the inputs differ (diff) / the checkpoint would not load (check)\n  130"
)


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
@click.option("--all", "all_tensors", is_flag=True, help="Every tensor by path, not state dicts.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--fmt",
    metavar="FORMAT",
    default="simple",
    callback=lambda ctx, param, value: _table_format(value),
    help="Table format (any tabulate format).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def diff(
    a: str,
    b: str,
    values: bool,
    atol: float,
    rtol: float,
    all_tensors: bool,
    as_json: bool,
    fmt: str,
    quiet: bool,
) -> None:
    """Compare two checkpoints key by key and tensor by tensor (any formats, mixed).

    Compares the model state dicts (or with --all every tensor by path), aligning keys that
    differ only by a wrapper prefix; tensors bit for bit, streamed from both files; with
    --values also how far the values are. Non-tensor entries (epoch, args) are compared too.

    \b
    Example:
      ckpttool diff best.pth best.safetensors
      ckpttool diff before.pt after.pt --values --atol 1e-6
    """
    from .ops.diff import diff as do_diff
    from .render import to_json
    from .render_diff import diff_dict, diff_text

    if (atol or rtol) and not values:
        raise click.UsageError("--atol and --rtol apply to --values: add --values")
    bars: list[Any] = []
    try:
        result = _run(
            lambda: do_diff(
                a,
                b,
                values=values,
                atol=atol,
                rtol=rtol,
                all_tensors=all_tensors,
                progress=_compare_bar(quiet or as_json, bars),
            )
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    click.echo(to_json(diff_dict(result)) if as_json else diff_text(result, fmt))
    _danger_exit(result.dangerous)
    sys.exit(0 if result.equal else EXIT_DIFFERS)


def _fix_command(result: Any, ckpt: str) -> str | None:
    """The ``ckpttool convert`` command(s) that apply a check's key fixes."""
    import shlex

    if not result.fixes:
        return None
    stem = os.path.splitext(ckpt.rstrip("/"))[0]
    rank = {"strip": 0, "replace": 1, "add": 2}
    fixes = list(result.fixes)
    # convert applies strips, then replacements, then additions: one command when that order
    # is the fixes' own, else one command per fix
    in_order = [rank[f.action] for f in fixes] == sorted(rank[f.action] for f in fixes)
    steps = [fixes] if in_order else [[f] for f in fixes]
    commands, src = [], ckpt
    for i, step in enumerate(steps):
        out = f"{stem}_fixed.pt" if i == len(steps) - 1 else f"{stem}_step{i + 1}.pt"
        args = ["ckpttool", "convert", src, out]
        if result.select and i == 0:
            args += ["--only", result.select]
        for f in step:
            if f.action == "strip":
                args += ["--strip-module"] if f.old == "module." else ["--strip-prefix", f.old]
            elif f.action == "add":
                args += ["--add-module"] if f.new == "module." else ["--add-prefix", f.new]
            else:
                args += ["--replace-prefix", f"{f.old}={f.new}"]
        commands.append(" ".join(shlex.quote(x) for x in args))
        src = out
    return " && ".join(commands)


@cli.command(epilog=COMPARE_EPILOG)
@click.argument("ckpt", metavar="CKPT", type=str)
@click.option("--against", metavar="REF", help="A checkpoint/safetensors/HF index with its keys.")
@click.option(
    "--model",
    "model_spec",
    metavar="MODULE:FACTORY",
    help="Build FACTORY() from MODULE on the meta device (imports and runs that code).",
)
@click.option("--key", metavar="PATH", help="The state dict in CKPT to check (e.g. model).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(
    ckpt: str, against: str | None, model_spec: str | None, key: str | None, as_json: bool
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
    from .ops.check import check as do_check
    from .render import to_json
    from .render_diff import check_dict, check_text

    if (against is None) == (model_spec is None):
        raise click.UsageError("give one of --against REF or --model MODULE:FACTORY")
    result = _run(lambda: do_check(ckpt, against, model=model_spec, key=key))
    command = _fix_command(result, ckpt)
    click.echo(to_json(check_dict(result, command)) if as_json else check_text(result, command))
    _danger_exit(result.dangerous)
    sys.exit(0 if result.loads else EXIT_DIFFERS)


def main() -> None:
    """Entry point of ``ckpttool`` and ``python -m ckpttool``.

    Installs the signal policy first (``signals.install``): SIGINT, SIGTERM and SIGHUP end
    any command with one line, no temp file left, and exit code 130. A reader closing stdout
    early (``| head``) ends it with exit 0.
    """
    signals.install()
    try:
        signals.release()
        cli(standalone_mode=True)
    except signals.Interrupted:
        _interrupted()
    except SystemExit:
        if signals.received() is not None:  # caught, then swallowed on its way: still stop
            _interrupted()
        raise
    if signals.received() is not None:
        _interrupted()


def _interrupted() -> None:
    """Stop now: remove what a write left, say so in one line, exit with EXIT_INTERRUPTED.

    Imports nothing: the signal may have cut an import short.
    """
    signals.stop()
    atomic = sys.modules.get("ckpttool.writers.atomic")  # no write began if it was not imported
    bar = sys.modules.get("ckpttool.progress")
    written: list[str] = []
    if atomic is not None:
        atomic.remove_temps()
        written = atomic.written_outputs()
    if bar is not None:
        bar.clear_line()
    target = _output[0] if _output else None
    if target is None:
        line = "Error: interrupted; nothing was written"
    elif any(_same_path(w, target) for w in written):
        line = f"Error: {target}: interrupted after the output was written (it is complete)"
    else:
        line = f"Error: {target}: interrupted; nothing was written"
    if not line.isprintable():
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is sys.stderr:
                stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)  # no more Python code runs: no atexit hook, no thread join


_output: list[str] = []  # the output the running command writes (named when interrupted)


def _writes(output_path: str) -> None:
    """Record the output the command writes, to name it if the command is interrupted."""
    _output[:] = [output_path]


def _same_path(written: str, given: str) -> bool:
    """Whether an output written (link resolved) is the one the user named."""
    given = os.path.realpath(given) if os.path.islink(given) else given
    return os.path.abspath(written) == os.path.abspath(given)


def _progress_factory(quiet: bool) -> Callable[[int], Callable[[int], None] | None]:
    """Progress callbacks for the writers: a bar on stderr (a terminal) for jobs over 256 MB,
    none with -q; every callback also stops the write if a signal was swallowed meanwhile."""
    bars: list[Any] = []

    def make(total: int) -> Callable[[int], None] | None:
        if quiet or total < (256 << 20) or not sys.stderr.isatty():
            return lambda n: signals.check()
        from .progress import Bar

        bar = Bar(total, "writing", sys.stderr)
        bars.append(bar)

        def update(n: int) -> None:
            signals.check()
            bar.update(n)

        return update

    make.bars = bars  # type: ignore[attr-defined]
    return make


def _run_writer(quiet: bool, call: Callable[[Any], Any]) -> Any:
    """Run a writer with a progress-bar factory, erasing any bar it drew."""
    factory = _progress_factory(quiet)
    try:
        return _run(lambda: call(factory))
    finally:
        for bar in getattr(factory, "bars", []):
            bar.close()


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


ALLOW_USER_CLASSES = click.option(
    "--allow-user-classes",
    is_flag=True,
    help="Also accept objects of classes from other modules (whole pickled models, configs, "
    "enums): loading the output imports those modules. Code is never written.",
)


def _check_shard_folder(output_path: str) -> None:
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
        **opts,  # key, dtype, force
    }
    return quiet, kwargs


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@ALLOW_USER_CLASSES
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
      ckpttool convert train.ckpt w.pt --only state_dict --replace-prefix model.=
    """
    _writes(output_path)
    from .ops.convert import convert as do_convert
    from .render import escape

    quiet, kwargs = _writer_kwargs(opts)
    if _is_shard_folder(input_path):  # DCP / DeepSpeed: consolidated, with the same options
        if plain_objects or in_place or kwargs.get("key"):
            raise click.UsageError(
                "--plain-objects, --in-place and --key do not apply to a folder of shards"
            )
        _consolidate_folder(input_path, output_path, quiet, kwargs, only or "all", "pt", None)
        return
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
    left = result.unsafe_globals
    if left:
        click.echo(
            "note: the output still pickles "
            + ", ".join(left[:4])
            + (" and more" if len(left) > 4 else "")
            + ": torch.load(weights_only=True) refuses it; --plain-objects replaces them",
            err=True,
        )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    check = f"verified: {result.verification}" if result.verified else "not verified"
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
    _writes(output_path)
    from .ops.to_safetensors import RESERVED_METADATA, parse_size
    from .ops.to_safetensors import to_safetensors as do_convert
    from .render import escape

    quiet, kwargs = _writer_kwargs(opts)
    if all_tensors and kwargs.get("key") is not None:
        raise click.UsageError("--all writes every tensor; --key chooses one state dict: give one")
    if duplicate_shared and keep:
        raise click.UsageError(
            "--keep chooses the name stored once for tied tensors; --duplicate-shared stores "
            "every name: give one"
        )
    meta = {}
    for spec in metadata:
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r} is not KEY=VALUE", param_hint="--metadata")
        k, v = spec.split("=", 1)
        if k in RESERVED_METADATA:
            raise click.BadParameter(
                f"{k!r} is a key ckpttool sets itself", param_hint="--metadata"
            )
        meta[k] = v
    shard = None
    if max_shard_size is not None:
        try:
            shard = parse_size(max_shard_size)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
        _check_shard_folder(output_path)
    if _is_shard_folder(input_path):  # DCP / DeepSpeed: consolidated, with the same options
        if meta or keep or duplicate_shared:
            raise click.UsageError(
                "--metadata, --keep and --duplicate-shared do not apply to a folder of shards"
            )
        select = "all" if all_tensors else kwargs.pop("key", None) or "model"
        _consolidate_folder(input_path, output_path, quiet, kwargs, select, "safetensors", shard)
        return
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


def _is_shard_folder(path: str) -> bool:
    from .readers import is_distributed_folder

    return is_distributed_folder(path)


def _consolidate_folder(
    input_path: str,
    output_path: str,
    quiet: bool,
    kwargs: dict[str, Any],
    select: str,
    fmt: str | None,
    shard: int | None,
) -> None:
    """Consolidate a folder of shards and report it (consolidate, and convert/to-safetensors
    given a folder)."""
    from .ops.consolidate import consolidate as do_consolidate
    from .render import escape

    kwargs = {k: v for k, v in kwargs.items() if k not in ("key", "allow_user_classes")}
    result = _run_writer(
        quiet,
        lambda progress: do_consolidate(
            input_path,
            output_path,
            select=select,
            max_shard_size=shard,
            output_format=fmt,
            progress=progress,
            **kwargs,
        ),
    )
    if quiet:
        return
    if result.renamed:
        click.echo(f"renamed {result.renamed} keys", err=True)
    if result.cast:
        click.echo(f"cast {result.cast} tensors to {kwargs['dtype']}", err=True)
    for item in result.left_out:
        click.echo(f"left out: {escape(item)}", err=True)
    check = "verified" if result.verified else "not verified"
    files = f" in {len(result.files) - 1} shards" if shard else ""
    click.echo(
        f"wrote {escape(output_path)}: {escape(result.selected)} of a {result.kind} checkpoint "
        f"from {result.world_size} ranks, {result.tensors} tensors{files} ({check})",
        err=True,
    )


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="FOLDER", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@click.option("--all", "all_entries", is_flag=True, help="Write everything (optimizer, step...).")
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard into OUTPUT/ (a folder) of safetensors with an index, e.g. 5GB.",
)
def consolidate(
    input_path: str,
    output_path: str,
    all_entries: bool,
    max_shard_size: str | None,
    **opts: Any,
) -> None:
    """Merge a distributed checkpoint folder (DCP/FSDP, DeepSpeed ZeRO) into one file.

    Writes the model state dict (what load_state_dict accepts) by default, as a torch zip
    (.pt) or, for an OUTPUT ending in .safetensors, as safetensors: for DCP the model's
    tensors as saved, for ZeRO-1/2/3 the fp32 master weights rebuilt from the partitions (as
    DeepSpeed's zero_to_fp32 does). --all writes the whole nested object (as torch's
    dcp_to_torch_save does), --key one entry (e.g. optim). Each tensor is copied range by range
    from its shards: memory stays flat, torch and DeepSpeed are not needed.

    \b
    Example:
      ckpttool consolidate checkpoints/step-1000 model.safetensors
      ckpttool consolidate ds_ckpt/ model_fp32.pt
      ckpttool consolidate checkpoints/step-1000 full.pt --all
      ckpttool consolidate checkpoints/step-1000 out/ --max-shard-size 5GB
    """
    quiet, kwargs = _writer_kwargs(opts)
    key = kwargs.pop("key")
    if key and all_entries:
        raise click.UsageError("--key writes one entry, --all everything: give one of them")
    shard = None
    if max_shard_size is not None:
        from .ops.to_safetensors import parse_size

        try:
            shard = parse_size(max_shard_size)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
        _check_shard_folder(output_path)
    select = "all" if all_entries else key or "model"
    _writes(output_path)
    _consolidate_folder(input_path, output_path, quiet, kwargs, select, None, shard)


for _param in consolidate.params:  # the shared options, as they read for a folder of shards
    if _param.name == "key":
        _param.help = "Write this entry instead of the model weights (e.g. optim)."
    elif _param.name == "dtype":
        _param.help = "Cast the model's floating-point weights (optimizer state is kept)."
