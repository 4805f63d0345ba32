"""The state of the symbolic machine under :mod:`.opscan`, and the calls torch's loaders make
that no global names: ``persistent_load`` (:func:`persid`, one model per loader) and the
attributes CPython calls on objects (BUILD's ``__setstate__``, ``append``, ``extend``,
``add``: :func:`attribute_call`)."""

from __future__ import annotations

import _compat_pickle

from .opvalues import ANY_ATTR, CallSite, GlobalRef, PickleWalk, Reader, Stop, Value

_PERSID = Value("persid")


class Machine:
    """The walk's state; the inline loop keeps ``pos``, ``limit`` and ``stack`` in locals and
    writes them back here before a handler runs."""

    def __init__(self, r: Reader, res: PickleWalk, persid_mode: str = "zip") -> None:
        self.r, self.res, self.buf, self.end = r, res, r.buf, r.end
        self.persid_mode = persid_mode  # how the loader's persistent_load reads an id
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


def _text(v: Value) -> str | None:
    """A str, or bytes torch decodes as ASCII (``_maybe_decode_ascii``), when known; protocol
    2 pickles bytes as ``_codecs.encode(text, 'latin1')``."""
    if v.kind in ("str", "bytes"):
        return v.text
    site = v.origin if v.kind == "result" else None
    if site is not None and site.callee.kind == "global" and site.callee.gref is not None:
        args = site.args.items if site.args is not None else None
        if site.callee.gref.full == "_codecs.encode" and args and args[0].kind == "str":
            return args[0].text
    return None


def persid(m: Machine, pid: Value, at: int) -> Value:
    """What the loader's ``persistent_load`` returns for ``pid``, by loader:

    * ``zip`` (torch's zip loader): ``('storage', storage_type, key, location, numel)`` -> a
      storage; anything else stops the load (an assertion);
    * ``legacy``: ``('module', cls, file, source)`` -> ``cls`` itself (the pickle may then call
      it), ``('storage', type, key, location, numel, view)`` -> a storage;
    * ``tar`` (pre-1.0 tar files): any tuple -> its first item, whatever it is; else a storage;
    * ``none`` (``pickle.load`` without ``persistent_load``): the load stops.

    The id's type name may be bytes: torch decodes it (``b'module'`` is ``'module'``).
    """
    mode = m.persid_mode
    if mode == "any":  # TorchScript's own loader: its ids name tensors
        return _PERSID
    if mode == "none":
        raise Stop(f"a persistent id at offset {at}: pickle.load has no persistent_load here")
    items = pid.items if pid.kind == "tuple" else None
    if mode == "tar":
        if items is None:
            return _PERSID
        if not items:
            raise Stop(f"an empty persistent id at offset {at}")
        _returned(items[0], "returned by the tar loader's persistent_load")
        return items[0]
    if not items:
        raise Stop(f"a persistent id at offset {at} is not a tuple: torch stops here")
    typename = _text(items[0])
    if mode == "legacy" and typename == "module" and len(items) >= 2:
        _returned(items[1], "returned by persistent_load as a container class")
        return items[1]
    if typename == "storage" and len(items) == (5 if mode == "zip" else 6):
        kind = items[1]
        if kind.kind == "global" and kind.gref is not None:
            kind.gref.uses.add("storage type")
        else:
            m.res.findings.append(
                ("unreadable", f"a persistent id at offset {at} has no storage class", at)
            )
        return _PERSID
    raise Stop(f"a persistent id at offset {at} is not a storage: torch stops here")


def _returned(v: Value, use: str) -> None:
    if v.kind == "global" and v.gref is not None:
        v.gref.uses.add(use)


def attribute_call(m: Machine, target: Value, names: tuple[str, ...], args: Value, at: int) -> None:
    attrs = target.attrs
    if not attrs:
        return
    for name in names:
        callee = attrs.get(name)
        if callee is not None:
            m.call("ATTR", callee, args, at)
            m.res.findings.append(
                ("dangerous", f"calls {name!r}, an attribute the pickle set (offset {at})", at)
            )
            return
    if ANY_ATTR in attrs:
        m.res.findings.append(
            (
                "dangerous",
                f"may call {' or '.join(map(repr, names))} through attributes set from keys the "
                f"walk cannot read (offset {at})",
                at,
            )
        )
