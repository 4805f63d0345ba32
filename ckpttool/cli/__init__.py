"""The ``ckpttool`` command line: Click wiring only; the library does the work.

Only this package imports click or names a flag. ``app``: the root group, error lines and
exit codes, ``main`` and interruption; ``options``: options and helpers the commands share;
``fixes``: the library's fixes spelled as commands; ``inspect``: inspect and scan;
``compare``: diff and check; ``write``: convert, to-safetensors and consolidate; ``dcp``:
to-dcp. A command's module is imported when the command runs (``app.COMMAND_MODULES``).
"""

from __future__ import annotations

from .. import signals

if signals.running_as("ckpttool"):
    # This process is the ckpttool program (its console script imports this package before it
    # calls main): take the signals now, before click is imported, and raise one caught
    # meanwhile once main() is running. Library users and tests importing this package keep
    # their own handlers (and collector).
    from .. import program

    program.start()

from importlib import import_module
from typing import Any

from .app import EPILOG, REMEDIES, error_line, main

__all__ = ["EPILOG", "REMEDIES", "cli", "compare", "dcp", "error_line", "inspect", "main", "write"]


def __getattr__(name: str) -> Any:
    """``cli``, the root group with every command registered, and the command modules, which
    register them: imported on first use (``main`` imports only the command that runs)."""
    if name == "cli":
        from .app import cli, load_commands

        load_commands()
        return cli
    if name in ("compare", "dcp", "inspect", "write"):
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
