"""Sharing a file's blocks instead of copying them, where the filesystem can (Linux).

On filesystems with extent sharing (XFS with reflink, btrfs, ...) ``FICLONERANGE`` makes a
range of the output point at the input's blocks: a 1 GiB range takes well under a millisecond
instead of a second, and uses no space. The kernel shares whole blocks only, so both offsets
must be equal modulo the filesystem's block size; the writers place each record at its input
offset modulo :func:`clone_block` and clone the block-aligned middle, copying only the head
and the tail (a ``.pt`` writer takes a run of whole records over as one range: ``zip_runs``).

A cloned range is verified by comparing extents (``FS_IOC_FIEMAP``): the output's blocks must
be the input's blocks, at the same place. That proves that the output holds exactly the input's
bytes, at a cost of a few ioctls, where reading the clone back would read every shared block
from the disk again (the clone has no page cache of its own). It does not read the input, so it
does not check the input's bytes against a CRC-32 recorded in it: a record that was corrupt on
disk stays corrupt, as with ``cp --reflink``.

Elsewhere (ext4, tmpfs, other OSes, two filesystems) :func:`clone_block` says 0 and the writers
copy as before, with the same output bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
import sys
from collections.abc import Iterator

_LINUX = sys.platform.startswith("linux")
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_CLONE_RANGE = struct.Struct("<qQQQ")  # src_fd, src_offset, src_length, dest_offset
_FIEMAP = struct.Struct("<QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("<QQQ16xI12x")  # logical, physical, length, flags
_LAST = 0x1
# extents whose physical address does not say where the bytes are (not yet allocated,
# compressed, inline in metadata, encrypted, packed with others)
_VAGUE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
SHARED = 0x2000
_BATCH = 128
# errors that mean "not here" (no support, two filesystems, misaligned), not a failed write
_UNSUPPORTED = {
    errno.EOPNOTSUPP,
    errno.ENOTTY,
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EBADF,
    errno.EPERM,
    errno.ETXTBSY,
}

_probed: dict[tuple[int, int, int], int] = {}


def clone_range(src_fd: int, src_off: int, n: int, dst_fd: int, dst_off: int) -> bool:
    """Make ``n`` bytes of ``dst_fd`` at ``dst_off`` share ``src_fd``'s blocks at ``src_off``.

    Offsets and ``n`` must be multiples of the block size (``n`` may end at the input's end).
    The output's file position is not moved. Returns False where the filesystem cannot share
    these blocks (nothing was written then); other OS errors (disk full) are raised.
    """
    if not _LINUX or n <= 0:
        return False
    import fcntl

    arg = _CLONE_RANGE.pack(src_fd, src_off, n, dst_off)
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, arg)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def clone_block(src_fd: int, dst_dir: str) -> int:
    """The block size to align to so that ranges of ``src_fd`` can be cloned into a new file in
    ``dst_dir``, or 0 where they cannot (then nothing needs aligning).

    Tried once per pair of filesystems by cloning a block of the input into an unnamed
    temporary file beside the output.
    """
    if not _LINUX:
        return 0
    try:  # a loop device mounted again may get the same number: the fsid tells them apart
        key = (os.fstat(src_fd).st_dev, os.stat(dst_dir).st_dev, os.statvfs(dst_dir).f_fsid)
    except OSError:
        return 0
    if key not in _probed:
        _probed[key] = _probe(src_fd, dst_dir)
    return _probed[key]


def _probe(src_fd: int, dst_dir: str) -> int:
    try:
        block = os.statvfs(dst_dir).f_bsize
        size = os.fstat(src_fd).st_size
    except OSError:
        return 0
    if size == 0 or block <= 0 or block & (block - 1):
        return 0
    block = max(block, 4096)  # a page: torch's records are aligned to 64 bytes within one
    with _scratch(dst_dir) as fd:
        if fd is None:
            return 0
        try:
            ok = clone_range(src_fd, 0, min(size, block), fd, 0)
        except OSError:
            return 0
        return block if ok else 0


@contextlib.contextmanager
def _scratch(folder: str) -> Iterator[int | None]:
    """An unnamed file in ``folder`` (O_TMPFILE), else None."""
    flag = getattr(os, "O_TMPFILE", 0)
    fd = None
    if flag:
        with contextlib.suppress(OSError):
            fd = os.open(folder, flag | os.O_RDWR, 0o600)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# -- checking a clone ------------------------------------------------------------------------
def extents(fd: int, off: int, n: int) -> list[tuple[int, int, int, int]] | None:
    """(logical, physical, length, flags) of the extents covering ``n`` bytes at ``off``, in
    order; None where FIEMAP is not available.

    Dirty pages are not written back first (that would flush the whole file): a range that
    has some shows as delayed-allocation extents, which :func:`same_blocks` does not trust.
    A freshly cloned range has none: cloning writes both ranges back before sharing them.
    """
    if not _LINUX:
        return None
    import fcntl

    found: list[tuple[int, int, int, int]] = []
    pos, end = off, off + n
    while pos < end:
        buf = bytearray(_FIEMAP.size + _BATCH * _EXTENT.size)
        _FIEMAP.pack_into(buf, 0, pos, end - pos, 0, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError:
            return None
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            break  # a hole: the caller sees the gap
        batch = [_EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size) for i in range(mapped)]
        found.extend(batch)
        logical, _, length, flags = batch[-1]
        if flags & _LAST or logical + length <= pos:
            break
        pos = logical + length
    return found


def _locate(ext: list[tuple[int, int, int, int]], pos: int) -> tuple[int, int, int] | None:
    """(physical address, bytes left in the extent, flags) of logical offset ``pos``
    (``ext`` in logical order, as FIEMAP lists them)."""
    i = bisect.bisect_right(ext, pos, key=lambda e: e[0]) - 1
    if i < 0:
        return None
    logical, physical, length, flags = ext[i]
    if logical <= pos < logical + length:
        return physical + pos - logical, logical + length - pos, flags
    return None


def same_blocks(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> bool:
    """Whether ``n`` bytes of ``dst_fd`` at ``dst_off`` are stored in exactly the blocks that
    hold ``src_fd``'s bytes at ``src_off`` (so both read the same), as FIEMAP reports them.

    False when that cannot be shown (no FIEMAP, a hole, an extent whose address does not
    locate its bytes): the caller then compares by reading.
    """
    src = extents(src_fd, src_off, n)
    dst = extents(dst_fd, dst_off, n)
    if not src or not dst:
        return False
    return _same(src, src_off, dst, dst_off, n)


class ExtentMaps:
    """The extents of whole files, each fetched once: checking many cloned ranges of one
    output costs a few FIEMAP calls in all instead of two per range.

    Fetch an output's extents only once every range is cloned into it (a map is a snapshot).
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int, int], list[tuple[int, int, int, int]] | None] = {}

    def _of(self, fd: int) -> list[tuple[int, int, int, int]] | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        key = (fd, st.st_dev, st.st_ino)  # a descriptor number closed and reused is another file
        if key not in self._maps:
            self._maps[key] = extents(fd, 0, st.st_size) if st.st_size else None
        return self._maps[key]

    def same_blocks(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> bool:
        """:func:`same_blocks` on the maps."""
        src, dst = self._of(src_fd), self._of(dst_fd)
        if not src or not dst:
            return False
        return _same(src, src_off, dst, dst_off, n)


def _same(
    src: list[tuple[int, int, int, int]],
    src_off: int,
    dst: list[tuple[int, int, int, int]],
    dst_off: int,
    n: int,
) -> bool:
    done = 0
    while done < n:
        a = _locate(src, src_off + done)
        b = _locate(dst, dst_off + done)
        if a is None or b is None or a[0] != b[0] or (a[2] | b[2]) & _VAGUE:
            return False
        done += min(a[1], b[1], n - done)
    return True


def shared(fd: int, off: int, n: int) -> bool:
    """Whether every extent of ``n`` bytes at ``off`` is flagged as shared with another file."""
    ext = extents(fd, off, n)
    if not ext:
        return False
    done = 0
    while done < n:
        hit = _locate(ext, off + done)
        if hit is None or not hit[2] & SHARED:
            return False
        done += min(hit[1], n - done)
    return True
