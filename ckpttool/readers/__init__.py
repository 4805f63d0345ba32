"""``open_checkpoint``: decide the format from the bytes, then hand the file to its reader."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct

from ..errors import CheckpointError
from ..model import Checkpoint

# The first bytes torch's legacy format writes: PROTO 2, LONG1 of the magic number.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def sniff(head: bytes, path: str = "") -> str:
    """The format of a file from its first bytes (``zip``, ``legacy``, ``safetensors``, ...).

    Mirrors torch: a zip must start with a local file header (a zip appended to a pickle does
    not count), a legacy file starts with the pickled magic number.
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(_LEGACY_PREFIX):
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n >= 2:
            return "safetensors"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO 2..5: some pickle
        return "pickle"
    stripped = head.lstrip()
    if stripped.startswith(b"{") and path.endswith(".json"):
        return "index"
    return "unknown"


def _describe_unknown(head: bytes) -> str:
    text = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs.github.com/spec"):
        return "is a Git LFS pointer, not the checkpoint: run `git lfs pull` to fetch it"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "is an HTML page, not a checkpoint (a download that saved an error page?)"
    if head.startswith(b"\x89PNG"):
        return "is a PNG image, not a checkpoint"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")):
        return "is a compressed file: decompress it first"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "is a tar archive (torch's pre-1.0 format), which ckpttool does not read"
    if head.startswith(b"PK"):
        return "is a damaged zip archive"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:512]):
        return "is a text file, not a checkpoint"
    return "is not a checkpoint format ckpttool knows (torch zip or legacy, safetensors)"


def _check_file(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(path, "is a symbolic link loop") from None
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file (a FIFO, socket or device?)")
    return st.st_size


def _find_index(folder: str) -> str | None:
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".index.json"))
    except OSError:
        return None
    return os.path.join(folder, names[0]) if len(names) == 1 else None


def open_checkpoint(path: str | os.PathLike[str], *, _allow_index: bool = True) -> Checkpoint:
    """Read a checkpoint's structure without reading tensor bytes or running pickled code.

    Raises :class:`~ckpttool.errors.CheckpointError` (one line naming the file) on bad input.
    A folder holding one ``*.index.json`` opens as a sharded checkpoint.
    """
    path = os.fspath(path)
    if _allow_index and os.path.isdir(path):
        index = _find_index(path)
        if index is not None:
            path = index
    size = _check_file(path)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    kind = sniff(head, path)
    seen: dict[str, str] = {}  # every global any pickle in the file names, even if it is broken
    try:
        return _read(path, size, kind, head, seen, _allow_index)
    except CheckpointError as exc:
        from ..errors import DangerousCheckpointError

        dangerous = [g for g, k in seen.items() if k == "dangerous"]
        if dangerous and not isinstance(exc, DangerousCheckpointError):
            raise DangerousCheckpointError(path, dangerous, detail=exc.message) from None
        raise


def _read(
    path: str, size: int, kind: str, head: bytes, seen: dict[str, str], allow_index: bool
) -> Checkpoint:
    try:
        if kind == "zip":
            from . import torch_zip

            return torch_zip.read(path, size, seen)
        if kind == "legacy":
            from . import torch_legacy

            return torch_legacy.read(path, size, seen)
        if kind == "safetensors":
            from . import safetensors

            return safetensors.read(path, size)
        if kind == "index" and allow_index:
            from . import hf_sharded

            return hf_sharded.read(path, size)
    except OSError as exc:
        raise CheckpointError(path, f"read failed: {exc.strerror or exc}") from None
    if kind == "pickle":
        _scan_plain_pickle(path, seen)
        raise CheckpointError(path, "is a plain pickle, not a torch checkpoint (no magic number)")
    raise CheckpointError(path, _describe_unknown(head))


def _scan_plain_pickle(path: str, seen: dict[str, str]) -> None:
    """Record the globals a non-torch pickle names (so a payload is reported as dangerous)."""
    from ..unpickling.scan import unpickle

    with open(path, "rb") as f, contextlib.suppress(CheckpointError):
        unpickle(path, f, "the pickle", seen=seen, end=os.fstat(f.fileno()).st_size)
