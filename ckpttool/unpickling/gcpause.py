"""Python's cyclic garbage collector, paused while the verdict walks a file's pickles.

The static walk makes tens of thousands of small objects that all live until the file is
judged and then all die: the collector, triggered every 700 allocations, scans them again
and again for cycles they do not form (a tenth of the verdict's time). Reference counting
frees them when the walk's results are dropped, before the pause ends, so the collector never
sees them; only a cycle would wait for it, and it runs again after the pause. (The read keeps
what it makes, the tree: the collector scans it once either way, so the read is not paused.)
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside; the collector's state (on or off) is restored after."""
    if not gc.isenabled():  # off already (by the caller, or an outer pause): leave it so
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
