"""Typed arguments of the allowlisted callables that call, or instantiate, what they are given.

An allowlisted function is only harmless with arguments of the kinds torch and numpy
themselves pickle: ``_rebuild_from_type_v2(func, new_type, args, state)`` calls
``func(*args)`` and makes ``new_type`` objects; numpy's RNG constructors call their second
argument; ``copyreg._reconstructor`` runs its base class's ``__new__``/``__init__``;
``defaultdict`` hands its factory to whoever uses the result. :func:`check` marks each
argument global with how the callee uses it, and reports (in ``extra``) every argument that
turns the call into a call of something unvetted.
"""

from __future__ import annotations

from collections.abc import Callable

from .lists import DATA_ALLOWED, PLAIN_TYPES, TORCH_ALLOWED, TORCH_ON_IMPORT
from .opvalues import SCALARS, GlobalRef, Value

TENSOR_TYPES = frozenset(
    {
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.distributed.tensor.DTensor",
        "torch.nested._internal.nested_tensor.NestedTensor",
    }
)
REBUILDS = frozenset(n for n in TORCH_ALLOWED if n.startswith("torch._utils._rebuild_")) | {
    "torch._tensor._rebuild_from_type_v2",
    "torch.nested._internal.nested_tensor._rebuild_njt",
}
ARRAY_TYPES = frozenset(
    {"numpy.ndarray", "numpy.ma.core.MaskedArray", "numpy.matrixlib.defmatrix.matrix"}
)
BIT_GENERATORS = frozenset(
    {
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        "numpy.random._pcg64.PCG64DXSM",
        "numpy.random._philox.Philox",
        "numpy.random._sfc64.SFC64",
    }
)
_BIT_CTOR = "numpy.random._pickle.__bit_generator_ctor"
_CODECS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})
MAX_NESTING = 8

Extra = dict[int, str]  # id(GlobalRef) -> why it is dangerous


def check(owner: GlobalRef, args: tuple[Value, ...] | None, extra: Extra, depth: int = 0) -> None:
    """Judge the arguments of one call of ``owner`` (``args``: None when the walk cannot
    read them)."""
    rule = _RULES.get(owner.full)
    if rule is None or depth > MAX_NESTING:
        return
    if args is None:
        _bad(owner, "its arguments are not a tuple the walk can read", extra)
        return
    rule(owner, args, extra, depth)


def _bad(owner: GlobalRef, why: str, extra: Extra) -> None:
    owner.uses.add("given arguments it must not be given")
    extra.setdefault(id(owner), f"{why}")


def _calls(owner: GlobalRef, arg: Value, allowed: frozenset[str], extra: Extra) -> bool:
    """``owner`` calls ``arg``: only an allowed global may be given."""
    if arg.kind == "global" and arg.gref is not None:
        g = arg.gref
        if g.full in allowed:
            g.uses.add(f"passed to {owner.full}")
            return True
        g.uses.add(f"called by {owner.full}")
        extra[id(g)] = f"passed to {owner.full}, which calls it"
        return False
    _bad(owner, "the pickle hands it a computed value, which it calls", extra)
    return False


def _makes(owner: GlobalRef, arg: Value, vetted: frozenset[str], extra: Extra) -> None:
    """``owner`` instantiates ``arg``: a class outside ``vetted`` is instantiated code."""
    if arg.kind == "global" and arg.gref is not None:
        g = arg.gref
        g.uses.add(f"passed to {owner.full}" if g.full in vetted else "instantiated")
    else:
        _bad(owner, "the pickle hands it a computed class to instantiate", extra)


def _from_type(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if len(args) != 4:
        _bad(owner, "called with other than (func, type, args, state)", extra)
        return
    func, new_type, inner, _state = args
    if _calls(owner, func, REBUILDS, extra) and func.gref is not None:
        check(func.gref, inner.items if inner.kind == "tuple" else None, extra, depth + 1)
    _makes(owner, new_type, TENSOR_TYPES, extra)


def _wrapper(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if args:
        _makes(owner, args[0], TENSOR_TYPES, extra)


def _reconstructor(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if len(args) != 3:
        _bad(owner, "called with other than (cls, base, state)", extra)
        return
    _makes(owner, args[0], frozenset(), extra)
    _calls(owner, args[1], PLAIN_TYPES, extra)


def _newobj(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if not args:
        _bad(owner, "called without a class", extra)
        return
    _makes(owner, args[0], frozenset(), extra)


def _defaultdict(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if args and args[0].kind != "none":
        _calls(owner, args[0], PLAIN_TYPES | TORCH_ALLOWED | DATA_ALLOWED, extra)


def _arrays(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    count = 2 if owner.full.endswith("_mareconstruct") else 1
    for arg in args[:count]:
        _makes(owner, arg, ARRAY_TYPES, extra)


def _rng(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    """numpy's RNG constructors: a bit generator's name (or class, or one made by numpy's own
    constructor), and numpy's own constructor, which they call."""
    if len(args) > 2:
        _bad(owner, "called with more arguments than numpy pickles", extra)
        return
    if args:
        name = args[0]
        if name.kind == "global":
            _makes(owner, name, BIT_GENERATORS, extra)
        elif name.kind == "result" and name.origin is not None:
            made = name.origin.callee
            if not (made.kind == "global" and made.gref and made.gref.full == _BIT_CTOR):
                _bad(owner, "given a computed value that numpy would call", extra)
        elif name.kind not in SCALARS:
            _bad(owner, "given a value that numpy would call", extra)
    if len(args) == 2:
        if owner.full == _BIT_CTOR:
            _bad(owner, "called with two arguments", extra)
        else:
            _calls(owner, args[1], frozenset({_BIT_CTOR}), extra)


def _seed_sequence(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    if args:
        _makes(owner, args[0], frozenset({"numpy.random.bit_generator.SeedSequence"}), extra)


def _encode(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    ok = (
        len(args) == 2
        and args[0].kind == "str"
        and args[1].kind == "str"
        and (args[1].text or "").lower() in _CODECS
    )
    if not ok:
        _bad(owner, "called with other than (text, 'latin1')", extra)


def _enum_value(owner: GlobalRef, args: tuple[Value, ...], extra: Extra, depth: int) -> None:
    """An enum class called with one member's value (``WriteItemType(2)``): a lookup."""
    if len(args) != 1 or args[0].kind != "int":
        _bad(owner, "called with other than one integer (an enum member's value)", extra)


_Rule = Callable[[GlobalRef, tuple[Value, ...], Extra, int], None]
_RULES: dict[str, _Rule] = {
    "torch._tensor._rebuild_from_type_v2": _from_type,
    "torch._utils._rebuild_wrapper_subclass": _wrapper,
    "copyreg._reconstructor": _reconstructor,
    "copyreg.__newobj__": _newobj,
    "copyreg.__newobj_ex__": _newobj,
    "collections.defaultdict": _defaultdict,
    "numpy.ma.core._mareconstruct": _arrays,
    **{f"numpy.{c}.multiarray._reconstruct": _arrays for c in ("core", "_core")},
    **{f"numpy.random._pickle.__{k}_ctor": _rng for k in ("randomstate", "generator")},
    _BIT_CTOR: _rng,
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": _seed_sequence,
    "_codecs.encode": _encode,
    "torch.distributed.checkpoint.planner.WriteItemType": _enum_value,
}
RULED = frozenset(_RULES)  # the callables check() has rules for (it returns at once for others)
VETTED_ARGUMENTS = TENSOR_TYPES | ARRAY_TYPES | BIT_GENERATORS | TORCH_ON_IMPORT


def builds_given_class(name: str) -> bool:
    """Whether the allowlisted callable ``name`` calls or instantiates what it is given (its
    result may then be an object of any class)."""
    return name in _RULES and name not in _RETURN_DATA


_RETURN_DATA = frozenset(
    {
        "_codecs.encode",
        "collections.defaultdict",
        "torch.distributed.checkpoint.planner.WriteItemType",
    }
)
