"""Per-rank saves of DTensor state dicts, merged: ``torch.save(model.state_dict())`` in every rank.

Under FSDP2 (and tensor parallelism) each rank's state dict holds DTensors: a local shard, the
device mesh and placements. verl writes them as ``model_world_size_W_rank_R.pt`` (with
``optim_...`` and ``extra_state_...`` beside them), others as ``..._rank_R.pt``. A folder of such
files is read as one checkpoint: every file's pickle is read as data (never imported), each
DTensor's global shape, placements, mesh size and this rank's mesh coordinate give the box of
the global tensor its local shard holds (``Shard(d)`` splits dim ``d`` in ``torch.chunk``
sizes, the last ranks' pieces smaller or empty; ``Replicate()`` boxes are read once), and the
boxes become byte segments of the rank files. ``Partial()`` (a sum still pending) and strided
or reordered shardings are refused. Tensors that are not DTensors (FSDP2's buffers, 0-d step
counters) and other values are taken from rank 0. Nothing reads tensor bytes.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import CheckpointError
from ..model import Checkpoint, Opaque, StorageInfo, TensorRef
from .distributed import (
    DistributedCheckpoint,
    LogicalTensor,
    check_segments,
    merge_segments,
    tensor_ref,
)
from .dtensor import Shard, is_dtensor, merge_dtensor, view_segments
from .sharded_tensor import is_sharded_tensor, merge_sharded

_RANK_FILE = re.compile(
    r"(?P<stem>.*?)(?:world_size_(?P<world>\d+)_)?rank[_-]?(?P<rank>\d+)(?P<ext>\.(?:pt|pth|bin))"
)
_OPTIMIZER = frozenset({"optim", "optimizer", "optimizers", "optim_state", "optimizer_state"})


def rank_sets(folder: str) -> dict[str, list[str]]:
    """{set name: its files by rank} for every complete set of per-rank files in ``folder``
    (``model_world_size_2_rank_0.pt`` + ``..._rank_1.pt`` -> ``{"model": [...]}``)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    groups: dict[tuple[str, str | None, str], dict[int, str]] = {}
    for name in names:
        m = _RANK_FILE.fullmatch(name)
        if m and os.path.isfile(os.path.join(folder, name)):
            key = (m["stem"], m["world"], m["ext"])
            groups.setdefault(key, {})[int(m["rank"])] = os.path.join(folder, name)
    out: dict[str, list[str]] = {}
    for (stem, world, _ext), ranks in groups.items():
        n = len(ranks)
        if n < 2 or sorted(ranks) != list(range(n)) or (world is not None and int(world) != n):
            continue
        label = stem.rstrip("_-.") or "model"
        if label in out:  # the same stem with another suffix or world size: ambiguous
            return {}
        out[label] = [ranks[r] for r in range(n)]
    return out


def is_per_rank_folder(path: str) -> bool:
    return os.path.isdir(path) and bool(rank_sets(path))


def incomplete(folder: str) -> str | None:
    """Why a folder's per-rank files make no complete set (a rank missing), or None."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    found: dict[tuple[str, str | None], dict[int, re.Match[str]]] = {}
    for name in names:
        m = _RANK_FILE.fullmatch(name)
        if m:
            found.setdefault((m["stem"], m["world"]), {})[int(m["rank"])] = m
    for (_stem, world), ranks in found.items():
        n = int(world) if world is not None else max(ranks) + 1
        missing = sorted(set(range(n)) - set(ranks))
        if missing:
            m = next(iter(ranks.values()))
            name = m.string[: m.start("rank")] + str(missing[0]) + m.string[m.end("rank") :]
            return f"holds per-rank files of {n} ranks, but rank {missing[0]} ({name}) is missing"
    return None


# -- the whole folder ----------------------------------------------------------------------------
def _group(path: tuple[Any, ...], several: bool) -> str:
    top = str(path[0]) if path else ""
    if top in _OPTIMIZER:
        return "optimizer"
    if not several or top in ("model", "module", "state_dict", "model_state_dict"):
        return "model"
    return "other"


class _Merger:
    """Walks the ranks' trees side by side; DTensors and tensors become logical tensors."""

    def __init__(self, folder: str, files: list[str], several: bool) -> None:
        self.folder, self.files, self.several = folder, files, several
        self.tensors: list[LogicalTensor] = []
        self.refs: list[TensorRef] = []
        self.memo: dict[int, Any] = {}  # a DTensor reached twice (tied weights) is one tensor

    def go(self, nodes: list[Any], path: tuple[Any, ...]) -> Any:
        first = nodes[0]
        if id(first) in self.memo:
            return self.memo[id(first)]
        name = ".".join(str(p) for p in path)
        if is_dtensor(first) or is_sharded_tensor(first) or isinstance(first, TensorRef):
            ref = self._tensor(nodes, path, name)
            self.memo[id(first)] = ref
            return ref
        if isinstance(first, dict) and not isinstance(first, Opaque):
            keys = list(first)
            self._same(nodes, lambda n: isinstance(n, dict) and list(n) == keys, name)
            out: dict[Any, Any] = type(first)() if type(first) is not dict else {}
            for k in keys:
                out[k] = self.go([n[k] for n in nodes], (*path, k))
            return out
        if isinstance(first, (list, tuple)):
            self._same(nodes, lambda n: type(n) is type(first) and len(n) == len(first), name)
            items = [self.go([n[i] for n in nodes], (*path, i)) for i in range(len(first))]
            return items if isinstance(first, list) else tuple(items)
        return first  # a value: rank 0's

    def _same(self, nodes: list[Any], same: Any, name: str) -> None:
        for rank, n in enumerate(nodes[1:], 1):
            if not same(n):
                raise CheckpointError(
                    self.files[rank],
                    f"holds another structure than rank 0 at {name or 'the root'!r}",
                )

    def _tensor(self, nodes: list[Any], path: tuple[Any, ...], name: str) -> TensorRef:
        group = _group(path, self.several)
        first = nodes[0]
        if is_dtensor(first):
            self._same(nodes, is_dtensor, name)
            shards = [Shard(n, self.files[r], name) for r, n in enumerate(nodes)]
            tensor = merge_dtensor(name, path, shards, self.files, group)
        elif is_sharded_tensor(first):
            self._same(nodes, is_sharded_tensor, name)
            tensor = merge_sharded(name, path, nodes, self.files, group)
        else:
            kind = (first.dtype, first.shape)
            self._same(
                nodes, lambda n: isinstance(n, TensorRef) and (n.dtype, n.shape) == kind, name
            )
            if first.storage is None:
                raise CheckpointError(self.files[0], f"tensor {name!r} has no storage")
            segs = merge_segments(view_segments(first, name))
            tensor = LogicalTensor(name, first.dtype, first.shape, segs, group, path)
            check_segments(self.folder, tensor)
        ref = tensor_ref(tensor, self.folder)
        self.tensors.append(tensor)
        self.refs.append(ref)
        return ref


def read(folder: str, seen: dict[str, str] | None = None) -> Checkpoint:
    """Read a folder of per-rank saves as one checkpoint whose tensors are logical tensors.

    Returns:
        A :class:`Checkpoint` of format ``"per-rank"``: one set of files gives its merged object,
        several (``model_...``, ``optim_...``) a dict of them by name; the
        :class:`DistributedCheckpoint` is in ``facts["distributed"]``.
    """
    from . import open_checkpoint

    seen = {} if seen is None else seen
    sets = rank_sets(folder)
    if not sets:
        raise CheckpointError(folder, "holds no complete set of per-rank files")
    several = len(sets) > 1
    merged: dict[str, Any] = {}
    tensors: list[LogicalTensor] = []
    refs: list[TensorRef] = []
    files: list[tuple[str, int]] = []
    for label, paths in sets.items():
        roots = []
        for p in paths:
            ckpt = open_checkpoint(p, _allow_index=False, _judge=False)
            for g in ckpt.globals:
                seen.setdefault(g, "")
            roots.append(ckpt.root)
            files.append((p, os.path.getsize(p)))
        merger = _Merger(folder, paths, several)
        merged[label] = merger.go(roots, (label,) if several else ())
        tensors += merger.tensors
        refs += merger.refs
    root = merged if several else next(iter(merged.values()))
    world = max(len(p) for p in sets.values())
    dc = DistributedCheckpoint(
        folder, "per-rank", world, sorted(files), tensors, {}, {"sets": list(sets)}
    )
    storages: dict[str, StorageInfo] = {r.storage.key: r.storage for r in refs if r.storage}
    facts = {"distributed": dc, "kind": "per-rank", "world_size": world, "files": len(files)}
    return Checkpoint(folder, "per-rank", dc.total_bytes, root, storages, list(seen), facts)
