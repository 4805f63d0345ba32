"""Plain equivalents of pickled objects that torch's ``weights_only`` loader refuses.

Built from the placeholder's recorded state, never by importing its class:
``argparse.Namespace`` -> dict, numpy scalars -> Python numbers, numpy arrays -> tensors
(new storages made from the pickled bytes), dict subclasses -> dict, enum members -> their value,
other objects -> a dict of their attributes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..analysis.describe import numpy_dtype_code, numpy_scalar_value
from ..model import Opaque, StorageInfo, TensorRef
from ..unpickling.policy import TORCH_ALLOWED

_NUMPY_ARRAY = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY_TO_TORCH = {
    "f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32",
    "i2": "int16", "i1": "int8", "u1": "uint8", "b1": "bool", "u2": "uint16", "u4": "uint32",
    "u8": "uint64", "c8": "complex64", "c16": "complex128",
}  # fmt: skip


class NotPlain(Exception):
    pass


@dataclass
class MemoryStorage:
    """Bytes for a new storage, made from a pickled numpy array (its StorageInfo has file "")."""

    data: bytes
    dtype: str
    numel: int


def _array_to_tensor(obj: Opaque, made: dict[str, MemoryStorage]) -> Any:
    state = obj.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise NotPlain("a numpy array with unexpected state")
    _version, shape, dtype_obj, fortran, raw = state
    code = numpy_dtype_code(dtype_obj)
    if code is None:
        raise NotPlain("a numpy array of unknown dtype")
    if code == "O" or isinstance(raw, list):
        return list(raw) if isinstance(raw, list) else raw
    torch_dtype = _NUMPY_TO_TORCH.get(code.lstrip("<>=|"))
    dstate = dtype_obj.state
    if torch_dtype is None or (isinstance(dstate, tuple) and len(dstate) > 1 and dstate[1] == ">"):
        raise NotPlain(f"a numpy array of dtype {code}")
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple):
        raise NotPlain("a numpy array without its bytes")
    from .. import dtypes

    itemsize = dtypes.get(torch_dtype).itemsize
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != len(raw):
        raise NotPlain("a numpy array whose bytes do not match its shape")
    key = f"numpy:{len(made)}"
    made[key] = MemoryStorage(bytes(raw), torch_dtype, numel)
    storage = StorageInfo(key, torch_dtype, numel, "cpu", "", -1)
    strides: list[int] = []
    acc = 1
    dims = list(shape)
    order = dims if fortran else list(reversed(dims))
    for s in order:
        strides.append(acc)
        acc *= max(s, 1)
    stride = tuple(strides) if fortran else tuple(reversed(strides))
    return TensorRef(storage, 0, tuple(shape), stride, dtype=torch_dtype)


def plain_equivalent(obj: Opaque, made: dict[str, MemoryStorage]) -> Any:
    """The plain value that stands for ``obj``, or raise NotPlain."""
    name = obj.global_name
    scalar = numpy_scalar_value(obj)
    if scalar is not None:
        return scalar
    if name in _NUMPY_ARRAY:
        return _array_to_tensor(obj, made)
    if name in ("numpy.dtype", "numpy.core.numeric.dtype"):
        return numpy_dtype_code(obj) or "?"
    if name == "argparse.Namespace" or (isinstance(obj.state, dict) and not obj.args):
        out: dict[Any, Any] = {}
        out.update(dict.items(obj))
        if isinstance(obj.state, dict):
            out.update(obj.state)
        return out
    if len(obj) and obj.state is None:  # a dict subclass (Lightning's AttributeDict)
        return OrderedDict(dict.items(obj))
    if obj.list_items and obj.state is None and not obj.args:
        return list(obj.list_items)
    if len(obj.args) == 1 and obj.state is None and not len(obj):  # enum member: Cls(value)
        value = obj.args[0]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
    if not obj.args and obj.state is None and not len(obj) and not obj.list_items:
        return None  # e.g. torch.nn.backends.thnn._get_thnn_function_backend()
    state = obj.state
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and (state[0] is None or isinstance(state[0], dict))
        and (state[1] is None or isinstance(state[1], dict))
    ):  # (__dict__, __slots__ values) as BUILD gets them
        return {**(state[0] or {}), **(state[1] or {})}
    raise NotPlain(f"no plain equivalent for {name}")


def needs_plain(obj: Any) -> bool:
    return isinstance(obj, Opaque) and obj.global_name not in TORCH_ALLOWED
