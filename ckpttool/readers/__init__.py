"""``open_checkpoint``: decide the format from the bytes, then hand the file to its reader."""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..model import Checkpoint
from ..source import is_url, join, read_head

if TYPE_CHECKING:
    from ..unpickling.policy import Verdict
    from .hf_folder import FolderWeights

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
    if is_url(path):  # a URL: its size, as the store reports it (errors are one line already)
        from ..source import open_source

        return int(open_source(path).size)
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
    if stat.S_ISDIR(st.st_mode):  # none of the folder layouts ckpttool reads
        from .folders import describe

        raise CheckpointError(path, describe(path))
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file (a FIFO, socket or device?)")
    return st.st_size


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    _allow_index: bool = True,
    _judge: bool = True,
    _headers: dict[int, tuple[bytes, int]] | None = None,
) -> Checkpoint:
    """Read a checkpoint's structure without reading tensor bytes or running pickled code.

    Raises :class:`~ckpttool.errors.CheckpointError` (one line naming the file) on bad input.
    A Hugging Face model folder opens as the weights transformers loads from it
    (``readers/hf_folder.py``: ``model.safetensors`` first; ``facts["folder"]`` says which and
    what it ignored), another folder holding one ``*.index.json`` as that sharded checkpoint.
    (``_judge=False``: no safety verdict, for a writer re-reading the output it has just
    written itself; ``_headers``: zip local headers that writer proved, see
    ``torch_zip.ZipArchive``.)
    """
    path = os.fspath(path)
    chosen = None
    if _allow_index:
        found = _layout(path)
        if isinstance(found, Checkpoint):  # a folder of shards, read as one checkpoint
            return found
        if found is not None:  # a model folder (or URL): the weights it serves
            chosen, path = found, found.path
    size = _check_file(path)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    try:
        head = read_head(path)
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    kind = sniff(head, path)
    verdict = file_verdict(path) if _judge else _no_verdict()  # every pickle, judged once
    seen: dict[str, str] = {}  # every global any pickle in the file names, even if it is broken
    try:
        ckpt = _read(path, size, kind, head, seen, _allow_index, _headers)
    except CheckpointError as exc:
        _refuse_dangerous(path, exc, verdict)
        raise
    others = sorted({s.file for s in ckpt.storages.values()} - {path})
    if others:  # a sharded index: its shards are files of their own
        from ..unpickling.discover import merge, scan_files
        verdict = merge([verdict, scan_files(others, dcp_items=dcp_items_of)])
    _refuse_unproven(path, verdict)
    ckpt.verdict = verdict
    if chosen is not None:  # opened from a folder: which file, and the weight sets ignored
        ckpt.facts["folder"] = chosen.fact()
    return ckpt


def _layout(path: str) -> Checkpoint | FolderWeights | None:
    """What a folder (or folder URL) opens as: a folder of shards (DCP, DeepSpeed, per-rank
    saves) read as one checkpoint, or the weights file a model folder serves; None for a file."""
    if is_url(path):
        return _remote_target(path)
    if not os.path.isdir(path):
        return None
    from . import megatron

    mcore = megatron.resolve(path)  # megatron-core torch_dist: an iteration folder, NeMo's
    if mcore is not None:
        read = functools.partial(megatron.read, chosen=mcore[1])  # and how it was chosen
        return _open_distributed(mcore[0], read)
    if os.path.isfile(os.path.join(path, ".metadata")):
        return _open_distributed(path)
    from . import deepspeed, per_rank
    from .hf_folder import choose

    if deepspeed.is_deepspeed_folder(path):
        # only the files of the tag being read decide the verdict, not older tags beside it
        return _open_distributed(path, deepspeed.read, deepspeed.tag_folder(path) or path)
    chosen = choose(path)  # the weights transformers loads, or the folder's one index
    if chosen is not None:
        return chosen
    why = per_rank.incomplete(path)
    if why:
        raise CheckpointError(path, why)
    if per_rank.is_per_rank_folder(path):  # torch.save(state_dict) in every rank
        return _open_distributed(path, per_rank.read)
    return None


def _remote_target(url: str) -> Checkpoint | FolderWeights | None:
    """For a folder URL (a Hub repo or a folder of one, a prefix, an HTTP folder), what it opens
    as, as a local folder would: a DCP or DeepSpeed folder of shards (read by range requests;
    its files listed or derived, see ``remote/tree.py``), else its Hugging Face weights in
    transformers' order, else its one ``*.index.json``; None for a file URL."""
    from ..remote import tree
    from . import deepspeed, remote_files
    from .hf_folder import HF_WEIGHTS, FolderWeights

    remote_files.enable()  # an HTTP folder without index pages: its files from its records
    if not tree.isdir(url):
        return None
    root = url.rstrip("/")
    top = {n for n in tree.files(root) if "/" not in n}
    if ".metadata" in top:  # a folder of shards, read by range requests as a local one is
        return _open_distributed(root)
    if deepspeed.is_deepspeed_folder(root):
        return _open_distributed(root, deepspeed.read, deepspeed.tag_folder(root) or root)
    indexes = sorted(n for n in top if n.endswith(".index.json"))
    present = [n for n in HF_WEIGHTS if n in top]
    if present:
        return FolderWeights(root, present[0], "transformers", tuple(present[1:]))
    if len(indexes) == 1:
        return FolderWeights(root, indexes[0], "index")
    raise CheckpointError(url, "is a folder without model weights ckpttool recognises")


def _no_verdict() -> Verdict:
    from ..unpickling.policy import Verdict

    return Verdict()


def dcp_items_of(folder: str) -> list[tuple[str, int, int, bool]]:
    """The items a DCP folder's ``.metadata`` names (:func:`.dcp.item_ranges`), its reader
    imported only when a scan meets a ``.distcp`` file (6 ms of every ``inspect`` else)."""
    from .dcp import item_ranges

    return item_ranges(folder)


def file_verdict(path: str) -> Verdict:
    """The security verdict of one file (see ``unpickling/discover.py``)."""
    from ..unpickling.discover import scan_file

    try:
        return scan_file(path, dcp_items=dcp_items_of)
    except (OSError, ValueError) as exc:  # mmap of an unreadable or special file
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(path, f"read failed: {reason}") from None


def _refuse_dangerous(path: str, exc: CheckpointError, verdict: Verdict) -> None:
    """A file that cannot be read but names dangerous globals is reported as dangerous."""
    from ..errors import DangerousCheckpointError

    if verdict.dangerous and not isinstance(exc, DangerousCheckpointError):
        raise DangerousCheckpointError(path, verdict.dangerous, detail=exc.message) from None


def _refuse_unproven(path: str, verdict: Verdict) -> None:
    """A file read fine by ckpttool but not provably as torch reads it is not read at all:
    what ckpttool would show or write may not be what torch loads."""
    from ..errors import UnprovenCheckpointError
    from ..unpickling.policy import UNREADABLE

    if verdict.kind == UNREADABLE:
        reasons = verdict.reasons(UNREADABLE)
        raise UnprovenCheckpointError(path, reasons[0] if reasons else "unknown")


def is_distributed_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``open_checkpoint`` reads ``path`` as a folder of shards (DCP, DeepSpeed,
    per-rank DTensor saves)."""
    from ..source import isdir, isfile

    path = os.fspath(path)
    if is_url(path):
        from . import remote_files

        remote_files.enable()
    if not isdir(path):  # a local folder, or a folder URL (see remote/tree.py)
        return False  # (a file: the folder readers are not imported, ~8 ms of every convert)
    from . import deepspeed, megatron, per_rank
    from .hf_folder import choose

    if isfile(join(path, ".metadata")) or deepspeed.is_deepspeed_folder(path):
        return True
    if is_url(path):  # per-rank and Megatron saves are read from local folders only
        return False
    try:
        if megatron.resolve(path) is not None:
            return True
    except CheckpointError:  # a tracker naming a missing iteration: opening it says so
        return True
    try:
        model_folder = choose(path) is not None
    except CheckpointError:  # a config.json naming weights that are missing: not per-rank
        return False
    return not model_folder and per_rank.is_per_rank_folder(path)


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
            raise CheckpointError(join(path, ".metadata"), "is not a DCP metadata pickle")
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
    _refuse_unproven(path, verdict)
    ckpt = dc if isinstance(dc, Checkpoint) else as_checkpoint(dc, list(seen))
    ckpt.verdict = verdict
    return ckpt


def folder_verdict(folder: str) -> Verdict:
    """The verdict over every checkpoint-like file under a folder checkpoint (DCP, DeepSpeed)."""
    from ..unpickling.discover import checkpoint_files, scan_files

    try:
        return scan_files(checkpoint_files(folder), dcp_items=dcp_items_of)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(folder, f"read failed: {reason}") from None


def _read(
    path: str,
    size: int,
    kind: str,
    head: bytes,
    seen: dict[str, str],
    allow_index: bool,
    headers: dict[int, tuple[bytes, int]] | None = None,
) -> Checkpoint:
    try:
        if kind == "zip":
            from . import torch_zip

            return torch_zip.read(path, size, seen, headers=headers)
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
    from .folders import enclosing_folder

    folder = enclosing_folder(path)
    if folder is not None and kind in ("pickle", "unknown"):  # .metadata, a bare .distcp...
        raise CheckpointError(path, f"is one file of a folder of shards: pass the folder, {folder}")
    if kind == "pickle":  # torch.load unpickles it before it looks for a magic number
        raise CheckpointError(path, "is a plain pickle, not a torch checkpoint (no magic number)")
    raise CheckpointError(path, _describe_unknown(head))
