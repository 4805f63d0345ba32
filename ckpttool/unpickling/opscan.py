"""A static opcode walker: what each global of a pickle is used for, without running anything.

``walk(buf, start, end)`` reads one pickle the way CPython's C unpickler (what ``torch.load``
runs) reads it and returns a :class:`PickleWalk`: every global it names and, for each, how the
pickle uses it (called, instantiated, mutated, passed along...). It never imports, creates or
calls anything the pickle names; it keeps a small symbolic stack instead of objects.

It differs from ``pickletools.genops`` where CPython does: ``INT``/``LONG`` accept ``0x1`` and
``0o7`` (C ``strtol``/``int(s, 0)``); ``STACK_GLOBAL`` takes protocol-0 strings; ``PROTO``
may appear anywhere; Python 2 names are mapped as ``pickle`` maps them (protocol < 3). A read
that crosses the end of a ``FRAME`` is where CPython (reading through a file) and other readers
disagree: it is flagged (``straddle``) and both readings can be asked for.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

from .opcalls import _PERSID
from .opmachine import _BOOL, _EMPTY_TUPLE, _INT1, _NONE, HANDLERS, Machine, persid
from .opvalues import (
    MAX_STR,
    SCALARS,
    CallSite,
    GlobalRef,
    IntValue,
    PickleWalk,
    Reader,
    ResultValue,
    Stop,
    StrValue,
    TupleValue,
    Value,
)

__all__ = ["SCALARS", "CallSite", "GlobalRef", "PickleWalk", "Value", "walk", "walk_all"]
_Reader, _Stop = Reader, Stop


def walk(
    buf: Any,
    start: int = 0,
    end: int | None = None,
    *,
    drop_tail: bool = True,
    persid_mode: str = "zip",
) -> PickleWalk:
    """Walk one pickle from ``start``; see the module docstring.

    Args:
        buf: bytes, or any buffer (an ``mmap``) holding the pickle.
        start: offset of its first opcode.
        end: where the data ends (default: the end of ``buf``).
        drop_tail: read across a FRAME end as CPython reading a file does (True) or straight
            on, as the pure-Python unpickler and ``pickletools`` do (False).
        persid_mode: which loader's ``persistent_load`` reads persistent ids (``zip``,
            ``legacy``, ``tar``, or ``none`` for ``pickle.load``): see ``opmachine.persid``.

    Returns:
        A :class:`PickleWalk`; ``error`` says where CPython would stop (the walk stops there
        too: nothing after it runs).

    Example:
        >>> w = walk(b"cos\\nsystem\\n(S'ls'\\ntR.")
        >>> [(g.full, sorted(g.uses)) for g in w.globals]
        [('os.system', ['called'])]
    """
    end = len(buf) if end is None else end
    res = PickleWalk(start=start)
    r = Reader(buf, start, end, drop_tail)
    try:
        _run(Machine(r, res, persid_mode))
    except Stop as exc:
        res.error = str(exc)
    except (IndexError, KeyError, ValueError, struct.error, UnicodeDecodeError) as exc:
        res.error = f"malformed at offset {r.pos} ({type(exc).__name__})"
    except Exception as exc:  # a walker bug must refuse the file, never pass it or crash
        res.error = f"could not be scanned ({type(exc).__name__})"
        res.crashed = True
    res.straddle = r.straddle
    return res


def _run(m: Machine) -> None:
    """The opcodes torch pickles are made of, most common first, inline while they lie in the
    frame (then :func:`_more`); anything else, across a boundary or failing: ``_slow``."""
    buf, stack, marks, memo, calls = m.buf, m.stack, m.marks, m.memo, m.res.calls
    pos, limit, ops, memo_max = m.pos, m.limit, 0, m.end - m.res.start  # memo_max: see _put
    u32, v = _U32 if isinstance(buf, _BUFFERS) else _u32_sliced, _NONE  # (remote: sliced)
    while True:
        at, pos, ops = pos, pos + 1, ops + 1
        code = buf[at] if at < limit else -1
        if code == 0x72 and pos + 4 <= limit and stack and (i := u32(buf, pos)[0]) <= memo_max:
            memo[i], pos = stack[-1], pos + 4  # LONG_BINPUT
            continue
        elif code == 0x68 and pos < limit and (got := memo.get(buf[pos])) is not None:  # BINGET
            stack.append(got)
            pos += 1
            continue
        elif code == 0x4B and pos < limit:  # BININT1
            stack.append(_INT1[buf[pos]])
            pos += 1
            continue
        elif code == 0x58 and pos + 4 <= limit and pos + 4 + (n := u32(buf, pos)[0]) <= limit:
            v, pos = _new(StrValue), pos + 4 + n  # BINUNICODE
            v.text = buf[pos - n : pos].decode("utf-8", _ESC) if n <= MAX_STR else None
            stack.append(v)
        elif code == 0x28:  # MARK
            marks.append(stack)
            stack = []
            continue
        elif code == 0x52 and len(stack) >= 2:  # REDUCE
            args, v = stack.pop(), _new(ResultValue)
            v.origin, v.attrs = CallSite("REDUCE", stack[-1], args, at), None
            calls.append(v.origin)
            stack[-1] = v
        elif code == 0x74 and marks:  # TUPLE
            v, v.items, stack = _new(TupleValue), tuple(stack), marks.pop()
            stack.append(v)
        elif code in _CONSTANTS:  # EMPTY_TUPLE, NEWFALSE, NEWTRUE, NONE
            stack.append(_CONSTANTS[code])
            continue
        elif code in (0x85, 0x86, 0x87) and len(stack) >= code - 0x84:  # TUPLE1..3
            v, v.items = _new(TupleValue), tuple(stack[0x84 - code :])
            del stack[0x84 - code :]
            stack.append(v)
        elif code == 0x75 and marks and marks[-1]:  # SETITEMS
            stack = _setitems(m, marks, stack)
            continue
        elif code >= 0 and _more(m, code, pos, limit, stack):
            pos = m.pos
            continue
        else:
            pos, limit, stack = _slow(m, at, limit, stack)  # a handler, errors included
            if m.res.end is not None:  # STOP
                m.res.protocol, m.res.ops = max(m.res.protocol, m.proto), ops
                return
            continue
        # ``v`` was pushed: torch memoizes it next (LONG_BINPUT), done here in the same turn
        if pos + 5 <= limit and buf[pos] == 0x72 and (i := u32(buf, pos + 1)[0]) <= memo_max:
            memo[i], pos, ops = v, pos + 5, ops + 1


_U32 = struct.Struct("<I").unpack_from  # bytes and mmap; a remote file's buffer is sliced
_BUFFERS = (bytes, bytearray, memoryview, mmap.mmap)


def _u32_sliced(buf: Any, pos: int) -> tuple[int]:
    return (int.from_bytes(buf[pos : pos + 4], "little"),)


_new = object.__new__
_ESC = "surrogateescape"
_CONSTANTS = {0x29: _EMPTY_TUPLE, 0x89: _BOOL, 0x88: _BOOL, 0x4E: _NONE}


def _setitems(m: Machine, marks: list[list[Value]], items: list[Value]) -> list[Value]:
    """SETITEMS, as its handler does it (``opmachine._mutate``): the stack below the mark."""
    stack = marks.pop()
    target = stack[-1]
    m.res.mutated.append(("SETITEM", target))
    if target.entries is not None:
        target.entries.extend(zip(items[0::2], items[1::2], strict=False))
    return stack


def _more(m: Machine, code: int, pos: int, limit: int, stack: list[Value]) -> bool:
    """The opcodes after :func:`_run`'s in how often torch pickles hold them: True when done
    (the position after it in ``m.pos``), False for the slow path (a handler decides)."""
    buf = m.buf
    if code == 0x4D and pos + 2 <= limit:  # BININT2
        v = _new(IntValue)
        v.num, m.pos = buf[pos] | buf[pos + 1] << 8, pos + 2
        stack.append(v)
    elif code == 0x51 and stack:  # BINPERSID: torch.save's ('storage', type, ...) without a call
        pid = stack[-1]
        items = (pid.items or ()) if pid.kind == "tuple" and m.persid_mode == "zip" else ()
        typename = items[0].text if items and len(items) == 5 and items[0].kind == "str" else None
        if typename == "storage" and items[1].kind == "global" and items[1].gref is not None:
            items[1].gref.uses.add("storage type")  # what persid() does, without the call
            stack[-1] = _PERSID
        else:
            stack[-1] = persid(m, pid, pos - 1)
        m.pos = pos
    elif (
        code == 0x6A
        and pos + 4 <= limit
        and (i := int.from_bytes(buf[pos : pos + 4], "little")) in m.memo
    ):  # LONG_BINGET
        stack.append(m.memo[i])
        m.pos = pos + 4
    elif code == 0x7D:  # EMPTY_DICT
        stack.append(Value("dict", None, None, None, None, None, []))
        m.pos = pos
    elif code == 0x71 and pos < limit and stack:  # BINPUT
        m.memo[buf[pos]] = stack[-1]
        m.pos = pos + 1
    elif code == 0x4A and pos + 4 <= limit:  # BININT
        stack.append(Value("int", num=int.from_bytes(buf[pos : pos + 4], "little", signed=True)))
        m.pos = pos + 4
    else:
        return False
    return True


def _slow(m: Machine, at: int, limit: int, stack: list[Value]) -> tuple[int, int, list[Value]]:
    """Run the opcode at ``at`` through its handler; the loop's new position, limit, stack."""
    m.pos, m.limit, m.stack = at, limit, stack
    code = m.buf[at] if at < limit else m.slow(1)[0]
    if at < limit:
        m.pos = at + 1
    handler = HANDLERS.get(code)
    if handler is None:
        raise Stop(f"invalid load key {code:#04x} at offset {at}")
    handler(m, code, at)
    return m.pos, m.limit, m.stack


def _run_reference(m: Machine) -> None:
    """The same walk with every opcode through its handler in ``HANDLERS``: no inline fast
    path. Slower; the differential tests hold :func:`_run` to it on every hostile file."""
    ops = 0
    while m.res.end is None:
        ops += 1
        _slow(m, m.pos, m.limit, m.stack)
    m.res.protocol = max(m.res.protocol, m.proto)
    m.res.ops = ops


def walk_all(
    buf: Any, start: int = 0, end: int | None = None, persid_mode: str = "zip"
) -> list[PickleWalk]:
    """Walk as CPython does, and when a read crosses a FRAME end walk the other way too, so
    that whatever any reader would run is seen. The first walk is CPython's."""
    first = walk(buf, start, end, drop_tail=True, persid_mode=persid_mode)
    if not first.straddle:
        return [first]
    return [first, walk(buf, start, end, drop_tail=False, persid_mode=persid_mode)]
