"""What each side of a comparison holds, read from the file's metadata (no tensor bytes).

``diff`` compares two :class:`Side` s: the tensors in scope as :class:`Operand` s (dtype, shape,
and their elements piece by piece, mapped from the file) and the non-tensor entries; a
safetensors side also its tied names and its metadata, any other side what safetensors could
hold of it. ``check``'s sides (``keysets``) share the helpers below: the state dict chosen,
tied names, the notes about a folder. A new input kind (a distributed checkpoint's logical
view, say) plugs in by producing these.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..analysis.describe import describe
from ..analysis.state_dicts import default_state_dict, find_state_dicts
from ..errors import CheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..readers.hf_folder import choose, config
from ..readers.hf_folder import note as folder_note
from ..readers.safetensors import ALIASES_KEY
from ..source import close_input, open_input
from ..tree import iter_tensors, walk
from .to_safetensors import scalar_metadata

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
    notes: tuple[str, ...] = ()  # e.g. the folder holds a second weight set, not read
    # A safetensors input holds tensors and string metadata only: ``entries`` are then its
    # metadata. Other inputs say what safetensors would hold of them (``to-safetensors``):
    # ``scalars``, their top-level scalars as strings, and ``unheld``, the entries it cannot.
    tensors_only: bool = False
    scalars: dict[str, str] = field(default_factory=dict)
    unheld: tuple[str, ...] = ()
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> its other names
    ties_config: bool = False  # a Hugging Face folder whose config.json ties its embeddings


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


def folder_notes(ckpt: Checkpoint) -> tuple[str, ...]:
    """The warning for an input folder holding two weight sets (of which one was read)."""
    note = folder_note(ckpt.facts.get("folder"))
    return (note,) if note else ()


def dangerous_globals(ckpt: Checkpoint) -> tuple[str, ...]:
    """The dangerous globals any pickle of the checkpoint names (ckpttool never runs them)."""
    return tuple(ckpt.verdict.dangerous) if ckpt.verdict is not None else ()


def chosen_state_dict(ckpt: Checkpoint, key: str | None) -> Any:
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
    sd = None if all_tensors and key is None else chosen_state_dict(obj, key)
    if sd is None:
        tensors = {n: _ref_operand(n, r) for n, r in iter_tensors(obj.root)}
        side = Side(obj.path, obj.format, None, tensors, _entries(obj.root, None), dangerous)
    else:
        side = _state_dict_side(obj, sd, dangerous)
    named = iter_tensors(obj.root) if sd is None else _named(sd)
    tied = {k: tuple(o for o in g if o != k) for g in tied_groups(named) for k in g}
    side = replace(side, notes=folder_notes(obj), tied=tied, ties_config=config_ties(obj))
    if obj.format in TENSORS_ONLY:
        return _tensors_only(side, obj)
    scalars, left = scalar_metadata(obj.root, obj.root if sd is None else sd.node, sd is None)
    return replace(side, scalars=scalars, unheld=tuple(x.name for x in left))


def _named(sd: Any) -> Iterable[tuple[str, Any]]:
    """A state dict's (key, value) pairs (a pickled module's tensors by path)."""
    return sd.node.items() if sd.source == "dict" else iter_tensors(sd.node)


def _state_dict_side(obj: Checkpoint, sd: Any, dangerous: tuple[str, ...]) -> Side:
    tensors = {k: _ref_operand(k, v) for k, v in _named(sd) if isinstance(v, TensorRef)}
    left_out = len(obj.tensors()) - sum(1 for _ in iter_tensors(sd.node))
    entries = _entries(obj.root, sd.path)
    if sd.source == "dict":  # keys whose value is None (absent buffers) are keys too
        entries.update(
            {f"{k} (in the state dict)": "None" for k, v in sd.node.items() if v is None}
        )
    return Side(obj.path, obj.format, sd.path, tensors, entries, dangerous, max(left_out, 0))


# Formats that hold named tensors and string metadata only (safetensors, a sharded index).
TENSORS_ONLY = ("safetensors", "hf-sharded")


def recorded_aliases(ckpt: Checkpoint) -> dict[str, str]:
    """{alias: stored name}: tied tensors ``to-safetensors`` stored once and recorded in
    ``__metadata__["ckpttool.aliases"]`` (``ckpttool.load`` gives them back under every name)."""
    if ckpt.format not in TENSORS_ONLY or not isinstance(ckpt.root, dict):
        return {}
    from ..readers.safetensors import recorded_aliases as parse

    return parse(ckpt.path, ckpt.facts.get("metadata"), ckpt.root)


def _tensors_only(side: Side, ckpt: Checkpoint) -> Side:
    """A safetensors side: its tied tensors under every name, its metadata as its entries."""
    tensors = dict(side.tensors)
    for alias, stored in recorded_aliases(ckpt).items():
        if stored in tensors:
            tensors[alias] = replace(tensors[stored], name=alias)
    meta = ckpt.facts.get("metadata") or {}
    entries = {k: v for k, v in meta.items() if k not in ("format", ALIASES_KEY)}
    return replace(side, tensors=tensors, entries=entries, tensors_only=True)


def _distributed_side(dc: Any, all_tensors: bool) -> Side:
    model = [t for t in dc.tensors if t.group == "model"]
    chosen = dc.tensors if all_tensors or not model else model
    tensors = {t.name: _logical_operand(t) for t in chosen}
    entries = {k: describe(v, 120) for k, v in dc.entries.items()}
    scope = None if chosen is dc.tensors else "model"
    return Side(dc.path, dc.kind, scope, tensors, entries, (), len(dc.tensors) - len(chosen))


def tied_groups(named: Iterable[tuple[str, Any]]) -> list[tuple[str, ...]]:
    """Groups of names whose tensors are the same view of one storage (tied weights)."""
    views: dict[tuple[Any, ...], list[str]] = {}
    for name, ref in named:
        if isinstance(ref, TensorRef) and ref.storage is not None and ref.numel:
            where = (ref.storage.file, ref.storage.key, ref.storage_offset, ref.dtype)
            views.setdefault((*where, ref.shape, ref.stride), []).append(name)
    return [tuple(g) for g in views.values() if len(g) > 1]


def config_ties(ckpt: Checkpoint) -> bool:
    """Whether the Hugging Face model whose weights these are ties tensors that
    ``save_pretrained`` then stores once (``lm_head.weight`` as ``transformer.wte.weight``).

    True when the weights are a model folder's (opened from it, or the file it serves) whose
    ``config.json`` does not set ``tie_word_embeddings`` to false (absent means true:
    ``PretrainedConfig``'s default, which transformers 4 left out of the file) and whose
    ``architectures``, when listed, are not all base models without a head (``GPT2Model``).
    """
    fact = ckpt.facts.get("folder")
    folder = fact["path"] if fact else os.path.dirname(ckpt.path) or "."
    if not fact:
        try:
            chosen = choose(folder)
        except CheckpointError:
            return False
        if chosen is None or os.path.abspath(chosen.path) != os.path.abspath(ckpt.path):
            return False
    cfg = config(folder)
    if not cfg or cfg.get("tie_word_embeddings", True) is not True:
        return False
    names = cfg.get("architectures")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return not all(_BASE_MODEL.fullmatch(n) for n in names)
    return True


_BASE_MODEL = re.compile(r"(?!.*(?:For|Head)).*Model")  # GPT2Model, BertModel: no head
