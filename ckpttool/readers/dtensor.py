"""DTensors in a rank's pickle, read as data: which box of the global tensor a local shard holds.

A pickled DTensor is ``torch._tensor._rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor,
(DTensor, dtype, global size, stride, ...), {"_local_tensor": ..., "_spec": DTensorSpec})``; the
spec holds the device mesh (its shape, and this rank's ``_coordinate_on_dim``) and the
placements. ``Shard(d)`` splits dim ``d`` in ``torch.chunk`` sizes (the last ranks' pieces
smaller or empty), ``Replicate()`` keeps it whole; ``Partial()`` and strided or reordered
shardings are refused. :mod:`.per_rank` merges the ranks' boxes into logical tensors.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Opaque, TensorRef
from .dcp_items import chunk_segments
from .distributed import LogicalTensor, Segment, check_segments, merge_segments

_DTENSOR = frozenset(
    {
        "torch.distributed.tensor.DTensor",
        "torch.distributed.tensor._api.DTensor",
        "torch.distributed._tensor.api.DTensor",
        "torch.distributed._tensor.DTensor",
    }
)
_PLACEMENTS = "torch.distributed.tensor.placement_types."
_OLD_PLACEMENTS = "torch.distributed._tensor.placement_types."
MAX_SEGMENTS = 1 << 20  # runs of a non-contiguous tensor before it is refused


# -- one DTensor ---------------------------------------------------------------------------------
def state_of(obj: Any) -> dict[str, Any]:
    state = obj.state if isinstance(obj, Opaque) else None
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return state if isinstance(state, dict) else {}


def is_dtensor(node: Any) -> bool:
    if not isinstance(node, Opaque) or node.global_name != "torch._tensor._rebuild_from_type_v2":
        return False
    args = node.args
    return len(args) == 4 and getattr(args[1], "__ck_global__", None) in _DTENSOR


class Shard:
    """What one rank's pickle says about one DTensor."""

    def __init__(self, node: Opaque, path: str, name: str) -> None:
        args = node.args
        wrapper = args[2] if isinstance(args[2], tuple) else ()
        state = args[3][1] if isinstance(args[3], tuple) and len(args[3]) == 2 else args[3]
        if not isinstance(state, dict):
            raise CheckpointError(path, f"DTensor {name!r} has no state")
        local, spec = state.get("_local_tensor"), state_of(state.get("_spec"))
        if not isinstance(local, TensorRef) or local.storage is None or not spec:
            raise CheckpointError(path, f"DTensor {name!r} has no local tensor or spec")
        self.local = local
        self.shape = _ints(wrapper[2] if len(wrapper) > 2 else None, path, name)
        self.dtype = getattr(wrapper[1], "name", None) if len(wrapper) > 1 else None
        mesh = state_of(spec.get("mesh"))
        self.coords = _ints(mesh.get("_coordinate_on_dim"), path, name)
        self.mesh = _mesh_shape(mesh, path, name)
        self.placements = [_placement(p, path, name) for p in spec.get("placements") or ()]
        if len(self.placements) != len(self.mesh) or len(self.coords) != len(self.mesh):
            raise CheckpointError(path, f"DTensor {name!r} has placements for another mesh")
        _check_order(spec, path, name)

    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of the local shard in the global tensor (torch.chunk sizes)."""
        offsets, sizes = [0] * len(self.shape), list(self.shape)
        for (kind, dim), n, c in zip(self.placements, self.mesh, self.coords, strict=True):
            if kind != "shard":
                continue
            full = sizes[dim]
            chunk = math.ceil(full / n) if n else full
            start = min(c * chunk, full)
            offsets[dim] += start
            sizes[dim] = max(0, min(full, start + chunk) - start)
        return tuple(offsets), tuple(sizes)


def _ints(value: Any, path: str, name: str) -> tuple[int, ...]:
    if isinstance(value, Opaque) and value.global_name == "torch.Size" and value.args:
        value = value.args[0]
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(path, f"DTensor {name!r} has no readable shape or mesh coordinate")
    return tuple(value)


def _mesh_shape(mesh: dict[str, Any], path: str, name: str) -> tuple[int, ...]:
    """The device mesh's shape: its ``mesh`` tensor's (torch < 2.10), else its layout's."""
    ranks = mesh.get("mesh")
    if isinstance(ranks, TensorRef):
        return ranks.shape
    axes = state_of(mesh.get("_layout")).get("axes")
    if isinstance(axes, tuple) and axes:
        out = []
        for axis in axes:
            shape = state_of(axis).get("shape")
            shape = (shape,) if isinstance(shape, int) else shape
            out.append(math.prod(_ints(shape, path, name)))
        return tuple(out)
    raise CheckpointError(path, f"DTensor {name!r}: its device mesh has no readable shape")


def _placement(p: Any, path: str, name: str) -> tuple[str, int]:
    kind = p.global_name if isinstance(p, Opaque) else repr(p)
    short = kind.removeprefix(_PLACEMENTS).removeprefix(_OLD_PLACEMENTS)
    if short == "Shard":
        dim = state_of(p).get("dim")
        if not isinstance(dim, int) or dim < 0:
            raise CheckpointError(path, f"DTensor {name!r} has a Shard without a dimension")
        return "shard", dim
    if short == "Replicate":
        return "replicate", 0
    if short == "Partial":
        raise CheckpointError(
            path,
            f"DTensor {name!r} is Partial (each rank holds a part of a sum not yet reduced): "
            "merging it needs that reduction, which ckpttool does not do",
        )
    raise CheckpointError(
        path, f"DTensor {name!r} has placement {short}, which ckpttool does not merge"
    )


def _check_order(spec: dict[str, Any], path: str, name: str) -> None:
    """Refuse a shard order other than the default (mesh dims in ascending order)."""
    if spec.get("use_strided_shard_as_shard_order"):
        raise CheckpointError(path, f"DTensor {name!r} uses strided sharding")
    for entry in spec.get("shard_order") or ():
        dims = entry.args[1] if isinstance(entry, Opaque) and len(entry.args) == 2 else None
        if not isinstance(dims, tuple) or list(dims) != sorted(dims):
            raise CheckpointError(path, f"DTensor {name!r} is sharded in a non-default order")


# -- segments ------------------------------------------------------------------------------------
def local_start(ref: TensorRef) -> int:
    storage = ref.storage
    assert storage is not None
    if storage.compressed or storage.big_endian:
        raise CheckpointError(storage.file, "holds a compressed or big-endian storage")
    return storage.offset + ref.storage_offset * ref.itemsize


def whole_crc(ref: TensorRef) -> int | None:
    storage = ref.storage
    whole = storage is not None and ref.storage_offset == 0 and ref.nbytes == storage.nbytes
    return storage.crc if whole and storage is not None else None


def view_segments(ref: TensorRef, name: str) -> list[Segment]:
    """A strided view's bytes in C order as segments of its file (contiguous runs joined)."""
    storage = ref.storage
    assert storage is not None
    start, item = local_start(ref), ref.itemsize
    if ref.is_contiguous():
        return [Segment(storage.file, start, ref.nbytes, 0, whole_crc(ref))] if ref.numel else []
    inner, run = len(ref.shape), 1  # the trailing dims that are contiguous
    while inner > 0 and (ref.shape[inner - 1] == 1 or ref.stride[inner - 1] == run):
        inner -= 1
        run *= ref.shape[inner]
    count = math.prod(ref.shape[:inner])
    if count > MAX_SEGMENTS or not ref.numel:
        raise CheckpointError(storage.file, f"tensor {name!r} is too scattered to merge")
    out = []
    for i, idx in enumerate(itertools.product(*(range(s) for s in ref.shape[:inner]))):
        src = start + sum(k * st for k, st in zip(idx, ref.stride, strict=False)) * item
        out.append(Segment(storage.file, src, run * item, i * run * item))
    return list(merge_segments(out))


def merge_dtensor(
    name: str, path: tuple[Any, ...], shards: list[Shard], files: list[str], group: str
) -> LogicalTensor:
    first = shards[0]
    dtype = first.dtype or first.local.dtype
    boxes: dict[tuple[Any, ...], tuple[int, Shard]] = {}
    for rank, s in enumerate(shards):
        if (s.shape, s.dtype or s.local.dtype) != (first.shape, dtype):
            raise CheckpointError(files[rank], f"DTensor {name!r} differs from rank 0's")
        offsets, sizes = s.box()
        if s.local.shape != sizes or s.local.dtype != dtype:
            raise CheckpointError(
                files[rank],
                f"the local shard of {name!r} is a {s.local.dtype} {list(s.local.shape)}, its "
                f"placement says {dtype} {list(sizes)}",
            )
        boxes.setdefault((offsets, sizes), (rank, s))  # a replicated box is read once
    segments: list[Segment] = []
    itemsize = dtypes.get(dtype).itemsize
    for (offsets, sizes), (rank, s) in boxes.items():
        if not math.prod(sizes):
            continue
        if not s.local.is_contiguous():
            raise CheckpointError(files[rank], f"the local shard of {name!r} is not contiguous")
        file = s.local.storage.file if s.local.storage else files[rank]
        segments += chunk_segments(
            first.shape, itemsize, offsets, sizes, file, local_start(s.local), whole_crc(s.local)
        )
    tensor = LogicalTensor(name, dtype, first.shape, merge_segments(segments), group, path)
    try:
        check_segments(os.path.dirname(files[0]), tensor)
    except CheckpointError:
        raise CheckpointError(
            os.path.dirname(files[0]),
            f"the ranks' shards of {name!r} overlap or leave gaps (a rank file missing?)",
        ) from None
    return tensor
