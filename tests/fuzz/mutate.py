"""Byte-level and structure-aware mutations of checkpoint files, shared by the hypothesis
property test and the standalone ``run_fuzz.py``.

A mutation is plain data so that hypothesis can generate and shrink it and a failure can
be replayed: ``Mutation(base, inner, outer)`` takes ``bases[base]``, applies ``inner`` ops
to the *inside* of the file (the ``data.pkl`` member of a zip, re-zipped with correct CRCs;
the JSON header of a safetensors file, length prefix fixed up), then ``outer`` ops to the
whole file. Inner mutations get past CRC and length checks, so they reach the pickle and
header parsers; outer ones hit the container parsers.

Ops (positions are taken modulo the current length):
  ("flip", pos, bit)              flip one bit
  ("byte", pos, value)            set one byte
  ("int", pos, width, k)          write INTERESTING_INTS[k] as a little-endian int
  ("trunc", pos)                  cut the data at pos
  ("delete", pos, n)              remove n bytes
  ("insert", pos, data)           insert bytes
  ("dup", src, n, dst)            copy n bytes from src to dst (insert)
  ("splice", base, pos_a, pos_b)  data[:pos_a] + bases[base][pos_b:]
"""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
from dataclasses import dataclass

INTERESTING_INTS = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    2**40,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
OP_KINDS = ("flip", "byte", "int", "trunc", "delete", "insert", "dup", "splice")


@dataclass(frozen=True)
class Mutation:
    base: int
    inner: tuple = ()
    outer: tuple = ()


def apply_ops(data: bytes, ops, bases: list[bytes]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind, *a = op
        n = len(buf)
        if kind == "flip" and n:
            buf[a[0] % n] ^= 1 << (a[1] % 8)
        elif kind == "byte" and n:
            buf[a[0] % n] = a[1] & 0xFF
        elif kind == "int" and n:
            width = (1, 2, 4, 8)[a[1] % 4]
            v = INTERESTING_INTS[a[2] % len(INTERESTING_INTS)] & ((1 << (8 * width)) - 1)
            p = a[0] % n
            buf[p : p + width] = v.to_bytes(width, "little")
        elif kind == "trunc":
            del buf[a[0] % (n + 1) :]
        elif kind == "delete" and n:
            p = a[0] % n
            del buf[p : p + a[1]]
        elif kind == "insert":
            p = a[0] % (n + 1)
            buf[p:p] = a[1]
        elif kind == "dup" and n:
            s, d = a[0] % n, a[2] % (n + 1)
            buf[d:d] = buf[s : s + a[1]]
        elif kind == "splice" and bases:
            other = bases[a[0] % len(bases)]
            buf = buf[: a[1] % (n + 1)] + bytearray(other[a[2] % (len(other) + 1) :])
    return bytes(buf)


def _rezip(data: bytes, fn) -> bytes | None:
    """Rewrite every ``*.pkl`` member with ``fn`` (fresh CRCs); None if not a plain zip."""
    if not data.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    except Exception:
        return None
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, body in members:
            zf.writestr(name, fn(body) if name.endswith(".pkl") else body)
    return out.getvalue()


def _st_header(data: bytes, fn) -> bytes | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    try:
        json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    header = fn(data[8 : 8 + n])
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def mutate(m: Mutation, bases: list[bytes]) -> bytes:
    data = bases[m.base % len(bases)]
    if m.inner:

        def inner(b: bytes) -> bytes:
            return apply_ops(b, m.inner, [])

        data = _rezip(data, inner) or _st_header(data, inner) or data
    return apply_ops(data, m.outer, bases)


def random_ops(rng: random.Random, n_bases: int, k: int) -> tuple:
    ops = []
    for _ in range(k):
        kind = rng.choice(OP_KINDS)
        pos = rng.randrange(1 << 20)
        if kind == "flip":
            ops.append((kind, pos, rng.randrange(8)))
        elif kind == "byte":
            ops.append((kind, pos, rng.randrange(256)))
        elif kind == "int":
            ops.append((kind, pos, rng.randrange(4), rng.randrange(len(INTERESTING_INTS))))
        elif kind == "trunc":
            ops.append((kind, pos))
        elif kind == "delete":
            ops.append((kind, pos, rng.randrange(1, 64)))
        elif kind == "insert":
            ops.append((kind, pos, rng.randbytes(rng.randrange(1, 16))))
        elif kind == "dup":
            ops.append((kind, pos, rng.randrange(1, 256), rng.randrange(1 << 20)))
        else:
            ops.append((kind, rng.randrange(n_bases), pos, rng.randrange(1 << 20)))
    return tuple(ops)


def random_mutation(rng: random.Random, n_bases: int) -> Mutation:
    inner = random_ops(rng, n_bases, rng.randrange(0, 4)) if rng.random() < 0.6 else ()
    outer = random_ops(rng, n_bases, rng.randrange(0 if inner else 1, 4))
    outer = tuple(op for op in outer if not (inner and op[0] == "splice")) or outer
    return Mutation(rng.randrange(n_bases), inner, outer)
