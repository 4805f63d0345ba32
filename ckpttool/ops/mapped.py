"""Pages of a file mapping that a streamed comparison is done with, given back.

``diff`` reads tensors through read-only file mappings; a mapping's pages stay resident
(counted in the process's resident size, though not in its private memory) until it is
unmapped, so comparing a 150 MB tensor pair held 300 MB. Releasing each compared piece keeps
the resident size flat; the pages stay in the page cache.
"""

from __future__ import annotations

import contextlib
from typing import Any


def release(piece: Any) -> None:
    """Unmap the pages of a compared piece that views a file mapping (they stay in the page
    cache): the process's resident memory then stays flat instead of growing to the size of
    the biggest tensor pair, as it would while its mapping lives."""
    import mmap

    base = piece
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or not piece.flags.c_contiguous or not hasattr(base, "madvise"):
        return
    import numpy as np

    page = mmap.PAGESIZE
    start = piece.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).ctypes.data
    lo = -(-start // page) * page
    hi = (start + piece.nbytes) // page * page
    if 0 <= lo < hi <= len(base):
        with contextlib.suppress(OSError, ValueError):
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
