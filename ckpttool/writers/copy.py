"""Moving bytes between files without holding them: kernel copies and streamed CRC-32."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo
from ..source import close_input, open_input, open_zip, preadv
from .crc import crc32
from .writeback import start_writeback as start_writeback  # the writers' one import of it

CHUNK = 8 << 20
WRITEBACK_MIN = 1 << 20  # smaller ranges are left to the final fsync (a hand-off costs more)

Progress = Callable[[int], None]


class Clone(NamedTuple):
    """The part of a copied range that shares the input's blocks: ``start`` bytes into the
    range, ``nbytes`` long (0: nothing was shared)."""

    start: int
    nbytes: int
    crc: int | None = None  # a remote input's CRC-32, computed as its bytes passed through


NOT_CLONED = Clone(0, 0)


def copy_range(
    src_fd: Any,
    src_off: int,
    n: int,
    dst_fd: int,
    progress: Progress | None,
    block: int = 0,
) -> Clone:
    """Append ``n`` bytes of ``src_fd`` from ``src_off`` at ``dst_fd``'s position.

    With a ``block`` size (:func:`.clone.clone_block`) and both offsets equal modulo it, the
    block-aligned middle is cloned (shares the input's blocks) and only the head and the tail
    are copied. Returns the cloned part, relative to the range (empty when all was copied).
    A remote source (not a file descriptor) is read through this process: its CRC-32 comes
    back in the result, so that checking the copy never fetches the input twice.
    """
    if not isinstance(src_fd, int):
        return Clone(0, 0, _copy_from_source(src_fd, src_off, n, dst_fd, progress))
    dst_off = os.lseek(dst_fd, 0, os.SEEK_CUR) if block else 0
    if not block or n < block or (src_off - dst_off) % block:
        _copy(src_fd, src_off, n, dst_fd, progress)
        return NOT_CLONED
    head = -src_off % block
    middle = (n - head) // block * block
    from .clone import clone_range

    if middle < block:
        _copy(src_fd, src_off, n, dst_fd, progress)
        return NOT_CLONED
    _copy(src_fd, src_off, head, dst_fd, progress)
    if not clone_range(src_fd, src_off + head, middle, dst_fd, dst_off + head):
        _copy(src_fd, src_off + head, n - head, dst_fd, progress)
        return NOT_CLONED
    os.lseek(dst_fd, dst_off + head + middle, os.SEEK_SET)
    if progress:
        progress(middle)
    _copy(src_fd, src_off + head + middle, n - head - middle, dst_fd, progress)
    return Clone(head, middle)


def _copy(src_fd: int, src_off: int, n: int, dst_fd: int, progress: Progress | None) -> None:
    """Append ``n`` bytes of ``src_fd`` from ``src_off`` (kernel copies where possible)."""
    left = n
    off = src_off
    use_kernel = hasattr(os, "copy_file_range")
    while left > 0:
        step = min(left, 1 << 30)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, step, off)
            except OSError:
                use_kernel = False
                continue
            if done == 0:
                raise EOFError("the input ended early")
        else:
            data = os.pread(src_fd, min(step, CHUNK), off)
            if not data:
                raise EOFError("the input ended early")
            done = os.write(dst_fd, data)
        off += done
        left -= done
        if progress:
            progress(done)
    return None


def _copy_from_source(src: Any, off: int, n: int, dst_fd: int, progress: Progress | None) -> int:
    buf = bytearray(min(CHUNK, max(n, 1)))
    view = memoryview(buf)
    crc = 0
    left = n
    while left > 0:
        want = min(left, len(buf))
        got = preadv(src, view[:want], off)
        if got <= 0:
            raise EOFError("the input ended early")
        write_all(dst_fd, view[:got])
        crc = crc32(view[:got], crc)
        off += got
        left -= got
        if progress:
            progress(got)
    return crc


def crc_range(fd: int, off: int, n: int, progress: Progress | None = None, value: int = 0) -> int:
    """CRC-32 of ``n`` bytes at ``off`` of a file (continuing from ``value``).

    Read through a read-only mapping (half the time of copying into a buffer, measured); a
    file that cannot be mapped is read in chunks into one reused buffer.
    """
    if n >= _MAP_MIN:
        try:
            return _crc_mapped(fd, off, n, progress, value)
        except (OSError, ValueError):
            pass
    view = _buffer(0, min(CHUNK, max(n, 1)))
    crc = value
    left = n
    while left > 0:
        want = min(left, len(view))
        got = os.preadv(fd, [view[:want]], off)
        if got <= 0:
            raise EOFError("the file ended early")
        crc = crc32(view[:got], crc)
        off += got
        left -= got
        if progress:
            progress(got)
    return crc


def _crc_mapped(fd: int, off: int, n: int, progress: Progress | None, value: int) -> int:
    import mmap

    if n == 0:
        return value
    start = off - off % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, off - start + n, prot=mmap.PROT_READ, offset=start) as mapped:
        if hasattr(mapped, "madvise"):  # not on Windows
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mapped)
        try:
            crc = value
            for pos in range(off - start, off - start + n, CHUNK):
                piece = view[pos : min(pos + CHUNK, off - start + n)]
                crc = crc32(piece, crc)
                if progress:
                    progress(len(piece))
                piece.release()
            return crc
        finally:
            view.release()


_MAP_MIN = 1 << 20  # smaller ranges are read into a buffer: a mapping costs more syscalls
_buffers = threading.local()


def _buffer(which: int, size: int) -> memoryview:
    """A reused read buffer of this thread (``which`` of two), at least ``size`` bytes long,
    cut to ``size`` (fresh 8 MB buffers cost their zeroing; a first 1 MB one, page faults)."""
    bufs = getattr(_buffers, "bufs", None)
    if bufs is None:
        bufs = _buffers.bufs = [bytearray(), bytearray()]
    if len(bufs[which]) < size:  # grown by doubling: a run of growing sizes reallocates rarely
        bufs[which] = bytearray(max(size, min(2 * len(bufs[which]), CHUNK), 64 << 10))
    return memoryview(bufs[which])[:size]


def compare_ranges(fd_a: Any, off_a: int, fd_b: int, off_b: int, n: int) -> int | None:
    """The first differing byte offset (relative), or None if the ranges are equal."""
    size = min(CHUNK, max(n, 1))
    va, vb = _buffer(0, size), _buffer(1, size)
    a, b = _buffers.bufs  # the bytearrays under the views
    pos = 0
    while pos < n:
        want = min(n - pos, size)
        ga = preadv(fd_a, va[:want], off_a + pos)
        gb = os.preadv(fd_b, [vb[:want]], off_b + pos)
        if ga != want or gb != want:
            return pos
        # bytearray == bytearray is memcmp (~9 GB/s); memoryview == memoryview compares item by
        # item (~0.2 GB/s), so only a piece shorter than the buffers is compared through copies
        full = want == len(a) == len(b)
        same = a == b if full else va[:want].tobytes() == vb[:want].tobytes()
        if not same:
            for i in range(want):
                if a[i] != b[i]:
                    return pos + i
        pos += want
    return None


class Sources:
    """Open input files by path (a sharded input has several): a file descriptor for a local
    file, a remote source for a URL (see :func:`ckpttool.source.open_input`)."""

    def __init__(self) -> None:
        self.fds: dict[str, Any] = {}

    def fd(self, path: str) -> Any:
        if path not in self.fds:
            self.fds[path] = open_input(path)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            close_input(fd)


def recode(
    chunk: bytes | bytearray | memoryview, src: StorageInfo, dtype: str, ring: Any = None
) -> bytearray | memoryview:
    """Byte-swap a big-endian chunk and/or cast it to ``dtype`` (whole elements only); with a
    ``ring`` (:class:`.cast_kernels.Ring`) the result is a view of one of its buffers.

    No torch: see :mod:`.numeric` (rounds as torch does; swaps as torch's loader does).
    """
    from . import numeric

    return numeric.recode(chunk, src, dtype, ring)


def iter_storage_chunks(src: StorageInfo, fd: Any, ring: Any = None) -> Iterator[Any]:
    """The storage's bytes in chunks that hold whole elements; with a ``ring``
    (:class:`.cast_kernels.Ring`) every chunk is read into its one input buffer (each is valid
    until the next is asked for)."""
    n = src.nbytes
    item = dtypes.get(src.dtype).itemsize
    step = max(item, (CHUNK // item) * item)
    if src.compressed:
        with open_zip(src.file) as zf, zf.open(src.record or "") as f:
            left = n
            while left:
                data = f.read(min(step, left))
                if not data:
                    raise CheckpointError(src.file, f"record {src.record} is truncated")
                left -= len(data)
                yield bytearray(data)
        return
    off = src.offset
    left = n
    while left:
        want = min(step, left)
        chunk = bytearray(want) if ring is None else ring.reading(want)
        got = preadv(fd, memoryview(chunk), off)
        if got != want:
            raise CheckpointError(src.file, "is truncated: a storage is cut short")
        yield chunk
        off += want
        left -= want


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class CopyMismatch(Exception):
    """A copied range reads back differently from its source."""


def read_back(
    dst_fd: int,
    dst_off: int,
    n: int,
    src_fd: Any,
    src_off: int,
    src_crc: int | None,
    cloned: Clone = NOT_CLONED,
    want_crc: bool = True,
    maps: Any = None,
) -> int | None:
    """The CRC-32 of a range just copied, checked against its source.

    With the source's recorded CRC (a zip record) only the output is read; without one the
    input range is read too: compared byte for byte when small, else by CRC-32s of both
    (a mismatch is then located byte for byte). A ``cloned`` part is checked by
    comparing extents instead (:func:`.clone.same_blocks`: no bytes read); the CRC is then the
    recorded one, or computed from the input (whose pages are more likely cached than the
    clone's, which has none), or None if not ``want_crc``. Where the extents cannot show it,
    the clone is read back. ``maps`` (:class:`.clone.ExtentMaps`) holds the extents of both
    files when many clones are checked at once.
    """
    if cloned.nbytes:
        from .clone import same_blocks

        start, size = cloned.start, cloned.nbytes
        same = maps.same_blocks if maps is not None else same_blocks
        if same(src_fd, src_off + start, dst_fd, dst_off + start, size):
            for a, b in ((0, start), (start + size, n)):
                diff = compare_ranges(src_fd, src_off + a, dst_fd, dst_off + a, b - a)
                if diff is not None:
                    raise CopyMismatch(f"differs from the input at byte {a + diff}")
            if src_crc is not None or not want_crc:
                return src_crc
            return crc_range(src_fd, src_off, n)
    crc = crc_range(dst_fd, dst_off, n)
    if src_crc is not None:
        if crc != src_crc:
            raise CopyMismatch("does not match the CRC-32 recorded in the input")
    elif n < _MAP_MIN or crc != crc_range(src_fd, src_off, n):
        # big ranges: the two CRC-32s over mappings (no copies), bytes only to say where
        diff = compare_ranges(src_fd, src_off, dst_fd, dst_off, n)
        if diff is not None:
            raise CopyMismatch(f"differs from the input at byte {diff}")
    return crc


class Background:
    """One worker thread for read-backs, so checking record k overlaps copying record k+1
    (the GIL is released); checks of a few system calls stay in this thread (:meth:`defer`):
    a small range is read back at once, clones are checked together once all are written."""

    def __init__(self) -> None:
        self.pool: Any = None  # started by the first job that needs it
        self.maps: Any = None  # the extents of the files, fetched by the first clone checked

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpttool-readback")
        return self.pool.submit(fn, *args)

    def check(
        self,
        dst_fd: int,
        dst_off: int,
        n: int,
        src_fd: Any,
        src_off: int,
        src_crc: int | None,
        cloned: Clone = NOT_CLONED,
        want_crc: bool = True,
    ) -> Any:
        """:func:`read_back`'s job for a range just copied (its ``result()`` is the CRC-32)."""
        args = (dst_fd, dst_off, n, src_fd, src_off, src_crc, cloned, want_crc)
        if cloned.nbytes and (src_crc is not None or not want_crc):
            return self.defer(read_back, *args)  # no bytes to read but the head and the tail
        if n < _MAP_MIN:
            return self.defer(read_back, *args, now=True)
        return self.submit(read_back, *args)

    def defer(self, fn: Callable[..., Any], *args: Any, now: bool = False) -> Any:
        """``fn(*args, maps=...)`` run in this thread, at once (``now``) or when its result is
        first asked for, with the extent maps (:class:`.clone.ExtentMaps`) fetched then."""
        return _Deferred(self, fn, args, now)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Deferred:
    """A check run in the calling thread: at once (``now``), else when its result is first
    asked for (a clone: once every range is written, its extents fetched once for all)."""

    def __init__(
        self, owner: Background, fn: Callable[..., Any], args: tuple[Any, ...], now: bool
    ) -> None:
        self.owner, self.fn, self.args, self.done = owner, fn, args, False
        self.crc: int | None = None
        self.error: CopyMismatch | None = None
        if now:
            self._run(None)

    def _run(self, maps: Any) -> None:
        try:
            self.crc, self.done = self.fn(*self.args, maps=maps), True
        except CopyMismatch as exc:
            self.error, self.done = exc, True

    def result(self) -> int | None:
        if not self.done:
            from .clone import ExtentMaps

            self.owner.maps = self.owner.maps or ExtentMaps()  # fetched once all are written
            self._run(self.owner.maps)
        if self.error is not None:
            raise self.error
        return self.crc
