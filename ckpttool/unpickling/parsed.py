"""Pickles the verdict's walk has already parsed to their STOP, and zip directories Python's
``zipfile`` has listed, by digest.

The walk (:mod:`.opscan`) reads every opcode with bounded reads, as the pre-pass of
:func:`.scan.unpickle` does with ``pickletools``; a pickle it parsed whole need not be walked a
second time before CPython's C unpickler reads it (that second pure-Python walk was most of
``inspect``'s time on large checkpoints). Keyed by a BLAKE2 digest of the exact bytes, so a
pickle that differs in any byte is walked again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

try:  # hashlib's own blake2b, without importing hashlib and OpenSSL's _hashlib (~4 ms)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b

_KEEP = 64
_PARSED: OrderedDict[bytes, None] = OrderedDict()


def _digest(data: Any) -> bytes:
    return blake2b(data, digest_size=32).digest()


def remember_parsed(data: Any) -> None:
    """Record that ``data`` (one pickle, exactly) parses to its STOP with bounded reads."""
    _PARSED[_digest(data)] = None
    while len(_PARSED) > _KEEP:
        _PARSED.popitem(last=False)


def was_parsed(data: Any) -> bool:
    """Whether ``data`` is byte for byte a pickle :func:`remember_parsed` recorded."""
    return _digest(data) in _PARSED


# -- zip directories, as Python's zipfile lists them -------------------------------------------
# The verdict's zip model compares miniz's view of every archive with ``zipfile``'s; the read
# then needs ``zipfile``'s list again. It is kept here, keyed by the archive's size and a
# digest of every byte ``zipfile`` read to make it (its central directory and the end records
# after it, and the 64 KiB in which it looks for the end record), so an archive whose bytes
# differ there in any way is listed afresh.
_TAIL = (1 << 16) + 22 + 56 + 20  # the end-record search window and the zip64 records
_DIRS: OrderedDict[tuple[int, int, bytes], list[Any]] = OrderedDict()


def directory_start(size: int, start_dir: int) -> int:
    """Where the bytes ``zipfile`` reads to list an archive of ``size`` bytes begin."""
    return max(0, min(start_dir, size - _TAIL))


def remember_directory(size: int, start: int, tail: Any, infos: list[Any]) -> None:
    """``zipfile``'s ``infos`` of an archive of ``size`` bytes whose bytes from ``start`` to
    its end are ``tail``."""
    _DIRS[(size, start, _digest(tail))] = list(infos)
    while len(_DIRS) > _KEEP // 8:
        _DIRS.popitem(last=False)


def known_directory(size: int, pread: Callable[[int, int], bytes]) -> list[Any] | None:
    """``zipfile``'s list of an archive of ``size`` bytes (``pread(n, offset)`` reads it) if
    :func:`remember_directory` recorded an archive with the same bytes there, else None."""
    for size_, start, digest in reversed(_DIRS):
        if size_ == size and _digest(pread(size - start, start)) == digest:
            return list(_DIRS[(size_, start, digest)])
    return None
