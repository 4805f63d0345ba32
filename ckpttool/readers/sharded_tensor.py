"""ShardedTensors in a rank's pickle, read as data: FSDP1's per-rank sharded state dicts.

Under FSDP1 with ``StateDictType.SHARDED_STATE_DICT`` each parameter (and each optimizer state
of ``FSDP.optim_state_dict``) is a ``torch.distributed._shard.sharded_tensor.ShardedTensor``.
``ShardedTensor.__getstate__`` pickles it as ``torch._tensor._rebuild_from_type_v2(
_rebuild_wrapper_subclass, ShardedTensor, (ShardedTensor, dtype, global size, ...), (local
shards, ShardedTensorMetadata, ShardedTensor.ProcessGroupState, sharding spec, init_rrefs))``:
each local ``Shard`` holds its tensor and a ``ShardMetadata`` (``shard_offsets``,
``shard_sizes``, ``placement`` ``rank:R/device``); the ``ShardedTensorMetadata`` lists every
rank's shards, the global size and the dtype. ``torch.load`` would run
``ShardedTensor.__setstate__``, which needs a process group of the saving world; ckpttool reads
the same fields as data and never runs it. Shards held by several ranks (replicas) are read
once; uneven shards (FSDP1 splits dim 0 in ``torch.chunk`` sizes, some ranks holding none) are
boxes like any other.

``LOCAL_STATE_DICT`` saves hold FSDP's flat parameters instead (``..._flat_param``, every
parameter of a wrapped module flattened and concatenated): which parameters they hold, their
shapes and the padding between them are not in the files, so they are refused.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Opaque, TensorRef
from .dcp_items import chunk_segments
from .distributed import LogicalTensor, Segment, check_segments, merge_segments
from .dtensor import local_start, state_of, whole_crc

_SHARDED_TENSOR = frozenset(
    {
        "torch.distributed._shard.sharded_tensor.api.ShardedTensor",
        "torch.distributed._shard.sharded_tensor.ShardedTensor",
    }
)
FLAT_PARAM = "_flat_param"  # FSDP1's FlatParameter in a LOCAL_STATE_DICT
Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in the global tensor


def is_sharded_tensor(node: Any) -> bool:
    if not isinstance(node, Opaque) or node.global_name != "torch._tensor._rebuild_from_type_v2":
        return False
    args = node.args
    return len(args) == 4 and getattr(args[1], "__ck_global__", None) in _SHARDED_TENSOR


class RankView:
    """What one rank's pickle says about one ShardedTensor: the global layout and its shards."""

    def __init__(self, node: Opaque, path: str, name: str) -> None:
        self.path, self.name = path, name
        state = node.args[3]
        if not isinstance(state, tuple) or len(state) != 5:
            raise self._error("has no (shards, metadata, process group, spec, rrefs) state")
        shards, meta, group = state[0], state_of(state[1]), state_of(state[2])
        if not isinstance(shards, list) or not meta:
            raise self._error("has no readable local shards or metadata")
        self.shape = self._ints(meta.get("size"), "size")
        props = meta.get("tensor_properties")  # its __getstate__: (dtype, layout, ...)
        props = props.state if isinstance(props, Opaque) else None
        dtype = getattr(props[0], "name", None) if isinstance(props, tuple) and props else None
        if dtype is None or dtype not in dtypes.DTYPES:
            raise self._error("has no readable dtype")
        self.dtype: str = dtype
        self.layout = [self._box(m) for m in meta.get("shards_metadata") or ()]
        self.rank = group.get("global_rank")
        self.world = group.get("global_world_size")
        self.local: list[tuple[Box, TensorRef]] = []
        for shard in shards:
            fields = state_of(shard)
            tensor = fields.get("tensor")
            if not isinstance(tensor, TensorRef) or tensor.storage is None:
                raise self._error("has a local shard without a tensor")
            self.local.append((self._box(fields.get("metadata")), tensor))

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(self.path, f"ShardedTensor {self.name!r} {what}")

    def _ints(self, value: Any, what: str) -> tuple[int, ...]:
        if isinstance(value, Opaque) and value.global_name == "torch.Size" and value.args:
            value = value.args[0]
        if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise self._error(f"has no readable {what}")
        return tuple(value)

    def _box(self, meta: Any) -> Box:
        fields = state_of(meta)
        offsets = self._ints(fields.get("shard_offsets"), "shard offsets")
        sizes = self._ints(fields.get("shard_sizes"), "shard sizes")
        if len(offsets) != len(self.shape) or len(sizes) != len(self.shape):
            raise self._error(
                f"has a shard of {len(sizes)} dimensions in a {len(self.shape)}-d one"
            )
        for o, s, full in zip(offsets, sizes, self.shape, strict=True):
            if o + s > full:
                raise self._error(f"has a shard at {list(offsets)} {list(sizes)} outside it")
        return offsets, sizes


def merge_sharded(
    name: str, path: tuple[Any, ...], nodes: list[Any], files: list[str], group: str
) -> LogicalTensor:
    """One logical tensor from every rank's ShardedTensor (each shard read from one rank)."""
    if path and str(path[-1]).rpartition(".")[2] == FLAT_PARAM:
        raise CheckpointError(
            os.path.dirname(files[0]),
            f"{name!r} is an FSDP flat parameter (a LOCAL_STATE_DICT save): the files do not "
            "say which parameters it holds, their shapes or its padding; save with "
            "StateDictType.SHARDED_STATE_DICT (or FULL_STATE_DICT) to merge the ranks",
        )
    views = [RankView(n, files[r], name) for r, n in enumerate(nodes)]
    first = views[0]
    held: dict[Box, TensorRef] = {}
    for rank, v in enumerate(views):
        _check_rank(v, first, rank, len(files))
        for box, tensor in v.local:
            if box not in first.layout:
                raise v._error(f"has a local shard at {list(box[0])} the metadata does not list")
            if tensor.shape != box[1] or tensor.dtype != first.dtype:
                raise v._error(
                    f"has a local shard that is a {tensor.dtype} {list(tensor.shape)}, its "
                    f"metadata says {first.dtype} {list(box[1])}"
                )
            if not tensor.is_contiguous():
                raise v._error("has a local shard that is not contiguous")
            held.setdefault(box, tensor)  # a replicated shard is read once
    segments: list[Segment] = []
    itemsize = dtypes.get(first.dtype).itemsize
    for box in first.layout:
        if not math.prod(box[1]):
            continue
        if box not in held:
            raise CheckpointError(
                os.path.dirname(files[0]),
                f"no rank's file holds the shard of {name!r} at {list(box[0])} (a rank missing?)",
            )
        tensor = held[box]
        file = tensor.storage.file if tensor.storage else files[0]  # (it has one: RankView)
        start, crc = local_start(tensor), whole_crc(tensor)
        segments += chunk_segments(first.shape, itemsize, box[0], box[1], file, start, crc)
    tensor_ = LogicalTensor(name, first.dtype, first.shape, merge_segments(segments), group, path)
    try:
        check_segments(os.path.dirname(files[0]), tensor_)
    except CheckpointError:
        raise CheckpointError(
            os.path.dirname(files[0]),
            f"the shards of ShardedTensor {name!r} overlap or leave gaps",
        ) from None
    return tensor_


def _check_rank(v: RankView, first: RankView, rank: int, world: int) -> None:
    if (v.shape, v.dtype, sorted(v.layout)) != (first.shape, first.dtype, sorted(first.layout)):
        raise v._error("has another global size, dtype or shard layout than rank 0's")
    if v.world not in (None, world) or v.rank not in (None, rank):
        raise v._error(
            f"was saved by rank {v.rank} of {v.world}, but this file is rank {rank} of {world}"
        )
