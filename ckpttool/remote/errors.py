"""How a remote read fails, in one line that names the file and never a credential."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import CheckpointError


def timeout() -> float:
    """Seconds a request may wait for the server (``CKPTTOOL_REMOTE_TIMEOUT``, default 30)."""
    try:
        return max(0.1, float(os.environ.get("CKPTTOOL_REMOTE_TIMEOUT", "30")))
    except ValueError:
        return 30.0


@dataclass(frozen=True)
class Stat:
    """What a store says about a file before it is read: its size and a version tag."""

    size: int
    version: str | None  # ETag, S3 VersionId or a Hub commit: checked on every later read
    ranges: bool = True  # False: the server says it ignores range requests


class NotFound(CheckpointError):
    """The store has no file at that URL (HTTP 404): a folder reader looking for the files a
    save may hold takes this as "not there", any other failure as a failure."""


def status_error(url: str, status: int, what: str = "") -> CheckpointError:
    """The error for an HTTP status a store answered with."""
    if status == 404:
        return NotFound(url, "no such file (HTTP 404)")
    if status == 401:
        return CheckpointError(
            url, "needs credentials (HTTP 401): set HF_TOKEN or log in, or set AWS credentials"
        )
    if status == 403:
        return CheckpointError(url, "access denied (HTTP 403): check the credentials it needs")
    if status == 412:
        return changed(url)
    if status == 416:
        return changed(url, "it is shorter than it was")
    return CheckpointError(url, f"the server answered HTTP {status}{what}")


def changed(url: str, why: str = "its version tag changed") -> CheckpointError:
    return CheckpointError(
        url, f"changed on the server while it was read ({why}); run the command again"
    )


def no_ranges(url: str, size: int) -> CheckpointError:
    return CheckpointError(
        url,
        f"the server ignores HTTP range requests: reading it would download the whole file "
        f"({size:,} bytes); download it and run ckpttool on the local copy",
    )


def timed_out(url: str) -> CheckpointError:
    return CheckpointError(url, f"the server did not answer within {timeout():g} s")


def lost(url: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(url, f"the connection to the server failed ({type(exc).__name__})")
