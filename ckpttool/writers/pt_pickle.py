"""Re-pickling a checkpoint tree for torch without creating the objects it names.

Tensors are written the way ``torch.save`` writes them (``_rebuild_tensor_v2`` over a
``('storage', torch.FloatStorage, key, 'cpu', numel)`` persistent id); every :class:`Opaque`
placeholder is written back as the same global, built the same way (called or ``__new__``),
with the same state and items. Nothing is imported.
"""

from __future__ import annotations

import codecs
import io
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..model import Opaque, StorageInfo, TensorRef
from ..unpickling.unpickler import DTypeRef, StorageType, StorageValue, _Named, global_name


@dataclass(eq=False)
class OutStorage:
    """A storage of the output: copied from ``source`` (cast to ``dtype`` if it differs)."""

    key: str
    dtype: str
    numel: int
    source: StorageInfo | None = None
    data: bytes | None = None  # bytes made in memory (e.g. from a pickled numpy array)
    crc: int | None = None  # expected CRC-32 of the written bytes, once known
    read_back: bool = False  # its bytes were already read back from the output and checked
    cloned: int = 0  # bytes that share the input's blocks (checked by their extents)
    tensors: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.get(self.dtype).itemsize

    @property
    def copies_verbatim(self) -> bool:
        src = self.source
        return (
            src is not None
            and src.dtype == self.dtype
            and not src.big_endian
            and not src.compressed
        )


class GlobalRef:
    """A global written by name (``torch._utils._rebuild_tensor_v2``)."""

    __slots__ = ("module", "name")
    __name__ = "GlobalRef"

    def __init__(self, full: str) -> None:
        self.module, _, self.name = full.rpartition(".")

    def __call__(self, *args: Any) -> Any:  # pickle insists that reduce functions are callable
        raise TypeError("placeholder")


def __newobj__(cls: Any, *args: Any) -> Any:
    raise TypeError("placeholder")


def __newobj_ex__(cls: Any, args: Any, kwargs: Any) -> Any:
    raise TypeError("placeholder")


class NeedsProtocol4(Exception):
    """The tree holds something only protocol 4 can write (NEWOBJ_EX, a dotted global)."""


_V2 = GlobalRef("torch._utils._rebuild_tensor_v2")
_V3 = GlobalRef("torch._utils._rebuild_tensor_v3")
_QTENSOR = GlobalRef("torch._utils._rebuild_qtensor")
_PARAMETER = GlobalRef("torch._utils._rebuild_parameter")
_PARAMETER_STATE = GlobalRef("torch._utils._rebuild_parameter_with_state")
_FROM_TYPE = GlobalRef("torch._tensor._rebuild_from_type_v2")
_UNTYPED = GlobalRef("torch.storage.UntypedStorage")
_TENSOR = GlobalRef("torch.Tensor")


_REAL_GLOBALS = (OrderedDict, set, frozenset, complex, bytearray, codecs.encode)


class _StorageRef:
    __slots__ = ("out",)

    def __init__(self, out: OutStorage) -> None:
        self.out = out


class _BareTensor:
    """The plain-tensor part of a Parameter or subclass (written with _rebuild_tensor_v2/v3)."""

    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref


_PurePickler: Any = pickle._Pickler  # the Python pickler (overridable per object type)


class TreePickler(_PurePickler):
    """Protocol-2 pickler (what torch.save uses) for ckpttool's trees; protocol 4 when the
    tree needs it (objects built with keyword arguments, dotted global names)."""

    def __init__(
        self,
        file: io.BytesIO,
        storage_of: dict[int, OutStorage],
        dtype_of: dict[int, str],
        protocol: int = 2,
    ) -> None:
        super().__init__(file, protocol=protocol)
        self._storage_of = storage_of  # id(TensorRef) -> its output storage
        self._dtype_of = dtype_of  # id(TensorRef) -> its output dtype
        self._storage_refs: dict[int, _StorageRef] = {}
        self.written_globals: dict[str, None] = {}  # every global written, in order

    dispatch = _PurePickler.dispatch.copy()

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageValue):
            out = self._storage_value(obj).out
            if obj.untyped:
                return ("storage", _UNTYPED, out.key, "cpu", out.nbytes)
            cls_name = dtypes.STORAGE_CLASS_FOR_DTYPE.get(out.dtype)
            if cls_name is None:
                raise pickle.PicklingError(f"no typed storage class for {out.dtype}")
            return ("storage", GlobalRef(f"torch.{cls_name}"), out.key, "cpu", out.numel)
        if isinstance(obj, _StorageRef):
            out = obj.out
            cls_name = dtypes.STORAGE_CLASS_FOR_DTYPE.get(out.dtype)
            if self._untyped(out):
                return ("storage", _UNTYPED, out.key, "cpu", out.nbytes)
            return ("storage", GlobalRef(f"torch.{cls_name}"), out.key, "cpu", out.numel)
        return None

    @staticmethod
    def _untyped(out: OutStorage) -> bool:
        return out.dtype not in dtypes.STORAGE_CLASS_FOR_DTYPE

    def _storage_ref(self, ref: TensorRef) -> _StorageRef:
        out = self._storage_of[id(ref)]
        sref = self._storage_refs.get(id(out))
        if sref is None:
            sref = self._storage_refs[id(out)] = _StorageRef(out)
        return sref

    def _tensor_args(self, ref: TensorRef) -> tuple[GlobalRef, tuple[Any, ...]]:
        out = self._storage_of[id(ref)]
        dtype = self._dtype_of.get(id(ref), ref.dtype)
        view = (self._storage_ref(ref), ref.storage_offset, ref.shape, ref.stride)
        hooks: OrderedDict[Any, Any] = OrderedDict()
        meta = (ref.metadata,) if ref.metadata else ()  # conj/neg bits
        if ref.kind == "quantized":
            return _QTENSOR, (*view, ref.quantizer, ref.requires_grad, hooks)
        if self._untyped(out) or out.dtype != dtype:
            return _V3, (*view, ref.requires_grad, hooks, DTypeRef(dtype), *meta)
        return _V2, (*view, ref.requires_grad, hooks, *meta)

    def _storage_value(self, value: StorageValue) -> _StorageRef:
        if value.offset or value.size not in (None, value.base.numel):
            raise pickle.PicklingError("a storage view saved on its own (legacy format)")
        out = self._storage_of[id(value)]
        sref = self._storage_refs.get(id(out))
        if sref is None:
            sref = self._storage_refs[id(out)] = _StorageRef(out)
        return sref

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorRef):
            if obj.subclass or (obj.attributes and obj.kind != "parameter" and not obj.parameter):
                func, args = self._tensor_args(obj)
                new_type = GlobalRef(obj.subclass) if obj.subclass else _TENSOR
                return _FROM_TYPE, (func, new_type, args, obj.attributes or {})
            if obj.kind == "parameter" or obj.parameter:
                if obj.attributes:
                    return _PARAMETER_STATE, (
                        _BareTensor(obj),
                        obj.requires_grad,
                        OrderedDict(),
                        obj.attributes,
                    )
                return _PARAMETER, (_BareTensor(obj), obj.requires_grad, OrderedDict())
            return self._tensor_args(obj)
        if isinstance(obj, _BareTensor):
            return self._tensor_args(obj.ref)
        if isinstance(obj, StorageValue):
            return NotImplemented  # persistent_id writes it
        if isinstance(obj, Opaque):
            return self._reduce_opaque(obj)
        return NotImplemented

    def _reduce_opaque(self, obj: Opaque) -> Any:
        """The object built again the way the pickle built it: NEWOBJ (``cls.__new__``),
        NEWOBJ_EX (with keyword arguments) or a call (REDUCE), then items and BUILD."""
        listitems = iter(obj.list_items) if obj.list_items else None
        dictitems = iter(dict.items(obj)) if len(obj) else None
        if obj.how == "newobj":
            if obj.kwargs:
                if self.proto < 4:
                    raise NeedsProtocol4
                return (
                    __newobj_ex__,
                    (type(obj), obj.args, obj.kwargs),
                    obj.state,
                    listitems,
                    dictitems,
                )
            return (__newobj__, (type(obj), *obj.args), obj.state, listitems, dictitems)
        if obj.kwargs:
            raise pickle.PicklingError(f"{obj.global_name} was called with keyword arguments")
        return (type(obj), obj.args, obj.state, listitems, dictitems)

    def save_bytes(self, obj: bytes) -> None:
        if self.proto >= 3:
            super().save_bytes(obj)
        else:  # as torch.save writes bytes at protocol 2 (never the global ``bytes``)
            self.save_reduce(codecs.encode, (str(obj, "latin1"), "latin1"), obj=obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Opaque) and obj.__ck_module__:
            module, attr = obj.__ck_module__, obj.__ck_qualname__  # as the pickle spelt it
        else:
            full = obj.module + "." + obj.name if isinstance(obj, GlobalRef) else global_name(obj)
            if full is None and obj in _REAL_GLOBALS:  # OrderedDict & co., created for real
                full = f"{obj.__module__}.{obj.__qualname__}"
            if full is None:
                raise pickle.PicklingError(f"cannot write {obj!r} without importing it")
            module, _, attr = full.rpartition(".")
        if "\n" in module + attr or not module or not attr:
            raise pickle.PicklingError(f"invalid global name {module}.{attr!r}")
        self.written_globals[f"{module}.{attr}"] = None
        if self.proto >= 4:
            self.save(module)
            self.save(attr)
            self.write(pickle.STACK_GLOBAL)
        elif "." in attr:  # torch resolves a dotted name only at protocol 4 (STACK_GLOBAL)
            raise NeedsProtocol4
        else:
            self.write(
                pickle.GLOBAL + module.encode("utf-8") + b"\n" + attr.encode("utf-8") + b"\n"
            )
        self.memoize(obj)

    def _save_global_obj(self, obj: Any) -> None:
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        self.save_global(obj)

    for _t in (GlobalRef, _Named, DTypeRef, StorageType):
        dispatch[_t] = _save_global_obj
    del _t


@dataclass(frozen=True)
class Pickled:
    """A tree's pickle, the protocol it needed and every global it names (in order)."""

    data: bytes
    protocol: int
    globals: list[str]


def pickle_tree(root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]) -> Pickled:
    """The pickle of ``root`` at protocol 2 (as torch.save writes it), or at protocol 4 when
    the tree holds what only protocol 4 can write."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        for protocol in (2, 4):
            buf = io.BytesIO()
            pickler = TreePickler(buf, storage_of, dtype_of, protocol)
            try:
                pickler.dump(root)
            except NeedsProtocol4:
                continue
            return Pickled(buf.getvalue(), protocol, list(pickler.written_globals))
        raise AssertionError("protocol 4 writes everything")
    finally:
        sys.setrecursionlimit(limit)


def dumps(root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]) -> bytes:
    """The bytes of :func:`pickle_tree`."""
    return pickle_tree(root, storage_of, dtype_of).data
