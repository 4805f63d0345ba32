"""Compare what ``torch.load`` builds from two files, object for object.

:func:`load` reads a file with torch through :class:`RecordingUnpickler`: torch's own globals are
real, every other global becomes a stand-in class that records how the pickle built it
(``__new__`` arguments, a call's arguments, BUILD state, list and dict items), so classes that
are not importable compare too, and NEWOBJ never compares equal to a call. :func:`canon` turns
the loaded object into nested tuples that capture types, tensor dtype/shape/stride/offset,
bitwise storage bytes, conj/neg bits, storage sharing, Parameter-ness, ``requires_grad``, tensor
attributes and object identity (a second reference becomes ``("ref", n)``). :func:`first_diff`
names the first place where two canonical forms differ.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

_BUILTINS_REAL = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("builtins", "object"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("_codecs", "encode"),
}


class StandInMeta(type):
    """A call ``Cls(*args)`` (REDUCE, INST/OBJ with arguments) records how it was made."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = cls.__new__(cls)
        obj.__dict__["_how"] = ("call", args, kwargs)
        return obj


class StandIn:
    """Base of the stand-in classes; ``cls.__new__(cls, *args)`` (NEWOBJ) records its args."""

    __standin__ = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        obj.__dict__.update(_how=("new", args, kwargs), _state=[], _items=[], _list=[])
        return obj

    def _rec(self, key: str) -> list[Any]:
        if key not in self.__dict__:
            self.__dict__[key] = []
        return self.__dict__[key]  # type: ignore[no-any-return]

    def __setstate__(self, state: Any) -> None:
        self._rec("_state").append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._rec("_items").append((key, value))

    def append(self, item: Any) -> None:
        self._rec("_list").append(item)

    def extend(self, items: Any) -> None:
        self._rec("_list").extend(items)

    def __setattr__(self, name: str, value: Any) -> None:
        self._rec("_state").append(("setattr", name, value))

    def __hash__(self) -> int:
        return id(self)


class RecordingUnpickler(pickle.Unpickler):
    """torch's globals real (all of ``torch.*``, or only its weights_only allowlist when
    ``strict``), a few builtins real, everything else a recording stand-in; never imports
    a module outside torch."""

    strict = False

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.cuda" and name.endswith("Tensor"):
            # 2017 pickles build ``torch.cuda.FloatTensor()`` then set its CPU-mapped storage;
            # on a machine without CUDA the CPU class stands for it (what map_location gives)
            module = "torch"
        full = f"{module}.{name}"
        if full == "torch._tensor._rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if (module, name) in _BUILTINS_REAL:
            return super().find_class(module, name)
        torch_global = module == "torch" or module.startswith("torch.")
        if torch_global and (not self.strict or full in _allowed() or _is_rebuild(full)):
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError):
                pass
        return stand_in(full)


def _is_rebuild(full: str) -> bool:
    return full.startswith("torch._utils._rebuild_")


_ALLOWED: set[str] = set()
_CLASSES: dict[str, type] = {}  # one stand-in class per global name, shared by all loads
_TENSOR_CLASSES: dict[str, type] = {}


def _allowed() -> set[str]:
    if not _ALLOWED:
        from torch import _weights_only_unpickler as wo

        _ALLOWED.update(wo._get_allowed_globals())
    return _ALLOWED


def stand_in(full: str) -> type:
    cls = _CLASSES.get(full)
    if cls is None:
        cls = StandInMeta(full.rpartition(".")[2] or "X", (StandIn,), {"__standin__": full})
        _CLASSES[full] = cls
    return cls


def _tensor_stand_in(full: str) -> type:
    cls = _TENSOR_CLASSES.get(full)
    if cls is None:
        cls = type("TensorStandIn", (torch.Tensor,), {"__standin__": full})
        _TENSOR_CLASSES[full] = cls
    return cls


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if isinstance(new_type, type) and issubclass(new_type, StandIn):
        new_type = _tensor_stand_in(new_type.__standin__)
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _pickle_module(strict: bool) -> types.ModuleType:
    mod = types.ModuleType("recording_pickle")
    cls = type("Unpickler", (RecordingUnpickler,), {"strict": strict})
    mod.Unpickler = cls  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: cls(f, **kw).load()  # type: ignore[attr-defined]
    mod.__name__ = "pickle"
    return mod


def load(path: str, *, strict: bool = False) -> Any:
    """``torch.load`` with stand-ins for every non-torch global (``strict``: for non-allowlisted
    torch globals too); storages land on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(strict)
        )


def load_real(path: str) -> Any:
    """``torch.load(weights_only=False)`` with real classes: ONLY for files the zoo made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=False)


# -- canonical form -------------------------------------------------------------------------
def _digest(st: Any) -> str:
    """SHA-256 of a storage's bytes (bitwise, so NaN payloads and -0.0 count)."""
    import hashlib

    raw = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _dims(dims: Any) -> tuple[Any, ...]:
    """Sizes or strides; a jagged tensor's ragged size (a fresh symbolic ``j<N>`` per load)
    compares as ``"ragged"``."""
    return tuple(d if isinstance(d, int) else "ragged" for d in dims)


def _float(x: float) -> Any:
    return ("float", struct.pack("<d", x)) if not math.isnan(x) else ("float", "nan")


class _Canon:
    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.keep: list[Any] = []  # keep objects alive so ids stay unique
        self.storages: dict[tuple[int, int], int] = {}

    def ref(self, obj: Any) -> tuple[str, int] | None:
        n = self.ids.get(id(obj))
        if n is not None:
            return ("ref", n)
        self.ids[id(obj)] = len(self.ids)
        self.keep.append(obj)
        return None

    def storage(self, st: Any) -> Any:
        if st.device.type == "meta":
            return ("meta-storage", st.nbytes())
        ident = (st.data_ptr(), st.nbytes())
        n = self.storages.get(ident)
        if n is not None and st.nbytes():
            return ("storage", n)
        self.storages[ident] = len(self.storages)
        return ("storage", len(self.storages) - 1, st.nbytes(), _digest(st))

    def tensor(self, t: torch.Tensor) -> Any:
        head = (
            "tensor",
            f"{type(t).__module__}.{type(t).__qualname__}",
            getattr(type(t), "__standin__", None),
            str(t.dtype),
            _dims(t.shape) if not (t.is_nested and t.layout == torch.strided) else None,
            str(t.layout),
            t.device.type,
            bool(t.requires_grad),
            isinstance(t, torch.nn.Parameter),
        )
        if type(t).__name__ == "DTensor":
            body: Any = (
                self.go(t.to_local()),
                repr(t.placements),
                t.device_mesh.mesh.tolist(),
                t.stride(),
            )
        elif t.is_nested and t.layout == torch.jagged:
            body = (
                self.go(t._values),
                self.go(t._offsets),
                self.go(t._lengths),
                t._ragged_idx,
                _dims(t.stride()),
            )
        elif t.is_nested:
            body = (
                self.go(t._nested_tensor_size()),
                self.go(t._nested_tensor_strides()),
                t._nested_tensor_storage_offsets().tolist(),
                self.storage(t.untyped_storage()),
            )
        elif t.layout == torch.sparse_coo:
            body = (t.is_coalesced(), self.go(t._indices()), self.go(t._values()))
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            body = (self.go(t.crow_indices()), self.go(t.col_indices()), self.go(t.values()))
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            body = (self.go(t.ccol_indices()), self.go(t.row_indices()), self.go(t.values()))
        else:
            q: Any = None
            if t.is_quantized:
                scheme = t.qscheme()
                if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    q = (str(scheme), _float(t.q_scale()), t.q_zero_point())
                else:
                    q = (
                        str(scheme),
                        self.go(t.q_per_channel_scales()),
                        self.go(t.q_per_channel_zero_points()),
                        t.q_per_channel_axis(),
                    )
            body = (
                t.stride(),
                t.storage_offset(),
                bool(t.is_conj()),
                bool(t.is_neg()),
                q,
                self.storage(t.untyped_storage()),
            )
        attrs = self.go(dict(t.__dict__)) if t.__dict__ else None
        return (*head, body, attrs)

    def go(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, str, bytes)):
            return (type(obj).__name__, obj)
        if isinstance(obj, float):
            return _float(obj)
        if isinstance(obj, complex):
            return ("complex", _float(obj.real), _float(obj.imag))
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return (type(obj).__name__, str(obj))
        if isinstance(obj, torch.SymInt):  # a jagged tensor's ragged size: fresh per load
            return ("ragged",)
        if isinstance(obj, torch.Size):
            return ("Size", tuple(obj))
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return ("tuple", tuple(self.go(v) for v in obj))
        if isinstance(obj, type):
            return ("class", getattr(obj, "__standin__", f"{obj.__module__}.{obj.__qualname__}"))
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
            return ("function", f"{obj.__module__}.{obj.__qualname__}")
        seen = self.ref(obj)
        if seen is not None:
            return seen
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, torch.UntypedStorage):
            return ("UntypedStorage", self.storage(obj))
        if isinstance(obj, torch.TypedStorage):
            return ("TypedStorage", str(obj.dtype), self.storage(obj._untyped_storage))
        if isinstance(obj, StandIn):
            d = obj.__dict__
            how, args, kwargs = d.get("_how", ("?", (), {}))
            return (
                "standin",
                type(obj).__standin__,
                how,
                self.go(args),
                self.go(kwargs),
                self.go(d.get("_state", [])),
                self.go(d.get("_items", [])),
                self.go(d.get("_list", [])),
            )
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if isinstance(obj, dict):
            items = [(self.go(k), self.go(v)) for k, v in obj.items()]
            extra = self.go(dict(obj.__dict__)) if getattr(obj, "__dict__", None) else None
            return ("dict", name, items, extra)
        if isinstance(obj, list):
            extra = self.go(dict(obj.__dict__)) if getattr(obj, "__dict__", None) else None
            return ("list", name, [self.go(v) for v in obj], extra)
        if isinstance(obj, (set, frozenset)):
            return ("set", name, sorted(repr(self.go(v)) for v in obj))
        if isinstance(obj, bytearray):
            return ("bytearray", bytes(obj))
        if isinstance(obj, tuple):  # a namedtuple
            return ("namedtuple", name, tuple(self.go(v) for v in obj))
        state: list[Any] = []
        if hasattr(obj, "__dict__"):
            state.append(self.go(dict(obj.__dict__)))
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    state.append((slot, self.go(getattr(obj, slot))))
        if not state:
            state.append(("repr", repr(obj)))
        return ("object", name, state)


def tensors_in(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from what torch loaded (containers, stand-ins' records), each
    once; a tensor's own parts (a nested tensor's values, a DTensor's shard) are not entered."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(k, seen)
            yield from tensors_in(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors_in(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from tensors_in(vars(obj), seen)


def canon(obj: Any) -> Any:
    """The canonical, comparable form of a loaded object graph."""
    return _Canon().go(obj)


def first_diff(a: Any, b: Any, path: str = "") -> str | None:
    """Where two canonical forms first differ (``None`` when equal)."""
    if type(a) is not type(b):
        return f"{path or '<root>'}: {_short(a)} != {_short(b)}"
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            return f"{path or '<root>'}: length {len(a)} != {len(b)}: {_short(a)} != {_short(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_diff(x, y, f"{path}/{i}")
            if d:
                return d
        return None
    if a != b:
        return f"{path or '<root>'}: {_short(a)} != {_short(b)}"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 300 else text[:297] + "..."


def same(path_a: str, path_b: str, *, strict: bool = False) -> str | None:
    """Load both files with stand-ins; return where they differ, or ``None``."""
    return first_diff(canon(load(path_a, strict=strict)), canon(load(path_b, strict=strict)))


def same_real(path_a: str, path_b: str) -> str | None:
    """Load both zoo files with their real classes; return where they differ, or ``None``."""
    return first_diff(canon(load_real(path_a)), canon(load_real(path_b)))


__all__ = [
    "OrderedDict",
    "canon",
    "first_diff",
    "io",
    "load",
    "load_real",
    "same",
    "same_real",
    "tensors_in",
]
