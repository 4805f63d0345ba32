"""The lazy checkpoint model: plain records that never hold tensor bytes and never need torch.

A reader turns a file into a :class:`Checkpoint`: the unpickled object tree, in which every tensor
is a :class:`TensorRef` that points at a :class:`StorageInfo` (where the bytes lie in the file) and
every object the pickle named but ckpttool does not create is an :class:`Opaque` placeholder.
Those node records live in :mod:`ckpttool.nodes` (so :mod:`ckpttool.tree` can walk them without
this module) and are re-exported here; :meth:`Checkpoint.tensors` names them with the tree walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .nodes import PACKED, Opaque, StorageInfo, TensorRef
from .tree import iter_tensors

if TYPE_CHECKING:
    from .unpickling.policy import Verdict

__all__ = ["PACKED", "Checkpoint", "Opaque", "StorageInfo", "TensorInfo", "TensorRef"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the checkpoint, named by its dotted path from the root."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage: StorageInfo | None
    kind: str
    requires_grad: bool
    ref: TensorRef = field(repr=False, compare=False)

    @classmethod
    def of(cls, name: str, ref: TensorRef) -> TensorInfo:
        """The tensor ``ref`` named ``name``: ``TensorInfo(name, ref.dtype, ..., ref=ref)``
        without the frozen dataclass' setattr per field (a report makes one per tensor)."""
        self = object.__new__(cls)
        self.__dict__.update(
            name=name,
            dtype=ref.dtype,
            shape=ref.shape,
            stride=ref.stride,
            storage_offset=ref.storage_offset,
            storage=ref.storage,
            kind=ref.kind,
            requires_grad=ref.requires_grad,
            ref=ref,
        )
        return self

    @property
    def numel(self) -> int:
        return self.ref.numel

    @property
    def nbytes(self) -> int:
        return self.ref.nbytes

    @property
    def device(self) -> str:
        return self.storage.location if self.storage else ""


@dataclass
class Checkpoint:
    """What a reader found in a checkpoint file, without reading tensor bytes."""

    path: str
    format: str  # "zip", "legacy", "torchscript", "safetensors", "hf-sharded"
    file_bytes: int
    root: Any
    storages: dict[str, StorageInfo]
    globals: list[str]  # every global the pickle names, in order of first appearance
    facts: dict[str, Any] = field(default_factory=dict)  # format details worth reporting
    _tensors: list[TensorInfo] | None = field(default=None, repr=False)
    # the security verdict, computed once per file from every pickle it holds (open_checkpoint)
    verdict: Verdict | None = field(default=None, repr=False)

    def tensors(self) -> list[TensorInfo]:
        """Every tensor reachable from the root, named by its path (cached)."""
        if self._tensors is None:
            self._tensors = [TensorInfo.of(name, ref) for name, ref in iter_tensors(self.root)]
        return self._tensors

    def iter_storages(self) -> Iterator[StorageInfo]:
        return iter(self.storages.values())
