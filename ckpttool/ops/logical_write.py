"""Writing logical tensors (assembled from shard segments) into one ``.pt`` or safetensors file.

Each tensor is copied segment by segment from the shards (``copy_file_range``), read back in a
background thread and checked against its source (the segment's CRC-32, else its bytes); a cast
passes through memory one chunk at a time. :mod:`.consolidate` chooses what to write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo, TensorRef
from ..progress import phase as progress_phase
from ..readers.distributed import (
    LogicalStorage,
    LogicalTensor,
    Segment,
    iter_logical_chunks,
)
from ..tree import iter_tensors
from ..writers import copy as bytecopy
from ..writers.cast_kernels import Ring, ahead
from ..writers.clone import clone_block, same_blocks
from ..writers.crc import crc32
from ..writers.pt import StoragePlan, verify_bytes
from ..writers.pt_pickle import OutStorage, dumps
from ..writers.safetensors import Item, clone_layout, header_bytes, header_pad
from ..writers.zipwriter import ZipWriter, add_torch_header

Progress = Callable[[int], None]


def logical(ref: TensorRef) -> LogicalTensor:
    storage = ref.storage
    if not isinstance(storage, LogicalStorage) or storage.tensor is None:
        raise CheckpointError(None, "a tensor of the checkpoint is not a logical tensor")
    return storage.tensor


def out_dtype(t: LogicalTensor, dtype: str | None) -> str:
    if dtype and t.group == "model" and dtypes.get(t.dtype).is_floating:
        return dtype
    return t.out_dtype or t.dtype


# -- copying one logical tensor ------------------------------------------------------------
def _check_copy(
    fd: int,
    start: int,
    tensor: LogicalTensor,
    sources: bytecopy.Sources,
    clones: list[bytecopy.Clone],
    want_crc: bool,
    maps: Any = None,
) -> int:
    """Check a copied tensor against its sources, segment by segment, and return the CRC-32
    of the whole record (0 if not ``want_crc``).

    A copied segment is read back from the output and checked against its recorded CRC-32,
    else its bytes; a cloned one is checked by comparing extents (its head and tail by their
    bytes; ``maps``: :class:`.clone.ExtentMaps` of both files), its CRC-32 then the one its
    shard records for a tensor of one segment, else read from the input
    (:mod:`ckpttool.writers.clone`).
    """
    total = 0
    pos = start
    buf: bytearray | None = None
    same = maps.same_blocks if maps is not None else same_blocks
    for seg, cloned in zip(tensor.segments, clones, strict=True):
        src_fd = sources.fd(seg.file)
        if cloned.nbytes and same(
            src_fd, seg.offset + cloned.start, fd, pos + cloned.start, cloned.nbytes
        ):
            for a, b in ((0, cloned.start), (cloned.start + cloned.nbytes, seg.nbytes)):
                diff = bytecopy.compare_ranges(src_fd, seg.offset + a, fd, pos + a, b - a)
                if diff is not None:
                    raise bytecopy.CopyMismatch(f"differs from {seg.file} at byte {a + diff}")
            if want_crc and len(tensor.segments) == 1 and seg.crc is not None:
                total = seg.crc  # the CRC-32 its shard records for exactly these bytes
            elif want_crc:
                total = bytecopy.crc_range(src_fd, seg.offset, seg.nbytes, value=total)
        else:
            buf = buf or bytearray(min(bytecopy.CHUNK, max(tensor.nbytes, 1)))
            total = _read_segment(fd, pos, seg, sources, buf, total, cloned.crc)
        pos += seg.nbytes
    return total


def _read_segment(
    fd: int,
    pos: int,
    seg: Segment,
    sources: bytecopy.Sources,
    buf: bytearray,
    total: int,
    passed: int | None = None,
) -> int:
    """Read a copied segment back at ``pos``, check it against its source (its recorded
    CRC-32, else the CRC-32 of its bytes in the shard, or for a URL the CRC-32 ``passed``
    of the bytes as they were copied: never fetched twice), and return the record's CRC-32
    continued over it."""
    view = memoryview(buf)
    crc, left, off = 0, seg.nbytes, pos
    while left:
        want = min(left, len(buf))
        got = os.preadv(fd, [view[:want]], off)
        if got != want:
            raise bytecopy.CopyMismatch("is cut short in the output")
        crc = crc32(view[:want], crc)
        total = crc32(view[:want], total)
        off += want
        left -= want
    if seg.crc is not None:
        if crc != seg.crc:
            raise bytecopy.CopyMismatch(f"does not match the CRC-32 recorded in {seg.file}")
    elif passed is not None:
        if crc != passed:
            raise bytecopy.CopyMismatch(f"differs from the bytes read from {seg.file}")
    elif crc != bytecopy.crc_range(sources.fd(seg.file), seg.offset, seg.nbytes):
        diff = bytecopy.compare_ranges(sources.fd(seg.file), seg.offset, fd, pos, seg.nbytes)
        raise bytecopy.CopyMismatch(f"differs from {seg.file} at byte {diff}")
    return total


def record_phase(
    tensor: LogicalTensor, blocks: dict[str, int], torch_record: bool
) -> tuple[int, int]:
    """(alignment, phase) of the tensor's data offset in the output: the phase that lets the
    biggest segment be cloned (:mod:`ckpttool.writers.clone`), if any can be (a ``.pt`` record
    must stay 64-byte aligned, as torch writes it); else (64, 0), torch's alignment."""
    best: Segment | None = None
    for seg in tensor.segments:
        block = blocks.get(seg.file, 0)
        bigger = best is None or seg.nbytes > best.nbytes
        aligned = not torch_record or (seg.offset - seg.dest) % 64 == 0
        if block and seg.nbytes >= 2 * block and bigger and aligned:
            best = seg
    if best is None:
        return 64, 0
    block = blocks[best.file]
    return block, (best.offset - best.dest) % block


def clone_blocks(
    tensors: list[LogicalTensor], sources: bytecopy.Sources, folder: str
) -> dict[str, int]:
    """The clone block size of each shard file into ``folder`` (0: no cloning)."""
    blocks: dict[str, int] = {}
    for t in tensors:
        for seg in t.segments:
            if seg.file not in blocks:
                fd = sources.fd(seg.file)
                blocks[seg.file] = clone_block(fd, folder) if isinstance(fd, int) else 0
    return blocks if any(blocks.values()) else {}


def _write_cast(
    tensor: LogicalTensor,
    dtype: str,
    fd: int,
    sources: bytecopy.Sources,
    cb: Progress | None,
    ring: Ring,
) -> int:
    """Write the tensor cast to ``dtype`` chunk by chunk (into ``ring``'s buffers); return the
    CRC-32 written."""
    src = StorageInfo("cast", tensor.dtype, 0, "cpu", "", 0)
    crc = 0
    pieces: Iterator[tuple[int, bytearray | memoryview]] = (
        (len(p), bytecopy.recode(p, src, dtype, ring)) for p in iter_logical_chunks(tensor, sources)
    )
    if tensor.nbytes > bytecopy.CHUNK:  # read and cast the next piece while this is written
        pieces = ahead(pieces)
    for read, data in pieces:
        bytecopy.write_all(fd, data)
        crc = crc32(data, crc)
        if cb:
            cb(read)
    return crc


def write_logical(
    tensor: LogicalTensor,
    dtype: str,
    fd: int,
    start: int,
    sources: bytecopy.Sources,
    background: bytecopy.Background,
    cb: Progress | None,
    blocks: dict[str, int] | None = None,
    ring: Ring | None = None,
    want_crc: bool = True,
) -> tuple[int | None, Any]:
    """Write one tensor at ``fd``'s position: (its CRC-32 if already known, a read-back job).

    Segments whose offset in the output matches their offset in the shard modulo the clone
    block are cloned where the filesystem can (``blocks``), copied otherwise.
    """
    blocks = {} if blocks is None else blocks
    ring = Ring(3) if ring is None else ring
    if dtype != tensor.dtype:
        return _write_cast(tensor, dtype, fd, sources, cb, ring), None
    clones = []
    for seg in tensor.segments:
        try:
            clones.append(
                bytecopy.copy_range(
                    sources.fd(seg.file), seg.offset, seg.nbytes, fd, cb, blocks.get(seg.file, 0)
                )
            )
        except EOFError:
            raise CheckpointError(seg.file, f"is truncated: {tensor.name!r} is cut short") from None
    args = (fd, start, tensor, sources, clones, want_crc)
    if all(c.nbytes for c in clones):  # extents to compare once all are cloned: no thread
        job = background.defer(_check_copy, *args)
    elif tensor.nbytes < bytecopy.WRITEBACK_MIN:  # small: a hand-off costs more than a check
        job = background.defer(_check_copy, *args, now=True)
    else:
        job = background.submit(_check_copy, *args)
    if not any(c.nbytes for c in clones) and tensor.nbytes >= bytecopy.WRITEBACK_MIN:
        background.submit(bytecopy.start_writeback, fd, start, tensor.nbytes)
    return None, job


def _result_of(job: Any, path: str, name: str) -> int:
    try:
        return int(job.result())
    except bytecopy.CopyMismatch as exc:
        raise CheckpointError(
            path, f"verification failed: tensor {name!r} {exc}; nothing was written"
        ) from None


# -- the .pt writer ------------------------------------------------------------------------
def _plan(
    root: Any, dtype: str | None
) -> tuple[list[tuple[str, Any]], list[OutStorage], dict[int, OutStorage], dict[int, str]]:
    """The output records of ``root``'s tensors: views of one storage share its record."""
    named = list(iter_tensors(root))
    storage_of: dict[int, OutStorage] = {}
    dtype_of: dict[int, str] = {}
    outs: list[OutStorage] = []
    by_storage: dict[int, OutStorage] = {}
    for _name, ref in named:
        if id(ref) in storage_of:
            continue
        t = logical(ref)
        out = by_storage.get(id(ref.storage))
        if out is None:
            out = OutStorage(str(len(outs)), out_dtype(t, dtype), t.numel, ref.storage)
            by_storage[id(ref.storage)] = out
            outs.append(out)
        storage_of[id(ref)] = out
        dtype_of[id(ref)] = out.dtype
    return named, outs, storage_of, dtype_of


def write_pt(
    tmp: str,
    root: Any,
    dtype: str | None,
    sources: bytecopy.Sources,
    cb: Progress | None,
    verify: bool = True,
) -> StoragePlan:
    """Write ``root`` as a torch zip at ``tmp``: the pickle first, then every tensor's record.

    Returns the plan it wrote, for :func:`~ckpttool.writers.pt.verify_pt` (``verify``: it
    will be called, which the progress of the verifying phase counts).
    """
    named, outs, storage_of, dtype_of = _plan(root, dtype)
    pkl = dumps(root, storage_of, dtype_of)
    archive = "archive"
    tensors = [o.source.tensor for o in outs if isinstance(o.source, LogicalStorage)]
    blocks = clone_blocks(
        [t for t in tensors if t is not None], sources, os.path.dirname(os.path.abspath(tmp))
    )
    fd = os.open(tmp, os.O_RDWR)
    background = bytecopy.Background()
    ring = Ring(3)  # casts: the piece written, the one queued, the one being made
    try:
        zw = ZipWriter(fd)
        add_torch_header(zw, archive, pkl)
        pending: list[tuple[int, OutStorage, Any]] = []
        for out in outs:
            assert isinstance(out.source, LogicalStorage) and out.source.tensor is not None
            t = out.source.tensor
            align, phase = record_phase(t, blocks, True) if out.dtype == t.dtype else (64, 0)
            start = zw.begin(f"{archive}/data/{out.key}", out.nbytes, 0, align, phase)
            crc, job = write_logical(t, out.dtype, fd, start, sources, background, cb, blocks, ring)
            out.crc = crc
            out.read_back = job is not None
            zw.end()
            pending.append((len(zw.entries) - 1, out, job))
        zw.add_bytes(f"{archive}/version", b"3")
        serial = f"{crc32(pkl):08x}{len(outs):08x}".encode()
        zw.add_bytes(f"{archive}/.data/serialization_id", serial)
        verifying = progress_phase(cb, "verifying", verify_bytes(outs, verify))
        _set_crcs(zw, pending, tmp, verifying)
        zw.finish()
    finally:
        background.close()
        os.close(fd)
    return StoragePlan(outs, storage_of, dtype_of, named)


def _set_crcs(
    zw: ZipWriter, pending: list[tuple[int, OutStorage, Any]], tmp: str, cb: Progress | None
) -> None:
    """Record each record's CRC-32, waiting for its read-back (whose bytes ``cb`` counts)."""
    for index, out, job in pending:
        if job is not None:
            assert isinstance(out.source, LogicalStorage) and out.source.tensor is not None
            out.crc = _result_of(job, tmp, out.source.tensor.name)
            if cb:
                cb(out.nbytes)
        assert out.crc is not None
        zw.set_crc(index, out.crc)


# -- the safetensors writer ----------------------------------------------------------------
def _span(it: Item) -> tuple[str, int] | None:
    """(shard file, offset) of a tensor that lies whole in one shard and is copied as is."""
    t = logical(it.ref)
    if len(t.segments) != 1 or it.dtype != t.dtype:
        return None
    return t.segments[0].file, t.segments[0].offset


def write_st(
    path: str,
    items: list[Item],
    meta: dict[str, str],
    sources: bytecopy.Sources,
    cb: Progress | None,
    verify: bool = True,
) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    blocks = clone_blocks([logical(it.ref) for it in items], sources, folder)
    order = items
    if blocks:  # tensors whole in one shard in shard order, the header padded to keep phase
        order, _ = clone_layout(items, _span, sources, folder)
    pos = 0
    for it in order:
        it.begin = pos
        pos += it.nbytes
    header = header_bytes(items, meta)
    if blocks:
        header = header_bytes(items, meta, header_pad(order, len(header), _span, blocks))
    fd = os.open(path, os.O_RDWR)
    background = bytecopy.Background()
    progress_phase(cb, "writing")  # the next shard, after the last one's verifying
    ring = Ring(3)  # casts: the piece written, the one queued, the one being made
    try:
        bytecopy.write_all(fd, header)
        for it in order:
            start = len(header) + it.begin
            it.crc, it.job = write_logical(
                logical(it.ref), it.dtype, fd, start, sources, background, cb, blocks, ring, False
            )
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if end != len(header) + pos:
            raise OSError(f"wrote {end} bytes, expected {len(header) + pos}")
        left = sum(it.nbytes for it in items if it.job or verify)
        verifying = progress_phase(cb, "verifying", left)
        for it in items:
            if it.job is not None:
                _result_of(it.job, path, it.name)
                it.crc = None  # checked against the shards; no CRC-32 of its own
                it.read_back = True
                if verifying:
                    verifying(it.nbytes)
    finally:
        background.close()
        os.close(fd)
