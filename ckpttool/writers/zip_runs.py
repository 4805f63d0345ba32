"""Storage records taken over with their zip headers: one clone for a run of records.

torch's zip writer lays its records out one after another: local header, name, padding,
the bytes, a data descriptor. An output that keeps the input's first records whole, in order
and under the same keys (a key rename: ``convert --strip-module``) can take the bytes from the
first record's local header to the last one's descriptor over as they are, under the input's
archive name. Where the filesystem shares blocks (:mod:`.clone`) that is one clone, placed at
the input's offset modulo the block, instead of a local header, a clone and two copied ends
for every record; the central directory lists them from what the input's directory and
descriptors record. The records keep torch's own layout, 64-byte alignment included.

Before a record joins a run its neighbourhood is read and checked, so that nothing but the
records and their zip framing is taken over: the local header (stored, flags), the data
descriptor after it (the CRC-32 and size the directory records) and that the next record's
header follows right after it. A record that does not fit ends the run; the rest are written
one by one as before.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from ..errors import CheckpointError
from . import copy as bytecopy
from .pt_pickle import OutStorage
from .zipwriter import ZipWriter

Progress = bytecopy.Progress

_LOCAL = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, ...
_DESCRIPTOR = b"PK\x07\x08"
_FOLLOWS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x06\x06", b"PK\x05\x06")  # what may come next
_GAPS = (0, 12, 16, 20, 24)  # a data descriptor's lengths (with or without signature, zip64)
_HAS_DESCRIPTOR = 0x8
_ENCRYPTED = 0x1
MIN_RECORDS = 2  # one record is no better taken over than written


class Run:
    """Input records ``outs`` (in order), from ``start`` (the first local header) to ``end``
    (after the last descriptor) in ``file``, named ``root/data/KEY``; ``flags``: each one's
    local header flags. (A plain class: a dataclass costs ~0.5 ms to import.)"""

    __slots__ = ("end", "entries", "file", "first", "flags", "outs", "root", "start")

    def __init__(self, file: str, root: str, start: int, out: OutStorage, flags: int) -> None:
        self.file, self.root, self.start, self.end = file, root, start, 0
        self.outs, self.flags = [out], [flags]
        self.first = 0  # once written: the index of its first entry in the output's zip
        self.entries: list[Any] = []  # and those entries (``zipwriter._Entry``)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outs)


def find_run(outs: list[OutStorage], memory: dict[str, Any], src_fd: int) -> Run | None:
    """The run of records the output can take over from the input open as ``src_fd``: the
    longest first part of ``outs`` copied whole and verbatim from consecutive zip records of
    one file, keys unchanged; None if it would hold fewer than :data:`MIN_RECORDS`."""
    if not outs or not _whole(outs[0], memory):
        return None
    first = outs[0].source
    assert first is not None and first.header is not None and first.record is not None
    root = _root(outs[0])
    head = os.pread(src_fd, _LOCAL.size, first.header)
    flags = _local_flags(head)
    if root is None or flags is None:
        return None
    run = Run(first.file, root, first.header, outs[0], flags)
    for out in outs[1:]:
        prev, src = run.outs[-1].source, out.source
        if not _whole(out, memory) or _root(out) != root:
            break
        assert prev is not None and src is not None and src.header is not None
        if src.file != run.file:
            break
        prev_end = prev.offset + prev.nbytes
        gap = src.header - prev_end
        if gap not in _GAPS:
            break
        got = os.pread(src_fd, gap + _LOCAL.size, prev_end)
        flags = _local_flags(got[gap:])
        if flags is None or not _framed(got[:gap], run.flags[-1], run.outs[-1]):
            break
        run.outs.append(out)
        run.flags.append(flags)
    while run.outs:  # the last one's descriptor must be one too, else it is left out
        end = _end_of(src_fd, run.outs[-1], run.flags[-1])
        if end is not None:
            run.end = end
            break
        run.outs.pop()
        run.flags.pop()
    return run if len(run.outs) >= MIN_RECORDS else None


def _whole(out: OutStorage, memory: dict[str, Any]) -> bool:
    """Whether ``out`` is a whole, 64-byte aligned zip record copied as it is."""
    src = out.source
    return (
        src is not None
        and out.copies_verbatim
        and bool(src.file)
        and src.key not in memory
        and src.header is not None
        and src.record is not None
        and src.crc is not None
        and src.key == out.key
        and src.nbytes == out.nbytes
        and src.offset % 64 == 0
    )


def _root(out: OutStorage) -> str | None:
    """The archive name of ``out``'s input record (``ROOT/data/KEY``), None if not so named."""
    record = (out.source.record if out.source else None) or ""
    tail = f"/data/{out.key}"
    return record[: -len(tail)] if record.endswith(tail) and len(record) > len(tail) else None


def _local_flags(head: bytes) -> int | None:
    """The flags of a stored, unencrypted local header, else None."""
    if len(head) < _LOCAL.size:
        return None
    sig, _version, flags, method = _LOCAL.unpack_from(head)[:4]
    if sig != b"PK\x03\x04" or method != 0 or flags & _ENCRYPTED:
        return None
    return int(flags)


def _framed(gap: bytes, flags: int, out: OutStorage) -> bool:
    """Whether ``gap`` (the bytes after ``out``'s data) is what its header announces: nothing,
    or a data descriptor recording its CRC-32 and size."""
    if not flags & _HAS_DESCRIPTOR:
        return not gap
    src = out.source
    assert src is not None
    if gap[:4] == _DESCRIPTOR:
        gap = gap[4:]
    if len(gap) == 12:
        crc, csize, usize = struct.unpack("<3I", gap)
    elif len(gap) == 20:
        crc, csize, usize = struct.unpack("<IQQ", gap)
    else:
        return False
    return crc == src.crc and csize == usize == out.nbytes


def _end_of(src_fd: int, out: OutStorage, flags: int) -> int | None:
    """Where the last record of a run ends: after its descriptor, where the next zip
    structure begins; None if no descriptor length fits."""
    src = out.source
    assert src is not None
    data_end = src.offset + src.nbytes
    after = os.pread(src_fd, max(_GAPS) + 4, data_end)
    for gap in _GAPS:
        if after[gap : gap + 4] in _FOLLOWS and _framed(after[:gap], flags, out):
            return data_end + gap
    return None


# -- writing a run -----------------------------------------------------------------------------
def take_run(
    run: Run,
    zw: ZipWriter,
    sources: bytecopy.Sources,
    background: bytecopy.Background,
    progress: Progress | None,
    check_copies: bool,
    block: int,
) -> Any:
    """Clone (or copy) a run of records with their zip framing, list them in the zip; return
    the job that checks the copy (None: not checked)."""
    src_fd, fd = sources.fd(run.file), zw.fd
    start, n = zw.pos, run.end - run.start
    assert (start - run.start) % block == 0
    try:
        cloned = bytecopy.copy_range(src_fd, run.start, n, fd, None, block)
    except EOFError:
        raise CheckpointError(run.file, "is truncated: a storage is cut short") from None
    zw.moved()
    run.first, shift = len(zw.entries), start - run.start
    lo, hi = run.start + cloned.start, run.start + cloned.start + cloned.nbytes
    for out, flags in zip(run.outs, run.flags, strict=True):
        src = out.source
        assert src is not None and src.header is not None and src.crc is not None
        name = f"{run.root}/data/{out.key}"
        zw.adopt(name, src.header + shift, src.offset + shift, src.nbytes, src.crc, flags)
        out.crc, out.read_back = src.crc, check_copies
        out.cloned = max(0, min(hi, src.offset + src.nbytes) - max(lo, src.offset))
    run.entries = zw.entries[run.first :]
    if progress:
        progress(run.nbytes)
    if not cloned.nbytes and n >= bytecopy.WRITEBACK_MIN:
        background.submit(bytecopy.start_writeback, fd, start, n)
    if not check_copies:
        return None
    return background.check(fd, start, n, src_fd, run.start, None, cloned, want_crc=False)


def check_run(run: Run, job: Any, progress: Progress | None) -> None:
    """Wait for the check of a run's copy (its records' CRC-32s are the input's)."""
    try:
        job.result()
    except bytecopy.CopyMismatch as exc:
        first, last = run.outs[0].source, run.outs[-1].source
        names = f"{first.record if first else ''} to {last.record if last else ''}"
        raise CheckpointError(
            run.file,
            f"storage records {names}: the copy {exc}: the input is corrupt or changed while "
            "it was copied",
        ) from None
    if progress:
        progress(run.nbytes)
