"""Plain equivalents of pickled objects that torch's ``weights_only`` loader refuses.

Built from the placeholder's recorded state, never by importing its class:
``argparse.Namespace`` -> dict, numpy scalars -> Python numbers, numpy arrays -> tensors
(new storages made from the pickled bytes), dict subclasses -> dict, enum members -> their value,
other objects -> a dict of their attributes, a ``frozenset`` -> a ``set`` (a tuple where it must
stay hashable: a dict key, a set member), a tensor subclass -> a plain tensor with the same
data, view and attributes, a torch memory format (``torch.channels_last``) -> its name.

:func:`judge_weights_only` then says, from the globals a written pickle names and its
protocol, whether ``torch.load(weights_only=True)`` opens it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..analysis.describe import numpy_dtype_code, numpy_scalar_value
from ..errors import CheckpointError
from ..model import Opaque, StorageInfo, TensorRef
from ..tree import KEEP, transform, walk
from ..unpickling.lists import TORCH_CONSTANTS, TORCH_ON_IMPORT
from ..unpickling.policy import TORCH_ALLOWED
from ..writers.pt_pickle import Pickled

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
    if name == "copyreg._reconstructor" and isinstance(obj.state, dict) and not len(obj):
        return dict(obj.state)  # an object pickled at protocols 0-1: Cls.__new__ + __dict__
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


def _must_hash(root: Any) -> set[int]:
    """The frozensets (by ``id``) that stand where a value must be hashable: in a dict key or
    a set member, directly or through tuples and frozensets."""
    out: set[int] = set()
    for _, node in walk(root):
        if isinstance(node, dict):
            todo = list(dict.keys(node))
        elif isinstance(node, (set, frozenset)):
            todo = list(node)
        else:
            continue
        while todo:
            x = todo.pop()
            if isinstance(x, frozenset) and id(x) not in out:
                out.add(id(x))
                todo.extend(x)
            elif isinstance(x, tuple):
                todo.extend(x)
    return out


def _plain_tensor(ref: TensorRef, replace: Any) -> TensorRef | None:
    """``ref`` without its subclass and with plain attributes, or None when it is plain."""
    subclass = ref.subclass if ref.subclass and ref.subclass not in TORCH_ALLOWED else None
    attrs = transform(ref.attributes, replace) if ref.attributes else ref.attributes
    if subclass is None and attrs is ref.attributes:
        return None
    new = object.__new__(type(ref))
    for slot in TensorRef.__slots__:  # a TypedTensorRef adds none
        setattr(new, slot, getattr(ref, slot))
    new.subclass = None if subclass else ref.subclass
    new.attributes = attrs
    return new


def make_plain(path: str, root: Any, made: dict[str, MemoryStorage]) -> tuple[Any, list[str]]:
    """``root`` with every object torch's ``weights_only`` loader refuses replaced by its plain
    equivalent; the replacements made (``argparse.Namespace -> dict``). Raises
    :class:`CheckpointError` naming the first object that has none."""
    failures: list[str] = []
    replaced: list[str] = []
    hashed = _must_hash(root)

    def replace(node: Any) -> Any:
        if isinstance(node, frozenset):
            value: Any = tuple(sorted(node, key=repr)) if id(node) in hashed else set(node)
            replaced.append(f"builtins.frozenset -> {type(value).__name__}")
            return transform(value, replace)
        if isinstance(node, type) and issubclass(node, Opaque):
            if node.__ck_qualname__ in TORCH_CONSTANTS and node.__ck_module__.startswith("torch"):
                replaced.append(f"{node.__ck_qualname__} -> str")  # torch.channels_last
                return node.__ck_qualname__
            return KEEP
        if isinstance(node, TensorRef):
            new = _plain_tensor(node, replace)
            if new is not None and node.subclass != new.subclass:
                replaced.append(f"{node.subclass} -> tensor")
            return KEEP if new is None else new
        if not needs_plain(node):
            return KEEP
        try:
            value = plain_equivalent(node, made)
        except NotPlain as exc:
            failures.append(str(exc))
            return KEEP
        kind = type(value).__name__ if not isinstance(value, TensorRef) else "tensor"
        replaced.append(f"{node.global_name} -> {kind}")
        # Children of a replaced value may hold placeholders too.
        return transform(value, replace) if isinstance(value, (dict, list)) else value

    new_root = transform(root, replace)
    if failures:
        raise CheckpointError(path, f"cannot replace objects by plain equivalents: {failures[0]}")
    return new_root, replaced


@dataclass(frozen=True)
class WeightsOnly:
    """What ``torch.load(weights_only=True)`` (torch 2.13, nothing added to its allowlist) makes
    of a written pickle, judged from the globals it names and its protocol."""

    refused: list[str]  # the globals it names that the loader's allowlist lacks, in order
    protocol: int  # the loader reads protocol 2 only (it has no FRAME, STACK_GLOBAL, ...)

    @property
    def loadable(self) -> bool:
        return not self.refused and self.protocol == 2

    def why(self) -> str:
        """Why the loader refuses the pickle (empty when it does not)."""
        parts = []
        if self.refused:
            shown = ", ".join(self.refused[:4])
            parts.append(f"it pickles {shown}" + (" and more" if len(self.refused) > 4 else ""))
            if any(g in TORCH_ON_IMPORT for g in self.refused):
                parts.append(
                    "torch accepts jagged nested tensors and DTensors only once the loading "
                    "process imports torch._dynamo or torch.distributed.tensor"
                )
        if self.protocol != 2:
            parts.append(f"it needs pickle protocol {self.protocol}, and the loader reads 2")
        return "; ".join(parts)


def judge_weights_only(pickled: Pickled) -> WeightsOnly:
    """Whether ``torch.load(weights_only=True)`` opens a file holding ``pickled``."""
    refused = [g for g in pickled.globals if g not in TORCH_ALLOWED]
    return WeightsOnly(refused, pickled.protocol)
