"""The safetensors writer: header from metadata, tensors streamed from the input, read back.

Contiguous tensors are copied with ``copy_file_range`` and checked in a background thread
(against the input record's CRC-32 when the tensor is a whole record, else byte for byte);
strided, cast or big-endian tensors are gathered and converted without torch, in bounded
pieces (:mod:`.numeric`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import TensorRef
from ..progress import phase as progress_phase
from ..readers import open_checkpoint
from . import copy as bytecopy
from . import numeric
from .cast_kernels import Ring, ahead
from .cast_range import can_cast_range, cast_here
from .clone import clone_block
from .crc import crc32

Progress = Callable[[int], None]


@dataclass
class Item:
    name: str
    ref: TensorRef
    dtype: str  # output dtype
    shard: int = 0
    begin: int = 0  # data offset within its shard
    crc: int | None = None
    job: Any = None  # the background read-back of a direct copy
    read_back: bool = False

    @property
    def nbytes(self) -> int:
        return self.ref.numel * dtypes.get(self.dtype).itemsize


def header_bytes(items: list[Item], metadata: dict[str, str], pad: int = 0) -> bytes:
    """The length-prefixed JSON header; ``pad`` (a multiple of 8) more spaces after it, which
    the format allows, move the data section (to keep its offsets' phase for cloning)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    for it in items:
        code = dtypes.get(it.dtype).safetensors
        header[it.name] = {
            "dtype": code,
            "shape": list(it.ref.shape),
            "data_offsets": [it.begin, it.begin + it.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8 + pad)  # safetensors pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def reader_notes(items: list[Item]) -> list[str]:
    """For each dtype written whose safetensors code only newer safetensors releases read
    (``F8_E4M3FNUZ``: 0.8.0), what to tell the reader."""
    notes = []
    for name in dict.fromkeys(it.dtype for it in items):
        info = dtypes.get(name)
        if info.safetensors_since:
            notes.append(
                f"{name} is stored as {info.safetensors}, which safetensors reads from "
                f"{info.safetensors_since} on (an older reader refuses the whole file)"
            )
    return notes


def direct_span(it: Item) -> tuple[str, int] | None:
    """(input file, offset) of a tensor whose bytes are one range of that file, copied as
    they are; None for a tensor that must be gathered or converted."""
    ref = it.ref
    src = ref.storage
    if (
        src is None
        or not ref.is_contiguous()
        or it.dtype != ref.dtype
        or numeric.swaps(src)
        or src.compressed
        or not src.file
        or numeric.has_view_bits(ref)
    ):
        return None
    return src.file, src.offset + ref.storage_offset * ref.itemsize


Span = Callable[[Item], "tuple[str, int] | None"]


def _plain_cast(it: Item) -> bool:
    """A tensor whose bytes are one range of its input, cast by :mod:`.cast_range`."""
    ref, src = it.ref, it.ref.storage
    return (
        src is not None
        and ref.is_contiguous()
        and not numeric.swaps(src)
        and not numeric.has_view_bits(ref)
        and can_cast_range(ref.dtype, it.dtype, ref.nbytes)
    )


def _write_gathered(
    it: Item, sources: bytecopy.Sources, fd: int, progress: Progress | None, ring: Ring
) -> None:
    """Strided, cast, big-endian or deflated: gathered and converted in bounded pieces."""
    src = it.ref.storage
    assert src is not None
    map_fd = sources.fd(src.file) if src.file and not src.compressed else None
    if isinstance(map_fd, int) and _plain_cast(it):  # one range, cast: on every core
        at = src.offset + it.ref.storage_offset * it.ref.itemsize
        it.crc = cast_here(map_fd, at, it.ref.numel, it.ref.dtype, fd, it.dtype, progress,
                           src.file)  # fmt: skip
        return
    crc = 0
    pieces = numeric.iter_tensor_bytes(it.ref, it.dtype, fd=map_fd, ring=ring)
    for piece in ahead(pieces) if it.nbytes > numeric.CHUNK else pieces:  # gather while writing
        bytecopy.write_all(fd, piece)
        crc = crc32(piece, crc)
        if progress:
            progress(len(piece))
    it.crc = crc


def write_tensor(
    it: Item,
    sources: bytecopy.Sources,
    fd: int,
    progress: Progress | None,
    background: bytecopy.Background,
    check: bool = True,
    block: int = 0,
) -> None:
    """One tensor at ``fd``'s position (a DCP item, say): copied when it is one range of its
    input (``it.job`` then gives its CRC-32, read back; cloned where ``block`` says the
    filesystem can and the offsets agree modulo it), else gathered (``it.crc``)."""
    if direct_span(it) is None:
        _write_gathered(it, sources, fd, progress, Ring(3))
    else:
        _write_run([it], sources, fd, progress, background, True, block)


def _write_run(
    run: list[Item],
    sources: bytecopy.Sources,
    fd: int,
    progress: Progress | None,
    background: bytecopy.Background,
    check: bool,
    block: int,
) -> None:
    """Copy direct tensors that follow each other in one input file (cloning what can be)."""
    first = run[0]
    file, start = direct_span(first)  # type: ignore[misc]
    src = first.ref.storage
    assert src is not None
    nbytes = sum(it.nbytes for it in run)
    src_fd = sources.fd(file)
    dst_off = os.lseek(fd, 0, os.SEEK_CUR)
    cloned = bytecopy.copy_range(src_fd, start, nbytes, fd, progress, block)
    if check:  # check the copy in the background while the next tensor is written
        whole = len(run) == 1 and first.ref.storage_offset == 0 and nbytes == src.nbytes
        known = src.crc if whole else None  # else a remote input's CRC, taken as it passed
        crc = known if known is not None else cloned.crc
        job = background.check(fd, dst_off, nbytes, src_fd, start, crc, cloned, False)
        for it in run:
            it.job = job
    if not cloned.nbytes and nbytes >= bytecopy.WRITEBACK_MIN:  # a clone has nothing to write back
        background.submit(bytecopy.start_writeback, fd, dst_off, nbytes)


def clone_layout(
    items: list[Item], span: Span, sources: bytecopy.Sources, folder: str
) -> tuple[list[Item], dict[str, int]]:
    """(the items in the order their bytes are written, the clone block of each input file).

    Where no input file can be cloned into the output, the order is the items' and nothing
    changes; else tensors copied as they are (``span``) come first, in input order, so that
    neighbours stay neighbours (and keep their phase) and are copied as one range.
    """
    blocks: dict[str, int] = {}
    for it in items:
        where = span(it)
        if where is not None and where[0] not in blocks:
            fd = sources.fd(where[0])  # a remote source has no blocks to share
            blocks[where[0]] = clone_block(fd, folder) if isinstance(fd, int) else 0
    if not any(blocks.values()):
        return items, {}
    spans = {id(it): span(it) for it in items}
    direct = sorted((it for it in items if spans[id(it)]), key=lambda it: spans[id(it)])  # type: ignore[arg-type, return-value]
    return direct + [it for it in items if not spans[id(it)]], blocks


def header_pad(order: list[Item], header_len: int, span: Span, blocks: dict[str, int]) -> int:
    """Spaces to add to the header so that the most bytes of tensors copied as they are land
    at their input offset modulo the clone block (a multiple of 8: the data stays 8-byte
    aligned, as safetensors writes it)."""
    weight: dict[int, int] = {}
    block = max(blocks.values(), default=0)
    for it in order:
        where = span(it)
        if where is not None and blocks.get(where[0]) and it.nbytes >= block:
            pad = (where[1] - header_len - it.begin) % block
            if pad % 8 == 0:
                weight[pad] = weight.get(pad, 0) + it.nbytes
    return max(weight, key=lambda p: (weight[p], -p)) if weight else 0


def _runs(order: list[Item], blocks: dict[str, int]) -> list[list[Item]]:
    """Consecutive items copied together: direct tensors whose input bytes follow each other
    in a file that can be cloned; every other item on its own."""
    runs: list[list[Item]] = []
    last: tuple[str, int] | None = None  # where the previous run's input bytes end
    for it in order:
        where = direct_span(it)
        if where is not None and blocks.get(where[0]) and runs and where == last:
            runs[-1].append(it)
        else:
            runs.append([it])
        last = (where[0], where[1] + it.nbytes) if where is not None else None
    return runs


def write_file(
    path: str,
    items: list[Item],
    metadata: dict[str, str],
    sources: bytecopy.Sources,
    progress: Progress | None,
    check: bool = True,
) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    order, blocks = clone_layout(items, direct_span, sources, folder)
    pos = 0
    for it in order:
        it.begin = pos
        pos += it.nbytes
    header = header_bytes(items, metadata)
    if blocks:
        header = header_bytes(items, metadata, header_pad(order, len(header), direct_span, blocks))
    fd = os.open(path, os.O_RDWR)  # no O_TRUNC: ext4 would flush the file on close
    background = bytecopy.Background()
    progress_phase(progress, "writing")  # the next shard, after the last one's verifying
    ring = Ring(3)  # gathered pieces: the one written, the one queued, the one being made
    try:
        bytecopy.write_all(fd, header)
        for run in _runs(order, blocks):
            where = direct_span(run[0])
            if where is not None:
                _write_run(run, sources, fd, progress, background, check, blocks.get(where[0], 0))
            else:
                _write_gathered(run[0], sources, fd, progress, ring)
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if end != len(header) + pos:
            raise OSError(f"wrote {end} bytes, expected {len(header) + pos}")
        wait_read_backs(path, items, progress, check)
    finally:
        background.close()
        os.close(fd)


def wait_read_backs(path: str, items: list[Item], progress: Progress | None, verify: bool) -> None:
    """Enter the verifying phase: wait for the read-backs still running (their bytes count),
    then ``verify_file`` re-reads the rest (with ``verify``)."""
    left = sum(it.nbytes for it in items if it.job is not None or verify)
    progress = progress_phase(progress, "verifying", left)
    for it in items:
        if it.job is not None:
            try:
                it.crc = it.job.result()
                it.read_back = True
            except bytecopy.CopyMismatch as exc:
                raise CheckpointError(
                    path, f"verification failed: tensor {it.name!r} {exc}"
                ) from None
            if progress:
                progress(it.nbytes)


def verify_file(
    path: str,
    items: list[Item],
    metadata: dict[str, str],
    sources: bytecopy.Sources,
    progress: Progress | None = None,
) -> None:
    """Re-open the written file and compare every tensor's name, dtype, shape, place and bytes
    with what was meant, bytes streamed (``progress`` is fed the bytes re-read here: those not
    read back while writing).

    The header is re-read by ckpttool's reader, which refuses what safetensors' own refuses
    (unknown dtypes, offsets that do not tile the data, duplicate names); safetensors' reader
    is used too where numpy is already loaded (a cast): importing it for a rename would cost
    more than the rename (the tests open every output with safetensors and torch).
    """

    def fail(what: str) -> CheckpointError:
        return CheckpointError(path, f"verification failed: {what}; nothing was written")

    if "numpy" in sys.modules:
        _reference_check(path, items, metadata, fail)
    try:
        back = open_checkpoint(path, _judge=False)  # our own output: structure only
    except CheckpointError as exc:
        raise fail(exc.message) from None
    got = {t.name: t for t in back.tensors()}
    if sorted(got) != sorted(it.name for it in items) or (
        back.facts.get("metadata") or {}
    ) != metadata:
        raise fail("the tensor names or metadata differ")
    for it in items:
        t = got[it.name]
        if t.dtype != it.dtype or tuple(t.shape) != tuple(it.ref.shape):
            raise fail(f"tensor {it.name!r} has another dtype or shape")
    fd = os.open(path, os.O_RDONLY)
    back_start = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")  # where tensor data begins
    try:
        for it in items:
            s = back.storages[it.name]
            ref, src = it.ref, it.ref.storage
            assert src is not None
            if s.offset != back_start + it.begin or s.nbytes != it.nbytes:
                raise fail(f"tensor {it.name!r} is not where it was written")
            if it.read_back:
                continue  # already read back and compared with the input while writing
            if it.crc is not None:
                if bytecopy.crc_range(fd, s.offset, s.nbytes) != it.crc:
                    raise fail(f"tensor {it.name!r}'s bytes differ from what was written")
            else:
                start = src.offset + ref.storage_offset * ref.itemsize
                src_fd = sources.fd(src.file)
                diff = bytecopy.compare_ranges(src_fd, start, fd, s.offset, s.nbytes)
                if diff is not None:
                    raise fail(f"tensor {it.name!r} differs from the input at byte {diff}")
            if progress:
                progress(s.nbytes)
    finally:
        os.close(fd)


def _reference_check(
    path: str, items: list[Item], metadata: dict[str, str], fail: Callable[[str], CheckpointError]
) -> None:
    """safetensors' own reader opens the file and finds the same names, shapes, metadata."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
            got_meta = f.metadata() or {}
            for it in items:
                if list(f.get_slice(it.name).get_shape()) != list(it.ref.shape):
                    raise fail(f"tensor {it.name!r} has another shape")
    except CheckpointError:
        raise
    except Exception as exc:
        raise fail(f"safetensors cannot open it ({exc})") from None
    if sorted(names) != sorted(it.name for it in items) or got_meta != metadata:
        raise fail("the tensor names or metadata differ")


def assign_shards(items: list[Item], groups: list[list[Item]], limit: int) -> list[list[Item]]:
    """Greedy shards of at most ``limit`` bytes (a bigger tensor gets a shard of its own);
    members of a shared group stay in one shard."""
    group_of: dict[str, list[Item]] = {}
    for g in groups:
        for m in g:
            group_of[m.name] = g
    shards: list[list[Item]] = [[]]
    size = 0
    placed: set[str] = set()
    for it in items:
        if it.name in placed:
            continue
        unit = [m for m in group_of.get(it.name, [it]) if m.name not in placed]
        unit_size = sum(m.nbytes for m in unit)
        if shards[-1] and size + unit_size > limit:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
        placed.update(m.name for m in unit)
    return [s for s in shards if s]
