"""A remote file read by range requests through a small cache of the ranges already fetched.

Small reads fetch a window around them: 256 KiB at the start of the file (a zip's first record
is its pickle), doubling while reads go on where the last one ended (up to 8 MiB); near the end
a window reaches back a full block (where a zip keeps its directory); a lone read amid the data
(a record's local header) fetches 4 KiB, and 12 KiB more before it when it ends just before a
window already fetched (reading backwards: the directory of a zip inside a DCP ``.distcp``
file, read from its end record back). Reads of 1 MiB or more go straight to the caller,
uncached, so copying a tensor never keeps it. The cache holds at most 32 MiB, least recently
used out first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

BLOCK = 256 << 10
SMALL = 4 << 10
BACK = 12 << 10
GAP = 16 << 10
PARALLEL = 8
MAX_AHEAD = 8 << 20
DIRECT = 1 << 20
CACHE_LIMIT = 32 << 20
ALIGN = 4096


class RemoteSource:
    """One remote file: ``size``, ``pread``, ``readinto`` and a sliceable :meth:`buffer`."""

    def __init__(self, url: str, backend: Any) -> None:
        self.name = url
        self.backend = backend
        stat = backend.stat()
        self.size = stat.size
        self.version = stat.version
        self._segments: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes
        self._cached = 0
        self._ahead = BLOCK
        self._last_end = -1
        self._lock = threading.Lock()
        self._expect: list[tuple[int, int, Any]] = []  # (start, end, check) not run yet

    # -- checks deferred to the first read of a range ---------------------------------------
    def expect(self, start: int, end: int, check: Any) -> None:
        """Call ``check()`` before any read of bytes [start, end) is served (once).

        A reader that would need one request per record to check a record's header (a zip's
        local header, a legacy storage's element count) registers that check here instead: it
        runs when a writer first reads the record, never for metadata-only commands.
        """
        with self._lock:
            self._expect.append((start, end, check))

    def _run_checks(self, off: int, end: int) -> None:
        due = [e for e in self._expect if e[0] < end and off < e[1]]
        if not due:
            return
        with self._lock:
            self._expect = [e for e in self._expect if e not in due]
        for _start, _end, check in due:
            check()

    # -- reading -------------------------------------------------------------------------
    def pread(self, n: int, off: int) -> bytes:
        end = min(off + max(n, 0), self.size)
        if off >= end:
            return b""
        if self._expect:
            self._run_checks(off, end)
        if end - off >= DIRECT:
            return bytes(self.backend.fetch(off, end))
        with self._lock:
            pieces = []
            pos = off
            while pos < end:
                piece = self._cached_at(pos, end)
                if piece is None:
                    piece = self._fill(pos, end)
                pieces.append(piece)
                pos += len(piece)
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def prefetch(self, n: int, off: int) -> None:
        """Cache bytes [off, off + n) (one request at most) without taking it for reading on:
        the next read just after it starts no read-ahead."""
        with self._lock:
            last, ahead = self._last_end, self._ahead
        self.pread(n, off)
        with self._lock:
            self._last_end, self._ahead = last, ahead

    def prefetch_many(self, ranges: list[tuple[int, int]]) -> None:
        """Cache many small ranges ``(offset, length)`` (every zip record's local header) in
        requests made ``PARALLEL`` at a time rather than one after the other; ranges closer
        than 16 KiB share a request."""
        todo: list[list[int]] = []
        with self._lock:
            for off, n in sorted(ranges):
                end = min(off + n, self.size)
                if off >= end or self._cached_at(off, end) is not None:
                    continue
                if todo and off - todo[-1][1] < GAP:
                    todo[-1][1] = max(todo[-1][1], end)
                else:
                    todo.append([off, end])
        if len(todo) < 2:
            return  # one read: as it comes
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(PARALLEL, len(todo))) as pool:
            got = list(pool.map(lambda r: self.backend.fetch(r[0], r[1]), todo))
        with self._lock:
            for (start, _), data in zip(todo, got, strict=True):
                self._segments[start] = data
                self._cached += len(data)
            while self._cached > CACHE_LIMIT and len(self._segments) > 1:
                _, old = self._segments.popitem(last=False)
                self._cached -= len(old)

    def readinto(self, view: memoryview, off: int) -> int:
        n = len(view)
        got = 0
        while got < n:  # big reads in 8 MiB requests, so no request holds a whole tensor
            step = min(n - got, MAX_AHEAD)
            data = self.pread(step, off + got)
            view[got : got + len(data)] = data
            got += len(data)
            if len(data) < step:
                break
        return got

    def buffer(self) -> RemoteBuffer:
        return RemoteBuffer(self)

    def close(self) -> None:
        """Nothing to release: the source stays shared for the process (its cache too)."""

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the cache -----------------------------------------------------------------------
    def _cached_at(self, pos: int, end: int) -> bytes | None:
        for start, data in reversed(self._segments.items()):
            if start <= pos < start + len(data):
                self._segments.move_to_end(start)
                return data[pos - start : min(end, start + len(data)) - start]
        return None

    def _fill(self, pos: int, end: int) -> bytes:
        """Fetch a window that holds [pos, ...) and cache it; return its part up to ``end``."""
        sequential = pos == self._last_end  # reading on where the last window ended
        self._ahead = min(self._ahead * 2, MAX_AHEAD) if sequential else BLOCK
        start = pos - pos % ALIGN
        stop = min(self.size, max(end, start + self._ahead))
        if stop == self.size and not sequential:  # a file's tail: where a zip keeps its directory
            start = min(start, max(0, self.size - BLOCK))
        elif not sequential and pos >= BLOCK:  # a lone read amid the data (a record's header)
            start, stop = pos, min(self.size, max(end, pos + SMALL))
            if any(0 <= s - end < SMALL for s in self._segments):  # reading backwards, as
                start = max(0, pos - BACK)  # zipfile reads a DCP item's directory from its end
        # do not fetch again what is cached just before or just after
        ends = [s + len(d) for s, d in self._segments.items() if s + len(d) <= pos]
        after = min((s for s in self._segments if s >= end), default=self.size)
        start, stop = max([start, *ends]), max(end, min(stop, after))
        data = self.backend.fetch(start, stop)
        self._last_end = stop
        self._segments[start] = data
        self._cached += len(data)
        while self._cached > CACHE_LIMIT and len(self._segments) > 1:
            _, old = self._segments.popitem(last=False)
            self._cached -= len(old)
        return data[pos - start : end - start]


class RemoteBuffer:
    """A remote file seen as a read-only buffer: ``len``, ``buf[i]``, ``buf[a:b]``,
    ``find``/``rfind`` over a range, as :mod:`ckpttool.unpickling.discover` uses an ``mmap``."""

    def __init__(self, source: RemoteSource) -> None:
        self.source = source
        self._start, self._data = 0, b""  # the last piece read: byte-at-a-time access hits it

    def __len__(self) -> int:
        return self.source.size

    def _bounds(self, start: int | None, end: int | None) -> tuple[int, int]:
        n = self.source.size
        s, e, _ = slice(start, end).indices(n)
        return s, max(s, e)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("RemoteBuffer slices take no step")
            s, e = self._bounds(key.start, key.stop)
            return self._read(s, e)
        i = key + self.source.size if key < 0 else key
        if not 0 <= i < self.source.size:
            raise IndexError("RemoteBuffer index out of range")
        if not self._start <= i < self._start + len(self._data):
            self._start = i
            self._data = self.source.pread(BLOCK, i)
        return self._data[i - self._start]

    def _read(self, s: int, e: int) -> bytes:
        if self._start <= s and e <= self._start + len(self._data):
            return self._data[s - self._start : e - self._start]
        return self.source.pread(e - s, s)

    def find(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:
        """The first ``sub`` in [start, end), read a window at a time (never the whole file)."""
        s, e = self._bounds(start, end)
        pos = s
        while pos < e:
            stop = min(e, pos + BLOCK)
            chunk = self._read(pos, stop)
            at = chunk.find(sub)
            if at >= 0 and pos + at + len(sub) <= e:
                return pos + at
            if stop >= e:
                return -1
            pos = max(pos + 1, stop - len(sub) + 1)
        return -1

    def rfind(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:
        s, e = self._bounds(start, end)
        stop = e
        while stop > s:
            pos = max(s, stop - BLOCK)
            at = self._read(pos, stop).rfind(sub)
            if at >= 0:
                return pos + at
            if pos == s:
                return -1
            stop = pos + len(sub) - 1
        return -1

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch these ``(offset, length)`` ranges now, in parallel requests (a hint)."""
        self.source.prefetch_many(ranges)

    def close(self) -> None:
        self._data = b""

    def __enter__(self) -> RemoteBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
