"""The nodes of an unpickled object tree: plain records that never hold tensor bytes.

Every tensor is a :class:`TensorRef` that points at a :class:`StorageInfo` (where the bytes lie in
the file) and every object the pickle named but ckpttool does not create is an :class:`Opaque`
placeholder. :mod:`ckpttool.tree` walks them; :mod:`ckpttool.model` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import dtypes


@dataclass(frozen=True)
class StorageInfo:
    """One storage record: dtype, size, the device it was saved from, where its bytes are."""

    key: str
    dtype: str
    numel: int
    location: str  # the saved device tag: "cpu", "cuda:0", ... ("" when the format has none)
    file: str  # the file that holds the bytes
    offset: int  # absolute offset of the first byte in ``file``
    record: str | None = None  # zip entry name, for zip-based formats
    compressed: bool = False  # a deflated zip record: bytes must be inflated, not copied
    big_endian: bool = False
    crc: int | None = None  # the CRC-32 the zip archive records for this storage's bytes
    header: int | None = None  # absolute offset of the zip record's local header

    @property
    def itemsize(self) -> int:
        return dtypes.get(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def quick(
        cls,
        key: str,
        dtype: str,
        numel: int,
        location: str,
        file: str,
        offset: int,
        record: str | None,
        compressed: bool,
        big_endian: bool,
        crc: int | None,
        header: int | None = None,
    ) -> StorageInfo:
        """``StorageInfo(...)`` without the frozen dataclass' setattr per field (readers make
        one per storage record: a thousand in a large checkpoint)."""
        self = object.__new__(cls)
        self.__dict__.update(
            key=key,
            dtype=dtype,
            numel=numel,
            location=location,
            file=file,
            offset=offset,
            record=record,
            compressed=compressed,
            big_endian=big_endian,
            crc=crc,
            header=header,
        )
        return self


PACKED = {"quint4x2": 2, "quint2x4": 4}  # values per storage element of packed dtypes


class TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, stride) of a storage."""

    __slots__ = (
        "attributes",
        "dtype",
        "kind",
        "metadata",
        "parameter",
        "quantizer",
        "requires_grad",
        "shape",
        "storage",
        "storage_offset",
        "stride",
        "subclass",
    )

    def __init__(
        self,
        storage: StorageInfo | None,
        storage_offset: int = 0,
        shape: tuple[int, ...] = (),
        stride: tuple[int, ...] = (),
        *,
        dtype: str | None = None,
        requires_grad: bool = False,
        kind: str = "tensor",
    ) -> None:
        self.storage = storage
        self.storage_offset = storage_offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype or (storage.dtype if storage else "float32")
        self.requires_grad = requires_grad
        # "tensor", "parameter", "quantized", "legacy-typed-tensor"
        self.kind = kind
        self.quantizer: Any = None  # quantizer parameters of a quantized tensor
        self.subclass: str | None = None  # a tensor subclass' global name (_rebuild_from_type_v2)
        self.attributes: Any = None  # Python attributes set on the tensor (its __dict__)
        self.metadata: Any = None  # _rebuild_tensor_v2's metadata: {"conj": True}, {"neg": True}
        self.parameter = False  # a 2017 typed tensor wrapped in a Parameter (kind stays)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return dtypes.get(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        per = PACKED.get(self.dtype, 1)
        return -(-self.numel // per) * self.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=False):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def extent(self) -> tuple[int, int]:
        """The element range [lo, hi) of the storage that this view touches (empty: lo == hi)."""
        if 0 in self.shape:  # no elements
            return (self.storage_offset, self.storage_offset)
        first = last = self.storage_offset  # one pass: checks read it for every tensor
        for s, st in zip(self.shape, self.stride, strict=True):
            if st < 0:
                first += (s - 1) * st
            last += (s - 1) * st
        per = PACKED.get(self.dtype, 1)  # quint4x2 & co.: several values in each storage byte
        return (first // per, -(-(last + 1) // per))

    def __setstate__(self, state: Any) -> None:
        # Old pickles BUILD a rebuilt tensor or Parameter with (requires_grad, volatile, hooks).
        if isinstance(state, tuple) and state and isinstance(state[0], bool):
            self.requires_grad = state[0]
        elif isinstance(state, dict) and state:
            self.attributes = state

    def __repr__(self) -> str:
        loc = self.storage.location if self.storage else "?"
        return f"TensorRef({self.dtype}, {list(self.shape)}, {loc})"


class _OpaqueMeta(type):
    """Tells a call (REDUCE: ``Cls(*args)``) from NEWOBJ (``Cls.__new__(Cls, *args)``): the
    unpickler calls the class for the first and only ``__new__`` for the second."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)  # Opaque.__init__ does nothing
        obj.__dict__["ck_how"] = "call"
        return obj


class Opaque(dict, metaclass=_OpaqueMeta):
    """A placeholder for an object the pickle names but ckpttool never imports or creates.

    It records the global's name (``__ck_module__`` and ``__ck_qualname__`` as the pickle
    spells them), how the pickle built it (``ck_how``: ``"call"``, called with ``args``; or
    ``"newobj"``, ``cls.__new__(cls, *args, **kwargs)``), the state given to ``__setstate__``
    (BUILD; ``(state, slotstate)`` stays a tuple), and any list or dict items the pickle
    appended. Readers create one subclass per global name (see ``unpickler``).
    """

    __ck_global__: str = "?"
    __ck_module__: str = ""
    __ck_qualname__: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = super().__new__(cls)
        self.__dict__["ck_args"] = args
        self.__dict__["ck_kwargs"] = kwargs
        self.__dict__["ck_state"] = None
        self.__dict__["ck_list"] = []
        self.__dict__["ck_how"] = "newobj"
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the pickle's args are kept in __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["ck_state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["ck_list"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["ck_list"].extend(items)

    @property
    def global_name(self) -> str:
        return type(self).__ck_global__

    @property
    def args(self) -> tuple[Any, ...]:
        return self.__dict__["ck_args"]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.__dict__["ck_kwargs"]

    @property
    def state(self) -> Any:
        return self.__dict__["ck_state"]

    @property
    def list_items(self) -> list[Any]:
        return self.__dict__["ck_list"]

    @property
    def how(self) -> str:
        """``"call"`` (REDUCE, or INST/OBJ with arguments) or ``"newobj"`` (NEWOBJ, NEWOBJ_EX,
        INST/OBJ without arguments: ``cls.__new__(cls)``)."""
        how: str = self.__dict__["ck_how"]
        return how

    def __repr__(self) -> str:
        return f"<{self.global_name}>"

    __hash__ = object.__hash__  # type: ignore[assignment]  # placeholders may be dict keys

    def __eq__(self, other: object) -> bool:
        return self is other
