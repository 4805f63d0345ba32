"""The torch zip writer: the rewritten pickle, storage records copied or recoded, read back.

Verbatim records are copied with ``copy_file_range`` and checked in a background thread while
the next one copies; records that must pass through memory (casts, byte swaps, deflated input,
arrays made from numpy) are written chunk by chunk with their CRC-32 computed on the way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import TensorRef
from ..ops.plain import MemoryStorage
from ..progress import phase as progress_phase
from ..readers import open_checkpoint
from . import copy as bytecopy
from .cast_kernels import Ring, ahead
from .cast_range import can_cast_range, cast_here
from .clone import clone_block
from .crc import crc32
from .pt_pickle import OutStorage, Pickled, pickle_tree
from .zip_runs import Run, check_run, find_run, take_run
from .zipwriter import ZipWriter, add_torch_header

try:  # hashlib's own SHA-1, without importing hashlib and OpenSSL's _hashlib (~4 ms)
    from _sha1 import sha1
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import sha1

Progress = Callable[[int], None]


def _write_transformed(
    out: OutStorage,
    src_fd: int,
    dst_fd: int,
    memory: MemoryStorage | None,
    progress: Progress | None,
    ring: Ring,
) -> int:
    """Write a storage that must pass through memory (cast, byte swap, deflated, in-memory),
    reading and casting into ``ring``'s buffers.

    Returns the CRC-32 of the bytes written.
    """
    src = out.source
    assert src is not None
    if memory is not None:
        bytecopy.write_all(dst_fd, memory.data)
        if progress:
            progress(len(memory.data))
        return crc32(memory.data)
    if isinstance(src_fd, int) and _spreads(out, src):  # a plain cast: on every core
        return cast_here(src_fd, src.offset, out.numel, src.dtype, dst_fd, out.dtype, progress,
                         src.file)  # fmt: skip
    crc = 0
    simple = out.dtype == src.dtype and not src.big_endian
    chunks: Iterator[Any] = bytecopy.iter_storage_chunks(src, src_fd, ring)
    if not simple:  # read into the ring's input buffer, cast into one of its three
        chunks = (bytecopy.recode(c, src, out.dtype, ring) for c in chunks)
        if src.nbytes > bytecopy.CHUNK:  # read and cast the next chunk while this is written
            chunks = ahead(chunks)
    for data in chunks:
        bytecopy.write_all(dst_fd, data)
        crc = crc32(data, crc)
        if progress:
            progress(len(data))  # output bytes, as the total counts them (a cast changes size)
    return crc


def _spreads(out: OutStorage, src: Any) -> bool:
    """Whether a storage is a plain cast of a stored record (:mod:`.cast_range`)."""
    return (
        not src.compressed
        and not src.big_endian
        and out.dtype != src.dtype
        and can_cast_range(src.dtype, out.dtype, src.nbytes)
        and out.nbytes * dtypes.get(src.dtype).itemsize
        == src.nbytes * dtypes.get(out.dtype).itemsize
    )


def _serialization_id(pkl: bytes, outs: list[OutStorage]) -> bytes:
    h = sha1(pkl)
    for o in outs:
        h.update(f"{o.key}:{o.dtype}:{o.numel};".encode())
    return h.hexdigest().encode()


@dataclass(frozen=True)
class StoragePlan:
    """What a torch zip will hold: its storages in order, and which one each tensor uses.

    The maps are keyed by ``id()`` of the planned tree's nodes, so a plan is only good for the
    tree it was made from (which must stay alive while the plan is used).
    """

    outs: list[OutStorage]  # the output storages, numbered in order of first use
    storage_of: dict[int, OutStorage]  # id(TensorRef or saved storage) -> its output storage
    dtype_of: dict[int, str]  # id(TensorRef) -> the dtype it is written as, when cast
    named: list[tuple[str, TensorRef]]  # every tensor by its path, in document order
    memory: dict[str, MemoryStorage] = field(default_factory=dict)  # made in memory, by key
    # local headers the write proved (records cloned with their framing, the clone checked):
    # header offset -> (name, data offset), so the re-read need not fetch them from the disk
    headers: dict[int, tuple[bytes, int]] = field(default_factory=dict)


def pickle_for(root: Any, plan: StoragePlan) -> Pickled:
    """The pickle of the tree ``plan`` was made from, as :func:`write_pt` writes it."""
    try:
        return pickle_tree(root, plan.storage_of, plan.dtype_of)
    except RecursionError:
        raise CheckpointError(None, "the checkpoint is nested too deeply to re-save") from None


def write_pt(
    dst_tmp: str,
    pkl: bytes,
    plan: StoragePlan,
    progress: Progress | None,
    *,
    check_copies: bool = True,
    archive: str = "archive",
) -> dict[str, int]:
    """Write the torch zip file holding the pickle ``pkl`` (:func:`pickle_for`); return each
    storage key's data offset in it.

    Verbatim copies get their CRC-32 by reading the output back (``check_copies``, which also
    proves the copy), or from the input's zip record when that is skipped.
    """
    sources, background = bytecopy.Sources(), bytecopy.Background()
    ring = Ring(3)  # casts: the chunk written, the one queued, the one being made
    fd = os.open(dst_tmp, os.O_RDWR)  # no O_TRUNC: ext4 would flush the file on close
    offsets: dict[str, int] = {}
    try:
        zw = ZipWriter(fd)
        pending: list[tuple[int, OutStorage, Any]] = []
        blocks: dict[str, int] = {}  # source file -> its clone block (0: no cloning)
        folder = os.path.dirname(os.path.abspath(dst_tmp))
        run, run_job = _run_for(plan, sources, folder, blocks), None
        if run is None:
            add_torch_header(zw, archive, pkl)
        else:  # the input's first records, taken over whole under its archive name
            archive, block = run.root, blocks[run.file]
            add_torch_header(zw, archive, pkl, (block, run.start % block))
            run_job = take_run(run, zw, sources, background, progress, check_copies, block)
            pending += [(run.first + i, out, None) for i, out in enumerate(run.outs)]
            offsets.update((run.outs[i].key, e.data_offset) for i, e in enumerate(run.entries))
        for out in plan.outs[len(run.outs) if run else 0 :]:
            job = _write_record(
                out, zw, archive, plan, sources, folder, blocks, background, progress,
                check_copies, ring,
            )  # fmt: skip
            offsets[out.key] = zw.entries[-1].data_offset
            pending.append((len(zw.entries) - 1, out, job))
        zw.add_bytes(f"{archive}/version", b"3")
        zw.add_bytes(f"{archive}/.data/serialization_id", _serialization_id(pkl, plan.outs))
        # what is left: the read-backs still running, then verify_pt's re-read of the rest
        verifying = progress_phase(progress, "verifying", verify_bytes(plan.outs, check_copies))
        if run_job is not None:
            assert run is not None
            check_run(run, run_job, verifying)
            plan.headers.update((e.header_offset, (e.name, e.data_offset)) for e in run.entries)
        _set_crcs(zw, pending, verifying)
        zw.finish()
    finally:
        background.close()
        os.close(fd)
        sources.close()
    return offsets


def _write_record(
    out: OutStorage,
    zw: ZipWriter,
    archive: str,
    plan: StoragePlan,
    sources: bytecopy.Sources,
    folder: str,
    blocks: dict[str, int],
    background: bytecopy.Background,
    progress: Progress | None,
    check_copies: bool,
    ring: Ring,
) -> Any:
    """Write one storage record with its local header; return its read-back job, if any."""
    src, fd = out.source, zw.fd
    assert src is not None
    mem = plan.memory.get(src.key) if not src.file else None
    verbatim = out.copies_verbatim and mem is None
    block = _block(src.file, sources, folder, blocks) if verbatim else 0
    align, phase = record_alignment(src.offset if verbatim else None, block)
    # a verbatim copy's CRC-32 is the input record's (its read-back checks it): known now, it
    # needs no patching (a write into a page already being written back)
    known = (src.crc or 0) * verbatim
    start = zw.begin(f"{archive}/data/{out.key}", out.nbytes, known, align, phase)
    job = None
    if verbatim:
        job = _copy_verbatim(out, fd, start, sources, background, progress, check_copies, block)
    else:
        src_fd = sources.fd(src.file) if src.file else -1
        out.crc = _write_transformed(out, src_fd, fd, mem, progress, ring)
    zw.end()
    return job


def _block(file: str, sources: bytecopy.Sources, folder: str, blocks: dict[str, int]) -> int:
    """The clone block size of ``file`` into ``folder`` (0: no cloning), found once per file."""
    if not file:
        return 0
    if file not in blocks:
        fd = sources.fd(file)  # a remote source has no blocks to share
        blocks[file] = clone_block(fd, folder) if isinstance(fd, int) else 0
    return blocks[file]


def _run_for(
    plan: StoragePlan, sources: bytecopy.Sources, folder: str, blocks: dict[str, int]
) -> Run | None:
    """The input records the output takes over as one run (:mod:`.zip_runs`): only where
    their blocks can be shared (elsewhere a record-by-record copy checks each against its
    CRC-32, where a run's copy would be compared with the input byte for byte)."""
    src = plan.outs[0].source if plan.outs else None
    if src is None or not src.file or not _block(src.file, sources, folder, blocks):
        return None
    return find_run(plan.outs, plan.memory, sources.fd(src.file))


def _copy_verbatim(
    out: OutStorage,
    fd: int,
    start: int,
    sources: bytecopy.Sources,
    background: bytecopy.Background,
    progress: Progress | None,
    check_copies: bool,
    block: int,
) -> Any:
    """Copy (or clone) a storage record byte for byte; return its read-back job (None: CRC
    from the input)."""
    src = out.source
    assert src is not None
    src_fd = sources.fd(src.file)
    try:
        cloned = bytecopy.copy_range(src_fd, src.offset, src.nbytes, fd, progress, block)
    except EOFError:
        raise CheckpointError(src.file, "is truncated: a storage is cut short") from None
    out.cloned = cloned.nbytes
    job = None
    if check_copies or src.crc is None:  # read back (in the background)
        crc = src.crc if src.crc is not None else cloned.crc  # a remote input: not read twice
        job = background.check(fd, start, src.nbytes, src_fd, src.offset, crc, cloned)
        out.read_back = True
    else:
        out.crc = src.crc
    if not cloned.nbytes and src.nbytes >= bytecopy.WRITEBACK_MIN:  # a clone: nothing to write
        background.submit(bytecopy.start_writeback, fd, start, src.nbytes)
    return job


def verify_bytes(outs: list[OutStorage], verify: bool) -> int:
    """The bytes a write still reads after its last byte is written: the records read back in
    the background, and with ``verify`` the others, which ``verify_pt`` re-reads."""
    return sum(o.nbytes for o in outs if o.read_back or verify)


def record_alignment(src_offset: int | None, block: int) -> tuple[int, int]:
    """(alignment, phase) of a storage record's data offset in the output.

    Torch aligns records to 64 bytes. A record copied verbatim from a 64-byte aligned input
    record keeps the input offset's phase within a page (kernel copies between equal page
    phases are faster), or within a clone ``block`` where the filesystem shares blocks
    (:mod:`.clone`), so that its aligned middle can be cloned.
    """
    if src_offset is None or src_offset % 64:
        return 64, 0
    if block:
        return max(block, 4096), src_offset % max(block, 4096)
    phase = src_offset % 4096
    return (4096, phase) if phase else (64, 0)  # a page-aligned input record: 64, as always


def _set_crcs(
    zw: ZipWriter, pending: list[tuple[int, OutStorage, Any]], progress: Progress | None = None
) -> None:
    """Record each storage's CRC-32 in the zip, waiting for its read-back where there is one."""
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
            if progress:
                progress(out.nbytes)
        assert out.crc is not None
        if zw.entries[index].crc != out.crc:
            zw.set_crc(index, out.crc)


# -- verification --------------------------------------------------------------------------
def verify_pt(path: str, plan: StoragePlan, progress: Progress | None = None) -> None:
    """Re-open the written file and compare it with what was intended, bytes streamed
    (``progress`` is fed the bytes of the records re-read here: those not read back)."""

    def fail(what: str) -> CheckpointError:
        return CheckpointError(path, f"verification failed: {what}; nothing was written")

    try:
        back = open_checkpoint(path, _judge=False, _headers=plan.headers)  # structure only
    except CheckpointError as exc:
        raise fail(exc.message) from None
    named, storage_of, dtype_of = plan.named, plan.storage_of, plan.dtype_of
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
        for out in plan.outs:
            s = back.storages.get(out.key)
            if s is None or s.nbytes != out.nbytes or s.crc != out.crc:
                raise fail(f"storage {out.key} reads back differently")
            if not out.read_back:
                if bytecopy.crc_range(fd, s.offset, s.nbytes) != out.crc:
                    raise fail(f"storage {out.key}'s bytes differ from what was written")
                if progress:
                    progress(s.nbytes)
    finally:
        os.close(fd)
