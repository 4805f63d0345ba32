"""What each side of a comparison holds, read from the file's metadata (no tensor bytes).

``diff`` compares two :class:`Side` s: the tensors in scope as :class:`Operand` s (dtype, shape,
and their elements piece by piece, mapped from the file) and the non-tensor entries. ``check``
compares two :class:`KeySet` s: a state dict's keys, shapes and dtypes, from a checkpoint or
from a model built on torch's meta device. A new input kind (a distributed checkpoint's logical
view, say) plugs in by producing these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..analysis.describe import describe
from ..analysis.state_dicts import default_state_dict, find_state_dicts
from ..errors import CheckpointError, DangerousCheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..source import close_input, open_input
from ..tree import iter_tensors, walk

CHUNK_ELEMENTS = 1 << 19  # elements compared at a time: a few MB of float64 temporaries
MAX_ENTRIES = 100_000  # non-tensor leaves compared per side


# -- the two sides ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """One tensor to compare: its dtype, shape, and its elements in C order, piece by piece."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[Any], Iterator[Any]]  # (open files) -> 1-D numpy pieces, raw dtype


@dataclass(frozen=True)
class Side:
    """What one input contributes: the tensors in scope by key, and its non-tensor entries."""

    path: str
    format: str
    scope: str | None  # the state dict compared (its dotted path, "" the root); None: all
    tensors: dict[str, Operand]
    entries: dict[str, str]  # dotted path -> description of a non-tensor value
    dangerous: tuple[str, ...] = ()
    left_out: int = 0  # tensors outside the state dict in scope (not compared)


class Files:
    """Open input files by path, closed together (a sharded input has several)."""

    def __init__(self) -> None:
        self.fds: dict[str, Any] = {}

    def fd(self, path: str) -> Any:
        """A descriptor of a local file, a remote source for a URL."""
        if path not in self.fds:
            try:
                self.fds[path] = open_input(path)
            except OSError as exc:
                raise CheckpointError(path, exc.strerror or str(exc)) from None
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            close_input(fd)
        self.fds.clear()


def _ref_operand(name: str, ref: TensorRef) -> Operand:
    logical = getattr(ref.storage, "tensor", None)  # a distributed checkpoint's tensor
    segments = getattr(ref.storage, "segments", None)
    if logical is not None and segments:
        return _logical_operand(logical, name)

    def chunks(files: Files) -> Iterator[Any]:
        from ..analysis.arrays import iter_chunks, tensor_array

        if ref.numel == 0:
            return
        fd = files.fd(ref.storage.file) if ref.storage and not ref.storage.compressed else None
        yield from iter_chunks(tensor_array(ref, fd=fd), CHUNK_ELEMENTS)

    return Operand(name, ref.dtype, tuple(ref.shape), ref.nbytes, chunks)


def _logical_operand(tensor: Any, name: str | None = None) -> Operand:
    """A tensor of a distributed checkpoint: dense little-endian bytes spread over segments."""

    def chunks(files: Files) -> Iterator[Any]:
        import mmap

        import numpy as np

        from ..analysis.arrays import numpy_dtype

        dt = numpy_dtype(tensor.dtype)
        for seg in tensor.segments:
            fd = files.fd(seg.file)
            aligned = seg.offset - seg.offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(
                fd, seg.offset + seg.nbytes - aligned, offset=aligned, access=mmap.ACCESS_READ
            )
            flat = np.frombuffer(mapped, dt, seg.nbytes // dt.itemsize, seg.offset - aligned)
            for i in range(0, flat.shape[0], CHUNK_ELEMENTS):
                yield flat[i : i + CHUNK_ELEMENTS]

    return Operand(name or tensor.name, tensor.dtype, tuple(tensor.shape), tensor.nbytes, chunks)


def _entries(root: Any, skip: str | None) -> dict[str, str]:
    """Every non-tensor leaf of the tree (and each object's class) by dotted path."""
    out: dict[str, str] = {}
    inside = (lambda p: p == skip or p.startswith(skip + ".")) if skip else None
    for path, node in walk(root):
        if isinstance(node, TensorRef) or (skip == "" and path):
            continue
        if inside is not None and inside(path):
            continue
        if isinstance(node, Opaque):
            out[path or "(root)"] = f"<{node.global_name}>"
        elif isinstance(node, (dict, list, tuple, set, frozenset)):
            if not node and path:
                out[path] = describe(node)
        elif path:
            out[path] = describe(node, 120)
        if len(out) >= MAX_ENTRIES:
            break
    return out


def dangerous_globals(ckpt: Checkpoint) -> tuple[str, ...]:
    """The dangerous globals any pickle of the checkpoint names (ckpttool never runs them)."""
    return tuple(ckpt.verdict.dangerous) if ckpt.verdict is not None else ()


def _state_dict(ckpt: Checkpoint, key: str | None) -> Any:
    """The state dict at dotted path ``key``, or the model's (None when there is none)."""
    if key is None:
        return default_state_dict(ckpt.root)
    sd = next((s for s in find_state_dicts(ckpt.root) if s.path == key), None)
    if sd is None:
        raise CheckpointError(ckpt.path, f"holds no state dict at {key!r}")
    return sd


def open_side(
    source: str | os.PathLike[str] | Any, *, all_tensors: bool = False, key: str | None = None
) -> Side:
    """Open one input for comparison: its model state dict (or every tensor), its entries.

    Args:
        source: a path ``open_checkpoint`` reads, or an already opened ``Checkpoint`` (or a
            distributed checkpoint's logical view, ``readers.distributed.DistributedCheckpoint``).
        all_tensors: compare every tensor by its dotted path instead of the model state dict.
        key: the dotted path of the state dict to compare (default: the model's).
    """
    from ..readers import open_checkpoint

    obj = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Checkpoint):
        return _distributed_side(obj, all_tensors)
    dangerous = dangerous_globals(obj)
    sd = None if all_tensors and key is None else _state_dict(obj, key)
    if sd is None:
        tensors = {n: _ref_operand(n, r) for n, r in iter_tensors(obj.root)}
        return Side(obj.path, obj.format, None, tensors, _entries(obj.root, None), dangerous)
    if sd.source == "dict":
        named: Iterable[tuple[str, Any]] = sd.node.items()
    else:
        named = iter_tensors(sd.node)
    tensors = {k: _ref_operand(k, v) for k, v in named if isinstance(v, TensorRef)}
    left_out = len(obj.tensors()) - sum(1 for _ in iter_tensors(sd.node))
    entries = _entries(obj.root, sd.path)
    if sd.source == "dict":  # keys whose value is None (absent buffers) are keys too
        entries.update(
            {f"{k} (in the state dict)": "None" for k, v in sd.node.items() if v is None}
        )
    return Side(obj.path, obj.format, sd.path, tensors, entries, dangerous, max(left_out, 0))


def _distributed_side(dc: Any, all_tensors: bool) -> Side:
    model = [t for t in dc.tensors if t.group == "model"]
    chosen = dc.tensors if all_tensors or not model else model
    tensors = {t.name: _logical_operand(t) for t in chosen}
    entries = {k: describe(v, 120) for k, v in dc.entries.items()}
    scope = None if chosen is dc.tensors else "model"
    return Side(dc.path, dc.kind, scope, tensors, entries, (), len(dc.tensors) - len(chosen))


# -- key sets (check) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeySpec:
    """What a state dict holds under one key (dtype and shape None: not a tensor)."""

    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class KeySet:
    """One side of a check: a state dict's keys, and which keys name the same tensor."""

    source: str  # the file, or the model factory
    path: str | None  # the state dict's dotted path in the file ("" the root); None: a model
    keys: dict[str, KeySpec]
    tied: tuple[tuple[str, ...], ...] = ()  # groups of keys holding one tensor
    dangerous: tuple[str, ...] = ()  # dangerous globals the file's pickle names (never run)


def checkpoint_keys(path: str | os.PathLike[str], key: str | None = None) -> KeySet:
    """The keys, shapes and dtypes of a checkpoint's model state dict (or the one at ``key``)."""
    from ..readers import open_checkpoint

    ckpt = open_checkpoint(path)
    dangerous = dangerous_globals(ckpt)
    sd = _state_dict(ckpt, key)
    if sd is None:
        if dangerous:
            raise DangerousCheckpointError(ckpt.path, list(dangerous))
        raise CheckpointError(ckpt.path, "holds no state dict (no mapping of names to tensors)")
    named = list(sd.node.items()) if sd.source == "dict" else list(iter_tensors(sd.node))
    keys: dict[str, KeySpec] = {}
    views: dict[tuple[Any, ...], list[str]] = {}
    for name, value in named:
        if isinstance(value, TensorRef):
            keys[name] = KeySpec(value.dtype, tuple(value.shape))
            if value.storage is not None:
                where = (value.storage.file, value.storage.key, value.storage_offset)
                views.setdefault((*where, value.shape, value.stride), []).append(name)
        else:
            keys[name] = KeySpec(None, None)
    tied = tuple(tuple(g) for g in views.values() if len(g) > 1)
    return KeySet(ckpt.path, sd.path, keys, tied, dangerous)


def model_keys(spec: str) -> KeySet:
    """Build ``module:factory`` on torch's meta device and read its ``state_dict()`` keys.

    This imports the module and runs the factory (user code): callers opt in explicitly. The
    module may also be a ``.py`` file path; the working directory is importable.
    """
    import importlib
    import importlib.util
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(None, f"model {spec!r} is not MODULE:FACTORY")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            loaded = importlib.util.spec_from_file_location("_ckpttool_model", module_name)
            if loaded is None or loaded.loader is None:
                raise CheckpointError(module_name, "cannot be imported")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, attr)
        import torch

        with torch.device("meta"):
            model = factory()
        state = model.state_dict(keep_vars=True)
    except CheckpointError:
        raise
    except Exception as exc:  # user code: any failure is reported as one line
        raise CheckpointError(None, f"building the model {spec!r} failed: {exc!r}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    keys: dict[str, KeySpec] = {}
    by_id: dict[int, list[str]] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            keys[name] = KeySpec(str(value.dtype).removeprefix("torch."), tuple(value.shape))
            by_id.setdefault(id(value), []).append(name)
        else:
            keys[name] = KeySpec(None, None)
    return KeySet(spec, None, keys, tuple(tuple(g) for g in by_id.values() if len(g) > 1))
