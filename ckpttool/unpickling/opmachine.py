"""The symbolic machine under :mod:`.opscan`: its state, and the handlers of the opcodes that
are rare in torch checkpoints (the common ones run inline in ``opscan``)."""

from __future__ import annotations

import _compat_pickle
import codecs
from collections.abc import Callable

from .opvalues import (
    _LEN4,
    _LEN8,
    _SIGNED4,
    MAX_STR,
    CallSite,
    GlobalRef,
    PickleWalk,
    Reader,
    Stop,
    Value,
    _str_value,
    _text_int,
    _unquote,
)

_INT, _FLOAT, _NONE, _BOOL, _BYTES, _PERSID = (
    Value(k) for k in ("int", "float", "none", "bool", "bytes", "persid")
)
_EMPTY_TUPLE = Value("tuple", items=())
_SIZES = {0x58: 4, 0x8C: 1, 0x8D: 8, 0x42: 4, 0x43: 1, 0x8E: 8, 0x96: 8}  # length prefixes
_STR_OPS = frozenset({0x58, 0x8C, 0x8D})  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8


class Machine:
    """The walk's state; the inline loop keeps ``pos``, ``limit`` and ``stack`` in locals and
    writes them back here before a handler runs."""

    def __init__(self, r: Reader, res: PickleWalk) -> None:
        self.r, self.res, self.buf, self.end = r, res, r.buf, r.end
        self.pos, self.limit = r.pos, r.end
        self.stack: list[Value] = []
        self.marks: list[list[Value]] = []
        self.memo: dict[int, Value] = {}
        self.proto = 0

    def slow(self, n: int) -> bytes:
        """n bytes across the frame end or the data end (Reader decides how)."""
        self.r.pos = self.pos
        data = self.r.read(n)
        self.pos = self.r.pos
        self.limit = self.r.frame_end if self.r.frame_end is not None else self.end
        return data

    def take(self, n: int) -> bytes:
        if self.pos + n <= self.limit:
            data = bytes(self.buf[self.pos : self.pos + n])
            self.pos += n
            return data
        return self.slow(n)

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise Stop(f"truncated at offset {self.pos} (declares {n:,} bytes)")
        if self.pos + n <= self.limit:
            self.pos += n  # skipped, never copied: a BINBYTES8 may hold gigabytes
        else:
            self.slow(n)

    def line(self) -> bytes:
        self.r.pos = self.pos
        data = self.r.readline()
        self.pos = self.r.pos
        self.limit = self.r.frame_end if self.r.frame_end is not None else self.end
        return data

    def pop(self, k: int = 1) -> list[Value]:
        if len(self.stack) < k:
            raise Stop(f"stack underflow at offset {self.pos}")
        items = self.stack[-k:]
        del self.stack[-k:]
        return items

    def top(self) -> Value:
        if not self.stack:
            raise Stop(f"stack underflow at offset {self.pos}")
        return self.stack[-1]

    def pop_mark(self) -> list[Value]:
        if not self.marks:
            raise Stop(f"no MARK before offset {self.pos}")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def add_global(self, module: str, name: str, opcode: str, at: int) -> Value:
        if self.proto < 3:  # Python 2 names, mapped as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        g = GlobalRef(module, name, opcode, at)
        self.res.globals.append(g)
        return Value("global", gref=g)

    def call(self, op: str, callee: Value, args: Value | None, at: int) -> Value:
        site = CallSite(op, callee, args, at)
        self.res.calls.append(site)
        return Value("result", origin=site)

    def memo_get(self, idx: int, at: int) -> None:
        v = self.memo.get(idx)
        if v is None:
            raise Stop(f"memo key {idx} not found at offset {at}")
        self.stack.append(v)


def persid(pid: Value) -> Value:
    """torch's legacy loader returns the class itself for ``('module', cls, file, source)``."""
    if pid.kind == "tuple" and pid.items and len(pid.items) >= 2:
        first = pid.items[0]
        if first.kind == "str" and first.text == "module" and pid.items[1].kind == "global":
            return pid.items[1]
    return _PERSID


# -- handlers of the rarer opcodes: (machine, opcode, offset) -----------------------------------
Handler = Callable[[Machine, int, int], None]
HANDLERS: dict[int, Handler] = {}


def _on(*codes: int) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS.update(dict.fromkeys(codes, fn))
        return fn

    return register


@_on(*_SIZES)
def _sized(m: Machine, code: int, at: int) -> None:
    n = int.from_bytes(m.take(_SIZES[code]), "little")
    if code in _STR_OPS and n <= MAX_STR:
        if n > m.end - m.pos:
            raise Stop(f"truncated at offset {at} (declares {n:,} bytes)")
        m.stack.append(_str_value(m.take(n)))
        return
    m.skip(n)
    m.stack.append(Value("str") if code in _STR_OPS else _BYTES)


@_on(0x4D, 0x4A, 0x47, 0x4B)  # BININT2, BININT, BINFLOAT, BININT1
def _binary_number(m: Machine, code: int, at: int) -> None:
    m.take({0x4D: 2, 0x4A: 4, 0x47: 8, 0x4B: 1}[code])
    m.stack.append(_FLOAT if code == 0x47 else _INT)


@_on(0x71, 0x72, 0x94)  # BINPUT, LONG_BINPUT, MEMOIZE
def _put(m: Machine, code: int, at: int) -> None:
    idx = m.take(1)[0] if code == 0x71 else len(m.memo)
    if code == 0x72:
        idx = _LEN4.unpack(m.take(4))[0]
    m.memo[idx] = m.top()


@_on(0x68, 0x6A)  # BINGET, LONG_BINGET
def _get(m: Machine, code: int, at: int) -> None:
    m.memo_get(m.take(1)[0] if code == 0x68 else _LEN4.unpack(m.take(4))[0], at)


@_on(0x75, 0x73, 0x61, 0x65, 0x90)  # SETITEMS, SETITEM, APPEND, APPENDS, ADDITEMS
def _mutate(m: Machine, code: int, at: int) -> None:
    if code in (0x75, 0x65, 0x90):
        m.pop_mark()
    else:
        m.pop(2 if code == 0x73 else 1)
    m.res.mutated.append(("SETITEM" if code in (0x75, 0x73) else "APPEND", m.top()))


@_on(0x7D, 0x5D, 0x8F, 0x6C, 0x64, 0x91)  # empty/marked dict, list, set, frozenset
def _container(m: Machine, code: int, at: int) -> None:
    if code in (0x6C, 0x64, 0x91):
        m.pop_mark()
    kind = "dict" if code in (0x7D, 0x64) else "list" if code in (0x5D, 0x6C) else "set"
    m.stack.append(Value(kind))


@_on(0x62)  # BUILD
def _build(m: Machine, code: int, at: int) -> None:
    (state,) = m.pop()
    m.res.built.append((m.top(), state))


@_on(0x81, 0x92)  # NEWOBJ, NEWOBJ_EX
def _newobj(m: Machine, code: int, at: int) -> None:
    items = m.pop(2 if code == 0x81 else 3)
    op = "NEWOBJ" if code == 0x81 else "NEWOBJ_EX"
    m.stack.append(m.call(op, items[0], items[1], at))


@_on(0x93)  # STACK_GLOBAL
def _stack_global(m: Machine, code: int, at: int) -> None:
    module_v, name_v = m.pop(2)
    if module_v.kind != "str" or name_v.kind != "str":
        raise Stop(f"STACK_GLOBAL requires str at offset {at}")
    module = module_v.text if module_v.text is not None else "<a long string>"
    name = name_v.text if name_v.text is not None else "<a long string>"
    m.stack.append(m.add_global(module, name, "STACK_GLOBAL", at))


@_on(0x80)  # PROTO
def _proto(m: Machine, code: int, at: int) -> None:
    m.proto = m.take(1)[0]
    if m.proto > 5:
        raise Stop(f"unsupported pickle protocol {m.proto}")
    m.res.protocol = max(m.res.protocol, m.proto)


@_on(0x95)  # FRAME
def _frame(m: Machine, code: int, at: int) -> None:
    (n,) = _LEN8.unpack(m.take(8))
    if m.r.frame_end is not None and m.pos < m.r.frame_end:
        m.r.straddle = True  # a new frame before the end of the current one
    if n > m.end - m.pos:
        raise Stop(f"a FRAME at offset {at} declares {n:,} bytes past the end")
    m.r.frame_end = m.limit = m.pos + n


@_on(0x63, 0x69)  # GLOBAL, INST
def _global(m: Machine, code: int, at: int) -> None:
    module = m.line()[:-1].decode("utf-8")
    name = m.line()[:-1].decode("utf-8")
    g = m.add_global(module, name, "GLOBAL" if code == 0x63 else "INST", at)
    if code == 0x63:
        m.stack.append(g)
    else:
        items = tuple(m.pop_mark())
        m.stack.append(m.call("INST", g, Value("tuple", items=items), at))


@_on(0x6F)  # OBJ
def _obj(m: Machine, code: int, at: int) -> None:
    marked = m.pop_mark()
    if not marked:
        raise Stop(f"OBJ without a class at offset {at}")
    m.stack.append(m.call("OBJ", marked[0], Value("tuple", items=tuple(marked[1:])), at))


@_on(0x82, 0x83, 0x84)  # EXT1, EXT2, EXT4
def _ext(m: Machine, code: int, at: int) -> None:
    n = int.from_bytes(m.take({0x82: 1, 0x83: 2, 0x84: 4}[code]), "little")
    m.stack.append(m.add_global("copyreg", f"<extension code {n}>", "EXT", at))


@_on(0x8A, 0x8B, 0x54, 0x55)  # LONG1, LONG4, BINSTRING, SHORT_BINSTRING
def _counted(m: Machine, code: int, at: int) -> None:
    n = m.take(1)[0] if code in (0x8A, 0x55) else _SIGNED4.unpack(m.take(4))[0]
    if n < 0 or n > m.end - m.pos:
        raise Stop(f"a bad byte count at offset {at}")
    if code in (0x8A, 0x8B):
        m.skip(n)
        m.stack.append(_INT)
    elif n <= MAX_STR:
        m.stack.append(_str_value(m.take(n)))
    else:
        m.skip(n)
        m.stack.append(Value("str"))


@_on(0x53, 0x56)  # STRING (quoted), UNICODE (raw-unicode-escape)
def _text_string(m: Machine, code: int, at: int) -> None:
    raw = m.line()
    text = _unquote(raw) if code == 0x53 else codecs.raw_unicode_escape_decode(raw[:-1])[0]
    if text is None:
        raise Stop(f"the STRING opcode argument must be quoted (offset {at})")
    m.stack.append(Value("str", text=text if len(text) <= MAX_STR else None))


@_on(0x49, 0x4C, 0x46)  # INT, LONG, FLOAT (text)
def _text_number(m: Machine, code: int, at: int) -> None:
    raw = m.line()
    if code == 0x46:
        try:
            float(raw)
        except ValueError:
            raise Stop(f"could not convert string to float at offset {at}") from None
    elif _text_int(raw) is None:
        raise Stop(f"could not convert string to int at offset {at}")
    m.stack.append(_FLOAT if code == 0x46 else _INT)


@_on(0x70, 0x67)  # PUT, GET (text, base 10)
def _text_memo(m: Machine, code: int, at: int) -> None:
    try:
        idx = int(m.line()[:-1], 10)
    except ValueError:
        raise Stop(f"bad memo index at offset {at}") from None
    if code == 0x67:
        m.memo_get(idx, at)
    elif idx < 0:
        raise Stop(f"negative PUT argument at offset {at}")
    else:
        m.memo[idx] = m.top()


@_on(0x30, 0x31, 0x32, 0x50, 0x97, 0x98)  # POP, POP_MARK, DUP, PERSID, NEXT/READONLY_BUFFER
def _stack_ops(m: Machine, code: int, at: int) -> None:
    if code == 0x30:  # POP pops a MARK when the stack above it is empty
        m.pop() if m.stack else m.pop_mark()
    elif code == 0x31:
        m.pop_mark()
    elif code == 0x32:
        m.stack.append(m.top())
    elif code == 0x50:
        m.line()
        m.stack.append(_PERSID)
    elif code == 0x97:
        raise Stop(f"pickle stream refers to out-of-band data (offset {at})")
    else:
        m.top()


# The opcodes opscan runs inline, for when their bytes straddle a boundary or they fail there.
@_on(0x28, 0x85, 0x86, 0x87, 0x74)  # MARK, TUPLE1..3, TUPLE
def _tuple(m: Machine, code: int, at: int) -> None:
    if code == 0x28:
        m.marks.append(m.stack)
        m.stack = []
        return
    items = m.pop_mark() if code == 0x74 else m.pop(code - 0x84)
    m.stack.append(Value("tuple", items=tuple(items)))


@_on(0x52, 0x51)  # REDUCE, BINPERSID
def _reduce(m: Machine, code: int, at: int) -> None:
    if code == 0x51:
        m.stack.append(persid(m.pop()[0]))
        return
    func, args = m.pop(2)
    m.stack.append(m.call("REDUCE", func, args, at))


@_on(0x88, 0x89, 0x29, 0x4E, 0x2E)  # NEWTRUE, NEWFALSE, EMPTY_TUPLE, NONE, STOP
def _constant(m: Machine, code: int, at: int) -> None:
    if code == 0x2E:
        m.res.end = m.pos
        fe = m.r.frame_end
        m.res.frame_end = fe if fe is not None and fe > m.pos else None
        return
    m.stack.append(_BOOL if code > 0x80 else _EMPTY_TUPLE if code == 0x29 else _NONE)
