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


# -- putting CRCs of consecutive pieces together (zlib's crc32_combine, which Python lacks) -------
_POLY = 0xEDB88320  # CRC-32's polynomial, bit-reflected as zlib computes it


def _multmodp(a: int, b: int) -> int:
    """a * b modulo CRC-32's polynomial (both reflected, as zlib keeps them)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x**1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x**(2**k) modulo the polynomial


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``.

    Example:
        >>> crc32_combine(crc32(b"ab"), crc32(b"cd"), 2) == crc32(b"abcd")
        True
    """
    p, k, n = 1 << 31, 3, len2  # x**0; x**(8 * len2) = product of x**(2**(k)) over n's bits
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2
