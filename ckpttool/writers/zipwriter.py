"""A minimal zip writer for torch's format: stored entries, aligned data, zip64, CRC patching.

It writes what ``torch.save`` writes (``ROOT/data.pkl``, ``ROOT/data/KEY`` aligned to 64 bytes,
...), but lets a storage record's bytes come straight from another file (``copy_file_range``)
instead of through Python.
"""

from __future__ import annotations

import os
import struct

from .crc import crc32

_LOCAL = struct.Struct("<4s5H3I2H")
_CENTRAL = struct.Struct("<4s6H3I5HII")
_EOCD = struct.Struct("<4s4H2IH")
_EOCD64 = struct.Struct("<4sQ2H2I4Q")
_LOCATOR64 = struct.Struct("<4sIQI")
_U32 = 0xFFFFFFFF
_FLAGS = 0x800  # names are UTF-8


class _Entry:
    """One entry: its name, offsets, size, CRC-32 and local header flags (a plain class: a
    dataclass costs ~0.5 ms to import)."""

    __slots__ = ("crc", "data_offset", "flags", "header_offset", "name", "size", "zip64")

    def __init__(
        self,
        name: bytes,
        header_offset: int,
        data_offset: int,
        size: int,
        crc: int,
        zip64: bool,
        flags: int = _FLAGS,
    ) -> None:
        self.name, self.header_offset, self.data_offset = name, header_offset, data_offset
        self.size, self.crc, self.zip64, self.flags = size, crc, zip64, flags


class ZipWriter:
    """Writes entries sequentially to an open file descriptor.

    ``base`` is where the archive begins in the file (a DCP item is a zip inside a larger
    file): the offsets the archive records are relative to it, and ``align`` pads data to
    offsets relative to it too.
    """

    def __init__(self, fd: int, base: int | None = None) -> None:
        self.fd = fd
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)
        self.base = self.pos if base is None else base
        self.entries: list[_Entry] = []
        self.central: list[int] = []  # absolute offset of each entry's central record

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.pos += len(data)

    def begin(self, name: str, size: int, crc: int = 0, align: int = 64, phase: int = 0) -> int:
        """Write a local header; the data must follow (``size`` bytes). Returns the data offset.

        The data starts at an offset ``≡ phase (mod align)``: 64-byte alignment as torch writes
        it, or the input record's offset modulo 4096 so that kernel copies stay page-aligned.
        """
        raw = name.encode("utf-8")
        zip64 = size >= _U32
        extra = struct.pack("<2H2Q", 1, 16, size, size) if zip64 else b""
        base = self.pos - self.base + _LOCAL.size + len(raw) + len(extra)
        pad = (phase - base) % align
        if pad:
            while pad < 4:
                pad += align
            extra += struct.pack("<2H", 0x4246, pad - 4) + b"Z" * (pad - 4)  # torch's "FB" pad
        header = _LOCAL.pack(
            b"PK\x03\x04",
            45 if zip64 else 20,
            _FLAGS,
            0,  # stored
            0,
            0,
            crc,
            _U32 if zip64 else size,
            _U32 if zip64 else size,
            len(raw),
            len(extra),
        )
        entry = _Entry(raw, self.pos - self.base, 0, size, crc, zip64)
        self._write(header + raw + extra)
        entry.data_offset = self.pos
        self.entries.append(entry)
        return entry.data_offset  # absolute

    def end(self) -> None:
        """Check that the last entry's data was written in full (callers write to ``fd``)."""
        entry = self.entries[-1]
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if self.pos != entry.data_offset + entry.size:
            raise OSError(f"zip entry {entry.name!r} has {self.pos - entry.data_offset} bytes")

    def add_bytes(self, name: str, data: bytes, align: int = 64, phase: int = 0) -> None:
        self.begin(name, len(data), crc32(data), align, phase)
        self._write(data)

    def adopt(self, name: str, header: int, data: int, size: int, crc: int, flags: int) -> None:
        """List an entry whose local header (at absolute offset ``header``, with ``flags``) and
        data (at ``data``) the caller wrote (:mod:`.zip_runs`: taken over from another zip).
        """
        self.entries.append(_Entry(name.encode("utf-8"), header - self.base, data, size, crc,
                                   size >= _U32, flags))  # fmt: skip

    def moved(self) -> None:
        """Take the file position as the end of what is written (after the caller wrote)."""
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)

    def set_crc(self, index: int, crc: int) -> None:
        """Patch an entry's CRC-32 in its local header (computed after its data was copied)."""
        entry = self.entries[index]
        entry.crc = crc
        os.pwrite(self.fd, struct.pack("<I", crc), self.base + entry.header_offset + 14)
        if index < len(self.central):  # already finished: its central record too
            os.pwrite(self.fd, struct.pack("<I", crc), self.central[index] + 16)

    def finish(self) -> None:
        cd_start = self.pos - self.base
        chunks = []
        self.central = []
        at = self.pos
        for e in self.entries:
            fields64 = []
            usize = csize = e.size
            offset = e.header_offset
            if e.size >= _U32:
                fields64 += [e.size, e.size]
                usize = csize = _U32
            if e.header_offset >= _U32:
                fields64.append(e.header_offset)
                offset = _U32
            extra = (
                struct.pack(f"<2H{len(fields64)}Q", 1, 8 * len(fields64), *fields64)
                if fields64
                else b""
            )
            version = 45 if fields64 else 20
            chunks.append(
                _CENTRAL.pack(
                    b"PK\x01\x02",
                    version,
                    version,
                    e.flags,
                    0,
                    0,
                    0,
                    e.crc,
                    csize,
                    usize,
                    len(e.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + e.name
                + extra
            )
            self.central.append(at)
            at += len(chunks[-1])
        self._write(b"".join(chunks))
        cd_size = self.pos - self.base - cd_start
        n = len(self.entries)
        if n >= 0xFFFF or cd_start >= _U32 or cd_size >= _U32:
            eocd64 = self.pos - self.base
            self._write(_EOCD64.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self._write(_LOCATOR64.pack(b"PK\x06\x07", 0, eocd64, 1))
            self._write(
                _EOCD.pack(b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), _U32, _U32, 0)
            )
        else:
            self._write(_EOCD.pack(b"PK\x05\x06", 0, 0, n, n, cd_size, cd_start, 0))


def add_torch_header(
    zw: ZipWriter, archive: str, pkl: bytes, end: tuple[int, int] | None = None
) -> None:
    """The entries torch.save writes before the storage records: the pickle, the storage
    alignment and the byte order.

    With ``end`` = (block, phase), the last of them (the byte order, read whole by torch:
    its alignment does not matter) ends at an offset ``≡ phase (mod block)``, where a run of
    records taken over from the input begins (:mod:`.zip_runs`).

    Not ``.format_version``: version 1 lets torch compute where each record lies instead of
    reading the zip (``torch.utils.serialization.config.load.calculate_storage_offsets`` with
    ``mmap=True``), assuming miniz's layout: a data descriptor after each record and the next
    record at the next multiple of ``.storage_alignment``. This writer adds no descriptors and
    keeps some records at their input's phase in a page (or a clone block), so torch would
    read the wrong bytes without an error (measured: 303 of 305 tensors); without the version
    torch reads every offset from the zip, as for files saved before it existed.

    The pickle is ours: the writers' re-read of what they wrote (their verification) need
    not walk it for size bombs first (``unpickling/parsed.py``; 0.05-0.1 s for a pickle of
    thousands of tensors). If it reads back with other bytes, it is walked.
    """
    from ..unpickling.parsed import remember_parsed

    remember_parsed(pkl)
    zw.add_bytes(f"{archive}/data.pkl", pkl)
    zw.add_bytes(f"{archive}/.storage_alignment", b"64")
    order = b"little"
    if end is None:
        zw.add_bytes(f"{archive}/byteorder", order)
    else:
        block, phase = end
        zw.add_bytes(f"{archive}/byteorder", order, block, (phase - len(order)) % block)
