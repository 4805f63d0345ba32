"""Every pickle a loader would run from one file, found the way that loader finds them.

``scan_file(path)`` picks the loading models of :mod:`.loaders` that apply to the file's bytes,
walks every pickle they run statically (:mod:`.opscan`) and judges them once (:mod:`.policy`):

* ``PK\x03\x04``: a torch zip as miniz reads it (an ``.npz`` when it holds ``.npy`` members
  and no ``data.pkl``: numpy reads it with Python's ``zipfile``); a ``.distcp`` file is a row
  of such zips, located through its folder's ``.metadata`` (or, alone, by tiling the file);
* ``\x93NUMPY``: an ``.npy`` array (object arrays hold a pickle);
* safetensors and JSON indexes: no pickle (their headers are validated by their readers);
* anything else: a pre-1.0 tar if ``tarfile`` opens it, and in any case the pickles
  ``torch.load`` / ``pickle.load`` read from byte 0 (legacy format or a plain pickle).

Only pickles and headers are read, never tensor bytes. What the models cannot follow
exactly as the loader would (a second zip end record, a tar link, a FRAME that lies, a
truncated pickle) is a problem of kind ``unreadable``: such a file is never ``safe``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from ..source import dirname, file_view, is_url, isfile, join, open_source, same_file
from .gcpause import paused_gc
from .loaders import UNREADABLE, Found, npy, npz, pickle_chain, tar_file, torch_zip
from .policy import Verdict, judge
from .zipmodel import ZipModel, read_zip

ItemRanges = Callable[[str], list[tuple[str, int, int, bool]]]


def scan_file(path: str, *, dcp_items: ItemRanges | None = None) -> Verdict:
    """The verdict of one file (any format); raises OSError if it cannot be read.

    ``dcp_items`` reads a DCP folder's ``.metadata`` into the items it names (``file, offset,
    length, read with weights_only=False``): with it, a ``.distcp`` file beside a ``.metadata``
    is scanned where DCP reads it; without it (or without a ``.metadata``) each torch zip that
    tiles the file is."""
    with paused_gc():  # the walks are freed before it resumes: it never scans them
        return _scan_file(path, dcp_items)


def _scan_file(path: str, dcp_items: ItemRanges | None) -> Verdict:
    found = Found()
    with open_source(path) as src:  # a local file (mmap) or a URL (range requests)
        if src.size == 0:
            found.problem(UNREADABLE, "the file is empty")
            return judge([], (), found.problems)
        with src.buffer() as buf:
            _models(buf, file_view(src), path, found, dcp_items)
    return judge(found.walks, found.notes, found.problems)


def _models(buf: Any, f: Any, path: str, found: Found, dcp_items: ItemRanges | None) -> None:
    head = bytes(buf[:512])
    if head[:4] == b"PK\x03\x04":
        if path.endswith(".distcp"):
            _distcp(buf, path, found, dcp_items)
        else:
            model = read_zip(buf)  # read once: torch_zip judges the same model
            if _has_data_pkl(model) or not npz(buf, "the .npz archive", found):
                torch_zip(buf, 0, len(buf), "the archive", found, model)
        return
    if head[:6] == b"\x93NUMPY":
        npy(buf, 0, len(buf), "the .npy array", found)
        return
    if _no_pickle(head, path):
        return
    if tar_file(f, "the tar archive", found):
        chain = Found()  # torch falls back to reading pickles from byte 0 on a TarError
        pickle_chain(buf, 0, len(buf), "the file read as a pickle", chain)
        found.walks.extend(chain.walks)
        return
    pickle_chain(buf, 0, len(buf), "the pickle", found)


def _no_pickle(head: bytes, path: str) -> bool:
    """A safetensors file (u64 header length, then JSON) or a JSON index: no loader unpickles
    them (their readers validate the headers)."""
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2:
        return True
    return head.lstrip().startswith(b"{") and path.endswith(".json")


def _has_data_pkl(model: ZipModel) -> bool:
    """A torch zip; without ``data.pkl``, numpy may read it as an ``.npz``."""
    return any(e.name.lower().endswith("/data.pkl") for e in model.entries)


def _distcp(buf: Any, path: str, found: Found, dcp_items: ItemRanges | None) -> None:
    """The items of a DCP ``.distcp`` file: where ``.metadata`` says (non-tensor items are
    read with ``torch.load(weights_only=False)``), or, without one, the zips tiling the file."""
    from ..errors import CheckpointError

    folder = dirname(path) or "."
    if dcp_items is not None and isfile(join(folder, ".metadata")):
        try:
            ranges = dcp_items(folder)
        except (CheckpointError, OSError) as exc:
            found.problem(UNREADABLE, f"its folder's .metadata cannot be read ({exc})")
            return
        for file, offset, length, plain in ranges:
            if plain and same_file(file, path):
                torch_zip(buf, offset, length, f"the item at offset {offset:,}", found)
        return
    pos = 0
    while pos < len(buf):
        end = _item_end(buf, pos)
        if end is None:
            found.problem(UNREADABLE, f"no torch zip starts at offset {pos:,} of the .distcp file")
            return
        torch_zip(buf, pos, end - pos, f"the item at offset {pos:,}", found)
        pos = end


def _item_end(buf: Any, start: int) -> int | None:
    """The end of the torch zip starting at ``start``: its end record is the first one whose
    central directory offset points back to ``start``."""
    at = buf.find(b"PK\x05\x06", start)
    while at >= 0 and at + 22 <= len(buf):
        cd_size, cd_off, comment = struct.unpack("<IIH", buf[at + 12 : at + 22])
        cd_end = at
        if cd_off == 0xFFFFFFFF and bytes(buf[at - 20 : at - 16]) == b"PK\x06\x07":
            (rec,) = struct.unpack("<Q", buf[at - 12 : at - 4])
            rec += start
            if rec + 56 <= at:
                cd_size, cd_off = struct.unpack("<QQ", buf[rec + 40 : rec + 56])
                cd_end = rec
        if cd_end - cd_size - cd_off == start:
            return at + 22 + comment
        at = buf.find(b"PK\x05\x06", at + 1)
    return None


# Files in a folder that a loader may unpickle (or that are checkpoints): what ``scan`` and
# folder checkpoints look at. A file named on the command line is always scanned.
SUFFIXES = (
    ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".th", ".tar", ".distcp",
    ".safetensors", ".joblib", ".model", ".index.json", ".npy", ".npz",
)  # fmt: skip


def checkpoint_files(folder: str, *, max_depth: int = 8) -> list[str]:
    """Checkpoint-like files under ``folder`` (recursive, sorted; links to files followed,
    links to folders not): DCP ``.metadata`` and ``.distcp``, DeepSpeed ``.pt`` files, Hugging
    Face snapshots (shards, ``*.index.json``, ``pytorch_model.bin``), ``*.pt``, ``*.ckpt``..."""
    if is_url(folder):  # as its store lists it (see remote/tree.py)
        from ..remote import tree

        return [u for u in tree.walk(folder) if _checkpoint_like(u.rsplit("/", 1)[-1])]
    out: list[str] = []
    base = folder.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if root.count(os.sep) - base >= max_depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
        for name in sorted(files):
            if _checkpoint_like(name):
                p = os.path.join(root, name)
                if os.path.isfile(p):
                    out.append(p)
    return out


def _checkpoint_like(name: str) -> bool:
    return name == ".metadata" or name.lower().endswith(SUFFIXES)


def scan_files(paths: list[str], *, dcp_items: ItemRanges | None = None) -> Verdict:
    """One verdict over several files (a folder checkpoint), worst use winning.

    A folder's ``.metadata`` is read into its items once for all of its ``.distcp`` files
    (with Adam state it is half a million opcodes; a folder from 4 ranks read it 4 times)."""
    if dcp_items is not None:
        dcp_items = _once_per_folder(dcp_items)
    return merge([scan_file(p, dcp_items=dcp_items) for p in paths])


def _once_per_folder(dcp_items: ItemRanges) -> ItemRanges:
    """``dcp_items``, asked once per folder (an error is raised again for each file)."""
    known: dict[str, Any] = {}

    def items(folder: str) -> Any:
        if folder not in known:
            try:
                known[folder] = dcp_items(folder)
            except Exception as exc:  # kept, raised again for every file that asks
                known[folder] = exc
        got = known[folder]
        if isinstance(got, Exception):
            raise got
        return got

    return items


def merge(verdicts: list[Verdict]) -> Verdict:
    """Combine verdicts: per global the worst kind wins and the uses add up."""
    from .policy import _RANK, GlobalVerdict

    merged: dict[str, GlobalVerdict] = {}
    notes: list[str] = []
    problems: list[tuple[str, str]] = []
    for v in verdicts:
        notes += v.notes
        problems += [p for p in v.problems if p not in problems]
        for g in v.globals:
            old = merged.get(g.name)
            if old is None:
                merged[g.name] = g
                continue
            uses = tuple(sorted(set(old.uses) | set(g.uses)))
            top = g if _RANK[g.kind] > _RANK[old.kind] else old
            merged[g.name] = GlobalVerdict(g.name, top.kind, uses, top.reason)
    return Verdict(tuple(merged.values()), tuple(notes), tuple(problems))
