"""What both tree picklers share (``pt_pickle``'s, in Python, and ``pt_cpickle``'s, CPython's C
pickler): the output storages, storages written as persistent ids, tensors reduced the way
``torch.save`` reduces them, and how a global the tree names is spelt. Nothing is imported.
"""

from __future__ import annotations

import codecs
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..model import Opaque, StorageInfo, TensorRef
from ..unpickling.unpickler import StorageValue, global_name
from .pickle_globals import GlobalRef


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


REAL_GLOBALS = (OrderedDict, set, frozenset, complex, bytearray, codecs.encode)


class _StorageRef:
    __slots__ = ("out",)

    def __init__(self, out: OutStorage) -> None:
        self.out = out


class _BareTensor:
    """The plain-tensor part of a Parameter or subclass (written with _rebuild_tensor_v2/v3)."""

    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref


class Reductions:
    """What both picklers share: storages as persistent ids, tensors reduced the way torch.save
    reduces them. (``TreePickler`` here; ``pt_cpickle.CTreePickler``, CPython's C pickler.)"""

    def _init_reductions(self, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]) -> None:
        self._storage_of = storage_of  # id(TensorRef) -> its output storage
        self._dtype_of = dtype_of  # id(TensorRef) -> its output dtype
        self._storage_refs: dict[int, _StorageRef] = {}
        self.written_globals: dict[str, None] = {}  # every global written, in order

    def _storage_pid(self, obj: Any) -> Any:
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
        if self._untyped(out) or out.dtype != dtype:  # the dtype: a global, as torch.float16
            return _V3, (*view, ref.requires_grad, hooks, GlobalRef(f"torch.{dtype}"), *meta)
        return _V2, (*view, ref.requires_grad, hooks, *meta)

    def _storage_value(self, value: StorageValue) -> _StorageRef:
        if value.offset or value.size not in (None, value.base.numel):
            raise pickle.PicklingError("a storage view saved on its own (legacy format)")
        out = self._storage_of[id(value)]
        sref = self._storage_refs.get(id(out))
        if sref is None:
            sref = self._storage_refs[id(out)] = _StorageRef(out)
        return sref

    def _reduce_tensor(self, obj: Any) -> Any:
        """A tensor's reduce tuple (a Parameter, a subclass, a plain tensor); None for others."""
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
        return None


def spelling(obj: Any) -> tuple[str, str]:
    """(module, name) that the global ``obj`` is written as: an Opaque class as the pickle
    spelt it, a recorder or stand-in by its name, OrderedDict & co. (created for real) as they
    are; PicklingError where it has none."""
    if isinstance(obj, type) and issubclass(obj, Opaque) and obj.__ck_module__:
        return obj.__ck_module__, obj.__ck_qualname__
    full = obj.module + "." + obj.name if isinstance(obj, GlobalRef) else global_name(obj)
    if full is None and any(obj is g for g in REAL_GLOBALS):  # created for real
        full = f"{obj.__module__}.{obj.__qualname__}"
    if full is None:
        raise pickle.PicklingError(f"cannot write {obj!r} without importing it")
    module, _, attr = full.rpartition(".")
    return module, attr


@dataclass(frozen=True)
class Pickled:
    """A tree's pickle, the protocol it needed and every global it names (in order)."""

    data: bytes
    protocol: int
    globals: list[str]
