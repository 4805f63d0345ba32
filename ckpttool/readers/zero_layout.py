"""Where each ZeRO param lies in the flat fp32 groups of a DeepSpeed save, as byte ranges.

Pure layout arithmetic on :class:`~ckpttool.model.TensorRef` records (no file is read here);
``readers/deepspeed.py`` finds the records and names the results.
ZeRO-1/2: a param group's per-rank partitions laid end to end hold its params one after the
other in ``param_shapes`` order, each followed by its alignment padding; the group may end with
up to ``2 * world`` padding. ZeRO-3: every rank holds ``ceil(numel / world)`` elements of each
param at the same offset of its (sub-)groups laid end to end; the last ranks' pieces are padded.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any

from ..errors import CheckpointError
from ..model import Opaque, TensorRef
from .distributed import Segment, merge_segments


def shape_of(shape: Any, what: str, path: str) -> tuple[tuple[int, ...], int]:
    if isinstance(shape, Opaque) and shape.global_name == "torch.Size":
        shape = shape.args[0] if shape.args else ()
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise CheckpointError(path, f"the shape of {what!r} is not a tuple of sizes")
    return tuple(shape), math.prod(shape)


def flat_tensor(ref: Any, what: str, path: str, dtype: str | None = "float32") -> TensorRef:
    """A tensor whose elements lie contiguously in a plain little-endian storage record."""
    if not isinstance(ref, TensorRef) or ref.storage is None:
        raise CheckpointError(path, f"{what} is not a tensor")
    if dtype is not None and ref.dtype != dtype:
        raise CheckpointError(path, f"{what} is {ref.dtype}, expected {dtype}")
    if not ref.is_contiguous() or ref.storage.compressed or ref.storage.big_endian:
        raise CheckpointError(path, f"{what} is not stored as contiguous little-endian bytes")
    return ref


def piece(ref: TensorRef, start: int, count: int, dest: int) -> Segment:
    """Elements [start, start + count) of a flat tensor, placed at element ``dest``."""
    storage = ref.storage
    assert storage is not None
    size = ref.itemsize
    first = ref.storage_offset + start
    whole = first == 0 and count * size == storage.nbytes
    return Segment(
        storage.file,
        storage.offset + first * size,
        count * size,
        dest * size,
        storage.crc if whole else None,
    )


class FlatGroups:
    """Each rank's flat fp32 tensors (one per group), seen as one vector per rank or per group."""

    def __init__(
        self, per_rank: list[list[TensorRef]], sizes: list[list[int]] | None = None
    ) -> None:
        self.per_rank = per_rank
        # how many elements of each tensor count (an optimizer moment may carry padding)
        self.sizes = sizes or [[ref.numel for ref in groups] for groups in per_rank]
        self._starts: dict[tuple[str, int], list[int]] = {}

    def pieces(self, rank: int, start: int, count: int, dest: int) -> list[Segment]:
        """Elements [start, start+count) of ``rank``'s groups laid end to end (ZeRO-3)."""
        return self._span(("rank", rank), self.per_rank[rank], self.sizes[rank], start, count, dest)

    def across(self, group: int, start: int, count: int) -> list[Segment]:
        """Elements [start, start+count) of ``group``'s partitions laid end to end (ZeRO-1/2)."""
        refs = [groups[group] for groups in self.per_rank]
        sizes = [s[group] for s in self.sizes]
        return self._span(("group", group), refs, sizes, start, count, 0)

    def _span(
        self, key: tuple[str, int], refs: list[TensorRef], sizes: list[int], start: int,
        count: int, dest: int,
    ) -> list[Segment]:
        starts = self._starts.get(key)
        if starts is None:
            starts = self._starts[key] = [0, *itertools.accumulate(sizes)]
        out: list[Segment] = []
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(refs) and starts[i] < start + count:
            lo, hi = max(start, starts[i]), min(start + count, starts[i + 1])
            if lo < hi:
                out.append(piece(refs[i], lo - starts[i], hi - lo, dest + lo - start))
            i += 1
        return out


Place = tuple[tuple[int, ...], int, int]  # a param's shape, its group (ZeRO-1/2), first element


def param_layout(
    stage: int, shapes: list[Any], sizes: list[list[int]], paddings: Any, world: int, path: str
) -> dict[str, Place]:
    """Where each trainable param lies in the flat fp32 groups, in ``param_shapes`` order.

    ZeRO-1/2: a group's partitions laid end to end hold its params one after the other, each
    followed by its alignment padding; the group may end with up to ``2 * world`` padding.
    ZeRO-3: every rank holds ``ceil(numel / world)`` elements of each param at the same offset
    of its groups laid end to end; the last ranks' pieces are padded.
    """
    out: dict[str, Place] = {}
    align = 2 * world
    offset = 0
    for g, group_shapes in enumerate(shapes):
        if not isinstance(group_shapes, dict):
            raise CheckpointError(path, "param_shapes is not a list of name-to-shape maps")
        pads = None
        if stage <= 2 and isinstance(paddings, list) and g < len(paddings):
            pads = paddings[g]
        if pads is not None and (
            not isinstance(pads, list)
            or len(pads) != len(group_shapes)
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pads)
        ):
            raise CheckpointError(path, f"param group {g} lists the wrong number of paddings")
        if stage <= 2:
            offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            dims, numel = shape_of(shape, name, path)
            out[str(name)] = (dims, g if stage <= 2 else 0, offset)
            if stage <= 2:
                offset += numel + (int(pads[i]) if pads is not None else 0)
            else:
                offset += math.ceil(numel / world)
        if stage <= 2:
            if g >= len(sizes[0]):
                raise CheckpointError(path, f"param group {g} has no fp32 partition")
            avail = sum(rank_sizes[g] for rank_sizes in sizes)
            if offset > avail or math.ceil(offset / align) != math.ceil(avail / align):
                raise CheckpointError(
                    path, f"param group {g} needs {offset:,} elements, the ranks hold {avail:,}"
                )
    if stage == 3 and offset != sum(sizes[0]):
        raise CheckpointError(
            path, f"the params need {offset:,} elements per rank, the ranks hold {sum(sizes[0]):,}"
        )
    return out


def assemble(stage: int, flat: FlatGroups, world: int, place: Place) -> tuple[Segment, ...]:
    dims, group, start = place
    numel = math.prod(dims)
    if stage <= 2:
        return merge_segments(flat.across(group, start, numel))
    part = math.ceil(numel / world)
    segments: list[Segment] = []
    for rank in range(world):
        count = min(part, numel - rank * part)
        if count > 0:
            segments += flat.pieces(rank, start, count, rank * part)
    return merge_segments(segments)


def group_at(stage: int, sizes: list[int], place: Place) -> int:
    if stage <= 2:
        return place[1]
    base = 0
    for g, size in enumerate(sizes):
        if place[2] < base + size:
            return g
        base += size
    return len(sizes) - 1


Moment = tuple[str, str, str, tuple[int, ...], tuple[Segment, ...]]


def moments(
    per_rank: list[list[dict[str, Any]]],
    paths: list[str],
    stage: int,
    world: int,
    layout: dict[str, Place],
    sizes: list[list[int]],
) -> list[Moment]:
    """(param, state key, dtype, shape, segments) of the optimizer's per-param state.

    ``per_rank[r][g]`` is rank ``r``'s optimizer state of flat group ``g`` (``exp_avg``...):
    flat tensors laid out as the fp32 groups (``sizes``; the last rank's may carry padding),
    or 0-dim ``step`` tensors, one per group, taken from rank 0.
    """
    if not any(any(groups) for groups in per_rank):  # saved before the optimizer's first step
        return []
    for rank, groups in enumerate(per_rank):
        if len(groups) != len(sizes[rank]):
            raise CheckpointError(
                paths[rank],
                f"holds optimizer state for {len(groups)} groups, fp32 weights for "
                f"{len(sizes[rank])}",
            )
    out: list[Moment] = []
    for key, value in per_rank[0][0].items():
        if not isinstance(value, TensorRef):
            continue
        scalar = value.shape == ()
        refs = []
        for rank, groups in enumerate(per_rank):
            what = f"optimizer state {key!r}"
            refs.append([flat_tensor(g.get(key), what, paths[rank], value.dtype) for g in groups])
            if not scalar and any(r.numel < n for r, n in zip(refs[-1], sizes[rank], strict=True)):
                raise CheckpointError(paths[rank], f"optimizer state {key!r} is short")
        flat = FlatGroups(refs, sizes)
        for name, place in layout.items():
            if scalar:  # one per group, the same on every rank
                ref = refs[0][group_at(stage, sizes[0], place)]
                out.append((name, str(key), ref.dtype, (), (piece(ref, 0, 1, 0),)))
            else:
                segs = assemble(stage, flat, world, place)
                out.append((name, str(key), value.dtype, place[0], segs))
    return out


def zero_stage(osd: dict[str, Any], path: str) -> int:
    value = osd.get("zero_stage")
    if isinstance(value, Opaque) and value.args:  # ZeroStageEnum(2), pickled by value
        value = value.args[0]
    if not isinstance(value, int) or isinstance(value, bool) or value not in (1, 2, 3):
        raise CheckpointError(path, f"has an unknown ZeRO stage ({value!r})")
    return value


def world_size(osd: dict[str, Any], path: str) -> int:
    count = osd.get("partition_count")
    if isinstance(count, list) and count:  # ZeRO-1/2: one per param group (experts may differ)
        count = max(count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise CheckpointError(path, "has no partition count")
    return count


def group_states(osd: dict[str, Any], stage: int) -> list[dict[str, Any]]:
    """The base optimizer's state per flat group (``exp_avg``...) in an optimizer states dict."""
    base = osd.get("base_optimizer_state" if stage <= 2 else "optimizer_state_dict")
    if isinstance(base, list):  # ZeRO-1/2 elastic checkpoints: one dict per group
        return [s if isinstance(s, dict) else {} for s in base]
    state = base.get("state") if isinstance(base, dict) else None
    if not isinstance(state, dict):
        return []
    found = sorted((k, s) for k, s in state.items() if isinstance(k, int) and isinstance(s, dict))
    return [s for _, s in found]


def named_groups(groups: list[Any], shapes: Any) -> list[Any]:
    """The base optimizer's param groups with ``params`` naming the parameters, as torch's
    ``get_optimizer_state_dict`` names them: DeepSpeed numbers its flat groups (ZeRO-3: several
    sub-groups per param group), and ``param_shapes[i]`` lists flat group ``i``'s parameters.
    Groups whose numbers do not fit ``param_shapes`` keep their numbers."""
    if not isinstance(shapes, list) or not all(isinstance(d, dict) for d in shapes):
        return groups
    out = []
    for group in groups:
        ids = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)) or any(
            not 0 <= i < len(shapes) for i in ids
        ):
            return groups
        out.append({**group, "params": [str(n) for i in ids for n in shapes[i]]})
    return out
