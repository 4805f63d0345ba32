"""What the ``ckpttool`` program sets up in its process before it imports the command line
(the library, imported by other programs, changes none of it).

- the signal policy (:func:`ckpttool.signals.install`), a signal during the imports being
  raised once ``main()`` runs;
- the cyclic garbage collector runs after every 100,000 allocations instead of 700. A short
  command builds its trees (the pickle's objects, the report) and exits: collected every 700
  allocations, they are scanned for cycles they do not form tens of times (8-15 ms of an
  ``inspect`` or a ``convert`` of a 2 GB checkpoint). A long command is collected as often
  per object as before, with at most 100,000 objects of garbage waiting.
"""

from __future__ import annotations

import gc

from . import signals

GC_FIRST_GENERATION = 100_000


def start() -> None:
    """Set up the process of the ``ckpttool`` program (``python -m ckpttool``, the script)."""
    signals.install(defer=True)
    first, *older = gc.get_threshold()
    if first and first < GC_FIRST_GENERATION:  # 0: the user turned the collector off
        gc.set_threshold(GC_FIRST_GENERATION, *older)
