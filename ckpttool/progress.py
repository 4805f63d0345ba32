"""A one-line progress bar on stderr that fits any terminal width, with a steady ETA.

Drawn only on a terminal; each redraw is one line shorter than the terminal is wide at that
moment (so it never wraps, however narrow the terminal or after a resize) and overwrites the
previous one with ``\\r``. The rate is smoothed (an exponential moving average of rates
measured over half-second windows), so the ETA does not swing when one chunk is slow (a lazy
import, a cast). Standard library only; importing it costs nothing measurable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

_MIN_REDRAW = 0.1  # seconds between redraws
_WINDOW = 0.5  # seconds of work per rate sample
_SMOOTHING = 0.25  # weight of the newest sample in the moving average
_ETA_AFTER = 1.0  # seconds of work before an ETA is shown

_active: list[Bar] = []


def terminal_width(stream: TextIO, default: int = 80) -> int:
    """The width of the terminal ``stream`` is on (COLUMNS when set, else ``default``)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, OSError, ValueError):
        return default


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def render(
    width: int, label: str, done: int, total: int, rate: float | None, eta: float | None
) -> str:
    """One progress line of at most ``width - 1`` characters.

    The layout depends only on the width and the total, never on values that change while the
    bar runs: each part has a fixed width (room for the widest rate and ETA is kept from the
    start), so the bar does not jump when the rate or the ETA appears. Parts are dropped as
    the width shrinks: first the rate, then the sizes, then the label, then the bar, then the
    ETA; the percentage fits from 4 columns.

    Example:
        >>> render(60, "writing", 50, 200, None, None)
        'writing  25% [####             ]     50 B/200 B'
    """
    room = max(width - 1, 1)
    frac = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    pct = f"{int(frac * 100):3d}%"
    total_text = _size(total)
    sizes = f"{_size(min(done, total))}/{total_text}".rjust(len("999.9 MB/") + len(total_text))
    speed = (f"{_size(rate)}/s" if rate else "").rjust(len("999.9 MB/s"))
    when = (f"ETA {_clock(eta)}" if eta is not None else "").ljust(len("ETA 9:59:59"))
    labelled = f"{label} {pct}"
    tails = [f"{sizes} {speed} {when}", f"{sizes} {when}", when, ""]
    for head, tail in [(labelled, t) for t in tails] + [(pct, when), (pct, "")]:
        cells = room - len(head) - 3 - (len(tail) + 1 if tail else 0)  # " [" "]" " tail"
        if cells >= 10:
            filled = int(frac * cells)
            bar = "#" * filled + " " * (cells - filled)
            return (f"{head} [{bar}]" + (f" {tail}" if tail else "")).rstrip()
    for text in (f"{labelled} {when.strip()}", f"{pct} {when.strip()}", labelled, pct.strip()):
        if len(text.strip()) == len(text) and len(text) <= room:
            return text
    return pct.strip() if len(pct.strip()) <= room else ""


class Bar:
    """Progress over ``total`` units (bytes), drawn on ``stream`` if it is a terminal.

    Example:
        >>> bar = Bar(1 << 30, "writing")
        >>> bar.update(8 << 20)   # called by a writer after each chunk
        >>> bar.close()           # erases the line
    """

    def __init__(self, total: int, label: str = "writing", stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.done = 0
        self.rate: float | None = None
        self._start: float | None = None  # the clock starts at the first update
        self._sample = (0.0, 0)  # (time, done) at the start of the current rate window
        self._drawn_at = 0.0
        self._drawn = False
        self._main: tuple[int, int, float | None, float | None, tuple[float, int]] | None = None
        if self.enabled:
            _active.append(self)

    def update(self, n: int) -> None:
        """Count ``n`` more units done; redraw at most every 0.1 s."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self._start is None:
            self._start = now
            self._sample = (now, self.done - n)
        t0, d0 = self._sample
        if now - t0 >= _WINDOW:
            sample = (self.done - d0) / (now - t0)
            self.rate = (
                sample if self.rate is None else _SMOOTHING * sample + (1 - _SMOOTHING) * self.rate
            )
            self._sample = (now, self.done)
        if now - self._drawn_at >= _MIN_REDRAW or self.done >= self.total:
            self._draw(now)

    def phase(self, label: str, total: int | None = None) -> None:
        """Show another phase of the job (``verifying`` after ``writing``).

        With ``total``, the phase counts its own units from 0 (the bytes read back); without,
        the bar goes back to the job's own count, where it was (the next shard's writing).
        """
        if total is None:
            if self._main is not None:
                self.total, self.done, self.rate, self._start, self._sample = self._main
                self._main = None
        else:
            if self._main is None:
                self._main = (self.total, self.done, self.rate, self._start, self._sample)
            self.total, self.done, self.rate, self._start = total, 0, None, None
        self.label = label
        if self.enabled:
            self._draw(time.monotonic())

    def eta(self, now: float) -> float | None:
        if not self.rate or self._start is None or now - self._start < _ETA_AFTER:
            return None
        return max(self.total - self.done, 0) / self.rate

    def _draw(self, now: float) -> None:
        width = terminal_width(self.stream)
        line = render(width, self.label, self.done, self.total, self.rate, self.eta(now))
        self._write("\r" + line.ljust(max(width - 1, 1)) + "\r")
        self._drawn_at = now
        self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def clear(self) -> None:
        """Erase the line (if one was drawn); the cursor stays at its start."""
        if self.enabled and self._drawn:
            width = terminal_width(self.stream)
            self._write("\r" + " " * max(width - 1, 1) + "\r")
            self._drawn = False

    def close(self) -> None:
        """Erase the line and stop drawing."""
        self.clear()
        self.enabled = False
        if self in _active:
            _active.remove(self)


def phase(
    progress: Callable[[int], None] | None, label: str, total: int | None = None
) -> Callable[[int], None] | None:
    """Tell a writer's progress callback that the job enters another phase (``verifying``);
    return the callback that counts that phase's units.

    A callback may have a ``phase(label, total)`` method (the command line's bars do, see
    :meth:`Bar.phase`): it is told, and returned. A plain function is left alone and None is
    returned, so that it is only ever fed the bytes of the total it was created with.
    """
    method = getattr(progress, "phase", None)
    if method is None or total == 0:  # nothing to count (a write that is not verified)
        return None
    method(label, total)
    return progress


def phased(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """``progress`` if it follows phases (has a ``phase`` method), else None."""
    return progress if getattr(progress, "phase", None) is not None else None


def clear_line() -> None:
    """Erase every bar still on screen (before an error line is printed)."""
    for bar in list(_active):
        bar.close()
