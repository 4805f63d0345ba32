"""One signal policy for the ``ckpttool`` process: SIGINT, SIGTERM and SIGHUP stop it cleanly.

The command line calls :func:`install` before it imports anything heavy. From then on the first
of these signals raises :class:`Interrupted` in the main thread, wherever it is (start-up, a
lazy import, reading, writing, verifying); later ones find the process already stopping and
are only recorded, so they cannot cut its cleanup short. ``Interrupted`` is a
``BaseException``: the ``except Exception`` blocks of the library (and of the packages it
imports) let it through; the atomic writers remove their temp files as it unwinds, and the
command line prints one line and exits with ``EXIT_INTERRUPTED``. A signal is never swallowed
even by code that catches ``BaseException``: :func:`check` raises it again, and it is called
by every progress tick, before every commit, and before the command line exits.
:func:`held` makes a block (a rename, a cleanup) wait for its end instead.

Signals that were ignored when the process started (``nohup``, a background job's SIGINT)
stay ignored. Importing this module changes nothing; the library (no :func:`install`) only
catches signals while an atomic write is in progress (see ``writers/atomic.py``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

_first: int | None = None  # the first signal caught
_count = 0  # how many were caught
_raised = False  # Interrupted has been raised for it: the process is stopping
_hold = 0  # depth of held() blocks (plus one while install(defer=True) waits for release)
_deferred = False
_installed = False


class Interrupted(BaseException):
    """A signal asked the process to stop; raised from the signal handler in the main thread.

    Not an ``Exception``: ``except Exception`` cleanup paths must not turn it into another
    error or swallow it. ``signum`` is the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _raise(signum: int) -> None:
    global _raised
    _raised = True
    raise Interrupted(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    """Raise :class:`Interrupted` for the first signal; later ones find the process already
    stopping (they must not cut its cleanup short). Inside :func:`held` the first waits."""
    global _first, _count
    if _first is None:
        _first = signum
    _count += 1
    if not _raised and not _hold:
        _raise(signum)


def handle(signum: int) -> object:
    """Install the raising handler for ``signum`` unless the signal is ignored; returns the
    previous handler (None when left alone). Main thread only (``ValueError`` otherwise)."""
    previous = signal.getsignal(signum)
    if previous == signal.SIG_IGN:
        return None
    signal.signal(signum, _handler)
    return previous


def install(*, defer: bool = False) -> None:
    """The process-wide policy: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`.

    Idempotent; does nothing outside the main thread. Call it first thing in a program.
    ``defer``: until :func:`release`, a signal is only recorded (for module-level code that
    has no ``try`` around it yet, such as the imports before ``main``).
    """
    global _installed, _deferred, _hold
    try:
        for sig in SIGNALS:
            handle(sig)
    except ValueError:  # not the main thread
        return
    if not _installed:
        sys.unraisablehook = _unraisable(sys.unraisablehook)
    _installed = True
    if defer and not _deferred:
        _deferred = True
        _hold += 1


def _unraisable(previous: Any) -> Any:
    """A signal that lands in a callback Python cannot raise from (a weakref callback of the
    import machinery, a finalizer) is swallowed there: say nothing, and let the next
    :func:`check` raise it again."""

    def hook(args: Any) -> None:
        global _raised
        if isinstance(args.exc_value, Interrupted):
            _raised = False
            return
        previous(args)

    return hook


def release() -> None:
    """End ``install(defer=True)``: a signal recorded meanwhile is raised now."""
    global _deferred, _hold
    if _deferred:
        _deferred = False
        _hold -= 1
    if not _hold and _first is not None and not _raised:
        _raise(_first)


def running_as(program: str) -> bool:
    """Whether this process is the console script ``program`` (``sys.argv[0]``'s name)."""
    import os
    import sys

    name = os.path.basename((getattr(sys, "argv", None) or [""])[0])
    return name.removesuffix(".exe").removesuffix("-script.py") == program


def installed() -> bool:
    """Whether :func:`install` has run in this process (the command line)."""
    return _installed


def reset() -> None:
    """Forget earlier signals (a library call starting a new write; never under the policy)."""
    global _first, _raised
    if not _installed:
        _first, _raised = None, False


def received() -> int | None:
    """The first signal the handler caught in this process, or None."""
    return _first


def count() -> int:
    """How many signals the handler has caught so far (to see if one came during a block)."""
    return _count


def check() -> None:
    """Raise :class:`Interrupted` if a signal was caught, even if that exception was swallowed
    on its way (by code that catches ``BaseException``). Cheap: call it at checkpoints. Does
    nothing outside the main thread (signal handlers run in the main thread only)."""
    if _first is not None and threading.current_thread() is threading.main_thread():
        _raise(_first)


def stop() -> None:
    """The process is stopping: from now on signals are only recorded, never raised."""
    global _raised
    _raised = True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Let no signal interrupt the block (a commit, a cleanup): one that arrives meanwhile is
    raised when the outermost block ends. Works whichever thread the OS delivers it to."""
    global _hold
    _hold += 1
    try:
        yield
    finally:
        _hold -= 1
        if not _hold and _first is not None and not _raised:
            _raise(_first)
