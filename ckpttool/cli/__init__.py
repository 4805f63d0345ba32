"""The ``ckpttool`` command line: Click wiring only; the library does the work.

Only this package imports click or names a flag. ``app``: the root group, error lines and
exit codes, ``main`` and interruption; ``options``: options and helpers the commands share;
``fixes``: the library's fixes spelled as commands; ``inspect``: inspect and scan;
``compare``: diff and check; ``write``: convert, to-safetensors and consolidate; ``dcp``:
to-dcp.
"""

from __future__ import annotations

from .. import signals

if signals.running_as("ckpttool"):
    # This process is the ckpttool program (its console script imports this package before it
    # calls main): take the signals now, before click is imported, and raise one caught
    # meanwhile once main() is running. Library users and tests importing this package keep
    # their own handlers.
    signals.install(defer=True)

from . import compare, dcp, inspect, write  # the command modules register their commands on cli
from .app import EPILOG, REMEDIES, cli, error_line, main

__all__ = ["EPILOG", "REMEDIES", "cli", "compare", "dcp", "error_line", "inspect", "main", "write"]
