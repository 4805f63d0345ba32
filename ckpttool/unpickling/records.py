"""The small records the unpickler hands out in place of torch objects: storage classes,
dtypes, storage persistent ids, and the globals ckpttool implements itself."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..model import Opaque, StorageInfo, TensorRef


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


class StorageValue:
    """A storage persistent id as the pickle gives it: the record, the storage class it names
    (``torch.FloatStorage``, ``torch.storage.UntypedStorage``), and for a legacy-format view
    the window of ``base`` it starts at (element ``offset``, ``size`` elements).

    Tensors unwrap it; one left in the tree is a storage saved directly
    (``torch.save({"s": t.untyped_storage()})``).
    """

    __slots__ = ("base", "offset", "size", "type_name")

    def __init__(
        self, base: StorageInfo, type_name: str, offset: int = 0, size: int | None = None
    ) -> None:
        self.base = base
        self.type_name = type_name
        self.offset = offset
        self.size = size  # None: the whole storage

    @property
    def untyped(self) -> bool:
        return self.type_name == "torch.storage.UntypedStorage"

    def __repr__(self) -> str:
        return f"StorageValue({self.type_name}, {self.base.key!r})"


class _Named(functools.partial[Any]):
    """A global ckpttool implements itself (a recorder); keeps the global's name. (A
    ``partial``: the C unpickler calls the recorder with no Python frame in between.)"""

    __ck_global__: str

    def __new__(cls, name: str, fn: Callable[..., Any]) -> _Named:
        self = super().__new__(cls, fn)
        self.__ck_global__ = name
        return self

    def __reduce__(self) -> Any:  # (partial's own would drop the name)
        return (_Named, (self.__ck_global__, self.func))


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


# -- tensors' views, checked as the recorders fill them in ---------------------------------------
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


_JUST_INT = frozenset({int})


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if (  # the common case, checked with the least work: a short tuple of plain ints >= 0
        type(value) is tuple
        and len(value) <= 64
        and _JUST_INT.issuperset(map(type, value))
        and (not value or min(value) >= 0)
    ):
        return value
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
    if isinstance(storage, StorageValue):
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
    if ref.dtype is None or (isinstance(ref, TypedTensorRef) and storage.dtype != "uint8"):
        ref.dtype = storage.dtype


# -- the plain builtins created for real (bound to the unpickler like its recorders) ------------
MAX_BYTEARRAY = 1 << 24  # bytearray(n) from a pickle: more than 16 MiB is an allocation bomb


def _bytes(self: Any, *args: Any) -> Any:
    if not args:
        return b""  # protocol 2 writes b"" as bytes()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise UnpickleRefused("bytes() with unexpected arguments")


def _set(self: Any, items: Any = ()) -> Any:
    return set(_finite(items))


def _frozenset(self: Any, items: Any = ()) -> Any:
    return frozenset(_finite(items))


def _complex(self: Any, real: Any = 0, imag: Any = 0) -> Any:
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise UnpickleRefused("complex() with non-numeric arguments")
    return complex(real, imag)


def _codecs_encode(self: Any, obj: Any, encoding: Any = "utf-8", *rest: Any) -> Any:
    if isinstance(obj, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8"):
        return obj.encode(encoding)
    raise UnpickleRefused("_codecs.encode with unexpected arguments")


def _bytearray(self: Any, source: Any = b"", *rest: Any) -> Any:
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
