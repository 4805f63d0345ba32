"""A zip archive as torch's reader (miniz, in ``PyTorchStreamReader``) finds it, and every
place where another reader would find something else.

miniz looks for the end-of-central-directory record by scanning back from the end of the
file (at most 64 KiB + 22 bytes), takes the zip64 records it points to, reads the central
directory where the end record says it starts, and finds each entry's data through its local
header (whose name it never compares). torch then takes the root folder from the first
entry's name and looks every record up as ``ROOT/name``, ignoring case.

ckpttool's own readers use Python's ``zipfile``, and other tools use other readers. So the
model also lists ``ambiguities``: a second end record, bytes after the real one, a directory
that does not end where the end record begins, names that differ only in case, two entries
sharing a local header, a local header naming another file, or Python's ``zipfile`` seeing
other entries. A file with any of them cannot be proven safe: torch may read one archive
while a scanner reads another. ``torch.save`` never writes any of them.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .parsed import directory_start, remember_directory

MAX_MEMBER = 1 << 28  # a pickle larger than this is not scanned (the file is refused)
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032:1: larger claims are bombs
_EOCD = struct.Struct("<4s4H2IH")
_CDIR = struct.Struct("<4s6H3I5H2I")
_LOCAL = struct.Struct("<4s5H3I2H")
_WINDOW = 0xFFFF + _EOCD.size  # how far back miniz looks for the end record
_CD_COPY = 1 << 24  # a central directory up to this size is copied once and parsed in memory


_tuple = tuple.__new__


class Entry(NamedTuple):
    """One central-directory entry: its name and where its data is (offsets absolute).
    (A named tuple: made thousands of times per file, where a frozen dataclass costs 1 µs.)"""

    name: str
    header: int  # the local header's offset in the buffer
    csize: int
    usize: int
    method: int


@dataclass
class ZipModel:
    """What torch reads from one archive (``error``: torch cannot open it)."""

    entries: list[Entry] = field(default_factory=list)
    root: str = ""
    ambiguities: list[str] = field(default_factory=list)
    error: str | None = None

    def records(self) -> list[str]:
        """Record names as torch lists them (``get_all_records``: the root stripped)."""
        prefix = self.root + "/"
        return [e.name[len(prefix) :] for e in self.entries if e.name.startswith(prefix)]

    def find(self, record: str) -> Entry | None:
        """The entry torch reads for ``record`` (``ROOT/record``, any case)."""
        want = f"{self.root}/{record}".lower()
        found = [e for e in self.entries if e.name.lower() == want]
        return found[0] if len(found) == 1 else None


def read_zip(buf: Any, base: int = 0, size: int | None = None) -> ZipModel:
    """The archive lying at ``buf[base : base + size]`` (default: the whole buffer)."""
    end = len(buf) if size is None else base + size
    model = ZipModel()
    at = _end_record(buf, base, end, model)
    if at is None:
        model.error = model.error or "no zip end record where torch looks for one"
        return model
    count, cd_size, cd_off, eocd_start = _directory(buf, base, end, at, model)
    if model.error is None:
        _entries(buf, base, end, count, cd_size, cd_off, model)
    if model.error is None and eocd_start != base + cd_off + cd_size:
        model.ambiguities.append("the central directory does not end where the end record begins")
    if model.error is None:
        _check_entries(buf, model)
        _compare_zipfile(buf, base, end, model)
    return model


def _end_record(buf: Any, base: int, end: int, model: ZipModel) -> int | None:
    lo = max(base, end - _WINDOW)
    hi = end - _EOCD.size + 4  # the record must fit before the end
    at = buf.rfind(b"PK\x05\x06", lo, hi) if hi > lo else -1
    if at < 0:
        return None
    others = [p for p in _all(buf, b"PK\x05\x06", lo, hi) if p != at and _plausible(buf, p, end)]
    if others:
        model.ambiguities.append(
            f"a second zip end record at offset {others[-1] - base} (readers pick different ones)"
        )
    comment = struct.unpack("<H", buf[at + 20 : at + 22])[0]
    if at + _EOCD.size + comment != end:
        model.ambiguities.append(
            f"{end - at - _EOCD.size - comment:+,} bytes after the zip end record and its comment"
        )
    return at


def _all(buf: Any, sig: bytes, lo: int, hi: int) -> list[int]:
    out: list[int] = []
    pos = buf.find(sig, lo, hi)
    while pos >= 0 and len(out) < 64:
        out.append(pos)
        pos = buf.find(sig, pos + 1, hi)
    return out


def _plausible(buf: Any, at: int, end: int) -> bool:
    """An end record whose directory offset and size point at a directory entry."""
    if at + _EOCD.size > end:
        return False
    f = _EOCD.unpack(buf[at : at + _EOCD.size])
    cd_size, cd_off = f[5], f[6]
    start = at - cd_size
    return (0 <= start < at and bytes(buf[start : start + 4]) == b"PK\x01\x02") or (
        cd_off == 0xFFFFFFFF
    )


def _directory(
    buf: Any, base: int, end: int, at: int, model: ZipModel
) -> tuple[int, int, int, int]:
    f = _EOCD.unpack(buf[at : at + _EOCD.size])
    disk, cd_disk, on_disk, count, cd_size, cd_off = f[1], f[2], f[3], f[4], f[5], f[6]
    eocd_start = at
    loc = at - 20
    if loc >= base and bytes(buf[loc : loc + 4]) == b"PK\x06\x07":  # zip64 locator
        (rec,) = struct.unpack("<Q", buf[loc + 8 : loc + 16])
        rec += base
        if rec + 56 <= end and bytes(buf[rec : rec + 4]) == b"PK\x06\x06":
            disk, cd_disk = struct.unpack("<II", buf[rec + 16 : rec + 24])
            on_disk, count, cd_size, cd_off = struct.unpack("<QQQQ", buf[rec + 24 : rec + 56])
            eocd_start = rec
            if rec + 56 > loc:
                model.ambiguities.append("the zip64 end record overlaps its locator")
        else:
            model.error = "a zip64 locator points at no zip64 end record"
    if (disk | cd_disk) != 0 and (disk != 1 or cd_disk != 1):
        model.error = "a multi-disk zip archive"
    elif count != on_disk:
        model.error = "the end record's entry counts disagree"
    elif cd_size < count * _CDIR.size or base + cd_off + cd_size > end:
        model.error = "the end record points past the end of the file"
    return count, cd_size, cd_off, eocd_start


def _entries(
    buf: Any, base: int, end: int, count: int, cd_size: int, cd_off: int, model: ZipModel
) -> None:
    cd_start, stop = base + cd_off, base + cd_off + cd_size
    off = cd_start if cd_size <= _CD_COPY else 0  # a directory of usual size: one copy,
    cd = bytes(buf[cd_start:stop]) if off else buf  # parsed in memory (mmap slices cost more)
    pos, stop, add, unpack = cd_start - off, stop - off, model.entries.append, _CDIR.unpack
    for _ in range(min(count, 1 << 20)):
        f = unpack(cd[pos : pos + _CDIR.size]) if pos + _CDIR.size <= stop else None
        if f is None or f[0] != b"PK\x01\x02":  # (sliced: a remote file's buffer is no mmap)
            model.error = "a damaged central directory"
            return
        method, csize, usize = f[4], f[8], f[9]
        nlen, xlen, clen, header = f[10], f[11], f[12], f[16]
        name = bytes(cd[pos + 46 : pos + 46 + nlen]).decode("utf-8", "surrogateescape")
        if 0xFFFFFFFF in (usize, csize, header):  # only then can a zip64 field apply
            extra = bytes(cd[pos + 46 + nlen : pos + 46 + nlen + xlen])
            usize, csize, header = _zip64(extra, usize, csize, header)
        if header + _LOCAL.size + csize > end - base:
            model.error = f"zip entry {name!r} lies past the end of the file"
            return
        add(_tuple(Entry, (name, base + header, csize, usize, method)))  # Entry(...), at C speed
        pos += 46 + nlen + xlen + clen
    if len(model.entries) != count:
        model.error = "the central directory holds more entries than its end record says"
    elif pos != stop:
        model.ambiguities.append("the central directory holds more bytes than its entries")
    if model.entries:
        first = model.entries[0].name
        if "/" not in first:
            model.error = f"the first zip entry {first[:60]!r} is not in a folder"
        model.root = first.split("/", 1)[0]


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


def _check_entries(buf: Any, model: ZipModel) -> None:
    """Names that collide, entries sharing a header, and the local header of every record
    torch parses (its pickles and text records). A storage record (``ROOT/data/KEY``) is
    only ever copied as bytes: its local header decides where those bytes start, never what
    loading calls, so it is checked when its bytes are read, not here (over a URL that is
    one request per record saved: a 2 GB checkpoint has a thousand)."""
    names: dict[str, str] = {}
    headers: dict[int, str] = {}
    counts = Counter(e.name for e in model.entries)  # once: a zip may have 100k entries
    storages = (model.root + "/data/").lower()
    parsed = [e for e in model.entries if not e.name.lower().startswith(storages)]
    prefetch = getattr(buf, "prefetch", None)
    if prefetch is not None:  # a URL: every local header fetched at once, not one by one
        prefetch([(e.header, _LOCAL.size + len(e.name.encode()) + 64) for e in parsed])
    checked = {id(e) for e in parsed}
    for e in model.entries:
        other = names.setdefault(e.name.lower(), e.name)
        if other != e.name or counts[e.name] > 1:
            model.ambiguities.append(f"zip entries {other[:60]!r} and {e.name[:60]!r} collide")
            break
        if headers.setdefault(e.header, e.name) != e.name:
            model.ambiguities.append(
                f"zip entries {headers[e.header][:60]!r} and {e.name[:60]!r} share one header"
            )
            break
        if id(e) not in checked:
            continue
        raw = e.name.encode("utf-8", "surrogateescape")
        head = bytes(buf[e.header : e.header + 30 + len(raw)])  # the name it should hold too
        if head[:4] != b"PK\x03\x04":
            model.error = f"zip entry {e.name[:60]!r} has no local header"
            return
        nlen = struct.unpack("<H", head[26:28])[0]
        local = head[30:] if nlen == len(raw) else bytes(buf[e.header + 30 : e.header + 30 + nlen])
        if local != raw:
            model.ambiguities.append(
                f"zip entry {e.name[:60]!r} is named {local[:60]!r} in its local header"
            )
            break


class _BufFile(io.RawIOBase):
    """A read-only file over ``buf[base:end]`` for Python's ``zipfile``."""

    def __init__(self, buf: Any, base: int, end: int) -> None:
        self.buf, self.base, self.end, self.pos = buf, base, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        size = self.end - self.base
        self.pos = max(
            0, offset if whence == 0 else self.pos + offset if whence == 1 else size + offset
        )
        return self.pos

    def readinto(self, b: Any) -> int:
        start = self.base + self.pos
        n = max(0, min(len(b), self.end - start))
        b[:n] = self.buf[start : start + n]
        self.pos += n
        return n


def _compare_zipfile(buf: Any, base: int, end: int, model: ZipModel) -> None:
    """Python's ``zipfile`` (ckpttool's readers, and most scanners) must list the same
    entries at the same headers; where it does not, the two readers see two archives."""
    try:
        with zipfile.ZipFile(_BufFile(buf, base, end)) as zf:
            theirs = [(i.filename, base + i.header_offset) for i in zf.infolist()]
            if not hasattr(buf, "prefetch"):  # a local file: the read lists it again
                start = directory_start(end - base, zf.start_dir)
                remember_directory(end - base, start, buf[base + start : end], zf.infolist())
    except Exception as exc:  # zipfile raises many kinds of errors on damaged archives
        model.ambiguities.append(f"Python's zipfile cannot read it ({type(exc).__name__})")
        return
    ours = [(e.name.replace("\\", "/"), e.header) for e in model.entries]
    if theirs != ours:
        model.ambiguities.append("Python's zipfile sees other entries than torch's reader")


def member(buf: Any, e: Entry, limit: int = MAX_MEMBER) -> bytes | None:
    """An entry's bytes as miniz extracts them (CRC not checked), or None when it cannot."""
    size = len(buf)
    nlen, xlen = struct.unpack("<HH", buf[e.header + 26 : e.header + 30])
    start = e.header + 30 + nlen + xlen
    if e.csize > limit or e.usize > limit or start + e.csize > size:
        return None
    raw = bytes(buf[start : start + e.csize])
    if e.method == 0:
        return raw if e.csize == e.usize else None
    if e.method != 8 or e.usize > MAX_DEFLATE_RATIO * max(e.csize, 1) + 1024:
        return None
    try:
        data = zlib.decompressobj(-15).decompress(raw, e.usize + 1)
    except (zlib.error, MemoryError):
        return None
    return data if len(data) == e.usize else None


def local_entries(buf: Any, base: int = 0, end: int | None = None) -> list[Entry]:
    """Entries found by walking local headers from ``base`` (what a streaming reader sees);
    stops at the first thing it cannot parse, or at a header whose size is in a descriptor."""
    end = len(buf) if end is None else end
    pos, out = base, list[Entry]()
    while pos + _LOCAL.size <= end and len(out) < 1 << 16:
        if bytes(buf[pos : pos + 4]) != b"PK\x03\x04":
            break
        f = _LOCAL.unpack(buf[pos : pos + _LOCAL.size])
        flags, method, csize, usize, nlen, xlen = f[2], f[3], f[7], f[8], f[9], f[10]
        name = bytes(buf[pos + 30 : pos + 30 + nlen]).decode("utf-8", "surrogateescape")
        extra = bytes(buf[pos + 30 + nlen : pos + 30 + nlen + xlen])
        usize, csize, _ = _zip64(extra, usize, csize, 0)
        if flags & 0x8 and csize == 0:
            break
        out.append(Entry(name, pos, csize, usize, method))
        pos += 30 + nlen + xlen + csize
    return out
