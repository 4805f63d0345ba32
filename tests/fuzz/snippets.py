"""Pickle snippets the structure-aware fuzzer inserts: each pushes exactly one value.

Drawn from two pools, as issue 18 asks: globals of ckpttool's allowlist (called with small
arguments, referenced, or instantiated) and a small set of harmless-marker payloads (each only
creates or touches the marker file of the input's folder). Both pools are mixed through the
constructions of the issue's classes: REDUCE, NEWOBJ, persistent ids whose first item is a
callable or whose type name is bytes (class 3), ``BUILD`` setting ``__setstate__`` / ``append``
/ ``extend`` / ``add`` on an allowed object (class 4), and allowlisted functions that call
their arguments (class 5).

Built with the opcode writer of the hostile corpus (``tests/hostile/pk.py``); nothing here is
ever unpickled.
"""

from __future__ import annotations

import random
import shlex
from functools import lru_cache
from typing import Any

try:
    from ..hostile import pk
    from ..hostile.pk import Build, Call, G, NewObj, PersId, Raw
except ImportError:  # tests/ itself on sys.path (the standalone runner)
    from hostile import pk
    from hostile.pk import Build, Call, G, NewObj, PersId, Raw


def payloads(marker: str) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(module, name, args): calls that create ``marker`` (or try to) and do nothing else."""
    code = f"open({marker!r}, 'w').close()"
    sh = f"touch {shlex.quote(marker)}"
    return [
        ("builtins", "exec", (code,)),
        ("__builtin__", "eval", (code,)),
        ("os", "system", (sh,)),
        ("posix", "system", (sh,)),
        ("subprocess", "check_call", (["touch", marker],)),
        ("builtins", "open", (marker, "w")),
        ("codecs", "open", (marker, "w")),
        ("logging", "FileHandler", (marker,)),
        ("wave", "open", (marker, "wb")),
        ("numpy", "save", (marker, 1)),
        ("torch", "save", (1, marker)),
        ("pathlib", "Path.touch", (Call(G("pathlib", "PosixPath"), (marker,)),)),
        ("shutil", "copyfile", ("/dev/null", marker)),
    ]


# unvetted but harmless classes: "user code", never "safe"
UNVETTED = [("collections", "UserDict"), ("collections", "UserList"), ("string", "Template")]

SMALL_ARGS: list[tuple[Any, ...]] = [(), (0,), (1,), ("x",), ((1, 2),), ([1, 2],), ({},), (b"ab",)]


@lru_cache(maxsize=1)
def allowed_globals() -> list[tuple[str, str]]:
    """Every allowlisted name as (module, name), split at the last dot (a sorted list)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.oracle.torch_oracle import allowlist

    return [tuple(n.rsplit(".", 1)) for n in sorted(allowlist())]  # type: ignore[misc]


class Snippets:
    """Random one-value snippets for one input (``marker``: its payloads' marker path)."""

    def __init__(self, rng: random.Random, marker: str, proto: int = 2) -> None:
        self.rng = rng
        self.marker = marker
        self.proto = proto
        self.kinds: list[str] = []  # what was drawn, for the statistics

    # -- pools ---------------------------------------------------------------------------------
    def payload(self) -> tuple[G, tuple[Any, ...]]:
        pool = payloads(self.marker)
        if self.proto < 4:  # a dotted name resolves only under protocol 4 and later
            pool = [p for p in pool if "." not in p[1]]
        m, n, args = self.rng.choice(pool)
        return G(m, n), args

    def allowed(self) -> G:
        m, n = self.rng.choice(allowed_globals())
        return G(m, n)

    def data(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 1 or r < 0.5:
            return self.rng.choice([0, 1, -1, 2**31, "x", "", b"\x00", None, True, 1.5])
        if r < 0.7:
            return tuple(self.data(depth + 1) for _ in range(self.rng.randrange(3)))
        if r < 0.85:
            return [self.data(depth + 1) for _ in range(self.rng.randrange(3))]
        return {"k": self.data(depth + 1)}

    # -- snippets ------------------------------------------------------------------------------
    def value(self) -> bytes:
        """One value-pushing snippet, drawn over every construction."""
        kind, make = self.rng.choice(
            [
                ("payload-call", self._payload_call),
                ("allowed-call", self._allowed_call),
                ("allowed-ref", lambda: self.allowed()),
                ("allowed-newobj", lambda: NewObj(self.allowed(), self.rng.choice(SMALL_ARGS))),
                ("unvetted", lambda: NewObj(G(*self.rng.choice(UNVETTED)), ())),
                ("persid-call", self._persid_call),
                ("build-hijack", self._build_hijack),
                ("allowed-calls-arg", self._allowed_calls_arg),
                ("data", lambda: self.data()),
            ]
        )
        self.kinds.append(kind)
        return pk.enc(make(), max(self.proto, 2))

    def _payload_call(self) -> Any:
        g, args = self.payload()
        return Call(g, args)

    def _allowed_call(self) -> Any:
        return Call(self.allowed(), self.rng.choice(SMALL_ARGS))

    def _callable(self) -> tuple[Any, tuple[Any, ...]]:
        """A callable and its arguments: a payload, or (one time in three) an allowed name."""
        if self.rng.random() < 0.33:
            return self.allowed(), self.rng.choice(SMALL_ARGS)
        return self.payload()

    def _persid_call(self) -> Any:
        """Class 3: what each loader's persistent_load returns, then REDUCE on it."""
        g, args = self._callable()
        typename = self.rng.choice(["module", b"module", "storage", b"storage"])
        pid = self.rng.choice(
            [
                (typename, g, "src.py", "class X: pass"),
                (g, "a", "b"),  # pre-1.0 tar: persistent_load returns saved_id[0]
                (typename, g, "", ""),
                (g,),
            ]
        )
        return Call(PersId(pid), args)

    def _build_hijack(self) -> Any:
        """Class 4: an allowed object whose instance attributes become the calls."""
        g, args = self._callable()
        cls = self.rng.choice([G("types", "SimpleNamespace"), G("argparse", "Namespace")])
        obj = NewObj(cls, ())
        attr = self.rng.choice(["__setstate__", "append", "extend", "add"])
        armed = Build(obj, {attr: g})
        arg = args[0] if args else None
        if attr == "__setstate__":
            return Build(armed, arg)
        body = pk.enc(armed, max(self.proto, 2)) + pk.MARK + pk.enc(arg, max(self.proto, 2))
        op = {"append": pk.APPENDS, "extend": pk.APPENDS, "add": b"\x90"}[attr]  # ADDITEMS
        if attr == "append" and self.rng.random() < 0.5:
            return Raw(pk.enc(armed, max(self.proto, 2)) + pk.enc(arg, 2) + pk.APPEND)
        return Raw(body + op)

    def _allowed_calls_arg(self) -> Any:
        """Class 5: allowlisted functions that call (or instantiate) what they are given."""
        g, args = self._callable()
        arg = args[0] if args else "x"
        return self.rng.choice(
            [
                Call(
                    G("torch._tensor", "_rebuild_from_type_v2"), (g, G("torch", "Tensor"), args, {})
                ),
                Call(G("numpy.random._pickle", "__randomstate_ctor"), (arg, g)),
                Call(G("numpy.random._pickle", "__generator_ctor"), (arg, g)),
                Call(G("numpy.random._pickle", "__bit_generator_ctor"), (g,)),
                Call(G("copyreg", "_reconstructor"), (g, G("builtins", "object"), None)),
                Call(G("collections", "defaultdict"), (g,)),
            ]
        )

    def pickle(self) -> bytes:
        """A whole pickle (a dict) holding one snippet, for new members and prefixes."""
        body = pk.EMPTY_DICT + pk.enc("w", 2) + self.value() + pk.SETITEM + pk.STOP
        return pk.proto(2) + body

    def global_ref(self) -> tuple[str, str]:
        """A global to put in place of another: allowed, payload or unvetted."""
        r = self.rng.random()
        if r < 0.5:
            g = self.allowed()
        elif r < 0.85:
            g, _ = self.payload()
        else:
            g = G(*self.rng.choice(UNVETTED))
        self.kinds.append("global")
        return g.module, g.name
