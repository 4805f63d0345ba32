"""A tiny opcode-level pickle *writer*.

Everything here produces bytes; nothing is ever unpickled and no payload target is ever
imported. Two layers:

* ``op`` functions return the raw bytes of one opcode (``GLOBAL``, ``BINGET``...), for
  cases that need exact control over the stream;
* ``enc(value, proto)`` encodes a tree of plain values (str, bytes, int, float, bool,
  None, tuple, list, dict) plus the marker classes below (``G`` for a global, ``Call``
  for ``REDUCE``, ``NewObj``/``Build``, ``PersId`` for ``BINPERSID``...) into an opcode
  stream, and ``dumps(value, proto)`` wraps it with ``PROTO`` and ``STOP``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

# --- single opcodes ------------------------------------------------------------------------

MARK = b"("
STOP = b"."
POP = b"0"
EMPTY_TUPLE = b")"
EMPTY_LIST = b"]"
EMPTY_DICT = b"}"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
LIST = b"l"
DICT = b"d"
APPEND = b"a"
APPENDS = b"e"
SETITEM = b"s"
SETITEMS = b"u"
REDUCE = b"R"
BUILD = b"b"
NEWOBJ = b"\x81"
OBJ = b"o"
BINPERSID = b"Q"
NONE = b"N"
NEWTRUE = b"\x88"
NEWFALSE = b"\x89"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"


def proto(n: int) -> bytes:
    return b"\x80" + bytes([n])


def frame(payload: bytes) -> bytes:
    """Protocol-4 FRAME around ``payload``."""
    return b"\x95" + struct.pack("<Q", len(payload)) + payload


def global_(module: str, name: str) -> bytes:
    """Protocol 0-3 ``GLOBAL`` (text, newline terminated)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def inst(module: str, name: str) -> bytes:
    """Protocol-0 ``INST``: pops args up to the MARK, calls ``module.name(*args)``."""
    return b"i" + module.encode() + b"\n" + name.encode() + b"\n"


def string0(s: str) -> bytes:
    """Protocol-0 ``STRING`` (repr-quoted, newline terminated)."""
    return b"S" + repr(s).encode() + b"\n"


def unicode(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    if len(b) < 256:
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE (proto 4), fine in any proto
    return b"X" + struct.pack("<I", len(b)) + b


def binunicode(s: str) -> bytes:
    """``BINUNICODE`` (protocol 1+), as torch's protocol-2 pickles use."""
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def binbytes(b: bytes) -> bytes:
    if len(b) < 256:
        return b"C" + bytes([len(b)]) + b
    return b"B" + struct.pack("<I", len(b)) + b


def bytearray8_header(declared_len: int) -> bytes:
    """``BYTEARRAY8`` opcode with an arbitrary declared length (data not included)."""
    return b"\x96" + struct.pack("<Q", declared_len)


def integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    nbytes = (n.bit_length() + 8) // 8
    raw = n.to_bytes(nbytes, "little", signed=True)
    if nbytes < 256:
        return b"\x8a" + bytes([nbytes]) + raw  # LONG1
    return b"\x8b" + struct.pack("<I", nbytes) + raw  # LONG4


def binfloat(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


def binput(i: int) -> bytes:
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def binget(i: int) -> bytes:
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


# --- value tree ----------------------------------------------------------------------------


@dataclass(frozen=True)
class G:
    """A global ``module.name``; encoded as GLOBAL (proto < 4) or STACK_GLOBAL (proto >= 4)."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``func(*args)`` via REDUCE."""

    func: Any
    args: tuple = ()


@dataclass(frozen=True)
class NewObj:
    """``cls.__new__(cls, *args)`` via NEWOBJ, then optional ``BUILD state``."""

    cls: Any
    args: tuple = ()
    state: Any = None


@dataclass(frozen=True)
class Build:
    """``obj`` followed by ``BUILD state``."""

    obj: Any
    state: Any


@dataclass(frozen=True)
class PersId:
    """A persistent id: ``value`` then BINPERSID."""

    value: Any


@dataclass(frozen=True)
class ODict:
    """``collections.OrderedDict`` as pickle protocol 2 writes it (REDUCE, then SETITEMS)."""

    items: tuple = ()


@dataclass(frozen=True)
class Raw:
    """Pre-encoded opcode bytes that push exactly one value."""

    data: bytes


@dataclass
class Enc:
    proto: int = 2
    out: list[bytes] = field(default_factory=list)

    def emit(self, v: Any) -> None:
        w = self.out.append
        if isinstance(v, Raw):
            w(v.data)
        elif v is None:
            w(NONE)
        elif v is True:
            w(NEWTRUE)
        elif v is False:
            w(NEWFALSE)
        elif isinstance(v, int):
            w(integer(v))
        elif isinstance(v, float):
            w(binfloat(v))
        elif isinstance(v, str):
            w(binunicode(v) if self.proto < 4 else unicode(v))
        elif isinstance(v, (bytes, bytearray)):
            if self.proto >= 3:
                w(binbytes(bytes(v)))
            else:  # what protocol 2 really writes for bytes
                self.emit(Call(G("_codecs", "encode"), (bytes(v).decode("latin-1"), "latin1")))
        elif isinstance(v, G):
            if self.proto >= 4:
                w(unicode(v.module) + unicode(v.name) + STACK_GLOBAL)
            else:
                w(global_(v.module, v.name))
        elif isinstance(v, Call):
            self.emit(v.func)
            self.emit(tuple(v.args))
            w(REDUCE)
        elif isinstance(v, NewObj):
            self.emit(v.cls)
            self.emit(tuple(v.args))
            w(NEWOBJ)
            if v.state is not None:
                self.emit(v.state)
                w(BUILD)
        elif isinstance(v, Build):
            self.emit(v.obj)
            self.emit(v.state)
            w(BUILD)
        elif isinstance(v, PersId):
            self.emit(v.value)
            w(BINPERSID)
        elif isinstance(v, ODict):
            self.emit(Call(G("collections", "OrderedDict"), ()))
            if v.items:
                w(MARK)
                for k, x in v.items:
                    self.emit(k)
                    self.emit(x)
                w(SETITEMS)
        elif isinstance(v, tuple):
            if not v:
                w(EMPTY_TUPLE)
            elif len(v) <= 3:
                for x in v:
                    self.emit(x)
                w({1: TUPLE1, 2: TUPLE2, 3: TUPLE3}[len(v)])
            else:
                w(MARK)
                for x in v:
                    self.emit(x)
                w(TUPLE)
        elif isinstance(v, list):
            w(EMPTY_LIST)
            if v:
                w(MARK)
                for x in v:
                    self.emit(x)
                w(APPENDS)
        elif isinstance(v, dict):
            w(EMPTY_DICT)
            if v:
                w(MARK)
                for k, x in v.items():
                    self.emit(k)
                    self.emit(x)
                w(SETITEMS)
        else:
            raise TypeError(f"cannot encode {type(v).__name__}")


def enc(value: Any, proto_: int = 2) -> bytes:
    """Opcodes that push ``value`` (no PROTO, no STOP)."""
    e = Enc(proto_)
    e.emit(value)
    return b"".join(e.out)


def dumps(value: Any, proto_: int = 2) -> bytes:
    """A complete pickle: PROTO, the value, STOP (protocol 4 gets a FRAME)."""
    body = enc(value, proto_) + STOP
    if proto_ >= 4:
        return proto(proto_) + frame(body)
    if proto_ >= 2:
        return proto(proto_) + body
    return body


# --- torch-flavoured helpers ---------------------------------------------------------------

STORAGE_CLASS = {
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
ITEMSIZE = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def tensor(
    key: str,
    numel: int,
    size: tuple[int, ...],
    *,
    dtype: str = "float32",
    offset: int = 0,
    stride: tuple[int, ...] | None = None,
    requires_grad: bool = False,
    location: str = "cpu",
) -> Call:
    """``torch._utils._rebuild_tensor_v2(PERSID(('storage', <cls>, key, loc, numel)), ...)``."""
    pid = PersId(("storage", G("torch", STORAGE_CLASS[dtype]), key, location, numel))
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        (
            pid,
            offset,
            tuple(size),
            tuple(stride if stride is not None else contiguous_stride(size)),
            requires_grad,
            ODict(),
        ),
    )


def legacy_tensor(key: str, numel: int, size: tuple[int, ...], dtype: str = "float32") -> Call:
    """Legacy (non-zip) torch format: the persistent id has a 6th element (view metadata)."""
    pid = PersId(("storage", G("torch", STORAGE_CLASS[dtype]), key, "cpu", numel, None))
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        (pid, 0, tuple(size), contiguous_stride(size), False, ODict()),
    )


def np_dtype(code: str) -> Build:
    """``numpy.dtype(code)`` as numpy pickles it (protocol-2 shape, numpy 2 module names)."""
    state = (3, "<", None, None, None, -1, -1, 0)
    return Build(Call(G("numpy", "dtype"), (code, False, True)), state)
