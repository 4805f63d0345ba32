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
from typing import Any

from ..model import Opaque
from ..unpickling.unpickler import DTypeRef, StorageType, StorageValue, _Named
from .pickle_globals import GlobalRef
from .pt_cpickle import pickle_fast
from .pt_reduce import (
    NeedsProtocol4,
    OutStorage,
    Pickled,
    Reductions,
    __newobj__,
    __newobj_ex__,
    spelling,
)

__all__ = [
    "GlobalRef",
    "OutStorage",
    "Pickled",
    "TreePickler",
    "dumps",
    "pickle_python",
    "pickle_tree",
]


_PurePickler: Any = pickle._Pickler  # the Python pickler (overridable per object type)


class TreePickler(Reductions, _PurePickler):
    """Protocol-2 pickler (what torch.save uses) for ckpttool's trees; protocol 4 when the
    tree needs it (objects built with keyword arguments, dotted global names). In Python:
    ``pt_cpickle`` writes the same bytes at C speed where it can."""

    def __init__(
        self,
        file: io.BytesIO,
        storage_of: dict[int, OutStorage],
        dtype_of: dict[int, str],
        protocol: int = 2,
    ) -> None:
        super().__init__(file, protocol=protocol)
        self._init_reductions(storage_of, dtype_of)

    dispatch = _PurePickler.dispatch.copy()

    def persistent_id(self, obj: Any) -> Any:
        return self._storage_pid(obj)

    def reducer_override(self, obj: Any) -> Any:
        reduced = self._reduce_tensor(obj)
        if reduced is not None:
            return reduced
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
        module, attr = spelling(obj)
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


def pickle_tree(root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]) -> Pickled:
    """The pickle of ``root`` at protocol 2 (as torch.save writes it), or at protocol 4 when
    the tree holds what only protocol 4 can write. CPython's C pickler writes it where it
    writes the same bytes (``pt_cpickle``), ten times faster."""
    fast = pickle_fast(root, storage_of, dtype_of)
    return fast if fast is not None else pickle_python(root, storage_of, dtype_of)


def pickle_python(
    root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]
) -> Pickled:
    """:func:`pickle_tree` by the Python pickler alone."""
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
