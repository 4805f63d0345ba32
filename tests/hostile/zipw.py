"""A raw zip *writer* with knobs for lying: wrong CRCs, mismatched local/central names,
forged sizes (zip64), the encryption flag, prepended data. Also torch-layout helpers.

``zipfile`` cannot write most of these, so headers are packed with ``struct`` here.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

STORED = 0
DEFLATED = 8
_U32_MAX = 0xFFFFFFFF
_DOSTIME = 0  # 1980-01-01 00:00, deterministic
_DOSDATE = (0 << 9) | (1 << 5) | 1


@dataclass(frozen=True)
class ZEntry:
    name: str
    data: bytes = b""
    method: int = STORED
    crc: int | None = None  # None: the real CRC-32 of ``data``
    local_name: str | None = None  # None: same as ``name``
    flags: int = 0
    declared_size: int | None = None  # uncompressed size in the headers (None: real size)
    raw: bytes | None = None  # bytes actually stored (None: ``data``, deflated if asked)
    align: int = 64  # STORED entries: pad the local extra field so the data is aligned
    declared_csize: int | None = None  # compressed size in the headers (None: real size)
    version_needed: int | None = None  # "version needed to extract" (None: 20, or 45 zip64)
    declared_offset: int | None = None  # central-directory local-header offset (zip64 if big)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def deflate_zeros(total: int, chunk: int = 1 << 20) -> bytes:
    """A raw deflate stream that inflates to ``total`` zero bytes (rounded down to ``chunk``).

    Built by repeating one independently decodable, non-final block set: ~1 KiB per MiB,
    so 2 GiB of output costs ~2 MiB of file and no time to build.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * chunk) + c.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # empty final block
    return block * (total // chunk) + final


def build_zip(
    entries: list[ZEntry],
    *,
    prefix: bytes = b"",
    comment: bytes = b"",
    eocd_cd_shift: int = 0,
    zip64_eocd_cd_shift: int | None = None,
) -> bytes:
    """Serialize ``entries``; offsets are absolute (``prefix`` counts), like a polyglot.

    ``eocd_cd_shift`` moves the central-directory offset recorded in the end record: zipfile
    then "corrects" every local-header offset by minus that much (negative offsets).
    ``zip64_eocd_cd_shift`` adds a zip64 end record + locator whose 64-bit central-directory
    offset is shifted the same way (so the shift can exceed 2**63).
    """
    out = bytearray(prefix)
    central = bytearray()
    for e in entries:
        stored = (
            e.raw
            if e.raw is not None
            else (raw_deflate(e.data) if e.method == DEFLATED else e.data)
        )
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        usize = len(e.data) if e.declared_size is None else e.declared_size
        csize = len(stored) if e.declared_csize is None else e.declared_csize
        big_offset = e.declared_offset is not None and e.declared_offset >= _U32_MAX
        zip64 = usize >= _U32_MAX or csize >= _U32_MAX or big_offset
        version = e.version_needed if e.version_needed is not None else (45 if zip64 else 20)
        sizes64 = usize >= _U32_MAX or csize >= _U32_MAX
        h_usize, h_csize = (_U32_MAX, _U32_MAX) if sizes64 else (usize, csize)
        z64 = struct.pack("<QQ", usize, csize) if sizes64 else b""
        if big_offset:
            z64 += struct.pack("<Q", e.declared_offset)
        z64 = struct.pack("<HH", 1, len(z64)) + z64 if z64 else b""
        z64_local = struct.pack("<HHQQ", 1, 16, usize, csize) if sizes64 else b""
        lname = (e.local_name if e.local_name is not None else e.name).encode()
        cname = e.name.encode()
        offset = len(out)
        cd_offset = offset if e.declared_offset is None else e.declared_offset
        cd_offset = _U32_MAX if big_offset else cd_offset
        extra = z64_local
        if e.method == STORED and e.align:
            base = offset + 30 + len(lname) + len(extra) + 4
            pad = (-base) % e.align
            extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding
        out += struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            version,
            e.flags,
            e.method,
            _DOSTIME,
            _DOSDATE,
            crc,
            h_csize,
            h_usize,
            len(lname),
            len(extra),
        )
        out += lname + extra + stored
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            0x031E,
            version,
            e.flags,
            e.method,
            _DOSTIME,
            _DOSDATE,
            crc,
            h_csize,
            h_usize,
            len(cname),
            len(z64),
            0,
            0,
            0,
            0o100644 << 16,
            cd_offset,
        )
        central += cname + z64
    cd_start = len(out)
    out += central
    if zip64_eocd_cd_shift is not None:
        rec64 = len(out)
        n = len(entries)
        cd_off = (cd_start + zip64_eocd_cd_shift) % (1 << 64)
        out += struct.pack("<4sQHHII", b"PK\x06\x06", 44, 45, 45, 0, 0)
        out += struct.pack("<QQQQ", n, n, len(central), cd_off)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, rec64, 1)
    out += struct.pack(
        "<IHHHHIIH",
        0x06054B50,
        0,
        0,
        len(entries),
        len(entries),
        len(central),
        cd_start + eocd_cd_shift,
        len(comment),
    )
    out += comment
    return bytes(out)


def torch_entries(
    pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    root: str = "archive",
    byteorder: bytes | None = b"little",
) -> list[ZEntry]:
    """The entry list ``torch.save`` (torch 2.x) writes, in its order."""
    entries = [
        ZEntry(f"{root}/data.pkl", pkl),
        ZEntry(f"{root}/.format_version", b"1"),
        ZEntry(f"{root}/.storage_alignment", b"64"),
    ]
    if byteorder is not None:
        entries.append(ZEntry(f"{root}/byteorder", byteorder))
    for key, data in (storages or {}).items():
        entries.append(ZEntry(f"{root}/data/{key}", data))
    entries.append(ZEntry(f"{root}/version", b"3\n"))
    entries.append(ZEntry(f"{root}/.data/serialization_id", b"0" * 40))
    return entries


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, **kw) -> bytes:
    return build_zip(torch_entries(pkl, storages, **kw))


def patch(entries: list[ZEntry], suffix: str, **changes) -> list[ZEntry]:
    """Return ``entries`` with the (single) entry whose name ends with ``suffix`` changed."""
    hits = [i for i, e in enumerate(entries) if e.name.endswith(suffix)]
    assert len(hits) == 1, (suffix, [e.name for e in entries])
    out = list(entries)
    out[hits[0]] = replace(out[hits[0]], **changes)
    return out
