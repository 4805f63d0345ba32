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
from .policy import classify

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_BYTEARRAY = 1 << 24  # bytearray(n) from a pickle: more than 16 MiB is an allocation bomb


class UnpickleRefused(Exception):
    """Raised from inside the unpickler; the reader turns it into a CheckpointError."""


class StorageType:
    """Stands for ``torch.FloatStorage`` & co. in persistent ids."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype


class DTypeRef:
    """Stands for ``torch.float16`` & co."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageView:
    """A legacy-format storage view: a window of ``base`` starting at element ``offset``."""

    __slots__ = ("base", "offset")

    def __init__(self, base: StorageInfo, offset: int) -> None:
        self.base = base
        self.offset = offset


class _Named:
    """A global ckpttool implements itself (a recorder); keeps the global's name."""

    __slots__ = ("__ck_global__", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.__ck_global__ = name
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class TypedTensorRef(TensorRef):
    """A 2017-era ``torch.cuda.FloatTensor()`` whose view arrives later through BUILD.

    BUILD is also how old pickles set a Parameter's ``(requires_grad, volatile, hooks)`` and a
    tensor's Python attributes, so any state that is not a view goes to ``_set_extra``.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if self.storage is None:
            if not isinstance(state, tuple) or len(state) < 4:
                raise UnpickleRefused(
                    "a typed tensor's state is not (storage, offset, size, stride)"
                )
            storage, offset, size, stride = state[:4]
            _fill(self, storage, offset, size, stride)
        else:
            TensorRef.__setstate__(self, state)


def global_name(obj: Any) -> str | None:
    """The ``module.name`` of a global the unpickler handed out, if ``obj`` is one."""
    if isinstance(obj, _Named):
        return obj.__ck_global__
    if isinstance(obj, type) and issubclass(obj, Opaque):
        return obj.__ck_global__
    if isinstance(obj, StorageType):
        return obj.name
    if isinstance(obj, DTypeRef):
        return f"torch.{obj.name}"
    return None


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, Opaque) and value.global_name == "torch.Size" and value.args:
        value = value.args[0]
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise UnpickleRefused(f"a tensor's {what} is not a tuple of non-negative integers")
    if len(value) > 64:
        raise UnpickleRefused(f"a tensor's {what} has {len(value)} dimensions")
    return tuple(value)


def _fill(ref: TensorRef, storage: Any, offset: Any, size: Any, stride: Any) -> None:
    if isinstance(storage, StorageView):
        base_offset = storage.offset
        storage = storage.base
    else:
        base_offset = 0
    if not isinstance(storage, StorageInfo):
        raise UnpickleRefused("a tensor's storage is not a storage record")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise UnpickleRefused("a tensor's storage offset is not a non-negative integer")
    ref.storage = storage
    ref.storage_offset = offset + base_offset
    ref.shape = _ints(size, "size")
    ref.stride = _ints(stride, "stride")
    if len(ref.shape) != len(ref.stride):
        raise UnpickleRefused("a tensor's size and stride have different lengths")
    if ref.dtype is None or (ref.kind == "legacy-typed-tensor" and storage.dtype != "uint8"):
        ref.dtype = storage.dtype


class SafeUnpickler(pickle.Unpickler):
    """Unpickles without importing: see the module docstring."""

    def __init__(
        self,
        file: IO[bytes],
        resolve: Callable[[StorageType, str, str, int], StorageInfo] | None = None,
        seen: dict[str, str] | None = None,
    ) -> None:
        super().__init__(file)
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
        cls = self._opaque_types.get(full)
        if cls is None:
            cls = type(
                name if name.isidentifier() else "Opaque", (Opaque,), {"__ck_global__": full}
            )
            self._opaque_types[full] = cls
        return cls

    # -- storages ----------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> Any:
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
            return StorageView(storage, view_offset)
        return storage

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
        ref = self._rebuild_tensor(storage, offset, size, stride)
        ref.requires_grad = bool(requires_grad is True)
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
        self, data: Any, requires_grad: Any = True, backward_hooks: Any = None, state: Any = None
    ) -> Any:
        if isinstance(data, TensorRef):
            if data.kind == "tensor":
                data.kind = "parameter"
            data.requires_grad = bool(requires_grad is True)
            if state:
                data.attributes = state
        return data

    def _parameter(self, data: Any = None, requires_grad: Any = True, *rest: Any) -> Any:
        return self._rebuild_parameter(data, requires_grad)

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not callable(func) or not isinstance(args, tuple):
            raise UnpickleRefused("malformed _rebuild_from_type_v2 call")
        result = func(*args)
        if isinstance(result, TensorRef):
            type_name = global_name(new_type)
            if type_name == "torch.nn.parameter.Parameter":
                result.kind = "parameter"
            elif type_name not in (None, "torch.Tensor"):
                result.subclass = type_name
            if state:
                result.attributes = state
        return result

    def _ordered_dict(self, *args: Any) -> Any:
        return collections.OrderedDict(*args)

    def _set(self, items: Any = ()) -> Any:
        return set(_finite(items))

    def _frozenset(self, items: Any = ()) -> Any:
        return frozenset(_finite(items))

    def _complex(self, real: Any = 0, imag: Any = 0) -> Any:
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise UnpickleRefused("complex() with non-numeric arguments")
        return complex(real, imag)

    def _codecs_encode(self, obj: Any, encoding: Any = "utf-8", *rest: Any) -> Any:
        if isinstance(obj, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8"):
            return obj.encode(encoding)
        raise UnpickleRefused("_codecs.encode with unexpected arguments")

    def _bytearray(self, source: Any = b"", *rest: Any) -> Any:
        if isinstance(source, int) and not isinstance(source, bool):
            if not 0 <= source <= MAX_BYTEARRAY:
                raise UnpickleRefused(f"the pickle asks for a bytearray of {source:,} bytes")
            return bytearray(source)
        if isinstance(source, (bytes, bytearray)):
            return bytearray(source)
        if isinstance(source, str) and rest:
            return bytearray(source.encode("latin1"))
        raise UnpickleRefused("bytearray() with unexpected arguments")


def _finite(items: Any) -> Any:
    if not isinstance(items, (list, tuple, set, frozenset, dict)):
        raise UnpickleRefused("set() of something that is not a container")
    return items


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SPECIAL: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": SafeUnpickler._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": SafeUnpickler._rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": SafeUnpickler._rebuild_tensor_v3,
    "torch._utils._rebuild_qtensor": SafeUnpickler._rebuild_qtensor,
    "torch._utils._rebuild_parameter": SafeUnpickler._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": SafeUnpickler._rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": SafeUnpickler._rebuild_from_type_v2,
    "torch.nn.parameter.Parameter": SafeUnpickler._parameter,
    "collections.OrderedDict": SafeUnpickler._ordered_dict,
    "builtins.set": SafeUnpickler._set,
    "builtins.frozenset": SafeUnpickler._frozenset,
    "builtins.complex": SafeUnpickler._complex,
    "builtins.bytearray": SafeUnpickler._bytearray,
    "_codecs.encode": SafeUnpickler._codecs_encode,
}
