"""Opcode-level pickle mutations: the pickle is split into its ops (``pickletools.genops``),
edited as a list of byte chunks, and joined again with every ``FRAME`` length fixed up (unless
the mutation is the frame length itself).

Kinds (``PICKLE_KINDS``):

* ``insert``: ``<snippet> POP`` at any op boundary (stack-neutral, so the pickle stays valid
  and the snippet's calls still happen), snippets from :mod:`.snippets`;
* ``setitem``: ``key <snippet> SETITEM`` just before ``STOP`` (the value stays in the result);
* ``global``: a ``GLOBAL`` / ``STACK_GLOBAL`` replaced by another global (allowlisted, payload
  or unvetted);
* ``persid``: the tuple before a ``BINPERSID`` replaced (bytes type names, a callable first);
* ``memo``: a ``GET`` / ``PUT`` index moved to another memo slot (or out of range);
* ``frame``: a ``FRAME`` length changed, or a ``FRAME`` inserted;
* ``opcode``: an op inserted, deleted, duplicated or replaced by a random one;
* ``build``: ``BUILD`` / ``APPEND`` / ``ADDITEMS`` sequences applied to the result itself.
"""

from __future__ import annotations

import pickletools
import random
import struct

try:
    from ..hostile import pk
except ImportError:
    from hostile import pk
from .snippets import Snippets

PICKLE_KINDS = ("insert", "setitem", "global", "persid", "memo", "frame", "opcode", "build")
_GETS = {"BINGET", "LONG_BINGET"}
_PUTS = {"BINPUT", "LONG_BINPUT"}
_RANDOM_OPS = [
    pk.MARK,
    pk.POP,
    b"1",  # POP_MARK
    b"2",  # DUP
    pk.NONE,
    pk.EMPTY_DICT,
    pk.EMPTY_LIST,
    pk.EMPTY_TUPLE,
    pk.TUPLE,
    pk.TUPLE1,
    pk.REDUCE,
    pk.BUILD,
    pk.APPEND,
    pk.APPENDS,
    pk.SETITEM,
    pk.SETITEMS,
    pk.NEWOBJ,
    pk.BINPERSID,
    pk.STACK_GLOBAL,
    pk.MEMOIZE,
    pk.STOP,
    b"\x90",  # ADDITEMS
    b"\x91",  # FROZENSET
    b"\x8f",  # EMPTY_SET
    b"h\x00",  # BINGET 0
    b"q\x00",  # BINPUT 0
    b"K\x07",  # BININT1 7
]


class Chunks:
    """A pickle as its op chunks (``None`` when the bytes do not parse as one pickle)."""

    def __init__(self, data: bytes) -> None:
        self.chunks: list[bytes] = []
        self.names: list[str] = []
        self.args: list[object] = []
        self.tail = b""
        self.proto = 0
        ops = list(pickletools.genops(data))
        for i, (op, arg, pos) in enumerate(ops):
            end = ops[i + 1][2] if i + 1 < len(ops) else pos + 1
            self.chunks.append(data[pos:end])
            self.names.append(op.name)
            self.args.append(arg)
            if op.name == "PROTO":
                self.proto = int(arg)  # type: ignore[call-overload]
        self.tail = data[(ops[-1][2] + 1) if ops else 0 :]
        self.fix_frames = True

    @classmethod
    def parse(cls, data: bytes) -> Chunks | None:
        try:
            return cls(data)
        except Exception:  # not a pickle we can split: the caller tries another mutation
            return None

    def join(self) -> bytes:
        chunks = list(self.chunks)
        if self.fix_frames:
            for i, name in enumerate(self.names):
                if name == "FRAME":
                    n = 0
                    for j in range(i + 1, len(chunks)):
                        if self.names[j] == "FRAME":
                            break
                        n += len(chunks[j])
                    chunks[i] = b"\x95" + struct.pack("<Q", n)
        return b"".join(chunks) + self.tail

    def insert(self, at: int, data: bytes, name: str = "?") -> None:
        self.chunks.insert(at, data)
        self.names.insert(at, name)
        self.args.insert(at, None)

    def boundaries(self) -> range:
        """Where an op may go: after PROTO (and a first FRAME), before STOP."""
        first = 1 if self.names and self.names[0] == "PROTO" else 0
        if len(self.names) > first and self.names[first] == "FRAME":
            first += 1
        last = len(self.names) - 1 if self.names and self.names[-1] == "STOP" else len(self.names)
        return range(first, max(first, last) + 1)

    def where(self, names: set[str]) -> list[int]:
        return [i for i, n in enumerate(self.names) if n in names]


def mutate_pickle(data: bytes, rng: random.Random, snip: Snippets, kind: str) -> bytes | None:
    """``data`` with one mutation of ``kind``; None when it does not apply to this pickle."""
    ch = Chunks.parse(data)
    if ch is None or not ch.chunks:
        return None
    snip.proto = max(ch.proto, 2)
    ok = _KINDS[kind](ch, rng, snip)
    return ch.join() if ok else None


def _insert(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    at = rng.choice(ch.boundaries())
    ch.insert(at, snip.value() + pk.POP)
    return True


def _setitem(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    if not ch.names or ch.names[-1] != "STOP":
        return False
    key = pk.enc(rng.choice(["extra", "__payload__", "w"]), snip.proto)
    ch.insert(len(ch.chunks) - 1, key + snip.value() + pk.SETITEM)
    return True


def _global(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    sites = ch.where({"GLOBAL", "STACK_GLOBAL", "INST"})
    if not sites:
        return False
    i = rng.choice(sites)
    m, n = snip.global_ref()
    if ch.names[i] == "STACK_GLOBAL":
        ch.chunks[i] = pk.POP + pk.POP + pk.global_(m, n)  # drop the two names, push ours
    elif ch.names[i] == "INST":
        ch.chunks[i] = pk.inst(m, n)
    else:
        ch.chunks[i] = pk.global_(m, n)
    return True


def _persid(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    sites = ch.where({"BINPERSID", "PERSID"})
    if not sites or rng.random() < 0.3:  # a standalone persistent-id call
        return _persid_call(ch, rng, snip)
    i = rng.choice(sites)
    g, _args = snip.payload() if rng.random() < 0.7 else (snip.allowed(), ())
    typename = rng.choice(["storage", b"storage", "module", b"module"])
    new = rng.choice(
        [
            (typename, g, "0", "cpu", 6),
            (typename, g, "src.py", "src"),
            (g, "x", "y"),
            ("storage", pk.G("torch", "FloatStorage"), "0", "cpu", 2**40),
            ("storage", pk.G("torch", "FloatStorage"), ("a",), "cpu", 6),
        ]
    )
    ch.chunks[i] = pk.POP + pk.enc(new, snip.proto) + pk.BINPERSID
    ch.names[i] = "BINPERSID"
    return True


def _persid_call(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    at = rng.choice(ch.boundaries())
    ch.insert(at, pk.enc(snip._persid_call(), snip.proto) + pk.POP)
    snip.kinds.append("persid-call")
    return True


def _memo(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    sites = ch.where(_GETS | _PUTS | {"GET", "PUT"})
    if not sites:
        return False
    slots = sorted(
        {a for n, a in zip(ch.names, ch.args, strict=False) if n in _PUTS | {"PUT"}}
    ) or [0]
    memoized = sum(1 for n in ch.names if n == "MEMOIZE")
    slots += list(range(memoized))
    i = rng.choice(sites)
    idx = rng.choice([*slots, max(slots) + 1, 255, 256, 2**31 - 1])
    get = ch.names[i] in _GETS | {"GET"}
    if ch.names[i] in ("GET", "PUT"):
        ch.chunks[i] = (b"g" if get else b"p") + str(idx).encode() + b"\n"
    elif get:
        ch.chunks[i] = pk.binget(idx)
    else:
        ch.chunks[i] = pk.binput(idx)
    return True


def _frame(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    sites = ch.where({"FRAME"})
    ch.fix_frames = False
    if sites and rng.random() < 0.7:
        i = rng.choice(sites)
        real = struct.unpack("<Q", ch.chunks[i][1:9])[0]
        n = rng.choice([0, 1, real - 1, real + 1, real + 8, real * 2, 2**31, 2**63 - 1, 2**64 - 1])
        ch.chunks[i] = b"\x95" + struct.pack("<Q", n % 2**64)
        return True
    at = rng.choice(ch.boundaries())
    rest = sum(len(c) for c in ch.chunks[at:])
    n = rng.choice([0, rest, rest + 1, rest - 1, 1 << 20])
    ch.insert(at, b"\x95" + struct.pack("<Q", max(n, 0)), "FRAME")
    return True


def _opcode(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    r = rng.random()
    at = rng.choice(ch.boundaries())
    if r < 0.35:
        ch.insert(at, rng.choice(_RANDOM_OPS))
    elif r < 0.6 and len(ch.chunks) > 2 and at < len(ch.chunks):
        del ch.chunks[at], ch.names[at], ch.args[at]
    elif r < 0.8 and at < len(ch.chunks):
        ch.insert(at, ch.chunks[at], ch.names[at])
    elif at < len(ch.chunks):
        ch.chunks[at] = rng.choice(_RANDOM_OPS)
        ch.names[at] = "?"
    else:
        return False
    return True


def _build(ch: Chunks, rng: random.Random, snip: Snippets) -> bool:
    """BUILD / APPEND / ADDITEMS on the pickle's own result (the object before STOP)."""
    if not ch.names or ch.names[-1] != "STOP":
        return False
    g, args = snip.payload() if rng.random() < 0.7 else (snip.allowed(), ())
    arg = pk.enc(args[0] if args else None, snip.proto)
    attr = rng.choice(["__setstate__", "append", "extend", "add", "__dict__"])
    arm = pk.enc({attr: g}, snip.proto) + pk.BUILD
    fire = {
        "__setstate__": arg + pk.BUILD,
        "append": arg + pk.APPEND,
        "extend": pk.MARK + arg + pk.APPENDS,
        "add": pk.MARK + arg + b"\x90",
        "__dict__": pk.enc({"k": 1}, snip.proto) + pk.BUILD,
    }[attr]
    ch.insert(len(ch.chunks) - 1, arm + fire)
    snip.kinds.append(f"build-{attr}")
    return True


_KINDS = {
    "insert": _insert,
    "setitem": _setitem,
    "global": _global,
    "persid": _persid,
    "memo": _memo,
    "frame": _frame,
    "opcode": _opcode,
    "build": _build,
}
