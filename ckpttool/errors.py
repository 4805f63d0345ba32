"""The one exception the library raises, and the exit codes the command line maps it to."""

from __future__ import annotations

import os
import re

# Exit codes, documented in `ckpttool --help` and the README.
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, unreadable file, failed write
EXIT_USAGE = 2  # Click's usage errors
EXIT_DANGEROUS = 3  # the pickle names dangerous globals (inspect reports them; writers refuse)
EXIT_DIFFERS = 4  # diff: the inputs differ; check: the state dict would not load
EXIT_UNVETTED = 5  # scan: loading would import and run unvetted code (classes, TorchScript)
EXIT_UNPROVEN = 6  # cannot prove what loading does: unreadable, or read differently by torch
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM / SIGHUP: nothing was written


# How to fix an error, said to a caller of the library (its argument names). The command line
# says the same with its flags (``cli.REMEDIES``): the library never names a flag.
REMEDIES = {
    "force": "; pass force=True to replace it",
    "force_set": "; pass force=True to replace that set",
    "in_place": "; pass in_place=True to replace it",
    "key": " (key)",
    "choose_key": "; choose one with key=PATH",
    "key_or_all": ": choose one with key=PATH, or pass all_tensors=True",
    "all_tensors": ": pass all_tensors=True to write its tensors",
    "allow_user_classes": (
        "; pass allow_user_classes=True to write them, or plain_objects=True to replace them"
    ),
    "allow_class_references": "; pass allow_user_classes=True to write them",
    "consolidate": ": ckpttool.consolidate(folder, output) merges its shards into one file",
    "extract_torchscript": (
        "; use ckpttool.to_safetensors(..., all_tensors=True) to extract its tensors"
    ),
    "not_parameters": (
        "; name the model's keys the optimizer does not hold (frozen layers, buffers) with "
        "not_parameters=('PATTERN',), or write the weights alone with model_only=True"
    ),
}


# Query parameters that carry a credential in a signed or tokenised URL (S3/GCS/Azure presigned
# URLs, ?token=...): their values are never shown.
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
    r"|signature|sig|se|sv|token|access_token|api_key|apikey|key|password|secret)=)[^&#]*"
)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@?#]*)@")


def shown(path: str) -> str:
    """``path`` as it may be printed: a URL's user information and the values of
    credential-like query parameters (presigned URLs' signatures, tokens) replaced by ``***``."""
    if "://" not in path:
        return path
    path = _USERINFO.sub(r"\1***@", path)  # a password, or a token given as the user name
    return _SECRET_PARAM.sub(r"\1***", path)


class CheckpointError(Exception):
    """A problem with a checkpoint file or with writing one, worded for the user.

    ``str(err)`` is one line: ``"<path>: <what is wrong>"``, followed by how to fix it when
    ``remedy`` (a key of :data:`REMEDIES`) says; the CLI prints it after ``Error: `` with the
    remedy spelled in flags.
    """

    exit_code = EXIT_ERROR

    def __init__(
        self, path: str | os.PathLike[str] | None, message: str, *, remedy: str | None = None
    ) -> None:
        self.path = shown(os.fspath(path)) if path is not None else None
        self.message = message
        self.remedy = remedy
        text = message + (REMEDIES[remedy] if remedy else "")
        super().__init__(f"{self.path}: {text}" if self.path is not None else text)


class CheckpointWarning(UserWarning):
    """Something the caller should know that does not stop the work (a folder holding two
    weight sets, of which one is read)."""


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


class UnprovenCheckpointError(CheckpointError):
    """ckpttool cannot prove what torch would read from the file (an ambiguous zip, a FRAME
    that lies, a tar link): it is neither read nor written, whatever it seems to hold."""

    exit_code = EXIT_UNPROVEN

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        super().__init__(path, f"cannot prove what torch would load: {reason}")


class InterruptedWriteError(CheckpointError):
    """The user interrupted a write (SIGINT, SIGTERM or SIGHUP); the temp file was removed."""

    exit_code = EXIT_INTERRUPTED


class ArgumentError(CheckpointError):
    """An argument names something the checkpoint does not hold (e.g. a tensor to keep).

    ``argument`` is the library's parameter name (``"keep"``); the command line reports it
    as a usage error of its option, exit code 2.
    """

    exit_code = EXIT_USAGE

    def __init__(self, path: str | os.PathLike[str] | None, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(path, message)
