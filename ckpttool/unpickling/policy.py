"""Default-deny policy: what each global of a pickle may do, judged by how the pickle uses it.

A file is ``safe`` only as a proof: every global its pickles name is ``torch`` or ``data``,
every call torch would make (REDUCE, NEWOBJ, INST/OBJ, BUILD's ``__setstate__``, APPEND(S) and
ADDITEMS on objects, each loader's ``persistent_load``, and the calls allowlisted functions
make with their arguments: :mod:`.arguments`) goes to an allowlisted callable, and the
loading model read every pickle exactly as the loader would (no problem of kind
``unreadable``). Anything else is not safe, whatever its names look like.

Four kinds of global, from :func:`judge` over a static walk (:mod:`.opscan`) of every pickle:

* ``torch``: torch's ``weights_only`` allowlist;
* ``data``: a short allowlist of plain data classes (argparse.Namespace, numpy arrays, dtypes
  and scalars, collections, datetime, decimal, fractions, uuid, pathlib paths,
  SimpleNamespace, torch's Generator state);
* ``unvetted code``: a class of another module that the pickle only instantiates (NEWOBJ +
  BUILD, as whole pickled models and configs are), or calls with plain values (as enum
  members are pickled), or only refers to: loading imports that module and runs its code;
* ``dangerous``: anything else that gets called, any attribute path (``builtins.eval.__call__``,
  ``torch.os.system``), a module-level object the pickle changes, a result the pickle calls,
  a module whose import runs a program, and names known to run code in any use.

The name tables themselves live in :mod:`.lists`; ``TORCH_ALLOWED`` is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import arguments
from .lists import (
    DATA_ALLOWED,
    DENY_MODULES,
    DENY_NAMES,
    DENY_PREFIXES,
    NESTED_CLASSES,
    NESTED_USE,
    PLAIN_TYPES,
    STDLIB,
    TORCH_ALLOWED,
    TORCH_CONSTANTS,
    TORCH_ON_IMPORT,
    VETTED,
)
from .opscan import SCALARS, GlobalRef, PickleWalk, Value

TORCH, DATA, USER, DANGEROUS = "torch", "data", "unvetted code", "dangerous"
UNREADABLE = "unreadable"  # a file-level kind: the walk cannot prove what the loader reads

_RANK = {TORCH: 0, DATA: 1, USER: 2, UNREADABLE: 3, DANGEROUS: 4}


@dataclass(frozen=True)
class GlobalVerdict:
    """One global of a file: its name, kind, how the pickle uses it, and why that kind."""

    name: str  # module.qualname as the loader resolves it (Python 2 names mapped)
    kind: str  # torch, data, unvetted code, dangerous
    uses: tuple[str, ...]  # "called", "instantiated", "referenced", "mutated", ...
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The security verdict of one file, computed once from every pickle it holds."""

    globals: tuple[GlobalVerdict, ...] = ()
    notes: tuple[str, ...] = ()
    # what stops the proof besides the globals: (kind, reason), kind one of ``dangerous``,
    # ``unvetted code`` (TorchScript), ``unreadable`` (cannot be read as the loader reads it)
    problems: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        """The worst kind: ``dangerous``, ``unreadable``, ``unvetted code``, ``data`` or
        ``torch`` (``data`` and ``torch`` files are safe)."""
        kinds = [g.kind for g in self.globals] + [k for k, _ in self.problems]
        return max(kinds, key=_RANK.__getitem__, default=TORCH)

    @property
    def safe(self) -> bool:
        return self.kind in (TORCH, DATA)

    def reasons(self, kind: str) -> list[str]:
        """Why the file is of ``kind``: the problems of that kind."""
        return [r for k, r in self.problems if k == kind]

    def names(self, *kinds: str) -> list[str]:
        return [g.name for g in self.globals if g.kind in kinds]

    @property
    def dangerous(self) -> list[str]:
        return self.names(DANGEROUS)

    def kind_of(self, name: str) -> str | None:
        return next((g.kind for g in self.globals if g.name == name), None)

    def get(self, name: str) -> GlobalVerdict | None:
        return next((g for g in self.globals if g.name == name), None)


def judge(
    walks: Iterable[PickleWalk],
    notes: Iterable[str] = (),
    problems: Iterable[tuple[str, str]] = (),
) -> Verdict:
    """The verdict over the static walks of every pickle of one file (worst use wins).

    Example:
        >>> from .opscan import walk
        >>> judge([walk(b"cos\\nsystem\\n(S'ls'\\ntR.")]).dangerous
        ['os.system']
    """
    merged: dict[str, GlobalVerdict] = {}
    found = list(problems)
    for w in walks:
        for g, kind, reason in _judge_walk(w, found):
            old = merged.get(g.full)
            uses = tuple(sorted(set(old.uses if old else ()) | (g.uses or {"referenced"})))
            if old is None or _RANK[kind] > _RANK[old.kind]:
                merged[g.full] = GlobalVerdict(g.full, kind, uses, reason)
            else:
                merged[g.full] = GlobalVerdict(old.name, old.kind, uses, old.reason)
    return Verdict(tuple(merged.values()), tuple(notes), tuple(dict.fromkeys(found)))


def _judge_walk(w: PickleWalk, problems: list[tuple[str, str]]) -> list[tuple[GlobalRef, str, str]]:
    extra: dict[int, str] = {}  # id(GlobalRef) -> a dangerous reason found from its context
    shapes: dict[int, set[str]] = {}
    nested = _nested_classes(w)
    for site in w.calls:
        if nested and id(site) in nested:
            continue  # getattr(Outer, 'Inner'): its result stands for the class Outer.Inner
        callee = _through(site.callee, nested) if nested else site.callee
        if callee.kind == "result":
            if not _result_called(callee):
                problems.append((DANGEROUS, "the pickle calls a value it computed"))
            continue
        if callee.kind != "global" or callee.gref is None:
            continue  # calling a str, a tuple, a storage... stops the load (TypeError)
        g = callee.gref
        args = site.args.items if site.args is not None and site.args.kind == "tuple" else None
        if site.op == "ATTR":
            g.uses.add("called through an attribute the pickle set")
            extra[id(g)] = "the pickle sets it as an object's attribute, which loading calls"
        elif site.op.startswith("NEWOBJ") or (site.op in ("INST", "OBJ") and args == ()):
            g.uses.add("instantiated")
        else:
            g.uses.add("called")
            if g.full not in _SHAPE_FREE:  # what it was called with may decide its kind
                shapes.setdefault(id(g), set()).add(_shape(args))
        if g.full in arguments.RULED:  # a callable whose arguments have rules
            arguments.check(g, args, extra)
    for _op, target in w.mutated:
        target = _through(target, nested)
        if target.kind == "global" and target.gref is not None:
            target.gref.uses.add("mutated")
    for target, _state in w.built:
        target = _through(target, nested)
        if target.kind == "global" and target.gref is not None:
            target.gref.uses.add("mutated")
    for g in w.globals:  # what a vetted callable returns is never callable: the load stops
        # (those that build a class they are given may return a callable object: not these)
        vetted = g.full in VETTED and not arguments.builds_given_class(g.full)
        if "result called" in g.uses and vetted and g.opcode != "EXT":
            g.uses.discard("result called")
            g.uses.add("its result called (not callable: the load stops)")
            problems.append((UNREADABLE, f"calls what {g.full} returns, which is not callable"))
    judged = [*w.globals, *nested.values()]
    return [(g, *_kind(g, shapes.get(id(g), set()), extra.get(id(g)))) for g in judged]


def _nested_classes(w: PickleWalk) -> dict[int, GlobalRef]:
    """The calls ``getattr(Outer, 'Inner')`` (REDUCE, exactly two arguments: a global and a
    str) that name one of ``NESTED_CLASSES``, as protocols 0-3 pickle a nested class: each
    becomes the global ``Outer.Inner`` (by id of the call site). Any other getattr is a call."""
    out: dict[int, GlobalRef] = {}
    if not any(g.full == "builtins.getattr" for g in w.globals):
        return out  # (most pickles: no call below can be one)
    for site in w.calls:
        g = site.callee.gref if site.callee.kind == "global" else None
        args = site.args.items if site.args is not None and site.args.kind == "tuple" else None
        if g is None or g.full != "builtins.getattr" or site.op != "REDUCE" or not args:
            continue
        if len(args) != 2 or args[0].kind != "global" or args[1].kind != "str":
            continue
        owner, attr = args[0].gref, args[1].text
        if owner is None or owner.opcode == "EXT" or "." in owner.name or attr is None:
            continue
        if f"{owner.full}.{attr}" in NESTED_CLASSES:
            g.uses.add(NESTED_USE)
            out[id(site)] = GlobalRef(owner.module, f"{owner.name}.{attr}", "getattr", site.pos)
    return out


def _through(v: Value, nested: dict[int, GlobalRef]) -> Value:
    """What ``getattr(Outer, 'Inner')`` returned, as the global ``Outer.Inner``."""
    if v.kind == "result" and v.origin is not None and id(v.origin) in nested:
        return Value("global", gref=nested[id(v.origin)])
    return v


def _result_called(callee: Value) -> bool:
    """A call of what another call returned: marks the global at the root of the chain."""
    for _ in range(64):
        site = callee.origin
        if site is None:
            return False
        callee = site.callee
        if callee.kind == "global" and callee.gref is not None:
            callee.gref.uses.add("result called")
            return True
        if callee.kind != "result":
            return False
    return False


def _shape(args: tuple[Value, ...] | None) -> str:
    if args is None:
        return "unknown"
    if not args:
        return "empty"
    return "plain" if all(a.kind in SCALARS for a in args) else "other"


def _kind(g: GlobalRef, shapes: set[str], extra: str | None) -> tuple[str, str]:
    full, module, name = g.full, g.module, g.name
    top = module.split(".", 1)[0]
    if g.opcode == "EXT":
        return DANGEROUS, "an extension-registry code: what it loads depends on the process"
    if (
        top == "torch"
        and name in TORCH_CONSTANTS
        and not g.uses & {"called", "instantiated", "mutated", "result called"}
        and not extra
    ):
        return DATA, "a torch constant, reached through the torch module's attribute path"
    if full in NESTED_CLASSES and not g.uses & _RISKY and not extra:
        return USER, f"a class nested in a torch class: loading imports {module} and runs its code"
    if full == "builtins.getattr" and g.uses == {NESTED_USE} and not extra:
        return USER, f"only gets {', '.join(sorted(NESTED_CLASSES))} (how protocols 0-3 pickle it)"
    if "." in name or not name or not module:
        return DANGEROUS, "an attribute path: the loader resolves it attribute by attribute"
    if (".__main__" in f".{module}" and module != "__main__") or module in ("antigravity", "this"):
        return DANGEROUS, f"importing {module} runs a program"
    if "mutated" in g.uses:
        return DANGEROUS, "the pickle changes this module-level object"
    if "result called" in g.uses:
        return DANGEROUS, "the pickle calls what this returns"
    if extra:
        return DANGEROUS, extra
    if full in TORCH_ALLOWED:
        return TORCH, "torch's weights_only loader allows it"
    if full in TORCH_ON_IMPORT:
        return TORCH, "torch's weights_only loader allows it once its module is imported"
    if full in DATA_ALLOWED or (full in PLAIN_TYPES and not g.uses & {"called", "mutated"}):
        return DATA, "plain data"
    if full in PLAIN_TYPES and "mutated" not in g.uses and shapes <= {"plain", "empty"}:
        return DATA, "a builtin type called with plain values (protocol 2 pickles b'' as bytes())"
    if full.startswith("numpy.dtypes.") and "called" not in g.uses:
        return DATA, "plain data"
    if _denied(full, module, top):
        return DANGEROUS, "known to run code or load files"
    stdlib = top in STDLIB
    if "called" in g.uses:
        if not stdlib and top != "torch" and shapes <= {"plain", "empty"} and _classlike(name):
            return USER, f"called with plain values (as enum members are); loading imports {module}"
        return DANGEROUS, "called, and not on the torch or data allowlists"
    if "instantiated" in g.uses:
        if stdlib:
            return DANGEROUS, "a standard-library class built outside the data allowlist"
        return USER, f"instantiated: loading imports {module} and runs its class code"
    return USER, f"referenced: loading imports {module}"


_RISKY = frozenset({"called", "mutated", "result called"})
# allowlisted: _kind decides their kind before it looks at what they were called with
_SHAPE_FREE = TORCH_ALLOWED | TORCH_ON_IMPORT | DATA_ALLOWED


def _denied(full: str, module: str, top: str) -> bool:
    return (
        full in DENY_NAMES
        or module in DENY_MODULES
        or top in DENY_MODULES
        or full.startswith(DENY_PREFIXES)
    )


def _classlike(name: str) -> bool:
    stripped = name.lstrip("_")
    return bool(stripped) and stripped[0].isupper()


def classify(name: str) -> str:
    """The kind of a global from its name alone, for callers that have no verdict.

    Prefer ``Checkpoint.verdict``: it knows how each global is used (a name alone cannot tell
    an instantiated class from a called function).
    """
    module, _, qual = name.rpartition(".")
    g = GlobalRef(module, qual, "GLOBAL", 0)
    return _kind(g, set(), None)[0]


def refuse_dangerous(path: str, verdict: Verdict | None) -> None:
    """Raise :class:`~ckpttool.errors.DangerousCheckpointError` if the file can run code."""
    from ..errors import DangerousCheckpointError

    if verdict is not None and verdict.dangerous:
        raise DangerousCheckpointError(path, verdict.dangerous)


def check_writable(
    path: str, verdict: Verdict | None, remaining: Iterable[str], *, allow_user_classes: bool
) -> None:
    """Refuse to write an output that would carry code.

    ``remaining`` names the globals the output would still pickle. ``torch`` and ``data`` are
    fine; ``unvetted code`` that the pickle instantiates (objects of user classes, enum members)
    or only refers to as a class (``torch.optim.Adam`` in Lightning's hyper-parameters) only
    with ``allow_user_classes``; a bare reference to anything else (a function stored as a
    value) never, since the output would hand a callable to whoever loads it.
    """
    from ..errors import CheckpointError

    refuse_dangerous(path, verdict)
    classes: list[str] = []
    referenced: list[str] = []  # classes stored as values, not instantiated
    for name in dict.fromkeys(remaining):
        g = verdict.get(name) if verdict is not None else None
        kind = g.kind if g is not None else classify(name)
        if kind in (TORCH, DATA):
            continue
        if kind == DANGEROUS or name in DENY_NAMES:  # a getattr left as a value, say
            from ..errors import DangerousCheckpointError

            raise DangerousCheckpointError(path, [name])
        uses = set(g.uses) if g is not None else {"referenced"}
        if uses <= {"referenced"} and _classlike(name.rpartition(".")[2]):
            referenced.append(name)
            continue
        if uses <= {"referenced"} or any(u.startswith("passed to") for u in uses):
            raise CheckpointError(
                path,
                f"holds a reference to {name} (a callable, not data): ckpttool never writes "
                "one into an output",
            )
        classes.append(name)
    if classes and not allow_user_classes:
        raise CheckpointError(
            path,
            f"holds objects of user classes ({_shown(classes)}): {_USER_WHY}",
            remedy="allow_user_classes",
        )
    if referenced and not allow_user_classes:  # --plain-objects keeps references as they are
        raise CheckpointError(
            path,
            f"holds references to classes ({_shown(referenced)}): loading it imports their "
            "modules",
            remedy="allow_class_references",
        )


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


_USER_WHY = "loading it imports those modules and runs their code"
