"""What the ``ckpttool`` program sets up in its process before it imports the command line
(the library, imported by other programs, changes none of it).

- the signal policy (:func:`ckpttool.signals.install`), a signal during the imports being
  raised once ``main()`` runs;
- the cyclic garbage collector runs after every 100,000 allocations instead of 700. A short
  command builds its trees (the pickle's objects, the report) and exits: collected every 700
  allocations, they are scanned for cycles they do not form tens of times (8-15 ms of an
  ``inspect`` or a ``convert`` of a 2 GB checkpoint). A long command is collected as often
  per object as before, with at most 100,000 objects of garbage waiting;
- once the command is done (:func:`finish`), every object is frozen out of the collector's
  reach (``gc.freeze``): the interpreter's last collection at exit then scans only what its
  shutdown makes, not the whole heap (10-16 ms of a short command). Cycles left then are not
  collected before the process ends, which Python never promised (``__del__`` at exit).
"""

from __future__ import annotations

import gc

from . import signals

GC_FIRST_GENERATION = 100_000
_started = False


def start() -> None:
    """Set up the process of the ``ckpttool`` program (``python -m ckpttool``, the script)."""
    global _started
    _started = True
    signals.install(defer=True)
    first, *older = gc.get_threshold()
    if first and first < GC_FIRST_GENERATION:  # 0: the user turned the collector off
        gc.set_threshold(GC_FIRST_GENERATION, *older)


def finish() -> None:
    """The command has run (``cli.main``): leave what it made to the process's end."""
    if _started:
        gc.freeze()
