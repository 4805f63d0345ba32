"""Writing logical tensors (assembled from shard segments) into one ``.pt`` or safetensors file.

Each tensor is copied segment by segment from the shards (``copy_file_range``), read back in a
background thread and checked against its source (the segment's CRC-32, else its bytes); a cast
passes through memory one chunk at a time. :mod:`.consolidate` chooses what to write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo, TensorRef
from ..progress import phase as progress_phase
from ..readers.distributed import LogicalStorage, LogicalTensor, copy_logical, iter_logical_chunks
from ..tree import iter_tensors
from ..writers import copy as bytecopy
from ..writers.crc import crc32
from ..writers.pt import StoragePlan, verify_bytes
from ..writers.pt_pickle import OutStorage, dumps
from ..writers.safetensors import Item, header_bytes
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
def _check_copy(fd: int, start: int, tensor: LogicalTensor, sources: bytecopy.Sources) -> int:
    """Read a copied tensor back from the output, check every segment against its source
    (its recorded CRC-32, else its bytes), and return the CRC-32 of the whole record."""
    total = 0
    pos = start
    buf = bytearray(min(bytecopy.CHUNK, max(tensor.nbytes, 1)))
    view = memoryview(buf)
    for seg in tensor.segments:
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
        else:
            diff = bytecopy.compare_ranges(sources.fd(seg.file), seg.offset, fd, pos, seg.nbytes)
            if diff is not None:
                raise bytecopy.CopyMismatch(f"differs from {seg.file} at byte {diff}")
        pos += seg.nbytes
    return total


def _write_cast(
    tensor: LogicalTensor, dtype: str, fd: int, sources: bytecopy.Sources, cb: Progress | None
) -> int:
    """Write the tensor cast to ``dtype`` chunk by chunk; return the CRC-32 written."""
    src = StorageInfo("cast", tensor.dtype, 0, "cpu", "", 0)
    crc = 0
    for piece in iter_logical_chunks(tensor, sources):
        data = bytecopy.recode(bytearray(piece), src, dtype)
        bytecopy.write_all(fd, data)
        crc = crc32(data, crc)
        if cb:
            cb(len(piece))
    return crc


def write_logical(
    tensor: LogicalTensor,
    dtype: str,
    fd: int,
    start: int,
    sources: bytecopy.Sources,
    background: bytecopy.Background,
    cb: Progress | None,
) -> tuple[int | None, Any]:
    """Write one tensor at ``fd``'s position: (its CRC-32 if already known, a read-back job)."""
    if dtype != tensor.dtype:
        return _write_cast(tensor, dtype, fd, sources, cb), None
    copy_logical(tensor, fd, sources, cb)
    job = background.submit(_check_copy, fd, start, tensor, sources)
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
    named = list(iter_tensors(root))
    storage_of: dict[int, OutStorage] = {}
    dtype_of: dict[int, str] = {}
    outs: list[OutStorage] = []
    by_storage: dict[int, OutStorage] = {}  # views of one storage share its output record
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
    pkl = dumps(root, storage_of, dtype_of)
    archive = "archive"
    fd = os.open(tmp, os.O_RDWR)
    background = bytecopy.Background()
    try:
        zw = ZipWriter(fd)
        add_torch_header(zw, archive, pkl)
        pending: list[tuple[int, OutStorage, Any]] = []
        for out in outs:
            assert isinstance(out.source, LogicalStorage) and out.source.tensor is not None
            start = zw.begin(f"{archive}/data/{out.key}", out.nbytes)
            crc, job = write_logical(
                out.source.tensor, out.dtype, fd, start, sources, background, cb
            )
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
def write_st(
    path: str,
    items: list[Item],
    meta: dict[str, str],
    sources: bytecopy.Sources,
    cb: Progress | None,
    verify: bool = True,
) -> None:
    pos = 0
    for it in items:
        it.begin = pos
        pos += it.nbytes
    header = header_bytes(items, meta)
    fd = os.open(path, os.O_RDWR)
    background = bytecopy.Background()
    progress_phase(cb, "writing")  # the next shard, after the last one's verifying
    try:
        bytecopy.write_all(fd, header)
        for it in items:
            start = len(header) + it.begin
            it.crc, it.job = write_logical(
                logical(it.ref), it.dtype, fd, start, sources, background, cb
            )
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if end != len(header) + pos:
            raise OSError(f"wrote {end} bytes, expected {len(header) + pos}")
        left = sum(it.nbytes for it in items if it.job or verify)
        verifying = progress_phase(cb, "verifying", left)
        for it in items:
            if it.job is not None:
                it.crc = _result_of(it.job, path, it.name)
                it.read_back = True
                if verifying:
                    verifying(it.nbytes)
    finally:
        background.close()
        os.close(fd)
