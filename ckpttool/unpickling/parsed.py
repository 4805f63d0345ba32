"""Pickles the verdict's walk has already parsed to their STOP, by digest.

The walk (:mod:`.opscan`) reads every opcode with bounded reads, as the pre-pass of
:func:`.scan.unpickle` does with ``pickletools``; a pickle it parsed whole need not be walked a
second time before CPython's C unpickler reads it (that second pure-Python walk was most of
``inspect``'s time on large checkpoints). Keyed by a BLAKE2 digest of the exact bytes, so a
pickle that differs in any byte is walked again.
"""

from __future__ import annotations

from collections import OrderedDict
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
