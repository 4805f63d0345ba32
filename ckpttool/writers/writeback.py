"""Starting the write-back of a range just written (Linux's ``sync_file_range``), so that the
fsync before an output is renamed into place has little left to do."""

from __future__ import annotations

from collections.abc import Callable


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk now,
    without waiting, so the fsync before the final rename has little left to do."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at import: a command that writes no big copy never loads it

    try:  # the running program's symbols first: find_library runs ldconfig (15 ms)
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.sync_file_range
        except (OSError, AttributeError):
            return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; failures only cost speed

    return start_writeback


_found: list[Callable[[int, int, int], None] | None] = []  # looked up on first use


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a just-written range to disk (a no-op where the OS offers no way)."""
    if not _found:
        _found.append(_sync_file_range())
    if _found[0] is not None:
        _found[0](fd, offset, nbytes)
