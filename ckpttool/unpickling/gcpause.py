"""Python's cyclic garbage collector, paused while a pickle is walked or read.

Walking or reading a checkpoint's pickle makes tens of thousands of small objects that all
live until the end: the collector, triggered every 700 of them, scans them again and again
for cycles it never finds (a tenth of the parse). Reference counting still frees what
becomes garbage; only cycles wait for the collector, which runs again after the pause.
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
