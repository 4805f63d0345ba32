"""Moving bytes between files without holding them: kernel copies and streamed CRC-32."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo
from ..source import close_input, open_input, open_zip, preadv
from .crc import crc32

CHUNK = 8 << 20

Progress = Callable[[int], None]


def copy_range(
    src_fd: Any, src_off: int, n: int, dst_fd: int, progress: Progress | None
) -> int | None:
    """Append ``n`` bytes of ``src_fd`` from ``src_off`` at ``dst_fd``'s position.

    ``src_fd`` is a file descriptor (copied by the kernel) or a remote source (read in chunks
    through this process: their CRC-32 is returned, so that checking the copy reads only the
    output and never fetches the input twice).
    """
    if not isinstance(src_fd, int):
        return _copy_from_source(src_fd, src_off, n, dst_fd, progress)
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


def crc_range(fd: int, off: int, n: int, progress: Progress | None = None) -> int:
    """CRC-32 of ``n`` bytes at ``off`` of a file this process wrote (an output).

    Read through a read-only mapping (half the time of copying into a buffer, measured); a
    file that cannot be mapped is read in chunks into one reused buffer.
    """
    try:
        return _crc_mapped(fd, off, n, progress)
    except (OSError, ValueError):
        pass
    buf = bytearray(min(CHUNK, max(n, 1)))
    view = memoryview(buf)
    crc = 0
    left = n
    while left > 0:
        want = min(left, len(buf))
        got = os.preadv(fd, [view[:want]], off)
        if got <= 0:
            raise EOFError("the file ended early")
        crc = crc32(view[:got], crc)
        off += got
        left -= got
        if progress:
            progress(got)
    return crc


def _crc_mapped(fd: int, off: int, n: int, progress: Progress | None) -> int:
    import mmap

    if n == 0:
        return 0
    start = off - off % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, off - start + n, prot=mmap.PROT_READ, offset=start) as mapped:
        if hasattr(mapped, "madvise"):  # not on Windows
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mapped)
        try:
            crc = 0
            for pos in range(off - start, off - start + n, CHUNK):
                piece = view[pos : min(pos + CHUNK, off - start + n)]
                crc = crc32(piece, crc)
                if progress:
                    progress(len(piece))
                piece.release()
            return crc
        finally:
            view.release()


def compare_ranges(fd_a: Any, off_a: int, fd_b: int, off_b: int, n: int) -> int | None:
    """The first differing byte offset (relative), or None if the ranges are equal."""
    size = min(CHUNK, max(n, 1))
    a, b = bytearray(size), bytearray(size)
    va, vb = memoryview(a), memoryview(b)
    pos = 0
    while pos < n:
        want = min(n - pos, size)
        ga = preadv(fd_a, va[:want], off_a + pos)
        gb = os.preadv(fd_b, [vb[:want]], off_b + pos)
        if ga != want or gb != want:
            return pos
        # bytearray == bytearray is memcmp (~9 GB/s); memoryview == memoryview compares item by
        # item (~0.2 GB/s), so only the short last piece is compared through copies
        same = a == b if want == size else va[:want].tobytes() == vb[:want].tobytes()
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


def recode(chunk: bytes | bytearray, src: StorageInfo, dtype: str) -> bytearray:
    """Byte-swap a big-endian chunk and/or cast it to ``dtype`` (whole elements only).

    No torch: see :mod:`.numeric` (rounds as torch does; swaps as torch's loader does).
    """
    from . import numeric

    return numeric.recode(chunk, src, dtype)


def iter_storage_chunks(src: StorageInfo, fd: Any) -> Iterator[bytearray]:
    """The storage's bytes in chunks that hold whole elements."""
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
        chunk = bytearray(want)
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
    dst_fd: int, dst_off: int, n: int, src_fd: Any, src_off: int, src_crc: int | None
) -> int:
    """The CRC-32 of a range just copied, checked against its source.

    With the source's recorded CRC (a zip record) only the output is read; without one the
    input range is read too and compared byte for byte.
    """
    crc = crc_range(dst_fd, dst_off, n)
    if src_crc is not None:
        if crc != src_crc:
            raise CopyMismatch("does not match the CRC-32 recorded in the input")
    else:
        diff = compare_ranges(src_fd, src_off, dst_fd, dst_off, n)
        if diff is not None:
            raise CopyMismatch(f"differs from the input at byte {diff}")
    return crc


class Background:
    """One worker thread for read-backs, so checking record k overlaps copying record k+1
    (zlib, preadv and copy_file_range all release the GIL)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpttool-readback")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk now,
    without waiting, so the fsync before the final rename has little left to do."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; failures only cost speed

    return start_writeback


_start_writeback = _sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a just-written range to disk (a no-op where the OS offers no way)."""
    if _start_writeback is not None:
        _start_writeback(fd, offset, nbytes)
