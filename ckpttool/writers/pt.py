"""The torch zip writer: the rewritten pickle, storage records copied or recoded, read back.

Verbatim records are copied with ``copy_file_range`` and checked in a background thread while
the next one copies; records that must pass through memory (casts, byte swaps, deflated input,
arrays made from numpy) are written chunk by chunk with their CRC-32 computed on the way.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError
from ..model import TensorRef
from ..ops.plain import MemoryStorage
from ..readers import open_checkpoint
from . import copy as bytecopy
from .pt_pickle import OutStorage, dumps
from .zipwriter import ZipWriter

Progress = Callable[[int], None]


def _write_transformed(
    out: OutStorage,
    src_fd: int,
    dst_fd: int,
    memory: MemoryStorage | None,
    progress: Progress | None,
) -> int:
    """Write a storage that must pass through memory (cast, byte swap, deflated, in-memory).

    Returns the CRC-32 of the bytes written.
    """
    src = out.source
    assert src is not None
    if memory is not None:
        bytecopy.write_all(dst_fd, memory.data)
        if progress:
            progress(len(memory.data))
        return zlib.crc32(memory.data)
    crc = 0
    simple = out.dtype == src.dtype and not src.big_endian
    for chunk in bytecopy.iter_storage_chunks(src, src_fd):
        data = chunk if simple else bytecopy.recode(chunk, src, out.dtype)
        bytecopy.write_all(dst_fd, data)
        crc = zlib.crc32(data, crc)
        if progress:
            progress(len(data))  # output bytes, as the total counts them (a cast changes size)
    return crc


def _serialization_id(pkl: bytes, outs: list[OutStorage]) -> bytes:
    h = hashlib.sha1(pkl)
    for o in outs:
        h.update(f"{o.key}:{o.dtype}:{o.numel};".encode())
    return h.hexdigest().encode()


def write_pt(
    dst_tmp: str,
    root: Any,
    outs: list[OutStorage],
    storage_of: dict[int, OutStorage],
    dtype_of: dict[int, str],
    memory: dict[str, MemoryStorage],
    progress: Progress | None,
    *,
    check_copies: bool = True,
    archive: str = "archive",
) -> dict[str, int]:
    """Write the torch zip file; return each storage key's data offset in it.

    Verbatim copies get their CRC-32 by reading the output back (``check_copies``, which also
    proves the copy), or from the input's zip record when that is skipped.
    """
    try:
        pkl = dumps(root, storage_of, dtype_of)
    except RecursionError:
        raise CheckpointError(None, "the checkpoint is nested too deeply to re-save") from None
    sources = bytecopy.Sources()
    background = bytecopy.Background()
    fd = os.open(dst_tmp, os.O_RDWR)  # no O_TRUNC: ext4 would flush the file on close
    offsets: dict[str, int] = {}
    try:
        zw = ZipWriter(fd)
        zw.add_bytes(f"{archive}/data.pkl", pkl)
        zw.add_bytes(f"{archive}/.format_version", b"1")
        zw.add_bytes(f"{archive}/.storage_alignment", b"64")
        zw.add_bytes(f"{archive}/byteorder", b"little")
        pending: list[tuple[int, OutStorage, Any]] = []
        for out in outs:
            src = out.source
            assert src is not None
            mem = memory.get(src.key) if not src.file else None
            verbatim = out.copies_verbatim and mem is None
            phase = src.offset % 4096 if verbatim and src.offset % 64 == 0 else 0
            start = zw.begin(
                f"{archive}/data/{out.key}", out.nbytes, 0, 4096 if phase else 64, phase
            )
            offsets[out.key] = start
            job = None
            if verbatim:
                src_fd = sources.fd(src.file)
                try:
                    bytecopy.copy_range(src_fd, src.offset, src.nbytes, fd, progress)
                except EOFError:
                    raise CheckpointError(
                        src.file, "is truncated: a storage is cut short"
                    ) from None
                if check_copies or src.crc is None:  # read back (in the background)
                    job = background.submit(
                        bytecopy.read_back, fd, start, src.nbytes, src_fd, src.offset, src.crc
                    )
                    out.read_back = True
                else:
                    out.crc = src.crc
                background.submit(bytecopy.start_writeback, fd, start, src.nbytes)
            else:
                out.crc = _write_transformed(
                    out, sources.fd(src.file) if src.file else -1, fd, mem, progress
                )
            zw.end()
            pending.append((len(zw.entries) - 1, out, job))
        zw.add_bytes(f"{archive}/version", b"3")
        zw.add_bytes(f"{archive}/.data/serialization_id", _serialization_id(pkl, outs))
        for index, out, job in pending:
            if job is not None:
                try:
                    out.crc = job.result()
                except bytecopy.CopyMismatch as exc:
                    src = out.source
                    raise CheckpointError(
                        src.file if src else None,
                        f"storage record {src.record if src else out.key} {exc}: "
                        "the input is corrupt or changed while it was copied",
                    ) from None
            assert out.crc is not None
            zw.set_crc(index, out.crc)
        zw.finish()
    finally:
        background.close()
        os.close(fd)
        sources.close()
    return offsets


# -- verification --------------------------------------------------------------------------
def verify_pt(
    path: str,
    named: list[tuple[str, TensorRef]],
    storage_of: dict[int, OutStorage],
    dtype_of: dict[int, str],
    outs: list[OutStorage],
) -> None:
    """Re-open the written file and compare it with what was intended, bytes streamed."""

    def fail(what: str) -> CheckpointError:
        return CheckpointError(path, f"verification failed: {what}; nothing was written")

    try:
        back = open_checkpoint(path)
    except CheckpointError as exc:
        raise fail(exc.message) from None
    got = back.tensors()
    if len(got) != len(named):
        raise fail(f"{len(got)} tensors read back, {len(named)} written")
    for t, (name, ref) in zip(got, named, strict=True):
        out = storage_of[id(ref)]
        want_dtype = dtype_of.get(id(ref), ref.dtype)
        if (
            t.name != name
            or t.dtype != want_dtype
            or t.shape != ref.shape
            or t.stride != ref.stride
            or t.storage_offset != ref.storage_offset
            or t.storage is None
            or t.storage.key != out.key
            or t.storage.location != "cpu"
        ):
            raise fail(f"tensor {name!r} reads back differently")
    fd = os.open(path, os.O_RDONLY)
    try:
        for out in outs:
            s = back.storages.get(out.key)
            if s is None or s.nbytes != out.nbytes or s.crc != out.crc:
                raise fail(f"storage {out.key} reads back differently")
            if not out.read_back and bytecopy.crc_range(fd, s.offset, s.nbytes) != out.crc:
                raise fail(f"storage {out.key}'s bytes differ from what was written")
    finally:
        os.close(fd)
