"""The name tables the policy judges by: torch's ``weights_only`` allowlist, the plain-data
allowlist, the argument roles of allowlisted callables, and the names known to run code.

Kept as data, apart from :mod:`.policy`'s rules, so that checking never imports torch and a table
can be read (and updated to a new torch) on its own.
"""

from __future__ import annotations

import sys


def _w(text: str) -> list[str]:
    return text.split()


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
        "torch.distributed.tensor.placement_types.Shard "
        "torch.distributed.tensor.placement_types._StridedShard "
        "torch.distributed.tensor._dtensor_spec.ShardOrderEntry "
        "torch.distributed._mesh_layout._FlatLayout torch.distributed._mesh_layout._MeshLayout"
    )
)
# torch constants that protocol 4 pickles through an attribute path of a torch module
# (``torch._utils`` + ``torch.channels_last``: the module's own ``torch`` is the package).
TORCH_CONSTANTS = frozenset(
    f"torch.{n}" for n in _w("contiguous_format channels_last channels_last_3d preserve_format")
)

DCP_PLANNER = "torch.distributed.checkpoint.planner."
DCP_PLAN_CLASSES = _w("SavePlan WriteItem WriteItemType TensorWriteData BytesIOWriteData")
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
            "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING "
            # the same enum in ShardedTensor's metadata (FSDP1 sharded state dicts)
            "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING"
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
        # the save plans Megatron-core caches in DCP's Metadata (``all_local_plans``): torch's
        # frozen dataclasses, and the enum built by calling it with a member's value (an int:
        # :mod:`.arguments`)
        *(f"{DCP_PLANNER}{c}" for c in DCP_PLAN_CLASSES),
        "torch.jit._pickle.build_tensor_from_id",
        "torch.jit._pickle.restore_type_tag",
        # numpy's RNGs: their bit generators and seed sequences (the constructors' arguments
        # are checked in .arguments)
        *(
            f"numpy.random.{m}"
            for m in _w(
                "_mt19937.MT19937 _pcg64.PCG64 _pcg64.PCG64DXSM _philox.Philox _sfc64.SFC64 "
                "bit_generator.SeedSequence bit_generator.__pyx_unpickle_SeedSequence"
            )
        ),
        # enums of the standard library and torch that training checkpoints hold, built by
        # calling the class with the member's value
        "re.RegexFlag",
        *(
            f"torch.distributed.fsdp.api.{c}"
            for c in _w("ShardingStrategy BackwardPrefetch StateDictType")
        ),
    ]
)
# Classes nested in a torch class, which pickle reaches through an attribute path (protocol 4:
# STACK_GLOBAL 'module' 'Outer.Inner'; protocols 0-3: getattr(Outer, 'Inner')). Exactly these
# paths are judged as classes of their module; every other attribute path stays dangerous.
NESTED_CLASSES = frozenset(
    {"torch.distributed._shard.sharded_tensor.api.ShardedTensor.ProcessGroupState"}
)
NESTED_USE = "gets a class nested in a torch class"  # the use of getattr that reaches one
# Plain builtin types: fine as a defaultdict factory, a copyreg base, or a class to instantiate.
PLAIN_TYPES = frozenset(
    f"builtins.{t}"
    for t in _w("object dict list set frozenset tuple int float str bytes bool complex")
)
# Known to run code, touch the system or load more pickles in any use (naming them is enough).
DENY_MODULES = frozenset(
    _w(
        "os posix nt posixpath ntpath subprocess commands sys shutil runpy importlib imp "
        "pickle _pickle cPickle marshal types ctypes socket webbrowser pty code codeop pdb "
        "bdb timeit trace profile cProfile multiprocessing asyncio threading _thread signal "
        "platform pip setuptools distutils __builtin__ io _io tempfile glob pathlib "
        "zipimport dill cloudpickle joblib requests urllib http ftplib smtplib telnetlib "
        "xmlrpc pydoc pkgutil operator _operator functools _frozen_importlib "
        "_frozen_importlib_external _xxsubinterpreters _interpreters idlelib ensurepip venv "
        "doctest linecache _osx_support imaplib logging test antigravity this "
        # evaluate strings as code (sympy's constructors sympify their arguments, typing
        # evaluates annotations) or write files (fsspec, wave, codecs.open)
        "typing sympy fsspec wave codecs _posixsubprocess _winapi nturl2path gc "
        "shelve dbm sqlite3 zipfile tarfile gzip bz2 lzma mailbox configparser"
    )
)
DENY_NAMES = frozenset(
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
            "torch.load torch.save torch.serialization.save torch.storage._load_from_bytes "
            "torch.serialization.load torch._C._jit_load "
            "torch.hub.load torch.hub.load_state_dict_from_url torch.jit.load "
            "torch._utils._rebuild_xla_tensor torch.utils.collect_env.run "
            "torch.fx.graph_module._exec_with_source numpy.load numpy.loadtxt numpy.fromfile "
            "numpy.testing._private.utils.runstring numpy.lib.npyio.load "
            "numpy.f2py.crackfortran.myeval numpy.f2py.crackfortran.getlincoef "
            "uuid._get_command_stdout typing.ForwardRef"
        ),
    ]
)
DENY_PREFIXES = tuple(
    _w(
        "torch.jit. torch._C. torch.hub. torch.package. torch.ops. torch._ops. "
        "torch._inductor. torch.fx. torch.utils.cpp_extension torch._dynamo. "
        "torch.utils.collect_env torch.utils.data.datapipes torch.fx.experimental "
        "torch.testing. torch.distributed.rpc torch.multiprocessing torch.compiler "
        "torch.export torch.library torch.classes. torch.utils.tensorboard torch._export. "
        "torch.utils._config_module numpy.f2py. numpy.testing. numpy.distutils."
    )
)
STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "copy_reg"}
# Every global a file proven safe may name (the oracle tests judge torch's own loads by it).
VETTED: frozenset[str] = (
    TORCH_ALLOWED | TORCH_ON_IMPORT | DATA_ALLOWED | PLAIN_TYPES | TORCH_CONSTANTS
)
