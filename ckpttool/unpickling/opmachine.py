"""Handlers of the opcodes that are rare in torch checkpoints, for the symbolic machine under
:mod:`.opscan` (the common ones run inline in ``opscan``; the machine's state and the calls no
global names are in :mod:`.opcalls`)."""

from __future__ import annotations

import codecs
from collections.abc import Callable

from .opcalls import _PERSID, Machine, attribute_call, persid
from .opvalues import (
    _LEN4,
    _LEN8,
    _SIGNED4,
    ANY_ATTR,
    MAX_STR,
    Stop,
    Value,
    _str_value,
    _text_int,
    _unquote,
)

_INT, _FLOAT, _NONE, _BOOL, _BYTES = (Value(k) for k in ("int", "float", "none", "bool", "bytes"))
_EMPTY_TUPLE = Value("tuple", items=())
_SIZES = {0x58: 4, 0x8C: 1, 0x8D: 8, 0x42: 4, 0x43: 1, 0x8E: 8, 0x96: 8}  # length prefixes
_STR_OPS = frozenset({0x58, 0x8C, 0x8D})  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
_BYTES_OPS = frozenset({0x42, 0x43, 0x8E})  # BINBYTES, SHORT_BINBYTES, BINBYTES8
_INT1 = [Value("int", num=i) for i in range(256)]  # BININT1, shared: no allocation per int
__all__ = ["HANDLERS", "Machine", "persid"]


def _bytes_value(raw: bytes) -> Value:
    return Value("bytes", text=raw.decode("latin-1"))


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
    if n <= MAX_STR and code in _STR_OPS | _BYTES_OPS:
        if n > m.end - m.pos:
            raise Stop(f"truncated at offset {at} (declares {n:,} bytes)")
        raw = m.take(n)
        m.stack.append(_str_value(raw) if code in _STR_OPS else _bytes_value(raw))
        return
    m.skip(n)
    m.stack.append(Value("str") if code in _STR_OPS else _BYTES)


@_on(0x4D, 0x4A, 0x47, 0x4B)  # BININT2, BININT, BINFLOAT, BININT1
def _binary_number(m: Machine, code: int, at: int) -> None:
    raw = m.take({0x4D: 2, 0x4A: 4, 0x47: 8, 0x4B: 1}[code])
    if code == 0x47:
        m.stack.append(_FLOAT)
    elif code == 0x4B:
        m.stack.append(_INT1[raw[0]])
    else:
        m.stack.append(Value("int", num=int.from_bytes(raw, "little", signed=code == 0x4A)))


@_on(0x71, 0x72, 0x94)  # BINPUT, LONG_BINPUT, MEMOIZE
def _put(m: Machine, code: int, at: int) -> None:
    idx = m.take(1)[0] if code == 0x71 else len(m.memo)
    if code == 0x72:
        idx = _LEN4.unpack(m.take(4))[0]
        _memo_bomb(m, idx, at)
    m.memo[idx] = m.top()


def _memo_bomb(m: Machine, idx: int, at: int) -> None:
    """CPython sizes its memo array by the index: one larger than the pickle is a bomb."""
    if idx > m.end - m.res.start:
        raise Stop(f"memo index {idx:,} at offset {at}, more than the pickle has bytes")


@_on(0x68, 0x6A)  # BINGET, LONG_BINGET
def _get(m: Machine, code: int, at: int) -> None:
    m.memo_get(m.take(1)[0] if code == 0x68 else _LEN4.unpack(m.take(4))[0], at)


@_on(0x75, 0x73, 0x61, 0x65, 0x90)  # SETITEMS, SETITEM, APPEND, APPENDS, ADDITEMS
def _mutate(m: Machine, code: int, at: int) -> None:
    items = m.pop_mark() if code in (0x75, 0x65, 0x90) else m.pop(2 if code == 0x73 else 1)
    target = m.top()
    m.res.mutated.append(("SETITEM" if code in (0x75, 0x73) else "APPEND", target))
    if code in (0x75, 0x73):
        if target.entries is not None:
            target.entries.extend(zip(items[0::2], items[1::2], strict=False))
        return  # SETITEM on anything else calls its type's __setitem__, never an attribute
    if target.kind != "result":
        return  # a list appends natively; anything else has no append and stops the load
    # CPython looks these up on the object: an attribute the pickle set is what gets called
    names = ("add",) if code == 0x90 else ("extend", "append")
    attribute_call(m, target, names, Value("tuple", items=tuple(items)), at)


@_on(0x7D, 0x5D, 0x8F, 0x6C, 0x64, 0x91)  # empty/marked dict, list, set, frozenset
def _container(m: Machine, code: int, at: int) -> None:
    items = m.pop_mark() if code in (0x6C, 0x64, 0x91) else []
    if code in (0x7D, 0x64):
        pairs = zip(items[0::2], items[1::2], strict=False)  # an odd item: CPython stops
        m.stack.append(Value("dict", entries=list(pairs)))
        return
    m.stack.append(Value("list" if code in (0x5D, 0x6C) else "set"))


@_on(0x62)  # BUILD
def _build(m: Machine, code: int, at: int) -> None:
    """CPython calls the object's ``__setstate__`` (an attribute set by an earlier BUILD
    wins over the class's), else copies ``state`` (or ``(state, slotstate)``) into it."""
    (state,) = m.pop()
    target = m.top()
    m.res.built.append((target, state))
    if target.kind != "result":
        return
    attribute_call(m, target, ("__setstate__",), Value("tuple", items=(state,)), at)
    attrs = target.attrs if target.attrs is not None else {}
    parts = (
        state.items if state.kind == "tuple" and state.items and len(state.items) == 2 else (state,)
    )
    for part in parts:
        if part.kind == "none":
            continue
        if part.entries is None:
            attrs[ANY_ATTR] = part  # a state the walk cannot read: it may set any name
            continue
        for key, value in part.entries:
            attrs[key.text if key.kind == "str" and key.text is not None else ANY_ATTR] = value
    target.attrs = attrs


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
        if n > 16:
            m.skip(n)
            m.stack.append(_INT)
        else:
            m.stack.append(Value("int", num=int.from_bytes(m.take(n), "little", signed=True)))
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
        m.stack.append(_FLOAT)
        return
    num = _text_int(raw)
    if num is None:
        raise Stop(f"could not convert string to int at offset {at}")
    m.stack.append(Value("int", num=num))


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
        _memo_bomb(m, idx, at)
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
        m.stack.append(persid(m, m.pop()[0], at))
        return
    func, args = m.pop(2)
    m.stack.append(m.call("REDUCE", func, args, at))


@_on(0x88, 0x89, 0x29, 0x4E, 0x2E)  # NEWTRUE, NEWFALSE, EMPTY_TUPLE, NONE, STOP
def _constant(m: Machine, code: int, at: int) -> None:
    if code == 0x2E:
        m.res.end = m.pos
        m.res.value = m.stack[-1] if m.stack else None
        fe = m.r.frame_end
        m.res.frame_end = fe if fe is not None and fe > m.pos else None
        return
    m.stack.append(_BOOL if code > 0x80 else _EMPTY_TUPLE if code == 0x29 else _NONE)
