"""A restricted unpickler that never imports or calls anything the pickle names.

torch's rebuild functions map to recorders that build :class:`TensorRef` leaves; a handful of
plain builtins (``OrderedDict``, ``set``, ``complex``, ...) are created for real because they
cannot run code; every other global becomes an :class:`Opaque` placeholder class that remembers
its name and what it was called with. Storage persistent ids are handed to a reader-supplied
``resolve`` callback that checks them against the file.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
from collections.abc import Callable
from typing import IO, Any

from .. import dtypes
from ..model import Opaque, StorageInfo, TensorRef
from . import records as builtins_
from .lists import NESTED_CLASSES
from .policy import classify
from .records import (
    _JUST_INT,
    DTypeRef,
    StorageType,
    StorageValue,
    TypedTensorRef,
    UnpickleRefused,
    _fill,
    _Named,
    global_name,
)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

__all__ = [
    "LEGACY_MAGIC",
    "LEGACY_PROTOCOL",
    "DTypeRef",
    "SafeUnpickler",
    "StorageType",
    "StorageValue",
    "TypedTensorRef",
    "UnpickleRefused",
    "global_name",
]


class SafeUnpickler(pickle.Unpickler):
    """Unpickles without importing: see the module docstring."""

    def __init__(
        self,
        file: IO[bytes],
        resolve: Callable[[StorageType, str, str, int], StorageInfo] | None = None,
        seen: dict[str, str] | None = None,
    ) -> None:
        # torch.load decodes Python 2 ``str`` objects as UTF-8 (pickle_load_args' default)
        super().__init__(file, encoding="utf-8")
        self._resolve = resolve
        self.globals: dict[str, str] = {}  # name -> kind, in order of appearance
        self.seen = seen if seen is not None else {}  # shared by all pickles of one file
        self.tensors: list[TensorRef] = []
        self.module_sources: list[str] = []  # legacy whole-module pickles embed class sources
        self._opaque_types: dict[str, type[Opaque]] = {}

    # -- globals -----------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full not in self.globals:
            self.globals[full] = classify(full)
            self.seen.setdefault(full, self.globals[full])
        return self._handler(module, name, full)

    def _handler(self, module: str, name: str, full: str) -> Any:
        special = _SPECIAL.get(full)
        if special is not None:
            if full == "collections.OrderedDict":  # a type that runs no code: called as it is
                return _Named(full, collections.OrderedDict)
            return _Named(full, special.__get__(self))
        if module in ("torch", "torch.cuda"):
            if name in dtypes.STORAGE_TYPES:
                return StorageType(full, dtypes.STORAGE_TYPES[name])
            if name in dtypes.TENSOR_TYPES:
                dtype = dtypes.TENSOR_TYPES[name]
                return _Named(full, lambda *a: self._typed_tensor(dtype, *a))
            if module == "torch" and name in dtypes.DTYPES:
                return DTypeRef(name)
        if full == "torch.storage.UntypedStorage":
            return StorageType(full, "uint8")
        return self._opaque_class(module, name)

    def _opaque_class(self, module: str, name: str) -> type[Opaque]:
        full = f"{module}.{name}"
        cls = self._opaque_types.get(full)
        if cls is None:
            short = name.rpartition(".")[2]
            meta: Any = type(Opaque)
            cls = meta(
                short if short.isidentifier() else "Opaque",
                (Opaque,),
                {"__ck_global__": full, "__ck_module__": module, "__ck_qualname__": name},
            )
            self._opaque_types[full] = cls
        return cls

    def _call_record(self, full: str, *args: Any) -> Opaque:
        """A call of a torch function that ckpttool keeps as the pickle wrote it, because what
        it was given is not a tensor ckpttool models (a meta tensor, a wrapper subclass)."""
        module, _, name = full.rpartition(".")
        return self._opaque_class(module, name)(*args)

    def _getattr(self, *args: Any) -> Any:
        """``getattr(Outer, 'Inner')`` naming one of ``NESTED_CLASSES`` (how protocols 0-3
        pickle a nested class) is that class's placeholder; any other getattr a call record."""
        if len(args) == 2 and isinstance(args[1], str):
            owner = args[0]
            if isinstance(owner, type) and issubclass(owner, Opaque):
                full = f"{owner.__ck_global__}.{args[1]}"
                if full in NESTED_CLASSES and "." not in owner.__ck_qualname__:
                    self.globals.setdefault(full, classify(full))
                    self.seen.setdefault(full, self.globals[full])
                    qualname = f"{owner.__ck_qualname__}.{args[1]}"
                    return self._opaque_class(owner.__ck_module__, qualname)
        return self._call_record("builtins.getattr", *args)

    # -- storages ----------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and self._resolve:
            # torch.save's ('storage', type, key, location, numel), with the least work
            storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
            if (
                type(storage_type) is StorageType
                and type(key) is str
                and type(location) is str
                and type(numel) is int
                and numel >= 0
            ):
                storage = self._resolve(storage_type, key, location, numel)
                return StorageValue(storage, storage_type.name)
        return self._persistent_load(pid)

    def _persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise UnpickleRefused(f"unknown persistent id {_short(pid)}")
        typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module" and len(pid) >= 4:
            # Legacy whole-module pickles: ('module', cls, source_file, source). Keep the class
            # placeholder; never compile the source.
            name = global_name(pid[1])
            if name and isinstance(pid[3], str) and pid[3]:
                self.module_sources.append(name)
            return pid[1]
        if typename != "storage" or len(pid) < 5 or self._resolve is None:
            raise UnpickleRefused(f"unknown persistent id {_short(pid)}")
        storage_type, key, location, numel = pid[1:5]
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if (
            not isinstance(storage_type, StorageType)
            or not isinstance(key, (str, int))
            or not isinstance(location, str)
            or not isinstance(numel, int)
            or numel < 0
        ):
            raise UnpickleRefused(f"malformed storage persistent id {_short(pid)}")
        storage = self._resolve(storage_type, str(key), location, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3):
                raise UnpickleRefused(f"malformed storage view {_short(view)}")
            _view_key, view_offset, view_size = view
            if (
                not isinstance(view_offset, int)
                or not isinstance(view_size, int)
                or view_offset < 0
                or view_size < 0
            ):
                raise UnpickleRefused(f"malformed storage view {_short(view)}")
            return StorageValue(storage, storage_type.name, view_offset, view_size)
        return StorageValue(storage, storage_type.name)

    # -- recorders (bound through _SPECIAL) ---------------------------------------------------
    def _new_ref(self, kind: str = "tensor", dtype: str | None = None) -> TensorRef:
        ref = TensorRef(None, kind=kind, dtype=dtype)
        ref.dtype = dtype  # type: ignore[assignment]  # filled from the storage if None
        self.tensors.append(ref)
        return ref

    def _typed_tensor(self, dtype: str, *args: Any) -> TensorRef:
        ref = TypedTensorRef(None, kind="legacy-typed-tensor", dtype=dtype)
        self.tensors.append(ref)
        if args:  # torch.FloatTensor(storage) style
            raise UnpickleRefused("a typed tensor was called with arguments")
        return ref

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
        ref = self._new_ref()
        _fill(ref, storage, offset, size, stride)
        return ref

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> TensorRef:
        if (  # torch.save's own call, checked as _fill checks it, with the least work
            type(storage) is StorageValue
            and isinstance(storage.base, StorageInfo)
            and type(offset) is int
            and offset >= 0
            and type(size) is tuple
            and type(stride) is tuple
            and len(size) == len(stride) <= 64
            and _JUST_INT.issuperset(map(type, size))
            and _JUST_INT.issuperset(map(type, stride))
            and (not size or (min(size) >= 0 and min(stride) >= 0))
            and not metadata
        ):
            base = storage.base
            ref = TensorRef(base, offset + storage.offset, size, stride, dtype=base.dtype)
            ref.requires_grad = requires_grad is True
            self.tensors.append(ref)
            return ref
        ref = self._rebuild_tensor(storage, offset, size, stride)
        ref.requires_grad = bool(requires_grad is True)
        _set_metadata(ref, metadata)
        return ref

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> TensorRef:
        if not isinstance(dtype, DTypeRef):
            raise UnpickleRefused("_rebuild_tensor_v3 without a dtype")
        ref = self._new_ref(dtype=dtype.name)
        _fill(ref, storage, offset, size, stride)
        ref.requires_grad = bool(requires_grad is True)
        _set_metadata(ref, metadata)
        return ref

    def _rebuild_qtensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        quantizer_params: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
    ) -> TensorRef:
        ref = self._rebuild_tensor(storage, offset, size, stride)
        ref.kind = "quantized"
        ref.quantizer = quantizer_params
        ref.requires_grad = bool(requires_grad is True)
        return ref

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any = True, backward_hooks: Any = None
    ) -> Any:
        if not _plain_tensor(data):
            return self._call_record(
                "torch._utils._rebuild_parameter", data, requires_grad, backward_hooks
            )
        _make_parameter(data)
        data.requires_grad = bool(requires_grad is True)
        return data

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any
    ) -> Any:
        if not _plain_tensor(data):
            return self._call_record(
                "torch._utils._rebuild_parameter_with_state",
                data,
                requires_grad,
                backward_hooks,
                state,
            )
        _make_parameter(data)
        data.requires_grad = bool(requires_grad is True)
        if state:
            data.attributes = state
        return data

    def _parameter(self, *args: Any) -> Any:
        data = args[0] if args else None
        if not isinstance(data, TensorRef) or not _plain_tensor(data) or len(args) > 2:
            return self._call_record("torch.nn.parameter.Parameter", *args)
        _make_parameter(data)
        data.requires_grad = bool(args[1] is True) if len(args) > 1 else True
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not callable(func) or not isinstance(args, tuple):
            raise UnpickleRefused("malformed _rebuild_from_type_v2 call")
        type_name = global_name(new_type)
        result = func(*args) if isinstance(func, _Named) else None
        if (
            isinstance(result, TensorRef)
            and result.subclass is None
            and result.attributes is None
            and type_name is not None
            and (not state or isinstance(state, dict))
        ):
            if type_name == "torch.nn.parameter.Parameter":
                result.kind = "parameter"
            elif type_name != "torch.Tensor":
                result.subclass = type_name
            if state:
                result.attributes = state
            return result
        # A wrapper subclass (DTensor, jagged NestedTensor) or a rebuild that did not make a
        # plain tensor: keep the call as the pickle wrote it (its inner tensors and storages
        # are written back as tensors and storages).
        return self._call_record("torch._tensor._rebuild_from_type_v2", func, new_type, args, state)


def _plain_tensor(data: Any) -> bool:
    return isinstance(data, TensorRef) and data.kind in ("tensor", "legacy-typed-tensor")


def _make_parameter(data: TensorRef) -> None:
    if data.kind == "tensor":
        data.kind = "parameter"
    else:  # a 2017 typed tensor keeps its kind
        data.parameter = True


def _set_metadata(ref: TensorRef, metadata: Any) -> None:
    if metadata:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
            raise UnpickleRefused("a tensor's metadata is not a dict of names")
        ref.metadata = dict(metadata)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SPECIAL: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": SafeUnpickler._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": SafeUnpickler._rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": SafeUnpickler._rebuild_tensor_v3,
    "torch._utils._rebuild_qtensor": SafeUnpickler._rebuild_qtensor,
    "torch._utils._rebuild_parameter": SafeUnpickler._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": SafeUnpickler._rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": SafeUnpickler._rebuild_from_type_v2,
    "torch.nn.parameter.Parameter": SafeUnpickler._parameter,
    "collections.OrderedDict": collections.OrderedDict,  # (not bound: see _handler)
    "builtins.set": builtins_._set,
    "builtins.frozenset": builtins_._frozenset,
    "builtins.complex": builtins_._complex,
    "builtins.bytearray": builtins_._bytearray,
    "builtins.bytes": builtins_._bytes,
    "_codecs.encode": builtins_._codecs_encode,
    "builtins.getattr": SafeUnpickler._getattr,
}
