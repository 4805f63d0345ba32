"""The one exception the library raises, and the exit codes the command line maps it to."""

from __future__ import annotations

import os

# Exit codes, documented in `ckpttool --help` and the README.
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, unreadable file, failed write
EXIT_USAGE = 2  # Click's usage errors
EXIT_DANGEROUS = 3  # the pickle names dangerous globals (inspect reports them; writers refuse)
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: nothing was written


class CheckpointError(Exception):
    """A problem with a checkpoint file or with writing one, worded for the user.

    ``str(err)`` is one line: ``"<path>: <what is wrong>"``; the CLI prints it after ``Error: ``.
    """

    exit_code = EXIT_ERROR

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class DangerousCheckpointError(CheckpointError):
    """The pickle names globals that could run code; ckpttool never creates them."""

    exit_code = EXIT_DANGEROUS

    def __init__(
        self, path: str | os.PathLike[str] | None, names: list[str], detail: str | None = None
    ) -> None:
        self.names = names
        self.detail = detail
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if detail:
            message = (
                f"the pickle names dangerous globals ({shown}) and is not a valid checkpoint "
                f"either ({detail})"
            )
        else:
            message = f"refusing: the pickle names dangerous globals ({shown}); it may run code"
        super().__init__(path, message)


class InterruptedWriteError(CheckpointError):
    """The user interrupted a write (Ctrl-C or SIGTERM); the temporary file was removed."""

    exit_code = EXIT_INTERRUPTED
