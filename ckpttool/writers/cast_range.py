"""A cast of one contiguous range of a local file into the output, on every core.

A cast storage is cut into pieces of :data:`PIECE` input bytes; each of :func:`workers`
threads takes the next piece, reads it (``preadv``), casts it (:mod:`.cast_kernels`), writes it
where it belongs (``pwrite``), starts its write-back (so the fsync before the output is renamed
has little left to do) and takes its CRC-32; the caller's thread puts the CRCs together in
order (:func:`.crc.crc32_combine`) and reports progress. Reading, casting and the kernel's copy
into the page cache each take a core's worth of time: spread over the cores, none of them
waits for another (a reader thread one chunk ahead of a writer left the writer idle on two
cores, see ``benchmarks/README.md``).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from .cast_kernels import cast_blocks, compiled, cores
from .crc import crc32, crc32_combine
from .writeback import start_writeback

PIECE = 2 << 20  # input bytes per piece: a 4 MB tensor still goes to two cores
MIN_BYTES = 2 * PIECE  # smaller casts are not worth the threads
# elements per kernel step: bigger than a single thread's best (cast_kernels.BLOCK, which stays
# in L2), so that each numpy call runs long without the GIL; with 32k-element steps two threads
# were slower than one (each call holds the GIL about 1 us of its 5), with 128k 1.7x faster
STEP = 1 << 17
_local = threading.local()


def workers() -> int:
    """Threads per cast: every core, at most 4 (the page cache stops scaling before)."""
    return max(1, min(4, cores()))


def can_cast_range(src_dtype: str, dst_dtype: str, nbytes: int) -> bool:
    """Whether :func:`cast_range` casts ``nbytes`` of ``src_dtype`` to ``dst_dtype``: two
    different floating dtypes that :mod:`.numeric` casts, and enough bytes to spread."""
    from .numeric import can_cast

    return src_dtype != dst_dtype and can_cast(src_dtype, dst_dtype) and nbytes >= MIN_BYTES


def cast_range(
    src_fd: int,
    src_off: int,
    count: int,
    src_dtype: str,
    dst_fd: int,
    dst_off: int,
    dst_dtype: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Cast ``count`` little-endian ``src_dtype`` elements at ``src_off`` of ``src_fd`` to
    ``dst_dtype``, written at ``dst_off`` of ``dst_fd`` (the file position is not used or
    moved), as torch's ``.to(dst_dtype)`` rounds.

    Returns:
        The CRC-32 of the bytes written.

    Raises:
        EOFError: the input ends before ``count`` elements.
    """
    job = _Cast(count, (src_fd, src_off, src_dtype), (dst_fd, dst_off, dst_dtype))
    n = min(workers(), job.pieces)
    _start_workers(n)
    for _ in range(n):
        _jobs.put(job.work)
    try:
        return job.gather(progress)
    finally:
        job.stop.set()
        job.wait_workers(n)  # nothing may write into dst_fd once this returns


def cast_here(
    src_fd: int,
    src_off: int,
    count: int,
    src_dtype: str,
    dst_fd: int,
    dst_dtype: str,
    progress: Callable[[int], None] | None,
    file: str,
) -> int:
    """:func:`cast_range` written at ``dst_fd``'s position, which is then moved past the
    output (a writer's next record follows); a short input is a :class:`CheckpointError`
    naming ``file``. Returns the CRC-32 of the bytes written."""
    start = os.lseek(dst_fd, 0, os.SEEK_CUR)
    try:
        crc = cast_range(src_fd, src_off, count, src_dtype, dst_fd, start, dst_dtype, progress)
    except EOFError:
        raise CheckpointError(file, "is truncated: a storage is cut short") from None
    os.lseek(dst_fd, start + count * dtypes.get(dst_dtype).itemsize, os.SEEK_SET)
    return crc


class _Cast:
    """One cast's pieces, shared by its workers and the caller's thread."""

    def __init__(self, count: int, src: tuple[int, int, str], dst: tuple[int, int, str]) -> None:
        self.count, self.src, self.dst = count, src, dst
        self.src_item = dtypes.get(src[2]).itemsize
        self.dst_item = dtypes.get(dst[2]).itemsize
        self.per = PIECE // self.src_item
        self.pieces = -(-count // self.per)
        self.crcs: list[tuple[int, int] | None] = [None] * self.pieces
        self.done = threading.Condition()
        self.failed: list[BaseException] = []
        self.stop = threading.Event()
        self.writing = threading.Lock()  # held by the worker writing into dst_fd
        self.taken = itertools.count()
        self.finished = 0

    def work(self) -> None:
        """A worker's turn: pieces until none is left or the cast stops (never raises: an
        error is handed to the caller's thread)."""
        (src_fd, src_off, src), (dst_fd, dst_off, dst) = self.src, self.dst
        try:
            while not self.stop.is_set():
                k = next(self.taken)
                if k >= self.pieces:
                    return
                first = k * self.per
                n = min(self.per, self.count - first)
                crc = _piece(src_fd, src_off + first * self.src_item, n, src, dst_fd,
                             dst_off + first * self.dst_item, dst, self.writing)  # fmt: skip
                with self.done:
                    self.crcs[k] = (crc, n * self.dst_item)
                    self.done.notify_all()
        except BaseException as exc:
            with self.done:
                self.failed.append(exc)
                self.stop.set()
        finally:
            with self.done:
                self.finished += 1
                self.done.notify_all()

    def gather(self, progress: Callable[[int], None] | None) -> int:
        """The CRC-32 of the pieces in order, as they are finished; progress as they come."""
        crc = 0
        for k in range(self.pieces):
            with self.done:
                while self.crcs[k] is None and not self.failed:
                    self.done.wait()
                if self.failed:
                    raise self.failed[0]
                got = self.crcs[k]
            assert got is not None
            crc = crc32_combine(crc, got[0], got[1])
            if progress:
                progress(got[1])
        return crc

    def wait_workers(self, n: int) -> None:
        """Until ``n`` workers have left, even through another interruption (raised once
        they have: each stops at its next piece)."""
        pending: BaseException | None = None
        while True:
            try:
                with self.done:
                    while self.finished < n:
                        self.done.wait()
                break
            except BaseException as exc:  # a second signal while the workers stop
                pending = exc
        if pending is not None:
            raise pending


# -- the workers: started once, kept (their buffers and the kernels' scratch are per thread,
# so fresh threads for every record would fault fresh pages in for every record) ----------------
_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_started = [0]
_start_lock = threading.Lock()


def _start_workers(n: int) -> None:
    with _start_lock:
        while _started[0] < n:
            threading.Thread(target=_serve, name="ckpttool-cast", daemon=True).start()
            _started[0] += 1


def _serve() -> None:
    while True:
        _jobs.get()()  # a job hands its own errors to the caller; it never raises


def _forget_workers() -> None:
    """In a forked child: the parent's workers did not come along (a fork copies only the
    thread that forked), so the next cast starts its own."""
    global _jobs, _start_lock
    _jobs, _start_lock, _started[0] = queue.SimpleQueue(), threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _piece(
    src_fd: int,
    src_off: int,
    n: int,
    src: str,
    dst_fd: int,
    dst_off: int,
    dst: str,
    lock: threading.Lock,
) -> int:
    """Read, cast and write one piece in this thread's buffers; its CRC-32. One worker at a
    time writes: ext4 and XFS take the file's lock for a buffered write anyway, and a second
    writer spun on it in the kernel (11% of the CPU of a 2 GB bfloat16 cast on XFS) where it
    now sleeps, or casts its next piece."""
    import numpy as np

    from .numeric import _cast_block, bits_dtype, table_for

    in_type, out_type = bits_dtype(src), bits_dtype(dst)
    raw, out = _buffers(n * in_type.itemsize, n * out_type.itemsize)
    got = os.preadv(src_fd, [raw], src_off)
    if got != len(raw):
        raise EOFError(f"{got} of {len(raw)} bytes at offset {src_off}")
    with np.errstate(all="ignore"):  # numpy's error state is per thread
        table = None if compiled(src, dst) else table_for(src, dst)
        cast_blocks(raw.view(in_type), out.view(out_type), src, dst, _cast_block, block=STEP,
                    table=table)  # fmt: skip
    view = memoryview(out)
    crc = crc32(view)
    at = dst_off
    with lock:
        while view:
            wrote = os.pwrite(dst_fd, view, at)
            view, at = view[wrote:], at + wrote
    start_writeback(dst_fd, dst_off, len(out))  # the final fsync then has little left
    return crc


def _buffers(n_in: int, n_out: int) -> tuple[Any, Any]:
    """This thread's input and output buffers (uint8 arrays), cut to size."""
    import numpy as np

    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].size < n_in or bufs[1].size < n_out:
        bufs = _local.bufs = (np.empty(max(n_in, PIECE), np.uint8),
                              np.empty(max(n_out, PIECE), np.uint8))  # fmt: skip
    return bufs[0][:n_in], bufs[1][:n_out]
