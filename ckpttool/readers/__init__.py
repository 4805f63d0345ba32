"""``open_checkpoint``: decide the format from the bytes, then hand the file to its reader."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..model import Checkpoint

if TYPE_CHECKING:
    from ..unpickling.policy import Verdict

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
    from .torch_legacy import looks_legacy  # other pickle protocols (torch.save(pickle_protocol=N))

    if looks_legacy(head):
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


# A Hugging Face model folder's weights, in the order transformers looks for them.
HF_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _find_index(folder: str) -> str | None:
    """The file a folder opens as: its one ``*.index.json``, else the weights of a Hugging
    Face model folder (``model.safetensors``, ``pytorch_model.bin``, ...)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    found = next((n for n in HF_WEIGHTS if n in names), None)
    return os.path.join(folder, found) if found else None


def open_checkpoint(
    path: str | os.PathLike[str], *, _allow_index: bool = True, _judge: bool = True
) -> Checkpoint:
    """Read a checkpoint's structure without reading tensor bytes or running pickled code.

    Raises :class:`~ckpttool.errors.CheckpointError` (one line naming the file) on bad input.
    A folder holding one ``*.index.json`` opens as a sharded checkpoint, a Hugging Face
    model folder as its ``model.safetensors`` (or ``pytorch_model.bin``). (``_judge=False``:
    no safety verdict, for a writer re-reading the output it has just written itself.)
    """
    path = os.fspath(path)
    if _allow_index and os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")):
        return _open_distributed(path)
    if _allow_index and os.path.isdir(path):
        from . import deepspeed

        if deepspeed.is_deepspeed_folder(path):
            # only the files of the tag being read decide the verdict, not older tags beside it
            return _open_distributed(path, deepspeed.read, deepspeed.tag_folder(path) or path)
    if _allow_index and os.path.isdir(path):
        index = _find_index(path)
        if index is not None:
            path = index
        else:
            from . import per_rank

            why = per_rank.incomplete(path)
            if why:
                raise CheckpointError(path, why)
            if per_rank.is_per_rank_folder(path):  # torch.save(state_dict) in every rank
                return _open_distributed(path, per_rank.read)
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
    verdict = file_verdict(path) if _judge else _no_verdict()  # every pickle, judged once
    seen: dict[str, str] = {}  # every global any pickle in the file names, even if it is broken
    try:
        differential = [n for n in verdict.notes if "FRAME" in n or "could not be scanned" in n]
        if differential:  # CPython reading a file and other readers see different pickles
            tampered = " (a tampered file)" if "FRAME" in differential[0] else ""
            raise CheckpointError(path, differential[0] + tampered)
        ckpt = _read(path, size, kind, head, seen, _allow_index)
    except CheckpointError as exc:
        _refuse_dangerous(path, exc, verdict)
        raise
    others = sorted({s.file for s in ckpt.storages.values()} - {path})
    if others:  # a sharded index: its shards are files of their own
        from ..unpickling.discover import merge, scan_files

        verdict = merge([verdict, scan_files(others)])
    ckpt.verdict = verdict
    return ckpt


def _no_verdict() -> Verdict:
    from ..unpickling.policy import Verdict

    return Verdict()


def file_verdict(path: str) -> Verdict:
    """The security verdict of one file (see ``unpickling/discover.py``)."""
    from ..unpickling.discover import scan_file

    try:
        return scan_file(path)
    except (OSError, ValueError) as exc:  # mmap of an unreadable or special file
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(path, f"read failed: {reason}") from None


def _refuse_dangerous(path: str, exc: CheckpointError, verdict: Verdict) -> None:
    """A file that cannot be read but names dangerous globals is reported as dangerous."""
    from ..errors import DangerousCheckpointError

    if verdict.dangerous and not isinstance(exc, DangerousCheckpointError):
        raise DangerousCheckpointError(path, verdict.dangerous, detail=exc.message) from None


def is_distributed_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``open_checkpoint`` reads ``path`` as a folder of shards (DCP, DeepSpeed,
    per-rank DTensor saves)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, ".metadata")):
        return True
    from . import deepspeed, per_rank

    if deepspeed.is_deepspeed_folder(path):
        return True
    return _find_index(path) is None and per_rank.is_per_rank_folder(path)


def _open_distributed(
    path: str, read: Callable[..., Any] | None = None, scope: str | None = None
) -> Checkpoint:
    """A DCP (or, with ``read``, DeepSpeed) folder, presented as one logical checkpoint
    (see ``readers/distributed.py``); the safety verdict covers the files under ``scope``
    (default: the whole folder)."""
    from . import dcp
    from .distributed import as_checkpoint

    if read is None:
        if not dcp.is_dcp_folder(path):
            raise CheckpointError(os.path.join(path, ".metadata"), "is not a DCP metadata pickle")
        read = dcp.read
    seen: dict[str, str] = {}
    verdict = folder_verdict(scope or path)
    try:
        dc = read(path, seen)
    except OSError as exc:
        raise CheckpointError(path, f"read failed: {exc.strerror or exc}") from None
    except CheckpointError as exc:
        _refuse_dangerous(path, exc, verdict)
        raise
    ckpt = dc if isinstance(dc, Checkpoint) else as_checkpoint(dc, list(seen))
    ckpt.verdict = verdict
    return ckpt


def folder_verdict(folder: str) -> Verdict:
    """The verdict over every checkpoint-like file under a folder checkpoint (DCP, DeepSpeed)."""
    from ..unpickling.discover import checkpoint_files, scan_files

    try:
        return scan_files(checkpoint_files(folder))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(folder, f"read failed: {reason}") from None


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
    if kind == "pickle":  # torch.load unpickles it before it looks for a magic number
        raise CheckpointError(path, "is a plain pickle, not a torch checkpoint (no magic number)")
    raise CheckpointError(path, _describe_unknown(head))
