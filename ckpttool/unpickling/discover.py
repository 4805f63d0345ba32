"""Every pickle a loader would run from one file, found the way torch finds them.

``scan_file(path)`` walks them all statically (:mod:`.opscan`) and judges them once
(:mod:`.policy`). Where loaders may read a file in more than one way, every reading is walked
and the worst verdict wins:

* a file that starts with ``PK\\x03\\x04`` is a zip: torch (miniz) reads the member named
  ``ROOT/data.pkl`` case-insensitively through the central directory and finds each entry's
  data through its local header, whatever name that header spells; so every member whose name
  ends with ``pkl`` is walked, listed by the central directory and by the local headers;
* any other file is unpickled from byte 0 by ``torch.load`` (legacy: magic number, protocol,
  system info, object, storage keys: five pickles in a row), whatever it looks like: a raw
  pickle, a protocol-0 text pickle, a file with no PROTO;
* a file whose first block is a valid tar header is a pre-1.0 checkpoint: torch unpickles its
  ``pickle``, ``storages`` and ``tensors`` members.

Only pickles and headers are read, never tensor bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
import tarfile
import zlib
from collections.abc import Iterator

from ..source import file_view, open_source
from .opscan import PickleWalk, walk_all
from .policy import Verdict, judge

MAX_PICKLE = 1 << 28  # a member larger than this is not scanned (and the file is refused)
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032:1: larger claims are bombs
MAX_CHAIN = 5  # torch's legacy loader runs five pickles in a row
_EOCD = struct.Struct("<4s4H2IH")
_CDIR = struct.Struct("<4s6H3I5H2I")
_LOCAL = struct.Struct("<4s5H3I2H")


def scan_file(path: str) -> Verdict:
    """The verdict of one file (any format); raises OSError if it cannot be read."""
    walks: list[PickleWalk] = []
    notes: list[str] = []
    with open_source(path) as src:  # a local file (mmap) or a URL (range requests)
        size = src.size
        if size == 0:
            return Verdict()
        with src.buffer() as buf:
            if buf[:4] == b"PK\x03\x04":
                for name, data in zip_pickles(buf, notes):
                    _walk(data, 0, len(data), name, walks, notes)
            else:
                _chain(buf, 0, size, "the pickle", walks, notes)
                if _is_tar(buf[:512]):
                    for name, data in _tar_members(file_view(src), notes):
                        _chain(data, 0, len(data), f"tar member {name!r}", walks, notes)
    return judge(walks, notes)


def _walk(
    buf: object, start: int, end: int, what: str, walks: list[PickleWalk], notes: list[str]
) -> list[PickleWalk]:
    found = walk_all(buf, start, end)
    if found[0].crashed:
        notes.append(f"{what} could not be scanned ({found[0].error})")
    if found[0].straddle:
        notes.append(f"{what}: an opcode straddles the end of a FRAME (readers disagree on it)")
    walks.extend(found)
    return found


def _chain(
    buf: object, start: int, end: int, what: str, walks: list[PickleWalk], notes: list[str]
) -> None:
    """Consecutive pickles from ``start``, as the legacy loader reads them (at most five);
    a pickle whose STOP lies inside a FRAME goes on from both places a reader may resume."""
    todo = [(start, 0)]
    done: set[int] = set()
    while todo and len(done) < 4 * MAX_CHAIN:
        pos, depth = todo.pop()
        if pos in done or pos >= end or depth >= MAX_CHAIN:
            continue
        done.add(pos)
        for w in _walk(buf, pos, end, what, walks, notes):
            if w.end is None:
                continue  # CPython raises here: nothing after it runs
            todo.append((w.end, depth + 1))
            if w.frame_end is not None:
                notes.append(f"{what}: STOP inside a FRAME (readers resume at different places)")
                todo.append((w.frame_end, depth + 1))


def zip_pickles(buf: mmap.mmap, notes: list[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member whose name ends with ``pkl``, from the central directory
    (as miniz reads it) and from a walk of the local headers; each data offset is taken from
    the local header, as miniz takes it."""
    seen: set[int] = set()
    for name, header, csize, usize, method in [*_central(buf), *_locals(buf)]:
        if header in seen or not name.lower().endswith("pkl"):
            continue
        seen.add(header)
        data = _member(buf, header, csize, usize, method)
        if data is None:
            notes.append(f"zip member {name!r} could not be read to scan it")
            continue
        yield name, data


def _central(buf: mmap.mmap) -> list[tuple[str, int, int, int, int]]:
    size = len(buf)
    at = buf.rfind(b"PK\x05\x06", max(0, size - 65557))
    if at < 0 or at + _EOCD.size > size:
        return []
    _sig, _d, _cd, _n1, count, cd_size, cd_off, _c = _EOCD.unpack(buf[at : at + _EOCD.size])
    loc = at - 20
    if loc >= 0 and buf[loc : loc + 4] == b"PK\x06\x07":  # zip64 locator
        (rec,) = struct.unpack("<Q", buf[loc + 8 : loc + 16])
        if rec + 56 <= size and buf[rec : rec + 4] == b"PK\x06\x06":
            count, cd_size, cd_off = struct.unpack("<QQQ", buf[rec + 32 : rec + 56])
    out = []
    for base in {cd_off, at - cd_size}:
        pos = base
        for _ in range(min(count, 1 << 20)):
            if pos < 0 or pos + _CDIR.size > size or buf[pos : pos + 4] != b"PK\x01\x02":
                break
            f = _CDIR.unpack(buf[pos : pos + _CDIR.size])
            method, csize, usize = f[4], f[8], f[9]
            nlen, xlen, clen, header = f[10], f[11], f[12], f[16]
            name = buf[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
            extra = buf[pos + 46 + nlen : pos + 46 + nlen + xlen]
            usize, csize, header = _zip64(extra, usize, csize, header)
            out.append((name, header, csize, usize, method))
            pos += 46 + nlen + xlen + clen
    return out


def _zip64(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[i : i + 4])
        if tag == 1:  # a field that claims more bytes than the extra holds: take what is there
            count = min(n, len(extra) - i - 4) // 8
            vals = list(struct.unpack(f"<{count}Q", extra[i + 4 : i + 4 + count * 8]))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if header == 0xFFFFFFFF and vals:
                header = vals.pop(0)
        i += 4 + n
    return usize, csize, header


def _locals(buf: mmap.mmap) -> Iterator[tuple[str, int, int, int, int]]:
    """Local headers from offset 0 on, one after another (and across concatenated archives:
    a DCP ``.distcp`` file is a row of torch zips); stops at the first thing it cannot parse."""
    pos, size = 0, len(buf)
    for _ in range(1 << 20):
        sig = buf[pos : pos + 4]
        if sig == b"PK\x03\x04" and pos + _LOCAL.size <= size:
            f = _LOCAL.unpack(buf[pos : pos + _LOCAL.size])
            flags, method, csize, usize, nlen, xlen = f[2], f[3], f[7], f[8], f[9], f[10]
            name = buf[pos + 30 : pos + 30 + nlen].decode("utf-8", "replace")
            extra = buf[pos + 30 + nlen : pos + 30 + nlen + xlen]
            usize, csize, _ = _zip64(extra, usize, csize, 0)
            if flags & 0x8 and csize == 0:
                return  # sizes only in a data descriptor: the central directory has them
            yield name, pos, csize, usize, method
            pos += 30 + nlen + xlen + csize
        elif sig == b"PK\x01\x02" and pos + 46 <= size:
            nlen, xlen, clen = struct.unpack("<3H", buf[pos + 28 : pos + 34])
            pos += 46 + nlen + xlen + clen
        elif sig == b"PK\x06\x06" and pos + 12 <= size:
            (n,) = struct.unpack("<Q", buf[pos + 4 : pos + 12])
            pos += 12 + n
        elif sig == b"PK\x06\x07":
            pos += 20
        elif sig == b"PK\x05\x06" and pos + 22 <= size:
            (clen,) = struct.unpack("<H", buf[pos + 20 : pos + 22])
            pos += 22 + clen
        else:
            return


def _member(buf: mmap.mmap, header: int, csize: int, usize: int, method: int) -> bytes | None:
    size = len(buf)
    if not 0 <= header <= size - _LOCAL.size or buf[header : header + 4] != b"PK\x03\x04":
        return None
    nlen, xlen = struct.unpack("<HH", buf[header + 26 : header + 30])
    start = header + 30 + nlen + xlen
    if csize > MAX_PICKLE or usize > MAX_PICKLE or start + csize > size:
        return None
    raw = buf[start : start + csize]
    if method == 0:
        return raw
    if method != 8 or usize > MAX_DEFLATE_RATIO * max(csize, 1) + 1024:
        return None
    try:
        inflater = zlib.decompressobj(-15)
        return inflater.decompress(raw, usize + 1)[:usize]
    except (zlib.error, MemoryError):
        return None


def _is_tar(head: bytes) -> bool:
    """What ``tarfile.open(mode="r:")`` checks before torch's tar loader goes on."""
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


def _tar_members(f: object, notes: list[str]) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # type: ignore[call-overload]
            for info in tar:
                if info.name in ("pickle", "storages", "tensors") and info.isfile():
                    if info.size > MAX_PICKLE:
                        notes.append(f"tar member {info.name!r} is too large to scan")
                        continue
                    member = tar.extractfile(info)
                    if member is not None:
                        yield info.name, member.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        notes.append(f"the tar archive could not be listed ({type(exc).__name__})")


# Files in a folder that a loader may unpickle (or that are checkpoints): what ``scan`` and
# folder checkpoints look at. A file named on the command line is always scanned.
SUFFIXES = (
    ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".th", ".tar", ".distcp",
    ".safetensors", ".joblib", ".model", ".index.json",
)  # fmt: skip


def checkpoint_files(folder: str, *, max_depth: int = 8) -> list[str]:
    """Checkpoint-like files under ``folder`` (recursive, sorted; links to files followed,
    links to folders not): DCP ``.metadata`` and ``.distcp``, DeepSpeed ``.pt`` files, Hugging
    Face snapshots (shards, ``*.index.json``, ``pytorch_model.bin``), ``*.pt``, ``*.ckpt``..."""
    out: list[str] = []
    base = folder.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if root.count(os.sep) - base >= max_depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
        for name in sorted(files):
            if name == ".metadata" or name.lower().endswith(SUFFIXES):
                p = os.path.join(root, name)
                if os.path.isfile(p):
                    out.append(p)
    return out


def scan_files(paths: list[str]) -> Verdict:
    """One verdict over several files (a folder checkpoint), worst use winning."""
    return merge([scan_file(p) for p in paths])


def merge(verdicts: list[Verdict]) -> Verdict:
    """Combine verdicts: per global the worst kind wins and the uses add up."""
    from .policy import _RANK, GlobalVerdict

    merged: dict[str, GlobalVerdict] = {}
    notes: list[str] = []
    for v in verdicts:
        notes += v.notes
        for g in v.globals:
            old = merged.get(g.name)
            if old is None:
                merged[g.name] = g
                continue
            uses = tuple(sorted(set(old.uses) | set(g.uses)))
            top = g if _RANK[g.kind] > _RANK[old.kind] else old
            merged[g.name] = GlobalVerdict(g.name, top.kind, uses, top.reason)
    return Verdict(tuple(merged.values()), tuple(notes))
