"""Default-deny policy: what each global of a pickle may do, judged by how the pickle uses it.

Four kinds, from :func:`judge` over a static walk (:mod:`.opscan`) of every pickle of a file:

* ``torch``: torch's ``weights_only`` allowlist;
* ``data``: a short allowlist of plain data classes (argparse.Namespace, numpy arrays, dtypes
  and scalars, collections, datetime, decimal, fractions, uuid, pathlib paths,
  SimpleNamespace, torch's Generator state);
* ``user code``: a class of another module that the pickle only instantiates (NEWOBJ + BUILD,
  as whole pickled models and configs are), or calls with plain values (as enum members are
  pickled), or only refers to: loading imports that module and runs its classes' code;
* ``dangerous``: anything else that gets called, any attribute path (``builtins.eval.__call__``,
  ``torch.os.system``), a module-level object the pickle changes, a result the pickle calls,
  a module whose import runs a program, and names known to run code in any use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from .opscan import SCALARS, GlobalRef, PickleWalk, Value

TORCH, DATA, USER, DANGEROUS = "torch", "data", "user code", "dangerous"


def _w(text: str) -> list[str]:
    return text.split()


_RANK = {TORCH: 0, DATA: 1, USER: 2, DANGEROUS: 3}

_SCALAR_TYPES = _w("Byte Char Short Int Long Half Float Double BFloat16 Bool")
_DTYPES = _w(
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 "
    "float32 float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz "
    "float8_e8m0fnu int16 int32 int64 int8 qint32 qint8 quint2x4 quint4x2 quint8 uint16 uint32 "
    "uint64 uint8 per_channel_affine per_channel_affine_float_qparams per_channel_symmetric "
    "per_tensor_affine per_tensor_symmetric"
)
_REBUILDS = _w(
    "_rebuild_device_tensor_from_cpu_tensor _rebuild_device_tensor_from_numpy "
    "_rebuild_meta_tensor_no_storage _rebuild_nested_tensor _rebuild_parameter "
    "_rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor _rebuild_tensor "
    "_rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_wrapper_subclass"
)

# What torch.load(weights_only=True) accepts by default (torch 2.13's
# _weights_only_unpickler._get_allowed_globals), kept here so that checking never imports torch.
TORCH_ALLOWED: frozenset[str] = frozenset(
    [
        *_w(
            "_codecs.encode builtins.bytearray builtins.complex builtins.set collections.Counter "
            "collections.OrderedDict torch.Size torch.Tensor torch.device "
            "torch.nn.parameter.Parameter torch.serialization._get_layout "
            "torch.storage.TypedStorage torch.storage.UntypedStorage "
            "torch._tensor._rebuild_from_type_v2"
        ),
        *(f"torch._utils.{f}" for f in _REBUILDS),
        *(f"torch.{d}" for d in _DTYPES),
        *(f"torch.{k}{n}" for k in ("int", "uint") for n in range(1, 8)),
        *(f"torch.{t}Storage" for t in [*_SCALAR_TYPES, "ComplexDouble", "ComplexFloat"]),
        *(f"torch.{t}Storage" for t in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")),
        *(f"torch.cuda.{t}Storage" for t in [*_SCALAR_TYPES, "ComplexDouble", "ComplexFloat"]),
        *(f"{m}{t}Tensor" for m in ("torch.", "torch.cuda.") for t in _SCALAR_TYPES),
        *(f"{m}{t}Tensor" for m in ("torch.sparse.", "torch.cuda.sparse.") for t in _SCALAR_TYPES),
    ]
) - {f"{m}BoolTensor" for m in ("torch.sparse.", "torch.cuda.sparse.")}
# Rebuilds torch's weights_only loader accepts once their module is imported (torch special-cases
# them: "torch.nested and torch._dynamo must be imported to load nested jagged tensors").
TORCH_ON_IMPORT: frozenset[str] = frozenset(
    _w(
        "torch.nested._internal.nested_tensor.NestedTensor "
        "torch.nested._internal.nested_tensor._rebuild_njt torch._dynamo.decorators._DimRange "
        "torch.distributed.device_mesh.DeviceMesh "
        "torch.distributed.tensor._dtensor_spec.DTensorSpec "
        "torch.distributed.tensor._dtensor_spec.TensorMeta torch.distributed.tensor.DTensor "
        "torch.distributed.tensor.placement_types.Partial "
        "torch.distributed.tensor.placement_types.Replicate "
        "torch.distributed.tensor.placement_types.Shard"
    )
)
# torch constants that protocol 4 pickles through an attribute path of a torch module
# (``torch._utils`` + ``torch.channels_last``: the module's own ``torch`` is the package).
_TORCH_CONSTANTS = frozenset(
    f"torch.{n}"
    for n in _w("contiguous_format channels_last channels_last_3d preserve_format")
)

_PATHS = _w("PurePath PurePosixPath PureWindowsPath Path PosixPath WindowsPath")
# Plain data classes and helpers that build plain data from plain data.
DATA_ALLOWED: frozenset[str] = frozenset(
    [
        *_w(
            "builtins.frozenset builtins.slice builtins.range builtins.object "
            "collections.defaultdict collections.deque copyreg._reconstructor copyreg.__newobj__ "
            "copyreg.__newobj_ex__ argparse.Namespace types.SimpleNamespace datetime.datetime "
            "datetime.date datetime.time datetime.timedelta datetime.timezone decimal.Decimal "
            "fractions.Fraction uuid.UUID uuid.SafeUUID numpy.dtype numpy.ndarray "
            "numpy.ma.core._mareconstruct numpy.random._pickle.__randomstate_ctor "
            "numpy.random._pickle.__bit_generator_ctor numpy.random._pickle.__generator_ctor "
            "torch.Generator torch._C.Generator torch.nn.backends.thnn._get_thnn_function_backend "
            "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"
        ),
        *(
            f"numpy.{c}.multiarray.{f}"
            for c in ("core", "_core")
            for f in ("_reconstruct", "scalar")
        ),
        *(f"numpy.{c}.numeric._frombuffer" for c in ("core", "_core")),
        *(f"{m}.{p}" for m in ("pathlib", "pathlib._local") for p in _PATHS),
        *(f"torch.jit._pickle.build_{t}list" for t in ("int", "tensor", "double", "bool")),
        *(
            f"torch.distributed.checkpoint.metadata.{c}"  # DCP's .metadata dataclasses
            for c in _w(
                "Metadata TensorStorageMetadata TensorProperties ChunkStorageMetadata "
                "BytesStorageMetadata MetadataIndex StorageMeta"
            )
        ),
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.jit._pickle.build_tensor_from_id",
        "torch.jit._pickle.restore_type_tag",
    ]
)
# Plain builtin types: fine as a defaultdict factory, a copyreg base, or a class to instantiate.
_PLAIN_TYPES = frozenset(
    f"builtins.{t}"
    for t in _w("object dict list set frozenset tuple int float str bytes bool complex")
)
# Arguments that allowlisted callables call ("call") or instantiate ("new"), by position.
_ROLES: dict[str, dict[int, str]] = {
    "torch._tensor._rebuild_from_type_v2": {0: "call", 1: "new"},
    "torch._utils._rebuild_wrapper_subclass": {0: "new"},
    "copyreg._reconstructor": {0: "new", 1: "base"},
    "copyreg.__newobj__": {0: "new"},
    "copyreg.__newobj_ex__": {0: "new"},
    "collections.defaultdict": {0: "call"},
    "numpy.ma.core._mareconstruct": {0: "new", 1: "new"},
    **{f"numpy.{c}.multiarray._reconstruct": {0: "new"} for c in ("core", "_core")},
    **{
        f"numpy.random._pickle.__{k}_ctor": {0: "call", 1: "call"}
        for k in ("randomstate", "bit_generator", "generator")
    },
}

# Known to run code, touch the system or load more pickles in any use (naming them is enough).
_DENY_MODULES = frozenset(
    _w(
        "os posix nt posixpath ntpath subprocess commands sys shutil runpy importlib imp "
        "pickle _pickle cPickle marshal types ctypes socket webbrowser pty code codeop pdb "
        "bdb timeit trace profile cProfile multiprocessing asyncio threading _thread signal "
        "platform pip setuptools distutils __builtin__ io _io tempfile glob pathlib "
        "zipimport dill cloudpickle joblib requests urllib http ftplib smtplib telnetlib "
        "xmlrpc pydoc pkgutil operator _operator functools _frozen_importlib "
        "_frozen_importlib_external _xxsubinterpreters _interpreters idlelib ensurepip venv "
        "doctest linecache _osx_support imaplib logging test antigravity this"
    )
)
_DENY_NAMES = frozenset(
    [
        *(
            f"builtins.{n}"
            for n in _w(
                "eval exec compile open __import__ getattr setattr delattr globals locals "
                "vars input breakpoint exit quit help memoryview type super classmethod "
                "staticmethod property apply execfile reload file"
            )
        ),
        *_w(
            "torch.load torch.storage._load_from_bytes torch.serialization.load torch._C._jit_load "
            "torch.hub.load torch.hub.load_state_dict_from_url torch.jit.load "
            "torch._utils._rebuild_xla_tensor torch.utils.collect_env.run "
            "torch.fx.graph_module._exec_with_source numpy.load numpy.loadtxt numpy.fromfile "
            "numpy.testing._private.utils.runstring numpy.lib.npyio.load "
            "numpy.f2py.crackfortran.myeval numpy.f2py.crackfortran.getlincoef "
            "uuid._get_command_stdout typing.ForwardRef"
        ),
    ]
)
_DENY_PREFIXES = tuple(
    _w(
        "torch.jit. torch._C. torch.hub. torch.package. torch.ops. torch._ops. "
        "torch._inductor. torch.fx. torch.utils.cpp_extension torch._dynamo. "
        "torch.utils.collect_env torch.utils.data.datapipes torch.fx.experimental "
        "torch.testing. torch.distributed.rpc torch.multiprocessing torch.compiler "
        "torch.export torch.library torch.classes. torch.utils.tensorboard torch._export. "
        "torch.utils._config_module numpy.f2py. numpy.testing. numpy.distutils."
    )
)
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "copy_reg"}


@dataclass(frozen=True)
class GlobalVerdict:
    """One global of a file: its name, kind, how the pickle uses it, and why that kind."""

    name: str  # module.qualname as the loader resolves it (Python 2 names mapped)
    kind: str  # torch, data, user code, dangerous
    uses: tuple[str, ...]  # "called", "instantiated", "referenced", "mutated", ...
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The security verdict of one file, computed once from every pickle it holds."""

    globals: tuple[GlobalVerdict, ...] = ()
    notes: tuple[str, ...] = ()  # what could not be scanned, parser differentials

    @property
    def kind(self) -> str:
        """The worst kind of any global: ``dangerous``, ``user code``, ``data`` or ``torch``."""
        return max((g.kind for g in self.globals), key=_RANK.__getitem__, default=TORCH)

    def names(self, *kinds: str) -> list[str]:
        return [g.name for g in self.globals if g.kind in kinds]

    @property
    def dangerous(self) -> list[str]:
        return self.names(DANGEROUS)

    def kind_of(self, name: str) -> str | None:
        return next((g.kind for g in self.globals if g.name == name), None)

    def get(self, name: str) -> GlobalVerdict | None:
        return next((g for g in self.globals if g.name == name), None)


def judge(walks: Iterable[PickleWalk], notes: Iterable[str] = ()) -> Verdict:
    """The verdict over the static walks of every pickle of one file (worst use wins).

    Example:
        >>> from .opscan import walk
        >>> judge([walk(b"cos\\nsystem\\n(S'ls'\\ntR.")]).dangerous
        ['os.system']
    """
    merged: dict[str, GlobalVerdict] = {}
    for w in walks:
        for g, kind, reason in _judge_walk(w):
            old = merged.get(g.full)
            uses = tuple(sorted(set(old.uses if old else ()) | (g.uses or {"referenced"})))
            if old is None or _RANK[kind] > _RANK[old.kind]:
                merged[g.full] = GlobalVerdict(g.full, kind, uses, reason)
            else:
                merged[g.full] = GlobalVerdict(old.name, old.kind, uses, old.reason)
    return Verdict(tuple(merged.values()), tuple(notes))


def _judge_walk(w: PickleWalk) -> list[tuple[GlobalRef, str, str]]:
    extra: dict[int, str] = {}  # id(GlobalRef) -> a dangerous reason found from its context
    shapes: dict[int, set[str]] = {}
    for site in w.calls:
        callee = site.callee
        if callee.kind == "result" and callee.origin is not None:
            origin = callee.origin.callee
            if origin.kind == "global" and origin.gref is not None:
                origin.gref.uses.add("result called")
            continue
        if callee.kind != "global" or callee.gref is None:
            continue
        g = callee.gref
        args = site.args.items if site.args is not None and site.args.kind == "tuple" else None
        if site.op.startswith("NEWOBJ") or (site.op in ("INST", "OBJ") and args == ()):
            g.uses.add("instantiated")
        else:
            g.uses.add("called")
            shapes.setdefault(id(g), set()).add(_shape(args))
        for i, arg in enumerate(args or ()):
            _arg_role(g, i, arg, extra)
    for _op, target in w.mutated:
        if target.kind == "global" and target.gref is not None:
            target.gref.uses.add("mutated")
    for target, _state in w.built:
        if target.kind == "global" and target.gref is not None:
            target.gref.uses.add("mutated")
    return [(g, *_kind(g, shapes.get(id(g), set()), extra.get(id(g)))) for g in w.globals]


def _shape(args: tuple[Value, ...] | None) -> str:
    if args is None:
        return "unknown"
    if not args:
        return "empty"
    return "plain" if all(a.kind in SCALARS for a in args) else "other"


def _arg_role(owner: GlobalRef, i: int, arg: Value, extra: dict[int, str]) -> None:
    callee = owner.full
    role = _ROLES.get(callee, {}).get(i)
    if role is None:
        return
    if arg.kind == "global" and arg.gref is not None:
        g = arg.gref
        if role == "new" or (role == "base" and g.full in _PLAIN_TYPES):
            g.uses.add("instantiated")
        elif g.full in TORCH_ALLOWED | TORCH_ON_IMPORT | DATA_ALLOWED | _PLAIN_TYPES:
            g.uses.add(f"passed to {callee}")
        else:
            g.uses.add(f"called by {callee}")
            extra[id(g)] = f"passed to {callee}, which calls it"
    elif arg.kind not in SCALARS and role in ("call", "base"):
        owner.uses.add("given a computed value to call")
        extra[id(owner)] = "the pickle hands it a computed value, which it calls"


def _kind(g: GlobalRef, shapes: set[str], extra: str | None) -> tuple[str, str]:
    full, module, name = g.full, g.module, g.name
    top = module.split(".", 1)[0]
    if g.opcode == "EXT":
        return DANGEROUS, "an extension-registry code: what it loads depends on the process"
    if (
        top == "torch"
        and name in _TORCH_CONSTANTS
        and not g.uses & {"called", "instantiated", "mutated", "result called"}
        and not extra
    ):
        return DATA, "a torch constant, reached through the torch module's attribute path"
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
    if full in DATA_ALLOWED or (full in _PLAIN_TYPES and not g.uses & {"called", "mutated"}):
        return DATA, "plain data"
    if full in _PLAIN_TYPES and "mutated" not in g.uses and shapes <= {"plain", "empty"}:
        return DATA, "a builtin type called with plain values (protocol 2 pickles b'' as bytes())"
    if full.startswith("numpy.dtypes.") and "called" not in g.uses:
        return DATA, "plain data"
    if _denied(full, module, top):
        return DANGEROUS, "known to run code or load files"
    stdlib = top in _STDLIB
    if "called" in g.uses:
        if not stdlib and top != "torch" and shapes <= {"plain", "empty"} and _classlike(name):
            return USER, f"called with plain values (as enum members are); loading imports {module}"
        return DANGEROUS, "called, and not on the torch or data allowlists"
    if "instantiated" in g.uses:
        if stdlib:
            return DANGEROUS, "a standard-library class built outside the data allowlist"
        return USER, f"instantiated: loading imports {module} and runs its class code"
    return USER, f"referenced: loading imports {module}"


def _denied(full: str, module: str, top: str) -> bool:
    return (
        full in _DENY_NAMES
        or module in _DENY_MODULES
        or top in _DENY_MODULES
        or full.startswith(_DENY_PREFIXES)
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
    fine; ``user code`` that the pickle instantiates (objects of user classes, enum members)
    only with ``allow_user_classes``; a bare reference to a global (a function or class
    stored as a value) never, since the output would hand a callable to whoever loads it.
    """
    from ..errors import CheckpointError

    refuse_dangerous(path, verdict)
    classes: list[str] = []
    for name in dict.fromkeys(remaining):
        g = verdict.get(name) if verdict is not None else None
        kind = g.kind if g is not None else classify(name)
        if kind in (TORCH, DATA):
            continue
        if kind == DANGEROUS:
            from ..errors import DangerousCheckpointError

            raise DangerousCheckpointError(path, [name])
        uses = set(g.uses) if g is not None else {"referenced"}
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


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


_USER_WHY = "loading it imports those modules and runs their code"
