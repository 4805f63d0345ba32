"""CRC-32, the checksum zip records carry, as fast as this machine allows.

ISA-L's implementation (the ``isal`` package: SIMD, about 6x zlib's on x86-64, measured in
``benchmarks/README.md``) when it is installed, else zlib's; both compute the same value.
Verifying a copy reads every byte back through it, so its speed is the writers' speed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

_crc32: Callable[..., int]
try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # no wheel for this platform: the standard library's
    _crc32 = zlib.crc32


def crc32(data: Any, value: int = 0) -> int:
    """The CRC-32 of ``data`` (any buffer), continuing from ``value``, as ``zlib.crc32``."""
    return _crc32(data, value)
