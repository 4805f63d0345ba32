"""A zip writer for the layout ``torch.save`` really writes, with separate control over local
entries, central directories and end records, so that a file can say one thing to miniz
(which torch reads zips with) and another to a naive reader.

``torch.save`` (torch 2.x) writes every local header with flags ``0x0808`` (data descriptor,
UTF-8 names), version 0, CRC and sizes 0; the data follows a ``FB`` extra field that pads it
to 64 bytes; a ``PK\\x07\\x08`` descriptor follows the data; the central directory has the
real CRC and sizes; then a zip64 end record, its locator, and the classic end record.

Usage: ``b = MzZip(); i = b.local("archive/data.pkl", pkl); cd = b.central([Cd("archive/
data.pkl", i)]); b.end(cd)``, then ``b.bytes()``. :func:`torch_layout` builds the usual
entry list in one call.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

STORED, DEFLATED = 0, 8
TORCH_FLAGS = 0x0808  # bit 3: data descriptor; bit 11: UTF-8 names
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Local:
    """What one local entry recorded: where its header starts, its CRC and sizes."""

    offset: int
    crc: int
    csize: int
    usize: int
    method: int
    flags: int


@dataclass(frozen=True)
class Cd:
    """One central-directory entry; sizes, CRC and offset default to the local entry's."""

    name: str
    local: int  # index of the local entry (MzZip.local's return value)
    usize: int | None = None
    csize: int | None = None
    crc: int | None = None
    offset: int | None = None
    zip64: bool = False  # sizes and offset as 0xFFFFFFFF, real values in a zip64 extra


@dataclass(frozen=True)
class Dir:
    """A written central directory: where it starts, its size and entry count."""

    offset: int
    size: int
    count: int


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass
class MzZip:
    out: bytearray = field(default_factory=bytearray)
    locals: list[Local] = field(default_factory=list)

    def raw(self, data: bytes) -> int:
        """Append raw bytes; returns their offset."""
        off = len(self.out)
        self.out += data
        return off

    def local(
        self,
        name: str,
        data: bytes,
        *,
        method: int = STORED,
        descriptor: bool = True,
        extra: bytes | None = None,
        align: int = 64,
    ) -> int:
        """A local header + data (+ descriptor) as torch.save writes it; returns its index.

        ``descriptor=False``: classic layout (flags 0, CRC and sizes in the local header).
        ``extra``: the local extra field as is (``None``: torch's ``FB`` padding to ``align``).
        """
        stored = raw_deflate(data) if method == DEFLATED else data
        crc = zlib.crc32(data)
        offset = len(self.out)
        lname = name.encode()
        if extra is None:
            extra = b""
            if align:
                pad = (-(offset + 30 + len(lname) + 4)) % align
                extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        flags, version = (TORCH_FLAGS, 0) if descriptor else (0, 20)
        hcrc, hcs, hus = (0, 0, 0) if descriptor else (crc, len(stored), len(data))
        self.out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, flags, method, 0, 0, hcrc, hcs, hus,
            len(lname), len(extra),
        )  # fmt: skip
        self.out += lname + extra + stored
        if descriptor:
            self.out += struct.pack("<4sIII", b"PK\x07\x08", crc, len(stored), len(data))
        self.locals.append(Local(offset, crc, len(stored), len(data), method, flags))
        return len(self.locals) - 1

    def central(self, entries: list[Cd]) -> Dir:
        """Write a central directory for ``entries``; returns where it is."""
        start = len(self.out)
        for e in entries:
            loc = self.locals[e.local]
            crc = loc.crc if e.crc is None else e.crc
            usize = loc.usize if e.usize is None else e.usize
            csize = loc.csize if e.csize is None else e.csize
            offset = loc.offset if e.offset is None else e.offset
            extra = b""
            if e.zip64:
                body = struct.pack("<QQQ", usize, csize, offset)
                extra = struct.pack("<HH", 1, len(body)) + body
                usize = csize = offset = _U32
            cname = e.name.encode()
            version = 0 if loc.flags else 20
            self.out += struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 45 if e.zip64 else version, loc.flags,
                loc.method, 0, 0, crc, csize, usize, len(cname), len(extra), 0, 0, 0, 0, offset,
            )  # fmt: skip
            self.out += cname + extra
        return Dir(start, len(self.out) - start, len(entries))

    def end64(self, d: Dir) -> None:
        """torch's zip64 end record and locator for ``d``."""
        rec = len(self.out)
        self.out += struct.pack("<4sQHHII", b"PK\x06\x06", 44, 0, 0, 0, 0)
        self.out += struct.pack("<QQQQ", d.count, d.count, d.size, d.offset)
        self.out += struct.pack("<4sIQI", b"PK\x06\x07", 0, rec, 1)

    def end(self, d: Dir, *, comment: bytes = b"", count: int | None = None) -> None:
        """The classic end record for ``d`` (``count``: the entry count it claims)."""
        n = d.count if count is None else count
        self.out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, d.size, d.offset, len(comment))
        self.out += comment

    def bytes(self) -> bytes:
        return bytes(self.out)


def torch_names(
    pkl: bytes, storages: dict[str, bytes] | None = None, root: str = "archive"
) -> list[tuple[str, bytes]]:
    """(name, data) of each entry ``torch.save`` writes, in its order."""
    items = [
        (f"{root}/data.pkl", pkl),
        (f"{root}/.format_version", b"1"),
        (f"{root}/.storage_alignment", b"64"),
        (f"{root}/byteorder", b"little"),
    ]
    items += [(f"{root}/data/{k}", v) for k, v in (storages or {}).items()]
    items += [(f"{root}/version", b"3\n"), (f"{root}/.data/serialization_id", b"0" * 40)]
    return items


def torch_layout(
    pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    root: str = "archive",
    zip64_end: bool = True,
    comment: bytes = b"",
    trailer: bytes = b"",
    zip64_entries: bool = False,
) -> bytes:
    """A whole file laid out byte for byte as ``torch.save`` lays it out."""
    z = MzZip()
    cds = [Cd(n, z.local(n, d), zip64=zip64_entries) for n, d in torch_names(pkl, storages, root)]
    d = z.central(cds)
    if zip64_end:
        z.end64(d)
    z.end(d, comment=comment)
    z.raw(trailer)
    return z.bytes()
