"""Where a checkpoint's bytes come from: a local file, or a URL read by range requests.

Readers and writers ask a :class:`Source` for byte ranges (``pread``, ``readinto``), a seekable
file object over it (:func:`file_view`: for :mod:`zipfile` and the unpickler) or a sliceable buffer
(``buffer``: an ``mmap`` locally; for a URL an object with the same ``len``, slicing and
``find``/``rfind``). A local file is read as before (``pread`` on a file descriptor, ``mmap``);
a URL (``https://``, ``hf://``, ``s3://``, ``gs://``) goes through :mod:`ckpttool.remote`, which
needs the ``remote`` extra (fsspec): importing this module imports nothing of it.
"""

from __future__ import annotations

import io
import mmap
import os
import re
from collections.abc import Iterable
from typing import IO, Any, Protocol

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a remote file (``scheme://...``) rather than a local one."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith("file://")


class Source(Protocol):
    """Bytes of one file, read by range."""

    name: str
    size: int

    def pread(self, n: int, off: int) -> bytes: ...

    def readinto(self, view: memoryview, off: int) -> int: ...

    def buffer(self) -> Any: ...

    def close(self) -> None: ...


class LocalSource:
    """A local file: ``pread`` on one descriptor, ``mmap`` for the whole-file buffer."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def pread(self, n: int, off: int) -> bytes:
        return os.pread(self.fd, n, off)

    def readinto(self, view: memoryview, off: int) -> int:
        return os.preadv(self.fd, [view], off)

    def buffer(self) -> Any:
        """The whole file as a read-only ``mmap`` (the caller closes it)."""
        return mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)

    def will_read(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Tell the kernel that these ``(offset, length)`` ranges are read next.

        Small reads scattered over a file that is not in the page cache (a zip's thousand
        local headers) otherwise reach the disk one after another, each waiting for the last;
        advised, they are queued together. A cached range costs about a microsecond.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        try:
            for off, n in ranges:
                advise(self.fd, off, n, os.POSIX_FADV_WILLNEED)
        except OSError:  # advice only: the reads that follow say what is wrong, if anything
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str) -> Any:
    """A :class:`Source` for a local path or a URL (raises OSError / CheckpointError)."""
    if is_url(path):
        from .remote import open_remote

        return open_remote(path)
    return LocalSource(path)


class RangeFile(io.RawIOBase):
    """Bytes ``[base, base + size)`` of a source as a seekable, read-only file (a zip stored
    inside a larger file is read through one of these)."""

    def __init__(self, source: Any, base: int = 0, size: int | None = None) -> None:
        self.source = source
        self.base = base
        self.size = source.size - base if size is None else size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), max(self.size - self.pos, 0))
        if n == 0:
            return 0
        got = self.source.readinto(view[:n], self.base + self.pos)
        self.pos += got
        return got


def file_view(src: Any, base: int = 0, size: int | None = None) -> IO[bytes]:
    """A buffered, seekable file over bytes ``[base, base + size)`` of a source."""
    return io.BufferedReader(RangeFile(src, base, size), 1 << 16)


def preadv(src: Any, view: memoryview, off: int) -> int:
    """Read into ``view`` from ``off`` of an input: a file descriptor or a :class:`Source`."""
    if isinstance(src, int):
        return os.preadv(src, [view], off)
    return int(src.readinto(view, off))


def open_input(path: str) -> Any:
    """An input for the writers: a file descriptor for a local path (kernel copies and maps
    work on it), a :class:`Source` for a URL."""
    if is_url(path):
        return open_source(path)
    return os.open(path, os.O_RDONLY)


def close_input(src: Any) -> None:
    if isinstance(src, int):
        os.close(src)
    # a remote source stays open for the rest of the process (its blocks are shared)


def open_zip(path: str) -> Any:
    """:class:`zipfile.ZipFile` over a local path or a URL (for deflated records)."""
    import zipfile

    if is_url(path):
        return zipfile.ZipFile(file_view(open_source(path)))
    return zipfile.ZipFile(path)


def parent(path: str) -> str:
    """The folder holding ``path`` (a URL's parent is cut at its last ``/``)."""
    if is_url(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name if is_url(folder) else os.path.join(folder, name)


def read_head(path: str, n: int = 512) -> bytes:
    """The first ``n`` bytes of a file or URL."""
    with open_source(path) as src:
        return bytes(src.pread(n, 0))


# -- folders, local or at a URL (the readers of folders of shards use these) -----------------------
def read_bytes(path: str, n: int, off: int = 0) -> bytes:
    """Up to ``n`` bytes of a file or URL from ``off`` (OSError / CheckpointError)."""
    if is_url(path):
        return bytes(open_source(path).pread(n, off))
    fd = os.open(path, os.O_RDONLY)  # unbuffered: a buffered file reads 8 KB for 9 bytes
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def getsize(path: str) -> int:
    return int(open_source(path).size) if is_url(path) else os.path.getsize(path)


def isfile(path: str) -> bool:
    if is_url(path):
        from .remote import tree

        return tree.isfile(path)
    return os.path.isfile(path)


def isdir(path: str) -> bool:
    if is_url(path):
        from .remote import tree

        return tree.isdir(path)
    return os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """The names in a folder (a folder URL: as its store lists it, see :mod:`.remote.tree`)."""
    if is_url(path):
        from .remote import tree

        return tree.listdir(path)
    return os.listdir(path)


def dirname(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def same_file(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)
