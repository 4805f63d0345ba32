"""The root ``ckpttool`` group and the process around it: error lines, exit codes, signals.

``main`` is the console script; a library error becomes one line (:func:`error_line`, with
:data:`REMEDIES` spelling its fix in flags) and its exit code; a signal ends the command with
one line and ``EXIT_INTERRUPTED`` (:func:`_interrupted`), naming the output being written
(:func:`writes`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

import click

from .. import __version__, program, signals
from ..errors import EXIT_DANGEROUS, EXIT_INTERRUPTED, EXIT_USAGE, ArgumentError, CheckpointError

EPILOG = """\b
Exit codes:
  0    success (also when a reader such as head closes the output early)
  1    bad input (unreadable, corrupt or unsupported file) or a failed write
  2    usage error
  3    the pickle names dangerous globals (inspect reports, writers refuse)
  4    diff: the inputs differ; check: the state dict would not load
  5    scan: loading would run unvetted code (classes, TorchScript)
  6    cannot prove what torch would load (unreadable, or ambiguous)
  130  interrupted (SIGINT, SIGTERM or SIGHUP); nothing was written
"""


# How to fix a library error, in this command line's flags (the library says it in its own
# argument names: ckpttool.errors.REMEDIES).
REMEDIES = {
    "force": "; pass --force to replace it",
    "force_set": "; pass --force to replace that set",
    "in_place": "; pass --in-place to replace it",
    "key": " (--state-dict)",
    "choose_key": "; choose one with --state-dict",
    "key_or_all": ": choose one with --state-dict PATH, or use --all",
    "all_tensors": ": use --all to write its tensors",
    "consolidate": ": `ckpttool consolidate FOLDER OUTPUT` merges its shards into one file",
    "extract_torchscript": "; use `ckpttool to-safetensors --all` to extract its tensors",
    "allow_class_references": "; pass --allow-user-classes to write them",
    "allow_user_classes": "; pass --allow-user-classes to write them, or --plain-objects to "
    "replace them",
    "not_parameters": "; name the model's keys the optimizer does not hold (frozen layers, "
    "buffers) with --not-param PATTERN, or write the weights alone with --model-only",
}


# Where the library's ``key`` is the entry to write (--only), not a state dict (--state-dict);
# convert meets ``key_or_all`` only from a folder of shards, where --only selects.
_ENTRY_REMEDIES = {
    "key": " (--only)",
    "key_or_all": ": choose one with --only PATH, or use --all",
}
_COMMAND_REMEDIES = {
    "consolidate": _ENTRY_REMEDIES,
    "to-dcp": _ENTRY_REMEDIES,
    "convert": {"key_or_all": _ENTRY_REMEDIES["key_or_all"]},
}


def _remedy(code: str) -> str:
    """The remedy ``code`` in flags, as the running command spells it."""
    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx is not None else None
    return _COMMAND_REMEDIES.get(command or "", {}).get(code, REMEDIES[code])


def error_line(err: CheckpointError) -> str:
    """The one line the command prints for ``err``: the library's words, the CLI's remedy."""
    text = err.message + (_remedy(err.remedy) if err.remedy else "")
    return f"{err.path}: {text}" if err.path is not None else text


def fail(err: CheckpointError) -> None:
    """Print ``err``'s line (``Error:``, or ``Danger:`` for a dangerous pickle) and exit."""
    from ..render import escape

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


def run_library(fn: Callable[[], Any]) -> Any:
    """Call the library; a :class:`CheckpointError` ends the command (:func:`fail`)."""
    try:
        return fn()
    except CheckpointError as err:
        fail(err)


# Each command and the module of this package that defines it. Only the module of the command
# that runs is imported (the others cost ~5 ms of every short command); help, and a name that
# is no command (for Click's "did you mean"), import them all. test_package checks the table.
COMMAND_MODULES = {
    "check": "compare",
    "consolidate": "write",
    "convert": "write",
    "diff": "compare",
    "inspect": "inspect",
    "scan": "inspect",
    "to-dcp": "dcp",
    "to-safetensors": "write",
}


def load_commands(names: Iterable[str] | None = None) -> None:
    """Import the modules defining the commands ``names`` (default: every command), which
    register their commands on :data:`cli`."""
    wanted = COMMAND_MODULES.values() if names is None else (COMMAND_MODULES[n] for n in names)
    for module in sorted(set(wanted)):
        import_module(f"{__package__}.{module}")


class _Group(click.Group):
    """The root group: a reader that closes stdout early (``| head``) ends the command quietly,
    with exit 0: what it read was printed in full. Its command list shows each command's
    first sentence whole (wrapped), where Click would cut it with "...". A command's module
    is imported when the command is looked up (:data:`COMMAND_MODULES`)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            load_commands([cmd_name] if cmd_name in COMMAND_MODULES else None)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_commands()
        return super().list_commands(ctx)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


def main() -> None:
    """Entry point of ``ckpttool`` and ``python -m ckpttool``.

    Installs the signal policy first (``signals.install``): SIGINT, SIGTERM and SIGHUP end
    any command with one line, no temp file left, and exit code 130. A reader closing stdout
    early (``| head``) ends it with exit 0.
    """
    signals.install()
    _one_blas_thread()
    try:
        signals.release()
        cli(standalone_mode=True)
    except signals.Interrupted:
        _interrupted()
    except SystemExit:
        program.finish()  # the command is done: what it made needs no collection before exit
        if signals.received() is not None:  # caught, then swallowed on its way: still stop
            _interrupted()
        raise
    except Exception:
        # A signal raised where Python turns exceptions into others (Python 3.11 wraps one
        # raised while a class is being made, in a dataclass field's __set_name__, in a
        # RuntimeError): the interruption, not that error, is what happened.
        if signals.received() is not None:
            _interrupted()
        raise
    if signals.received() is not None:
        _interrupted()


def _one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread per core when numpy is imported (50-80 ms of CPU of a
    short cast on 2 cores, more with more cores) for BLAS calls the commands hardly make: casts
    and comparisons are elementwise, spread over ckpttool's own workers. One thread, unless
    the user chose otherwise (set before numpy is imported: OpenBLAS reads it when loaded)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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


def writes(output_path: str) -> None:
    """Record the output the command writes, to name it if the command is interrupted."""
    _output[:] = [output_path]


def _same_path(written: str, given: str) -> bool:
    """Whether an output written (link resolved) is the one the user named."""
    given = os.path.realpath(given) if os.path.islink(given) else given
    return os.path.abspath(written) == os.path.abspath(given)
